"""Cost of ARD's history attention: FLOPs (DiT-XL/2, meta device) and CPU wall times; prints JSON.

    .venv/bin/python scripts/bench_student.py [--threads 1] [--repeats 5] [--sizes digits DiT-B/2]

Sections (targets: the paper's cost of history, +1.1% FLOPs and +2.4% latency over the baseline; docs/method.md,
"Numbers to beat"):
- flops: one 4-step sample of ARD (N = 6) against the baseline (N = 0), DiT-XL/2, counted by
  torch's FlopCounterMode on the meta device, against the analytic N * L^2 * D * S(S-1) MACs;
  also one teacher-forced training forward (plain and closed history start).
- training_attention: how the one-pass (training) history attention is computed, measured on one
  block: one call per query step over its visible keys only against one call over all S*L keys with
  the block-causal mask (ard.student.attention picks by tokens per step), FlexAttention where it runs.
- inference: wall time of a 4-step sample, ARD against baseline, same weights, per size and batch.
- training: wall time of one forward + backward of the per-step loss, ARD against baseline.
- teacher_vs_student: wall time per sample of the 25-step guided DDIM teacher against the 4-step student.
Timings: torch.set_num_threads(--threads), one warm-up round, ARD and baseline interleaved, medians of
wall and of process CPU time over up to --repeats rounds (about a minute per configuration at most);
ratios use CPU time (this machine's 2 cores are shared: wall time depends on other jobs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ard.diffusion import ddim_grid, ddim_sample
from ard.student import ARDStudent, StepMSELoss, sample
from ard.student.attention import ONE_MASK_BELOW_TOKENS, HistoryAttnProcessor
from ard.backbones.dit import build_dit

STEPS = 4
HISTORY_BLOCKS = 6  # N, the paper's setting (6 of 28 blocks for DiT-XL/2)


def boundaries(batch: int, steps: int = STEPS) -> torch.Tensor:
    """Student boundaries on the K = 24 leading teacher grid (every 24/S-th state), (B, S+1)."""
    grid = ddim_grid(24)
    return torch.tensor(grid[:: 24 // steps]).expand(batch, -1)


def inputs(model, batch: int, device="cpu"):
    c, side = model.config.in_channels, model.config.sample_size
    return (torch.randn(batch, c, side, side, device=device), torch.zeros(batch, dtype=torch.long, device=device))


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_flops() -> dict:
    with torch.device("meta"):
        teacher = build_dit("DiT-XL/2")
    base = ARDStudent(teacher, STEPS, history_blocks=0)
    ard = {start: ARDStudent(teacher, STEPS, history_blocks=HISTORY_BLOCKS, history_start=start)
           for start in ("plain", "closed")}
    noise, labels = inputs(teacher, 1, "meta")
    ts = boundaries(1).to("meta")
    tokens = (teacher.config.sample_size // teacher.config.patch_size) ** 2
    width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    analytic = HISTORY_BLOCKS * tokens ** 2 * width * STEPS * (STEPS - 1)  # MACs
    macs = lambda flops: flops / 2  # noqa: E731  FlopCounterMode counts 2 FLOPs per multiply-add
    forward = macs(count(lambda: teacher(noise, ts[:, 0], labels)))
    base_sample = macs(count(lambda: sample(base, noise, labels, ts[0])))
    out = dict(model="DiT-XL/2", steps=STEPS, history_blocks=HISTORY_BLOCKS, tokens=tokens, width=width,
               teacher_forward_gmacs=forward / 1e9, baseline_sample_gmacs=base_sample / 1e9,
               analytic_overhead_gmacs=analytic / 1e9,
               analytic_overhead_percent=100 * analytic / base_sample)
    states = torch.randn(1, STEPS, *noise.shape[1:], device="meta")
    base_train = macs(count(lambda: base(states, ts, labels)))
    for start, student in ard.items():
        s = macs(count(lambda: sample(student, noise, labels, ts[0])))
        t = macs(count(lambda: student(states, ts, labels)))
        out[f"ard_{start}"] = dict(
            sample_gmacs=s / 1e9, sample_overhead_gmacs=(s - base_sample) / 1e9,
            sample_overhead_percent=100 * (s - base_sample) / base_sample,
            sample_overhead_equals_analytic=(s - base_sample) == analytic,
            training_forward_overhead_gmacs=(t - base_train) / 1e9,
            training_forward_overhead_percent=100 * (t - base_train) / base_train)
    return out


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. CPU time of this process is what the ratios use: this machine's
    2 cores are shared, and time spent waiting for a core inflates wall time at random."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(fns: dict, repeats: int, budget_s: float = 60.0) -> dict:
    """Median wall and CPU time of each fn over interleaved rounds, and median CPU-time ratios of each fn
    to the first, round by round. Round 0 is a warm-up, dropped when later rounds run; rounds stop at
    `repeats` or once `budget_s` is spent (a configuration taking longer gets a single round)."""
    rounds, spent = [], 0.0
    while len(rounds) <= repeats and spent < budget_s:
        rounds.append({name: timed(fn) for name, fn in fns.items()})  # name -> (wall, CPU)
        spent += sum(wall for wall, _ in rounds[-1].values())
    rounds = rounds[1:] if len(rounds) > 1 else rounds
    first = next(iter(fns))
    out = dict(rounds=len(rounds))
    for name in fns:
        out[f"{name}_wall_s"] = statistics.median(r[name][0] for r in rounds)
        out[f"{name}_cpu_s"] = statistics.median(r[name][1] for r in rounds)
    for name in list(fns)[1:]:
        ratios = [r[name][1] / r[first][1] for r in rounds]
        out[f"{name}_over_{first}"] = statistics.median(ratios)
        out[f"{name}_over_{first}_range"] = [min(ratios), max(ratios)]  # the noise of this machine
    return out


def sample_flops_overhead(size: str, history_blocks: int) -> float:
    """Percent more FLOPs of an S-step ARD sample over the baseline's, counted on the meta device."""
    with torch.device("meta"):
        teacher = build_dit(size)
    noise, labels = inputs(teacher, 1, "meta")
    ts = boundaries(1)[0].to("meta")
    base, ard = (count(lambda n=n: sample(ARDStudent(teacher, STEPS, history_blocks=n), noise, labels, ts))
                 for n in (0, history_blocks))
    return 100 * (ard - base) / base


