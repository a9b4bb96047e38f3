"""The digits distillation benchmark: baseline (N = 0) against ARD at several student step counts and
knob settings, each over several training seeds, all evaluated on one shared evaluation set.

    python scripts/bench_digits.py [--steps 2 3 4] [--seeds 0 1 2] [--max-steps 600] [--workers 2]

Runs (resumable: a finished run is skipped when the command is re-run):
  1. the training store: `scripts/precompute_trajectories.py` (K = 24 DDIM, CFG 2, every grid state);
  2. one `ard fit` per (variant, S, seed), `--workers` at a time with one thread each (the seed sets the
     data order and every random draw; the student starts from the teacher's weights, a GAN variant from
     the same-seed regression student of the same S, fine-tuned `--gan-steps` iterations with
     configs/digits/ard_gan.yaml; each run's training time is kept in <run>/fit_seconds.json);
  3. `ard.evaluate.evaluate` per S over every student of that S, plus the teacher at K steps and the
     undistilled teacher at S steps (same noises and labels: a held-out seed);
     (skipped when `<work>/eval/S<s>/report.json` already holds the same students and settings);
  4. aggregation over seeds (mean and sd), written to <results>/<name>.{json,md}, a plot <results>/<name>.png,
     and the README's section between `<!-- <name>:start -->` and `<!-- <name>:end -->`.
The report's second table is the verdict, computed here: per S, the baseline's degradation against the
teacher in bootstrap sds (the sensitivity criterion: >= 5) and each ARD variant's degradation as a fraction
of the baseline's (the paper's target: <= 1/5), for FID against the teacher's samples and against real data.
Prints the aggregated rows and the verdict as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ard.atomic import write_text_atomic
from ard.viz import save_figure

ROOT = Path(__file__).resolve().parents[1]
# name -> `ard fit` overrides of configs/digits/ard.yaml (the knobs of ard.student.ARDStudent)
VARIANTS: dict[str, list[str]] = {
    "baseline": ["--model.init_args.history_blocks=0"],
    "ard": [],
    "ard-plain": ["--model.init_args.history_start=plain"],
    "ard-N3": ["--model.init_args.history_blocks=3"],
    "ard-M3": ["--model.init_args.mask=noise_and_current"],
    "baseline-direct": ["--model.init_args.history_blocks=0", "--model.init_args.output=next_state",
                        "--model.init_args.heads=per_step"],
    "ard-direct": ["--model.init_args.output=next_state", "--model.init_args.heads=per_step"],
}
# ARD + GAN (sec. 4): name -> (the regression variant whose student of the same S and seed it fine-tunes with
# configs/digits/ard_gan.yaml, with the GAN or not); "-continued": that student trained equally long (same batch
# and lr) without the GAN, the comparison the GAN stage must beat
GAN_VARIANTS: dict[str, tuple[str, bool]] = {
    "baseline-gan": ("baseline", True),
    "ard-gan": ("ard", True),
    "baseline-continued": ("baseline", False),
    "ard-continued": ("ard", False),
}
METRICS = ("fid", "fid_vs_teacher", "mse_vs_teacher", "is", "precision", "recall", "sec_per_image")
SENSITIVITY = 5.0  # the baseline's degradation must be at least this many bootstrap sds
TARGET_RATIO = 0.2  # the paper: ARD degrades at most 1/5 as much as the baseline


def run(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def fit(work: Path, store: Path, variant: str, steps: int, seed: int, max_steps: int, threads: int,
        init: Path | None = None, gan_args: tuple[str, ...] = ()) -> Path:
    """Train one student (resumable), max_steps iterations. A GAN variant starts from `init` (an exported
    student) with configs/digits/ard_gan.yaml and `gan_args`, and logs the discriminator's health to CSV."""
    run_dir = work / "runs" / f"{variant}-S{steps}-seed{seed}"
    if not (run_dir / "student_ema" / "ard_sampling.json").exists():
        start = time.time()
        stage = [f"--trainer.max_steps={max_steps}", "--trainer.logger=false"]
        if variant in GAN_VARIANTS:
            csv = ('{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                   '"init_args": {"save_dir": "%s", "name": "csv"}}')
            adversarial = GAN_VARIANTS[variant][1]
            stage = ["-c", "configs/digits/ard_gan.yaml", f"--model.init_args.init_student={init}",
                     f"--model.init_args.gan_seed={seed}", f"--trainer.logger={csv % run_dir}",
                     "--trainer.log_every_n_steps=10", *gan_args,
                     *([f"--trainer.max_steps={2 * max_steps}"] if adversarial else  # 2 optimiser steps each
                       [f"--trainer.max_steps={max_steps}", "--model.init_args.gan_weight=0",
                        "--trainer.gradient_clip_val=1.0"])]
        run([sys.executable, "-m", "ard.cli", "fit", "-c", "configs/digits/ard.yaml", *stage,
             f"--data.init_args.path={store}", f"--data.init_args.student_steps={steps}",
             f"--model.init_args.num_steps={steps}", f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
             f"--trainer.default_root_dir={run_dir}", f"--trainer.val_check_interval={max_steps}",
             "--trainer.enable_progress_bar=false", *VARIANTS[GAN_VARIANTS.get(variant, (variant,))[0]]],
            run_dir.with_suffix(".log"), threads)
        write_text_atomic(run_dir / "fit_seconds.json", json.dumps({"seconds": time.time() - start}) + "\n")
        print(f"trained {run_dir.name} in {time.time() - start:.0f} s", flush=True)
    return run_dir / "student_ema"


