"""What the CPU test suite cannot see, checked on one GPU in one command (under 8 minutes); prints JSON and
writes docs/results/gpu_check.json.

    python scripts/gpu_check.py              # a CUDA machine: DiT-XL/2-shaped random weights
    python scripts/gpu_check.py --smoke      # any machine: the same code on a tiny DiT of XL/2's structure

Sections (random weights everywhere: these are numerics and costs, not quality):
- attention: one history block's attention on the same inputs (DiT-XL/2 heads, S = 4 steps of 256 tokens; the
  one-pass training layout with the plain and the closed start, and the cached inference steps) in bf16 SDPA,
  fp32 xformers and bf16 xformers, against fp32 SDPA: max abs error, and relative to the largest output.
- cache_vs_one_pass: 4-step sampling with the KV cache (ARD, N = 6) against the one-pass training forward fed the
  sampler's own states, in fp32 and in bf16 autocast (xformers on when installed): max abs error per step.
- flops: GFLOPs of one 4-step ARD sample and of the baseline's, counted as ard-eval counts them
  (evaluate.gflops_per_image) with xformers active and with it off: a kernel without a FLOP formula counts 0.
- training: one step of the per-step MSE, AdamW, grad clip 1, bf16 autocast, 32 trajectories x 4 steps (the
  ImageNet preset's per-GPU batch): median step time and peak memory of ARD (N = 6) and the baseline (N = 0),
  without and with gradient checkpointing (an out-of-memory is recorded, not fatal).
- sampling: images per second of the 4-step ARD student against the 25-step CFG teacher (DDIM, w = 1.5), bf16.
Without CUDA (and without --smoke) it exits with status 2 and "no CUDA device", measuring and writing nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ard.student.attention as attention_module
from ard.atomic import write_text_atomic
from ard.diffusion import ddim_grid, ddim_sample
from ard.evaluate import gflops_per_image
from ard.student import ARDStudent, StepMSELoss, sample
from ard.student.attention import HistoryAttnProcessor, KVCache
from ard.backbones.dit import build_dit

ROOT = Path(__file__).resolve().parents[1]
STEPS, HISTORY_BLOCKS, GUIDANCE = 4, 6, 1.5  # the ImageNet preset's S, N and the teacher's w
# (DiT size overrides, training batch, sampling batch, timed repeats): full scale, and --smoke
SCALE = {False: (dict(), 32, 64, 10), True: (dict(num_layers=7, num_attention_heads=2, attention_head_dim=8), 2, 2, 2)}


@contextlib.contextmanager
def xformers(on: bool):
    """Let ard's attention use xformers (when installed, on CUDA) or force torch's SDPA."""
    original = attention_module._xformers_ops
    attention_module._xformers_ops = original if on else (lambda: None)
    try:
        yield
    finally:
        attention_module._xformers_ops = original


def has_xformers(device: torch.device) -> bool:
    return device.type == "cuda" and attention_module._xformers_ops() is not None


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def boundaries(device: torch.device) -> torch.Tensor:
    """The 4-step student's boundary timesteps on the K = 24 leading grid: 943, 697, 451, 205, clean."""
    return torch.tensor(ddim_grid(24)[:: 24 // STEPS], device=device)  # (S+1,)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float()).abs().max().item()
    return {"max_abs_error": diff, "relative_to_max_output": diff / ref.float().abs().max().item()}


# ------------------------------------------------------------------------------------------------ sections
def check_attention(teacher, device: torch.device, trajectories: int) -> dict:
    attn = teacher.transformer_blocks[0].attn1
    heads, head_dim = attn.heads, teacher.config.attention_head_dim
    tokens = (teacher.config.sample_size // teacher.config.patch_size) ** 2
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(trajectories * STEPS, heads, tokens, head_dim, generator=g).to(device)
               for _ in range(3))  # (B*S, H, L, d), rows ordered (b, s)
    gate = torch.full((heads,), 0.3, device=device)  # a half-open closed-start gate
    proc = HistoryAttnProcessor(0)

    def cached(q, k, v, gate):  # the inference path: one step at a time through a KV cache
        cache = KVCache(batch_size=trajectories, num_steps=STEPS, num_layers=1)
        rows = lambda x, s: x.view(trajectories, STEPS, *x.shape[1:])[:, s]  # noqa: E731  (B, H, L, d)
        outs = [proc._cached_step(rows(q, s), rows(k, s), rows(v, s), s, cache, gate) for s in range(STEPS)]
        return torch.stack(outs, dim=1).flatten(0, 1)  # (B*S, H, L, d)

    paths = {"one_pass_plain": lambda *x: proc._one_pass(*x, STEPS, None),
             "one_pass_closed": lambda *x: proc._one_pass(*x, STEPS, gate.to(x[0].dtype)),
             "cached_steps_plain": lambda *x: cached(*x, None)}
    variants = {"sdpa_bf16": (False, torch.bfloat16), "xformers_fp32": (True, torch.float32),
                "xformers_bf16": (True, torch.bfloat16)}
    out = {"shape_B*S_H_L_d": list(q.shape), "reference": "fp32 SDPA, one-pass plain/closed"}
    with torch.no_grad():
        with xformers(False):
            ref = {name: fn(q, k, v) for name, fn in paths.items() if name.startswith("one_pass")}
            ref["cached_steps_plain"] = ref["one_pass_plain"]  # the cache must reproduce the one-pass output
            out["cached_steps_plain_fp32_sdpa"] = errors(paths["cached_steps_plain"](q, k, v), ref["one_pass_plain"])
        for variant, (use_xformers, dtype) in variants.items():
            if use_xformers and not has_xformers(device):
                out[variant] = "xformers unavailable (needs CUDA and the gpu extra)"
                continue
            with xformers(use_xformers):
                out[variant] = {name: errors(fn(q.to(dtype), k.to(dtype), v.to(dtype)), ref[name])
                                for name, fn in paths.items()}
    return out


def check_cache_vs_one_pass(teacher, device: torch.device, batch: int) -> dict:
    out = {}
    ts = boundaries(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(batch, *noise_shape(teacher), generator=g).to(device)  # (B, C, H, W)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)  # (B,)
    for start in ("plain", "closed"):
        student = ARDStudent(teacher, STEPS, history_blocks=HISTORY_BLOCKS, history_start=start).eval()
        if student.history_gate is not None:
            student.history_gate.data.fill_(0.3)  # open the gates half-way, so history matters
        for bf16 in (False, True):
            with torch.no_grad(), autocast(device, bf16), xformers(True):
                states = sample(student, noise, labels, ts)  # (B, S+1, C, H, W)
                pred = student(states[:, :-1], ts.expand(batch, -1), labels)  # (B, S, C, H, W)
            diff = (pred.float() - states[:, 1:].float()).abs().flatten(2).amax(dim=(0, 2))  # (S,)
            out[f"{start}_{'bf16' if bf16 else 'fp32'}"] = {
                "max_abs_error_per_step": diff.tolist(), "state_abs_max": states.float().abs().max().item()}
        del student
    out["xformers"] = has_xformers(device)
    return out


def noise_shape(teacher) -> tuple[int, int, int]:
    c, side = teacher.config.in_channels, teacher.config.sample_size
    return c, side, side


def check_flops(teacher, device: torch.device) -> dict:
    ts = boundaries(device)
    noise = torch.randn(1, *noise_shape(teacher), device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    out = {}
    for name, n in (("ard", HISTORY_BLOCKS), ("baseline", 0)):
        student = ARDStudent(teacher, STEPS, history_blocks=n, history_start="plain").eval()
        sampler = lambda x, y, s=student: sample(s, x, y, ts)[:, -1]  # noqa: E731
        for on in (False, True):
            if on and not has_xformers(device):
                continue
            with xformers(on):
                out[f"{name}_gflops_{'xformers' if on else 'sdpa'}"] = gflops_per_image(sampler, noise, labels)
        del student
    out["ard_overhead_percent_sdpa"] = 100 * (out["ard_gflops_sdpa"] / out["baseline_gflops_sdpa"] - 1)
    if "ard_gflops_xformers" in out:
        out["xformers_counts_equal_sdpa"] = abs(out["ard_gflops_xformers"] - out["ard_gflops_sdpa"]) < 1e-6 * out[
            "ard_gflops_sdpa"]
    else:
        out["xformers_counts_equal_sdpa"] = "xformers unavailable"
    return out


def check_training(teacher, device: torch.device, trajectories: int, repeats: int) -> dict:
    ts = boundaries(device).expand(trajectories, -1)  # (B, S+1)
    g = torch.Generator(device="cpu").manual_seed(2)
    trajectory = torch.randn(trajectories, STEPS + 1, *noise_shape(teacher), generator=g).to(device)  # (B, S+1, ...)
    labels = torch.randint(0, 1000, (trajectories,), generator=g).to(device)
    loss_fn = StepMSELoss()
    out = {"trajectories": trajectories, "rows": trajectories * STEPS, "precision": "bf16 autocast, fp32 weights",
           "peak_memory_includes_teacher_gib": sum(p.numel() * p.element_size() for p in teacher.parameters())
           / 2 ** 30}
    for name, n in (("ard", HISTORY_BLOCKS), ("baseline", 0)):
        for checkpointing in (False, True):
            key = f"{name}{'_checkpointing' if checkpointing else ''}"
            student = optimizer = None
            try:
                student = ARDStudent(teacher, STEPS, history_blocks=n, history_start="plain").train()
                if checkpointing:
                    student.transformer.enable_gradient_checkpointing()
                optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)

                def step():
                    with autocast(device, True):
                        loss = loss_fn(student, trajectory, ts, labels).mean()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed(step, device, repeats)
                out[key] = {"step_s": seconds, "trajectories_per_s": trajectories / seconds}
                if device.type == "cuda":
                    out[key]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            except torch.cuda.OutOfMemoryError as e:
                out[key] = f"out of memory: {str(e).splitlines()[0][:200]}"
            finally:
                del student, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


def check_sampling(teacher, device: torch.device, batch: int, repeats: int) -> dict:
    ts = boundaries(device)
    noise = torch.randn(batch, *noise_shape(teacher), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    student = ARDStudent(teacher, STEPS, history_blocks=HISTORY_BLOCKS, history_start="plain").eval()
    with torch.no_grad(), autocast(device, True), xformers(True):
        student_s = timed(lambda: sample(student, noise, labels, ts), device, repeats)
        teacher_s = timed(lambda: ddim_sample(teacher, noise, labels, 25, GUIDANCE, save_indices=[25]), device,
                          max(1, repeats // 3))
    return {"batch": batch, "precision": "bf16 autocast", "xformers": has_xformers(device),
            "student_4_steps_images_per_s": batch / student_s, "teacher_ddim25_cfg_images_per_s": batch / teacher_s,
            "speedup": teacher_s / student_s}


SECTIONS = ("attention", "cache_vs_one_pass", "flops", "training", "sampling")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny DiT of XL/2's structure; runs on CPU too")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--out", default=None, help="JSON file (default: docs/results/gpu_check.json; "
                                                      "with --smoke: none)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing measured or written; "
              "`--smoke` runs the same code on a tiny DiT on CPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides, train_batch, sample_batch, repeats = SCALE[args.smoke]
    torch.manual_seed(0)
    with device:
        teacher = build_dit("DiT-XL/2", **overrides).eval()
    for p in teacher.parameters():  # adaLN-zero starts every block as the identity: make the blocks compute
        p.data.add_(0.02 * torch.randn_like(p))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "xformers": has_xformers(device), "smoke": args.smoke,
              "model": "DiT-XL/2" + (f" shrunk to {overrides}" if overrides else ""), "random_weights": True}
    start = time.perf_counter()
    runs = {"attention": lambda: check_attention(teacher, device, sample_batch // 8 or 1),
            "cache_vs_one_pass": lambda: check_cache_vs_one_pass(teacher, device, min(sample_batch, 8)),
            "flops": lambda: check_flops(teacher, device),
            "training": lambda: check_training(teacher, device, train_batch, repeats),
            "sampling": lambda: check_sampling(teacher, device, sample_batch, repeats)}
    for name in args.sections:
        section_start = time.perf_counter()
        report[name] = runs[name]()
        report[name]["seconds"] = time.perf_counter() - section_start
        print(f"gpu_check: {name} done in {report[name]['seconds']:.0f} s", file=sys.stderr)
    report["seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=1)
    print(text)
    out = args.out or (None if args.smoke else ROOT / "docs" / "results" / "gpu_check.json")
    if out is not None:
        write_text_atomic(Path(out), text + "\n")
    return report


if __name__ == "__main__":
    main()