def bench_training_attention(repeats: int) -> list:
    """One history block's attention alone (q, k, v given), forward + backward, in the training layout
    (B*S, H, L, d), S = 4, M4: digits-size and DiT-B/2-size heads."""
    return [_training_attention(repeats, *setting) for setting in (("digits", 64, 16, 4, 32),
                                                                   ("DiT-B/2", 4, 256, 12, 64))]


def _training_attention(repeats: int, size: str, batch: int, tokens: int, heads: int, head_dim: int) -> dict:
    layouts = dict(per_step=HistoryAttnProcessor(0, one_mask_below_tokens=0),
                   one_mask=HistoryAttnProcessor(0, one_mask_below_tokens=10 ** 9))

    def variants(device):
        gate = torch.zeros(heads, device=device, requires_grad=True)
        fns = dict(no_history=lambda q, k, v: F.scaled_dot_product_attention(q, k, v))  # the baseline's call
        for name, proc in layouts.items():
            fns[f"{name}_plain"] = lambda q, k, v, p=proc: p._one_pass(q, k, v, STEPS, None)
            fns[f"{name}_closed"] = lambda q, k, v, p=proc: p._one_pass(q, k, v, STEPS, gate)
        return fns

    def qkv(device):
        return [torch.randn(batch * STEPS, heads, tokens, head_dim, device=device, requires_grad=True)
                for _ in range(3)]

    meta_qkv = qkv("meta")
    gmacs = {name: count(lambda fn=fn: fn(*meta_qkv)) / 2e9 for name, fn in variants("meta").items()}
    fns = variants("cpu")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b, h, q, k: q // tokens >= k // tokens, None, None,
                                       STEPS * tokens, STEPS * tokens, device="cpu")
        flex = lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)  # noqa: E731
        flex(*qkv("cpu")).sum().backward()
        fns["flex_attention"] = flex
        flex_error = None
    except Exception as e:  # noqa: BLE001 - report why it cannot be measured here
        flex_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    tensors = qkv("cpu")
    out = compare({name: (lambda fn=fn: fn(*tensors).sum().backward()) for name, fn in fns.items()}, repeats)
    return dict(setting=dict(size=size, trajectories=batch, steps=STEPS, tokens=tokens, heads=heads,
                             head_dim=head_dim), forward_gmacs=gmacs, forward_backward=out,
                flex_attention_error=flex_error,
                chosen="one_mask" if tokens < ONE_MASK_BELOW_TOKENS else "per_step")


