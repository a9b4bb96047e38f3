"""History's cost at text-to-image resolutions: counted FLOPs of one S-step sample, ARD against the baseline (N = 0),
for the PixArt-XL/2 architecture at 256 / 512 / 1024 px, per history mask and depth. Prints JSON.

    python scripts/bench_history_cost.py [--steps 4] [--blocks 1 2 6] [--text-tokens 120]

Counted by torch's FlopCounterMode on the meta device (no weights, no compute): the whole sample (image
self-attention with history, text cross-attention, MLPs, heads) at batch 1, against the analytic extra
multiply-adds of block-causal history, N * 2 * L^2 * D * S(S-1) / 2 (scores and values of the S(S-1)/2 earlier-step
blocks). Latent sides: 256 px -> 32, 512 -> 64, 1024 -> 128 (VAE /8), patch 2: L = 256, 1024, 4096 image tokens;
text: `--text-tokens` T5 tokens (PixArt-alpha: 120). The cheaper settings are the masks that see fewer earlier
steps (window 1: the previous step only; noise_and_current: x_T only) and shallower history (N).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from ard.backbones.pixart import PixArt
from ard.backbones.text import TextCondition
from ard.diffusion import ddim_grid
from ard.student import ARDStudent, sample
from ard.student.attention import visible_steps

RESOLUTIONS = {256: 32, 512: 64, 1024: 128}  # px -> latent side
MASKS = [("block_causal", 1), ("window", 1), ("noise_and_current", 1)]


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sample_flops(teacher, steps: int, blocks: int, mask: str, window: int, text_tokens: int) -> int:
    """FLOPs of one `steps`-step sample of a student with history in `blocks` blocks (0: the baseline)."""
    student = ARDStudent(teacher, steps, history_blocks=blocks, mask=mask, window=window)
    noise = torch.randn(1, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size,
                        device="meta")
    condition = TextCondition(torch.randn(1, text_tokens, teacher.config.caption_channels, device="meta"),
                              torch.ones(1, text_tokens, dtype=torch.bool, device="meta"))
    grid = ddim_grid(24)
    timesteps = torch.tensor(grid[:: 24 // steps], device="meta")
    return count(lambda: sample(student, noise, condition, timesteps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 6])
    parser.add_argument("--text-tokens", type=int, default=120)
    args = parser.parse_args()
    rows = []
    for px, side in RESOLUTIONS.items():
        with torch.device("meta"):
            teacher = PixArt().build("PixArt-XL/2-512", sample_size=side)
        tokens = (side // 2) ** 2
        width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        base = sample_flops(teacher, args.steps, 0, "block_causal", 1, args.text_tokens)
        for blocks in args.blocks:
            for mask, window in MASKS:
                extra = sample_flops(teacher, args.steps, blocks, mask, window, args.text_tokens) - base
                earlier = sum(len(visible_steps(mask, s, window)) - 1 for s in range(args.steps))
                analytic = blocks * 2 * tokens ** 2 * width * earlier  # multiply-adds of the extra keys
                rows.append(dict(px=px, image_tokens=tokens, history_blocks=blocks, mask=mask, window=window,
                                 baseline_tflops=base / 1e12, extra_tflops=extra / 1e12,
                                 overhead_percent=100 * extra / base, analytic_extra_tflops=2 * analytic / 1e12))
    print(json.dumps({"model": "PixArt-XL/2 (28 blocks, width 1152)", "steps": args.steps,
                      "text_tokens": args.text_tokens, "batch": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
