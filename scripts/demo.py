"""The main job, end to end on the embedded default (8x8 digits, the shipped teacher and classifier):

    python scripts/demo.py [--out runs/demo] [--steps 2] [--num-trajectories 2048] [--max-steps 500]

1. precompute the teacher's DDIM + CFG trajectories into a store (`scripts/precompute_trajectories.py`);
2. distil a step-distillation baseline (N = 0) and an ARD student (`ard fit`, configs/digits/ard.yaml);
3. evaluate the teacher, the undistilled teacher at S steps and both students on the same noises and labels
   (`ard.evaluate`), writing report.json, report.md and samples.png (one row per model, same noise and label
   per column);
4. plot the students' per-step training losses (curves.png).
Everything lands in --out; re-running the command resumes (finished stages are skipped).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from ard.viz import save_figure

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {"baseline": ["-c", "configs/digits/baseline.yaml"], "ARD": []}


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def ard(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(args)}` failed with exit code {proc.returncode}")


def read_losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step training losses (train/loss_step{s}) from the run's CSV log."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("train/loss_step") and value:
                        curves.setdefault(key.removeprefix("train/loss_"), []).append((int(row["step"]), float(value)))
    return curves


def plot_curves(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, run_dir), style in zip(runs.items(), ("--", "-")):
        for i, (step_name, points) in enumerate(sorted(read_losses(run_dir).items())):
            x, y = zip(*points)
            ax.plot(x, y, style, color=f"C{i}", label=f"{name} {step_name}")
    return save_figure(fig, out / "curves.png", "iteration", "per-step MSE to the teacher's state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--steps", type=int, default=2, help="student steps S")
    parser.add_argument("--num-trajectories", type=int, default=2048, help="teacher trajectories to distil from")
    parser.add_argument("--max-steps", type=int, default=500, help="training iterations per student")
    parser.add_argument("--val-count", type=int, default=512, help="trajectories held out for validation")
    parser.add_argument("--num-samples", type=int, default=1000, help="evaluation samples per model")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    start = time.time()

    stage(f"1/4 teacher trajectories -> {out / 'store'}")
    ard("scripts/precompute_trajectories.py", "-c", "configs/digits/trajectories.yaml", "--out", str(out / "store"),
        "--num-trajectories", str(args.num_trajectories), threads=args.threads)

    runs = {}
    for i, (name, preset) in enumerate(STUDENTS.items()):
        run_dir = runs[name] = out / name.lower()
        stage(f"2/4 distil the {args.steps}-step {name} student ({i + 1}/{len(STUDENTS)}) -> {run_dir}")
        if (run_dir / "student_ema" / "ard_sampling.json").exists():
            print("done already")
            continue
        ard("-m", "ard.cli", "fit", "-c", "configs/digits/ard.yaml", *preset,
            f"--data.init_args.path={out / 'store'}", f"--data.init_args.student_steps={args.steps}",
            f"--data.init_args.val_count={args.val_count}", f"--model.init_args.num_steps={args.steps}",
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.max_steps={args.max_steps}", f"--trainer.val_check_interval={args.max_steps}",
            "--trainer.logger+=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.logger.init_args.name=csv",
            threads=args.threads)

    stage(f"3/4 evaluate teacher, undistilled teacher, baseline and ARD -> {out}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from ard.evaluate import evaluate

    evaluate(students={name: str(d / "student_ema") for name, d in runs.items()}, store=str(out / "store"),
             undistilled_steps=[args.steps], num_samples=args.num_samples, out=str(out), cache_dir=str(out / "cache"))

    stage("4/4 training curves")
    print(f"wrote {plot_curves(out, runs)}")
    print(f"\n{(out / 'report.md').read_text()}")
    print(f"demo finished in {time.time() - start:.0f} s: {out}/report.md, report.json, samples.png, curves.png, store/")


if __name__ == "__main__":
    main()