def students(size: str, history_blocks: int):
    torch.manual_seed(0)
    teacher = build_dit(size).eval()
    return teacher, ARDStudent(teacher, STEPS, history_blocks=0).eval(), \
        ARDStudent(teacher, STEPS, history_blocks=history_blocks).eval()


def bench_inference(sizes, batches, repeats: int) -> list:
    rows = []
    for size in sizes:
        teacher, base, ard = students(size, HISTORY_BLOCKS)
        for batch in batches:
            noise, labels = inputs(teacher, batch)
            ts = boundaries(batch)
            with torch.no_grad():
                fns = dict(baseline=lambda: sample(base, noise, labels, ts), ard=lambda: sample(ard, noise, labels, ts))
                rows.append(dict(size=size, batch=batch, history_blocks=HISTORY_BLOCKS,
                                 num_layers=teacher.config.num_layers,
                                 flops_overhead_percent=sample_flops_overhead(size, HISTORY_BLOCKS),
                                 **compare(fns, repeats)))
    return rows


def bench_training(sizes, repeats: int) -> list:
    rows = []
    loss = StepMSELoss()
    for size in sizes:
        teacher, base, _ = students(size, HISTORY_BLOCKS)
        batch = 64 if size == "digits" else 1  # trajectories; S = 4 rows each
        noise, labels = inputs(teacher, batch)
        trajectory = torch.randn(batch, STEPS + 1, *noise.shape[1:])
        ts = boundaries(batch)
        fns = dict(baseline=base.train())
        for start in ("plain", "closed"):
            fns[f"ard_{start}"] = ARDStudent(teacher, STEPS, history_blocks=HISTORY_BLOCKS, history_start=start).train()
        steps = {name: (lambda m=m: loss(m, trajectory, ts, labels).mean().backward()) for name, m in fns.items()}
        rows.append(dict(size=size, trajectories=batch, history_blocks=HISTORY_BLOCKS,
                         **compare(steps, repeats)))
    return rows


def bench_teacher_vs_student(sizes, repeats: int) -> list:
    rows = []
    for size in sizes:
        teacher, _, ard = students(size, HISTORY_BLOCKS)
        batch = 16 if size == "digits" else 1
        noise, labels = inputs(teacher, batch)
        ts = boundaries(batch)
        with torch.no_grad():
            fns = dict(teacher_ddim25_cfg=lambda: ddim_sample(teacher, noise, labels, num_steps=25, guidance_scale=1.5),
                       ard_4_steps=lambda: sample(ard, noise, labels, ts))
            times = compare(fns, repeats)
        rows.append(dict(size=size, batch=batch, teacher_per_sample_wall_s=times["teacher_ddim25_cfg_wall_s"] / batch,
                         student_per_sample_wall_s=times["ard_4_steps_wall_s"] / batch,
                         teacher_per_sample_cpu_s=times["teacher_ddim25_cfg_cpu_s"] / batch,
                         student_per_sample_cpu_s=times["ard_4_steps_cpu_s"] / batch,
                         speedup_cpu=times["teacher_ddim25_cfg_cpu_s"] / times["ard_4_steps_cpu_s"],
                         speedup_wall=times["teacher_ddim25_cfg_wall_s"] / times["ard_4_steps_wall_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median)")
    parser.add_argument("--sizes", nargs="+", default=["digits", "DiT-B/2"], help="DiT sizes for the timings")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="inference batch sizes")
    parser.add_argument("--sections", nargs="+", default=["flops", "training_attention", "inference", "training",
                                                          "teacher_vs_student"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=args.threads,
                  repeats=args.repeats)
    sections = dict(flops=bench_flops, training_attention=lambda: bench_training_attention(args.repeats),
                    inference=lambda: bench_inference(args.sizes, args.batches, args.repeats),
                    training=lambda: bench_training(args.sizes, args.repeats),
                    teacher_vs_student=lambda: bench_teacher_vs_student(args.sizes, args.repeats))
    for name in args.sections:
        report[name] = sections[name]()
    report["runtime_s"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
