"""How much of the student's output SRL's target keeps, per re-noising timestep, and the per-step timesteps
tau'_s that ard.student.srl.retention_timesteps picks from it; prints JSON (docs/results/srl_retention.json).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_srl_retention.py [--out docs/results/srl_retention.json]

Retention (ard.student.srl.retention): the real digits (sklearn's 1797, ard.data.digits) re-noised to tau' with
fresh noise, the shipped digits teacher's guided x0-estimate T of that with the digits store's CFG and x0 clipping
(configs/digits/trajectories.yaml), and the slope of the class-centred T on the class-centred x0 (1: T is the
input; 0: only the class mean survives). Measured every --every timesteps, then at each student step of S = 2 and
S = 4 on the K = 24 leading grid (boundaries 943/451 and 943/697/451/205): retention at tau_s itself (srl_shift 1),
and for each --top target the rule's tau'_s and the retention measured there (fresh noise), with the SNR step
weights (srl_weights "snr") and sigma / alpha of each step. recipe.srl_timesteps takes a row's `timesteps`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from ard.data.digits import load_digits_split
from ard.diffusion import ddim_grid, student_grid_indices
from ard.schedules import alpha_bar, make_scheduler
from ard.student.srl import retention, retention_timesteps, snr_weights
from ard.teacher import DIGITS_TEACHER, load_teacher

ROOT = Path(__file__).resolve().parents[1]
STORE_CONFIG = ROOT / "configs" / "digits" / "trajectories.yaml"
K = 24  # the digits store's teacher grid ("leading" spacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=50, help="spacing of the measured tau' grid")
    parser.add_argument("--top", type=float, nargs="+", default=[1 / 3, 0.4, 0.5],
                        help="retention targets of the top step (retention_timesteps' `top`)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4], help="student step counts S")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-noising draws")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    solver = yaml.safe_load(STORE_CONFIG.read_text())["model"]["init_args"]
    guidance, clip = float(solver["guidance_scale"]), bool(solver["clip_sample"])
    teacher = load_teacher(DIGITS_TEACHER)
    x0, labels = load_digits_split("all")  # (1797, 1, 8, 8) in [-1, 1], (1797,)
    generator = torch.Generator().manual_seed(args.seed)

    def measure(timesteps: list[int]) -> dict[int, float]:
        return dict(zip(timesteps, retention(teacher, x0, labels, timesteps, guidance, clip, generator=generator,
                                             batch_size=256)))

    grid_ts = sorted(set(range(0, 1000, args.every)) | {999})
    curve = measure(grid_ts)
    grid = ddim_grid(K)
    scheduler = make_scheduler()
    students, measured = [], {}  # retention at the steps' timesteps and picks, measured again (fresh noise)
    for steps in args.steps:
        inputs = [grid[i] for i in student_grid_indices(K, steps)[:-1]]  # tau_0..tau_{S-1}
        t = torch.tensor(inputs)
        a = alpha_bar(scheduler, t)
        picks = {top: retention_timesteps(curve, inputs, top) for top in args.top}
        measured |= measure(sorted(set(inputs) | {p for row in picks.values() for p in row} - set(measured)))
        students.append(dict(
            steps=steps, input_timesteps=inputs,
            sigma_over_alpha=[round(float(v), 3) for v in ((1 - a) / a).sqrt()],
            snr_weights=[round(float(w), 6) for w in snr_weights(t)],
            retention_at_input=[round(measured[tau], 4) for tau in inputs],
            rule=[dict(top=round(top, 4), timesteps=row, retention=[round(measured[p], 4) for p in row])
                  for top, row in picks.items()]))
    result = dict(
        what="retention of SRL's target: slope of the class-centred teacher x0-estimate on the class-centred clean "
             "input, real digits re-noised to tau' (ard.student.srl.retention)",
        teacher=str(DIGITS_TEACHER.relative_to(ROOT)), guidance_scale=guidance, clip_sample=clip,
        samples=len(labels), seed=args.seed,
        rule="tau'_s = largest t <= tau_s with retention(t) >= max(top, retention(tau_s)) "
             "(ard.student.srl.retention_timesteps, the curve linearly interpolated)",
        curve={str(t): round(r, 4) for t, r in curve.items()},
        students=students,
        torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=1,
        seconds=round(time.perf_counter() - start, 1))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