def fit_seconds(student_dir: Path) -> float | None:
    path = student_dir.parent / "fit_seconds.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def history_gate(student_dir: Path) -> float | None:
    """Largest opening max(g, 0) of a closed-start student's history gates (None: no gates); at 0 the
    student computes exactly the baseline, so this says how much history the training switched on."""
    from safetensors.torch import load_file

    path = student_dir / "ard_student.safetensors"
    gate = load_file(path).get("history_gate") if path.exists() else None
    return None if gate is None else float(gate.clamp(min=0).max())


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds of every metric, per (model, steps)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((re.sub(r"-seed\d+$", "", r["model"]), r["steps"]), []).append(r)
    out = []
    for (model, steps), rs in groups.items():
        row = {"model": model, "steps": steps, "nfe": rs[0]["nfe"], "seeds": len(rs)}
        for m in METRICS:
            values = np.array([r[m] for r in rs], dtype=float)
            row[m], row[m + "_spread"] = float(values.mean()), float(values.std(ddof=1)) if len(rs) > 1 else 0.0
        for m in ("fid", "fid_vs_teacher"):  # the bootstrap sd of one run's FID, averaged over the seeds
            row[m + "_bootstrap_sd"] = float(np.mean([r[m + "_sd"] for r in rs]))
        ratios = [r["gan_time_ratio"] for r in rs if r.get("gan_time_ratio") is not None]
        if ratios:  # the GAN stage's training time over its regression stage's (same S and seed)
            row["gan_time_ratio"] = float(np.mean(ratios))
        gates = [r["history_gate"] for r in rs if r.get("history_gate") is not None]
        if gates:
            row["history_gate_max"] = max(gates)
        out.append(row)
    return out


def verdict(agg: list[dict], teacher_steps: int) -> list[dict]:
    """Per student step count S and ARD variant: degradations against the teacher, the baseline's in
    bootstrap sds, and ARD's as a fraction of the baseline's. Against the teacher's samples the degradation
    is the FID itself (the teacher scores 0); against real data it is FID(model) - FID(teacher)."""
    teacher = next(r for r in agg if r["model"].startswith("teacher") and r["steps"] == teacher_steps)
    out = []
    for s in sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}):
        base = next((r for r in agg if r["model"] == "baseline" and r["steps"] == s), None)
        if base is None:
            continue
        for r in agg:
            if r["steps"] != s or r["model"] == "baseline" or r["model"].startswith("teacher"):
                continue
            row = {"steps": s, "model": r["model"]}
            for m, offset in (("fid_vs_teacher", 0.0), ("fid", teacher["fid"])):
                d_base, d_model = base[m] - offset, r[m] - offset
                sensitive = d_base >= SENSITIVITY * base[m + "_bootstrap_sd"]  # a ratio means nothing otherwise
                row[m] = {"baseline_degradation": d_base, "degradation": d_model,
                          "baseline_in_bootstrap_sd": d_base / base[m + "_bootstrap_sd"], "sensitive": sensitive,
                          "ratio": d_model / d_base if sensitive else None,
                          "meets_target": sensitive and d_model <= TARGET_RATIO * d_base}
            out.append(row)
    return out


