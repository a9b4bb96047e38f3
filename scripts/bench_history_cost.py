"""History's cost at text-to-image resolutions: counted FLOPs of one S-step sample, ARD against the baseline (N = 0),
for the PixArt-XL/2 architecture at 256 / 512 / 1024 px or SD3-medium's at 512 / 1024 px, per history mask and
depth, and CPU wall time at reduced depth. Prints JSON.

    python scripts/bench_history_cost.py [--family pixart|sd3] [--steps 4] [--blocks 1 2 6] [--text-tokens 120]
                                         [--wall-depth 1]

Counted by torch's FlopCounterMode on the meta device (no weights, no compute): the whole sample (attention with
history, PixArt's text cross-attention or SD3's text stream, MLPs, heads) at batch 1, against the analytic extra
multiply-adds of history, N * 2 * Lq * L * D per earlier step a query step sees (block-causal: S(S-1)/2 of them;
scores and values), Lq = L for PixArt's image self-attention and L + T for SD3's joint attention, whose text
queries see the earlier steps' image keys too. Latent sides: 256 px -> 32, 512 -> 64, 1024 -> 128 (VAE /8), patch
2: L = 256, 1024, 4096 image tokens; text: `--text-tokens` tokens (default: PixArt-alpha's 120 T5 tokens; SD3's
77 CLIP + 256 T5 = 333). The cheaper settings are the masks that see fewer earlier steps (window 1: the previous
step only; noise_and_current: x_T only) and shallower history (N).

Wall time (`--wall-depth` D > 0): the same architecture cut to D blocks (its width, heads and text path; random
weights, fp32, batch 1, one thread), history in all D blocks, one S-step sample with the KV cache,
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

from ard.backbones import backbone_of
from ard.backbones.pixart import PixArt
from ard.backbones.sd3 import SD3
from ard.backbones.text import TextCondition
from ard.diffusion import ddim_grid
from ard.student import ARDStudent, sample
from ard.student.attention import visible_steps

MASKS = [("block_causal", 1), ("window", 1), ("noise_and_current", 1)]
# Per family: the architecture (a named size, its latent side set per resolution), resolutions (px -> latent
# side), the default history depths and text tokens.
FAMILIES = {
    "pixart": dict(adapter=PixArt(), size="PixArt-XL/2-512", model="PixArt-XL/2 (28 blocks, width 1152)",
                   resolutions={256: 32, 512: 64, 1024: 128}, blocks=[1, 2, 6], text_tokens=120),
    "sd3": dict(adapter=SD3(), size="SD3-medium-512", model="SD3-medium (24 blocks, width 1536)",
                resolutions={512: 64, 1024: 128}, blocks=[1, 2, 5], text_tokens=333),
}


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def prompt(teacher, text_tokens: int, device: str | None = None, generator: torch.Generator | None = None
           ) -> TextCondition:
    """One random encoded prompt of `text_tokens` valid tokens as `teacher` reads it (PixArt's caption_channels or
    SD3's joint_attention_dim wide; SD3's with its pooled embedding)."""
    width, pooled = backbone_of(teacher).text_dims(teacher)
    return TextCondition(torch.randn(1, text_tokens, width, device=device, generator=generator),
                         torch.ones(1, text_tokens, dtype=torch.bool, device=device),
                         pooled=None if pooled is None else torch.randn(1, pooled, device=device, generator=generator))


def sample_flops(teacher, steps: int, blocks: int, mask: str, window: int, text_tokens: int) -> int:
    """FLOPs of one `steps`-step sample of a student with history in `blocks` blocks (0: the baseline)."""
    student = ARDStudent(teacher, steps, history_blocks=blocks, mask=mask, window=window)
    noise = torch.randn(1, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size,
                        device="meta")
    condition = prompt(teacher, text_tokens, device="meta")
    grid = ddim_grid(24)
    timesteps = torch.tensor(grid[:: 24 // steps], device="meta")
    return count(lambda: sample(student, noise, condition, timesteps))


def sample_seconds(student, noise: torch.Tensor, condition: TextCondition, timesteps: torch.Tensor) -> float:
    """Wall seconds of one sample of `student` (real weights, CPU)."""
    with torch.no_grad():
        start = time.perf_counter()
        sample(student, noise, condition, timesteps)
        return time.perf_counter() - start


def wall_rows(family: dict, depth: int, steps: int, text_tokens: int, reps: int, full: list[dict]) -> list[dict]:
    """Per resolution and mask: the wall-time and counted-FLOPs overhead of history in all `depth` blocks of the
    cut model, and the full model's counted overhead (the rows `full`) scaled by their ratio, for each N there."""
    rows = []
    timesteps = torch.tensor(ddim_grid(24)[:: 24 // steps])
    for px, side in family["resolutions"].items():
        teacher = family["adapter"].build(family["size"], sample_size=side, num_layers=depth).eval()
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(1, teacher.config.in_channels, side, side, generator=generator)  # (1, C, h, w)
        condition = prompt(teacher, text_tokens, generator=generator)
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
            cut = family["adapter"].build(family["size"], sample_size=side, num_layers=depth)
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
    parser.add_argument("--family", choices=sorted(FAMILIES), default="pixart")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", help="history depths N (default: the family's)")
    parser.add_argument("--text-tokens", type=int, help="text tokens of the prompt (default: the family's)")
    parser.add_argument("--wall-depth", type=int, default=0, help="blocks of the cut model timed on CPU (0: none)")
    parser.add_argument("--wall-reps", type=int, default=3, help="timings per setting (their median is kept)")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    text_tokens = args.text_tokens or family["text_tokens"]
    torch.set_num_threads(1)
    rows = []
    for px, side in family["resolutions"].items():
        with torch.device("meta"):
            teacher = family["adapter"].build(family["size"], sample_size=side)
        tokens = (side // 2) ** 2
        queries = tokens + (text_tokens if backbone_of(teacher).history_kind == "joint" else 0)  # a step's queries
        width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
        base = sample_flops(teacher, args.steps, 0, "block_causal", 1, text_tokens)
        for blocks in args.blocks or family["blocks"]:
            for mask, window in MASKS:
                extra = sample_flops(teacher, args.steps, blocks, mask, window, text_tokens) - base
                earlier = sum(len(visible_steps(mask, s, window)) - 1 for s in range(args.steps))
                analytic = blocks * 2 * queries * tokens * width * earlier  # multiply-adds of the extra keys
                rows.append(dict(px=px, image_tokens=tokens, history_blocks=blocks, mask=mask, window=window,
                                 baseline_tflops=base / 1e12, extra_tflops=extra / 1e12,
                                 overhead_percent=100 * extra / base, analytic_extra_tflops=2 * analytic / 1e12))
    wall = (wall_rows(family, args.wall_depth, args.steps, text_tokens, args.wall_reps, rows)
            if args.wall_depth else [])
    print(json.dumps({"model": family["model"], "steps": args.steps, "text_tokens": text_tokens, "batch": 1,
                      "rows": rows, "wall_time": wall}, indent=1))


if __name__ == "__main__":
    main()
