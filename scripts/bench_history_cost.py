"""History's cost at text-to-image resolutions: counted FLOPs of one S-step sample, ARD against the baseline (N = 0),
for the PixArt-XL/2 architecture at 256 / 512 / 1024 px, per history mask and depth, and CPU wall time at reduced
depth. Prints JSON.

    python scripts/bench_history_cost.py [--steps 4] [--blocks 1 2 6] [--text-tokens 120] [--wall-depth 1]

Counted by torch's FlopCounterMode on the meta device (no weights, no compute): the whole sample (image
self-attention with history, text cross-attention, MLPs, heads) at batch 1, against the analytic extra
multiply-adds of block-causal history, N * 2 * L^2 * D * S(S-1) / 2 (scores and values of the S(S-1)/2 earlier-step
blocks). Latent sides: 256 px -> 32, 512 -> 64, 1024 -> 128 (VAE /8), patch 2: L = 256, 1024, 4096 image tokens;
text: `--text-tokens` T5 tokens (PixArt-alpha: 120). The cheaper settings are the masks that see fewer earlier
steps (window 1: the previous step only; noise_and_current: x_T only) and shallower history (N).

Wall time (`--wall-depth` D > 0): the same architecture cut to D blocks (PixArt-XL/2's width, heads and text
path; random weights, fp32, batch 1, one thread), history in all D blocks, one S-step sample with the KV cache,
the median of `--wall-reps` timings per setting, the settings interleaved so that a busy machine slows them alike.
The cut model's wall-time overhead over its counted FLOPs overhead is the price of a history FLOP against a
baseline FLOP on this CPU; `extrapolated_percent` applies it to the full model's counted overhead for each N.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

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


def sample_seconds(student, noise: torch.Tensor, condition: TextCondition, timesteps: torch.Tensor) -> float:
    """Wall seconds of one sample of `student` (real weights, CPU)."""
    with torch.no_grad():
        start = time.perf_counter()
        sample(student, noise, condition, timesteps)
        return time.perf_counter() - start


def wall_rows(depth: int, steps: int, text_tokens: int, reps: int, full: list[dict]) -> list[dict]:
    """Per resolution and mask: the wall-time and counted-FLOPs overhead of history in all `depth` blocks of the
    cut model, and the full model's counted overhead (the rows `full`) scaled by their ratio, for each N there."""
    rows = []
    timesteps = torch.tensor(ddim_grid(24)[:: 24 // steps])
    for px, side in RESOLUTIONS.items():
        teacher = PixArt().build("PixArt-XL/2-512", sample_size=side, num_layers=depth).eval()
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(1, teacher.config.in_channels, side, side, generator=generator)  # (1, C, h, w)
        condition = TextCondition(torch.randn(1, text_tokens, teacher.config.caption_channels, generator=generator),
                                  torch.ones(1, text_tokens, dtype=torch.bool))
        settings = [(0, "block_causal", 1)] + [(depth, mask, window) for mask, window in MASKS]
        students = {(blocks, mask, window): ARDStudent(teacher, steps, history_blocks=blocks, mask=mask,
                                                       window=window).eval() for blocks, mask, window in settings}
        timings = {setting: [] for setting in settings}
        sample_seconds(students[settings[0]], noise, condition, timesteps)  # warm-up
        for _ in range(reps):
            for setting in settings:
                timings[setting].append(sample_seconds(students[setting], noise, condition, timesteps))
        base = statistics.median(timings[settings[0]])
        with torch.device("meta"):
            cut = PixArt().build("PixArt-XL/2-512", sample_size=side, num_layers=depth)
        base_flops = sample_flops(cut, steps, 0, "block_causal", 1, text_tokens)
        for setting in settings[1:]:
            seconds = statistics.median(timings[setting])
            wall = seconds / base - 1  # the history's extra time over the cut model's baseline
            flops = sample_flops(cut, steps, *setting, text_tokens) / base_flops - 1
            counted = {r["history_blocks"]: r["overhead_percent"] for r in full
                       if (r["px"], r["mask"], r["window"]) == (px, *setting[1:])}
            rows.append(dict(px=px, depth=depth, mask=setting[1], window=setting[2], reps=reps,
                             baseline_seconds=base, history_seconds=seconds, wall_overhead_percent=100 * wall,
                             flops_overhead_percent=100 * flops, wall_per_flops=wall / flops,
                             extrapolated_percent={n: o * wall / flops for n, o in counted.items()}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 6])
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--wall-depth", type=int, default=0, help="blocks of the cut model timed on CPU (0: none)")
    parser.add_argument("--wall-reps", type=int, default=3, help="timings per setting (their median is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
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
    wall = (wall_rows(args.wall_depth, args.steps, args.text_tokens, args.wall_reps, rows)
            if args.wall_depth else [])
    print(json.dumps({"model": "PixArt-XL/2 (28 blocks, width 1152)", "steps": args.steps,
                      "text_tokens": args.text_tokens, "batch": 1, "rows": rows, "wall_time": wall}, indent=1))


if __name__ == "__main__":
    main()