def markdown(agg: list[dict], checks: list[dict], floors: dict, settings: dict) -> str:
    lines = [f"Digits, teacher K = {settings['teacher_steps']} DDIM steps with CFG {settings['guidance_scale']}; "
             f"{settings['num_samples']} samples per model on the same noises and labels; students trained "
             f"{settings['max_steps']} iterations on {settings['num_trajectories']} trajectories; mean ± sd over "
             "training seeds (the teacher rows: one run), and in brackets the bootstrap sd of one run's FID. "
             "Same-noise MSE is per pixel in [-1, 1] units. Reference noise floors (FID between random halves): "
             f"real digits {floors['real']:.2f}, teacher samples {floors['teacher']:.2f}.", "",
             "| model | steps | seeds | FID vs real | FID vs teacher | same-noise MSE | IS | precision | recall | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(agg, key=lambda r: (r["steps"] != settings["teacher_steps"], r["steps"], r["model"])):
        def pm(m, fmt):
            return f"{r[m]:{fmt}}" + (f" ± {r[m + '_spread']:{fmt}}" if r["seeds"] > 1 else "")

        def fid(m):
            return f"{pm(m, '.2f')} [{r[m + '_bootstrap_sd']:.2f}]"
        lines.append(f"| {r['model']} | {r['steps']} | {r['seeds']} | {fid('fid')} | {fid('fid_vs_teacher')} | "
                     f"{pm('mse_vs_teacher', '.4f')} | {pm('is', '.2f')} | {pm('precision', '.3f')} | "
                     f"{pm('recall', '.3f')} | {r['sec_per_image']:.1e} |")
    lines += ["", f"Degradation against the teacher (computed by the tool): the baseline's in bootstrap sds (sensitive "
              f"when >= {SENSITIVITY:g}), and each variant's as a fraction of the baseline's (the paper's target: "
              f"<= {TARGET_RATIO:g}). Against the teacher's samples the degradation is the FID; against real data, "
              "FID minus the teacher's.", "",
              "| steps | model | baseline Δ vs teacher (sds) | Δ vs teacher | ratio | baseline Δ vs real (sds) "
              "| Δ vs real | ratio |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        cells = []
        for m in ("fid_vs_teacher", "fid"):
            v = c[m]
            cells += [f"{v['baseline_degradation']:.2f} ({v['baseline_in_bootstrap_sd']:.1f}"
                      f"{'' if v['sensitive'] else ', not sensitive'})", f"{v['degradation']:.2f}",
                      "-" if v["ratio"] is None
                      else f"{v['ratio']:.2f}" + (" (target met)" if v["meets_target"] else "")]
        lines.append(f"| {c['steps']} | {c['model']} | " + " | ".join(cells) + " |")
    timed = [r for r in agg if "gan_time_ratio" in r]
    if timed:
        lines += ["", "Training time of the second stage relative to the regression stage it starts from (same S and "
                  "seed; wall time on a shared machine): " + ", ".join(
                      f"{r['model']} S={r['steps']} {r['gan_time_ratio']:.2f}x" for r in timed) + "."]
    gated = [r for r in agg if "history_gate_max" in r]
    if gated:
        lines += ["", "Closed history start: the largest history gate after training (0 computes exactly the "
                  "baseline; 1 is the plain start's full attention to earlier steps): " + ", ".join(
                      f"{r['model']} S={r['steps']} {r['history_gate_max']:.4f}" for r in gated) + "."]
    return "\n".join(lines) + "\n"


def plot(agg: list[dict], floors: dict, path: Path, teacher_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    models = sorted({r["model"] for r in agg if r["steps"] != teacher_steps or not r["model"].startswith("teacher")})
    for model in models:
        rs = sorted([r for r in agg if r["model"] == model and r["steps"] != teacher_steps], key=lambda r: r["steps"])
        if rs:
            ax.errorbar([r["steps"] for r in rs], [r["fid_vs_teacher"] for r in rs],
                        yerr=[r["fid_vs_teacher_spread"] for r in rs], marker="o", capsize=3, label=model)
    ax.axhline(floors["teacher"], color="grey", linestyle=":", label="teacher samples, half vs half")
    ax.set_yscale("log")  # the undistilled teacher's few-step FIDs are 10x the students'
    ax.set_xticks(sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}))
    save_figure(fig, path, "sampling steps", "FID against the teacher's samples")


def update_readme(table: str, name: str) -> None:
    """Replace the README's section between `<!-- name:start -->` and `<!-- name:end -->` (if it has one)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        write_text_atomic(readme, head + start + "\n" + table + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_digits", help="stores, runs and evaluation caches")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4], help="student step counts S")
    parser.add_argument("--variants", nargs="+", default=["baseline", "ard"], choices=list(VARIANTS))
    parser.add_argument("--knob-variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="extra variants trained at --knob-steps only")
    parser.add_argument("--knob-steps", type=int, default=2)
    parser.add_argument("--gan-variants", nargs="*", default=[], choices=list(GAN_VARIANTS),
                        help="GAN stages (and their continued-regression comparisons) at every --steps")
    parser.add_argument("--gan-steps", type=int, default=600, help="iterations of each GAN stage")
    parser.add_argument("--gan-args", nargs="*", default=[], help="extra overrides of every GAN stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-trajectories", type=int, default=8192)
    parser.add_argument("--max-steps", type=int, default=600, help="training iterations per student")
    parser.add_argument("--num-samples", type=int, default=2000, help="evaluation set size")
    parser.add_argument("--workers", type=int, default=2, help="students trained at once (one thread each)")
    parser.add_argument("--results", default="docs/results", help="where the report goes")
    parser.add_argument("--name", default="digits-benchmark",
                        help="report file stem and README section (<!-- NAME:start --> ... <!-- NAME:end -->)")
    args = parser.parse_args()

    work = (ROOT / args.work).resolve()
    store = work / "store"
    start = time.time()
    run([sys.executable, "scripts/precompute_trajectories.py", "-c", "configs/digits/trajectories.yaml",
         "--out", str(store), "--num-trajectories", str(args.num_trajectories)], work / "precompute.log", 2)
    jobs = [(v, s, seed) for s in args.steps for v in args.variants for seed in args.seeds]
    jobs += [(v, args.knob_steps, seed) for v in args.knob_variants for seed in args.seeds]
    with ThreadPoolExecutor(args.workers) as pool:
        students = list(pool.map(lambda j: fit(work, store, *j, args.max_steps, 1), jobs))
        regression = dict(zip(jobs, students))
        gan_jobs = [(v, s, seed) for s in args.steps for v in args.gan_variants for seed in args.seeds]
        missing = sorted({GAN_VARIANTS[v][0] for v, s, seed in gan_jobs
                          if (GAN_VARIANTS[v][0], s, seed) not in regression})
        if missing:
            raise SystemExit(f"--gan-variants need the regression variants {missing} in --variants")
        students += list(pool.map(lambda j: fit(work, store, *j, args.gan_steps, 1,
                                                regression[(GAN_VARIANTS[j[0]][0], *j[1:])], tuple(args.gan_args)),
                                  gan_jobs))
        jobs += gan_jobs

    from ard.evaluate import evaluate

    rows, floors = [], {}
    for s in sorted({j[1] for j in jobs}):
        named = {f"{v}-seed{seed}": str(d) for (v, steps, seed), d in zip(jobs, students) if steps == s}
        out = work / "eval" / f"S{s}"
        done = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
        if not done or done["settings"]["students"] != named or done["settings"]["num_samples"] != args.num_samples:
            evaluate(students=named, undistilled_steps=[s], num_samples=args.num_samples, out=str(out),
                     cache_dir=str(work / "cache"), wandb=False)
        report = json.loads((out / "report.json").read_text())
        for r in report["rows"]:
            if r["model"] in named:
                r["history_gate"] = history_gate(Path(named[r["model"]]))
                variant, seed = r["model"].rsplit("-seed", 1)
                if variant in GAN_VARIANTS:
                    reg = named.get(f"{GAN_VARIANTS[variant][0]}-seed{seed}")
                    seconds = fit_seconds(Path(named[r["model"]])), reg and fit_seconds(Path(reg))
                    r["gan_time_ratio"] = seconds[0] / seconds[1] if all(seconds) else None
        k = report["settings"]["teacher_steps"]  # the K-step teacher row: once, from the first evaluation
        rows += [r for r in report["rows"] if not (rows and r["steps"] == k and r["model"].startswith("teacher"))]
        floors = report["noise_floor"]
    settings = {**report["settings"], "max_steps": args.max_steps, "num_trajectories": args.num_trajectories,
                "seeds": args.seeds, "invocation_seconds": time.time() - start}  # finished runs are reused
    agg = aggregate(rows)
    checks = verdict(agg, settings["teacher_steps"])
    results = ROOT / args.results
    stem = args.name.replace("-", "_")
    table = markdown(agg, checks, floors, settings)
    write_text_atomic(results / f"{stem}.json", json.dumps(
        {"settings": settings, "noise_floor": floors, "aggregated": agg, "verdict": checks, "runs": rows}, indent=1))
    write_text_atomic(results / f"{stem}.md", table)
    plot(agg, floors, results / f"{stem}.png", settings["teacher_steps"])
    update_readme(table, args.name)
    print(json.dumps({"aggregated": agg, "verdict": checks}, indent=1))


if __name__ == "__main__":
    main()
