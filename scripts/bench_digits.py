"""The digits distillation benchmark: baseline (N = 0) against ARD at several student step counts and
knob settings, each over several training seeds, all evaluated on one shared evaluation set.

    python scripts/bench_digits.py [--steps 2 3 4] [--seeds 0 1 2] [--max-steps 600] [--workers 2]

Runs (resumable: a finished run is skipped when the command is re-run, and refused if it was trained for another
number of iterations, since run directories are named by variant, S and seed only):
  1. the training store: `scripts/precompute_trajectories.py` (K = 24 DDIM, CFG 2, every grid state);
  2. one `ard fit` per (variant, S, seed), `--workers` at a time with one thread each (the seed sets the
     data order and every random draw; the student starts from the teacher's weights, a GAN variant from
     the same-seed regression student of the same S, fine-tuned `--gan-steps` iterations with
     configs/digits/ard_gan.yaml; each run's training time is kept in <run>/train_seconds.json);
  3. `ard.evaluate.evaluate` per S over every student of that S, plus the teacher at K steps and the
     undistilled teacher at S steps (same noises and labels: a held-out seed);
     (skipped when `<work>/eval/S<s>/report.json` already holds the same students and settings);
  4. aggregation over seeds (mean and sd), written to <results>/<name>.{json,md}, a plot <results>/<name>.png,
     and the README's section between `<!-- <name>:start -->` and `<!-- <name>:end -->`; with --merge, the
     student rows of the committed report that this invocation did not evaluate are kept (the runs of an
     earlier checkout, which runs/ does not outlive), if that report was evaluated the same way.
The GAN stages add their verdict (FID vs real against the continued student and the teacher, precision against
the teacher's) and the discriminator's health (their CSV logs).
The report's second table is the verdict, computed here: per S, the baseline's degradation against the
teacher in bootstrap sds (the sensitivity criterion: >= 5) and each ARD variant's degradation as a fraction
of the baseline's (the paper's target: <= 1/5), for FID against the teacher's samples and against real data.
Prints the aggregated rows and the verdict as JSON.
"""
from __future__ import annotations

import argparse
import csv
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
# Students: name -> `ard fit` overrides of configs/digits/ard.yaml (the knobs of ard.student.ARDStudent).
MODELS: dict[str, list[str]] = {
    "baseline": ["--model.init_args.history_blocks=0"],
    "ard": ["--model.init_args.history_blocks=6"],  # history in all 6 blocks, plain start
    "ard-N1": ["--model.init_args.history_blocks=1"],
    "ard-N2": ["--model.init_args.history_blocks=2"],
    "ard-N3": ["--model.init_args.history_blocks=3"],
    "ard-closed": ["--model.init_args.history_start=closed"],
    "ard-closed-gatelr": ["--model.init_args.history_start=closed", "--model.init_args.history_gate_lr=0.05"],
    "ard-M3": ["--model.init_args.mask=noise_and_current"],
    "baseline-direct": ["--model.init_args.history_blocks=0", "--model.init_args.output=next_state",
                        "--model.init_args.heads=per_step"],
    "ard-direct": ["--model.init_args.output=next_state", "--model.init_args.heads=per_step"],
}
# Training recipes (ard/student/recipe.py): suffix -> overrides; "" is teacher forcing on the stored trajectory.
RECIPES: dict[str, list[str]] = {
    "": ["--model.init_args.inputs=teacher", "--model.init_args.targets=trajectory"],  # stated, whatever the preset says
    "rollout": ["--model.init_args.inputs=rollout"],
    "mixed": ["--model.init_args.inputs=mixed", "--model.init_args.rollout_prob=1.0",
              "--model.init_args.rollout_ramp_steps=600"],
    "backward": ["--model.init_args.inputs=rollout", "--model.init_args.targets=teacher_from_state"],
    "srl": ["--model.init_args.inputs=rollout", "--model.init_args.targets=shifted_reconstruction"],
    # SRL re-noised far below the student's timestep, so that its top steps' targets keep the student's x0
    "srl-shift0.1": ["--model.init_args.inputs=rollout", "--model.init_args.targets=shifted_reconstruction",
                     "--model.init_args.srl_shift=0.1"],
}
# A variant is a model, optionally followed by "+" and a recipe: "ard-N2+rollout".
VARIANTS: dict[str, list[str]] = {m + ("+" + r if r else ""): MODELS[m] + RECIPES[r] for m in MODELS for r in RECIPES}
# Reports written while the closed history start was the student's default named their variants by it:
RENAMED_SINCE_PLAIN_DEFAULT = {"ard": "ard-closed", "ard-plain": "ard", "ard-direct": "ard-closed-direct"}
NC = " [nc]"  # name suffix of a student's rows sampled with noise correction (ARDStudent.step)
# ARD + GAN (sec. 4): name -> (the regression variant whose student of the same S and seed it fine-tunes with
# configs/digits/ard_gan.yaml, with the GAN or not); "-continued": that student trained equally long (same batch
# and lr) without the GAN, the comparison the GAN stage must beat
GAN_VARIANTS: dict[str, tuple[str, bool]] = {
    "baseline-gan": ("baseline", True),
    "ard-gan": ("ard", True),
    "baseline-continued": ("baseline", False),
    "ard-continued": ("ard", False),
}
# The discriminator's health, as ARDDistillation logs it (CSV logger of a GAN stage), and the window of the last
# iterations it is averaged over in the report
HEALTH = ("gan/d_loss", "gan/logits_real", "gan/logits_fake", "gan/logits_holdout", "gan/weight")
HEALTH_WINDOW = 50
GAN_FID_REDUCTION = 0.2  # issue 10's goal at S = 2: the GAN stage's FID vs real >= 20% below the continued student's
# Evaluation settings that must be equal for rows of a committed report to be merged with new ones (--merge)
EVAL_KEYS = ("teacher", "teacher_identity", "solver", "num_samples", "seed", "reference", "extractor", "max_steps",
             "num_trajectories")

METRICS = ("fid", "fid_vs_teacher", "mse_vs_teacher", "is", "precision", "recall", "sec_per_image")
SENSITIVITY = 5.0  # the baseline's degradation must be at least this many bootstrap sds
TARGET_RATIO = 0.2  # the paper: ARD degrades at most 1/5 as much as the baseline


def second_stage(regression: str, adversarial: bool) -> str:
    """The GAN_VARIANTS name of the second stage of `regression` with the GAN or without it (`-continued`)."""
    return next(v for v, (reg, adv) in GAN_VARIANTS.items() if reg == regression and adv == adversarial)


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
    done = run_dir / "train_seconds.json"
    trained = json.loads(done.read_text()).get("iterations", max_steps) if done.exists() else max_steps
    if trained != max_steps:
        raise SystemExit(f"{run_dir} was trained {trained} iterations, not {max_steps}: use another --work for "
                         "another training length")
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
        seconds = time.time() - start
        write_text_atomic(done, json.dumps({"seconds": seconds, "threads": threads, "iterations": max_steps}))
        print(f"trained {run_dir.name} in {seconds:.0f} s", flush=True)
    return run_dir / "student_ema"


def train_seconds(student_dir: Path) -> float | None:
    """Wall seconds the student's `ard fit` took (one thread, the machine's load as it was; None: unknown)."""
    path = student_dir.parent / "train_seconds.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def health(run_dir: Path, window: int = HEALTH_WINDOW) -> dict[str, float | None]:
    """Means of the discriminator's logged health (HEALTH) over the last `window` iterations of a GAN stage (its
    CSV logs; Lightning's step counts both optimisers' steps, 2 per iteration)."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("gan/d_loss")]
    if not rows:
        return {}
    last = max(int(r["step"]) for r in rows)
    out = {}
    for key in HEALTH:
        values = [float(r[key]) for r in rows if r.get(key) and int(r["step"]) > last - 2 * window]
        out[key.split("/")[1]] = float(np.mean(values)) if values else None
    return out


def exposure(student_dir: Path, store: Path, steps: int) -> dict[str, list[float]]:
    """Per student step, the mean squared distance to the teacher's state on the store's held-out trajectories,
    fed the teacher's states ("fed") and on its own states ("own"): ard.student.exposure."""
    from ard.data.trajectories import TrajectoryDataModule
    from ard.student.exposure import exposure_errors
    from ard.modules.distill import load_exported

    student, _ = load_exported(student_dir)
    data = TrajectoryDataModule(str(store), steps, batch_size=512)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    fed, own = exposure_errors(student, batch["states"], batch["timesteps"], batch["labels"])  # (B, S) each
    return {"fed": fed.mean(0).tolist(), "own": own.mean(0).tolist()}


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
        if all(r.get("health") for r in rs):  # the discriminator's health, mean over seeds
            row["health"] = {k: float(np.mean([r["health"][k] for r in rs])) if all(
                r["health"].get(k) is not None for r in rs) else None for k in rs[0]["health"]}
        gates = [r["history_gate"] for r in rs if r.get("history_gate") is not None]
        if gates:
            row["history_gate_max"] = max(gates)
        if all(r.get("exposure") for r in rs):  # per-step errors, mean over seeds
            row["exposure"] = {k: np.mean([r["exposure"][k] for r in rs], axis=0).tolist() for k in ("fed", "own")}
        if all(r.get("train_seconds") for r in rs):
            row["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        out.append(row)
    for row in out:  # training cost relative to the same model trained with teacher forcing
        plain = next((r for r in out if r["model"] == row["model"].split("+")[0] and r["steps"] == row["steps"]), None)
        if "+" in row["model"] and plain and "train_seconds" in row and "train_seconds" in plain:
            row["train_cost_vs_teacher_forcing"] = row["train_seconds"] / plain["train_seconds"]
    return out


def verdict(agg: list[dict], teacher_steps: int) -> list[dict]:
    """Per student step count S and ARD variant: degradations against the teacher, the baseline's in
    bootstrap sds, and ARD's as a fraction of the baseline's. Against the teacher's samples the degradation
    is the FID itself (the teacher scores 0); against real data it is FID(model) - FID(teacher)."""
    teacher = next(r for r in agg if r["model"].startswith("teacher") and r["steps"] == teacher_steps)
    out = []
    for s in sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}):
        for r in agg:
            if r["steps"] != s or r["model"].startswith(("baseline", "teacher")):
                continue
            core = r["model"].removesuffix(NC)  # compared with the baseline trained and sampled the same way
            if core in GAN_VARIANTS:  # a second stage: against the baseline's same second stage
                base_core = second_stage("baseline", GAN_VARIANTS[core][1])
            else:
                recipe = core.partition("+")[2]
                base_core = "baseline" + ("+" + recipe if recipe else "")
            base_name = base_core + (NC if r["model"].endswith(NC) else "")
            base = next((b for b in agg if b["model"] == base_name and b["steps"] == s), None)
            if base is None:
                continue
            row = {"steps": s, "model": r["model"], "baseline": base_name}
            for m, offset in (("fid_vs_teacher", 0.0), ("fid", teacher["fid"])):
                d_base, d_model = base[m] - offset, r[m] - offset
                sensitive = d_base >= SENSITIVITY * base[m + "_bootstrap_sd"]  # a ratio means nothing otherwise
                row[m] = {"baseline_degradation": d_base, "degradation": d_model,
                          "baseline_in_bootstrap_sd": d_base / base[m + "_bootstrap_sd"], "sensitive": sensitive,
                          "ratio": d_model / d_base if sensitive else None,
                          "meets_target": sensitive and d_model <= TARGET_RATIO * d_base}
            out.append(row)
    return out


def gan_verdict(agg: list[dict], teacher_steps: int) -> list[dict]:
    """Per S and GAN stage (ARD sec. 4, issue 10's goals): its FID against real data against the same student
    trained equally long without the GAN (`-continued`: the reduction must be >= GAN_FID_REDUCTION at S = 2) and
    against the K-step teacher's (at or below it at every S), and its precision against the teacher's (not lower)."""
    teacher = next(r for r in agg if r["model"].startswith("teacher") and r["steps"] == teacher_steps)
    out = []
    for r in agg:
        variant = r["model"].removesuffix(NC)
        if variant not in GAN_VARIANTS or not GAN_VARIANTS[variant][1]:
            continue
        name = second_stage(GAN_VARIANTS[variant][0], False) + r["model"][len(variant):]
        other = next((c for c in agg if c["model"] == name and c["steps"] == r["steps"]), None)
        if other is None:
            continue
        reduction = 1 - r["fid"] / other["fid"]
        out.append({"steps": r["steps"], "model": r["model"], "continued": name, "fid": r["fid"],
                    "fid_continued": other["fid"], "fid_reduction": reduction, "fid_teacher": teacher["fid"],
                    "at_or_below_teacher": r["fid"] <= teacher["fid"], "precision": r["precision"],
                    "precision_teacher": teacher["precision"], "precision_ok": r["precision"] >= teacher["precision"],
                    "reduction_ok": reduction >= GAN_FID_REDUCTION})
    return out


def repo_relative(settings: dict) -> dict:
    """The report's settings with the paths under the repository written relative to it (committed results)."""
    def rel(path):
        return os.path.relpath(path, ROOT) if path and Path(path).resolve().is_relative_to(ROOT) else path

    return {**settings, "teacher": rel(settings["teacher"]), "store": rel(settings.get("store")),
            "students": {name: rel(path) for name, path in settings["students"].items()}}


def markdown(agg: list[dict], checks: list[dict], gan_checks: list[dict], floors: dict, settings: dict) -> str:
    lines = [f"Digits, teacher K = {settings['teacher_steps']} DDIM steps with CFG {settings['guidance_scale']}; "
             f"{settings['num_samples']} samples per model on the same noises and labels; students trained "
             f"{settings['max_steps']} iterations on {settings['num_trajectories']} trajectories; mean ± sd over "
             "training seeds (the teacher rows: one run), and in brackets the bootstrap sd of one run's FID. "
             "Same-noise MSE is per pixel in [-1, 1] units. Noise floors: FID vs teacher "
             f"{floors['teacher']:.2f} (the teacher's {settings['num_samples']} samples against as many from independent "
             f"noises and labels, the rows' footing), FID vs real {floors['real']:.2f} (two random halves of the real "
             "digits). The undistilled teacher at S steps samples at the students' boundary timesteps." + (
                 f" GAN stages (`-gan`) and their comparisons (`-continued`): {settings['gan_steps']} more iterations "
                 f"from the regression student of the same S and seed, {settings['gan_preset']} "
                 f"{' '.join(settings['gan_args'])}; the EMA (decay 0.999) of each run, which in a stage this short "
                 f"keeps {0.999 ** settings['gan_steps']:.2f} of the weights it started from."
                 if "gan_steps" in settings else ""), "",
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
    exposed = sorted((r for r in agg if "exposure" in r), key=lambda r: (r["steps"], r["model"]))
    if exposed:
        lines += ["", "Exposure bias (ard.student.exposure, the store's 512 held-out trajectories): per student step, "
                  "the mean squared distance to the teacher's next state when fed the teacher's states (fed) and on "
                  "the student's own states from x_T (own); the last step's gap is what the student's own states add "
                  "to its final error, the most that history could remove. Training cost: wall time of the run "
                  "against the same model trained with teacher forcing (one thread each; the machine was shared).",
                  "", "| steps | model | fed, per step | own, per step | own / fed at the last step | training cost |",
                  "|---|---|---|---|---|---|"]
        for r in exposed:
            fed, own = r["exposure"]["fed"], r["exposure"]["own"]
            cost = r.get("train_cost_vs_teacher_forcing")
            lines.append(f"| {r['steps']} | {r['model']} | {' / '.join(f'{v:.4f}' for v in fed)} | "
                         f"{' / '.join(f'{v:.4f}' for v in own)} | {own[-1] / fed[-1]:.2f} | "
                         f"{'-' if cost is None else f'{cost:.2f}x'} |")
    if gan_checks:
        lines += ["", "ARD + GAN (computed by the tool): each GAN stage's FID against real data against the same student "
                  "trained equally long without the GAN (goal at S = 2: at least "
                  f"{GAN_FID_REDUCTION:.0%} lower) and against the {settings['teacher_steps']}-step teacher's (goal: at "
                  "or below it), and its precision against the teacher's (goal: not lower).", "",
                  "| steps | model | FID vs real | without the GAN | reduction | teacher's FID | at or below | "
                  "precision | teacher's | not lower |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in gan_checks:
            lines.append(f"| {c['steps']} | {c['model']} | {c['fid']:.2f} | {c['fid_continued']:.2f} | "
                         f"{c['fid_reduction']:.0%} | {c['fid_teacher']:.2f} | {'yes' if c['at_or_below_teacher'] else 'no'} | "
                         f"{c['precision']:.3f} | {c['precision_teacher']:.3f} | {'yes' if c['precision_ok'] else 'no'} |")
    healthy = [r for r in agg if r.get("health")]
    if healthy:
        lines += ["", f"The discriminator's health (the GAN stage's CSV log, means over its last {HEALTH_WINDOW} iterations "
                  "and over seeds): D loss (hinge: 2 when it cannot tell real from fake), the mean logits on real "
                  "training digits, on fakes and on held-out real digits (far below the real ones: memorisation), "
                  "and the adaptive GAN weight lambda.", "",
                  "| steps | model | D loss | logit real | logit fake | logit held-out | lambda |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(healthy, key=lambda r: (r["steps"], r["model"])):
            h = r["health"]
            lines.append(f"| {r['steps']} | {r['model']} | " + " | ".join(
                "-" if h.get(k) is None else f"{h[k]:.2f}"
                for k in ("d_loss", "logits_real", "logits_fake", "logits_holdout", "weight")) + " |")
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


def plot(agg: list[dict], floors: dict, path: Path, teacher_steps: int, metric: str = "fid_vs_teacher") -> None:
    """`metric` ("fid_vs_teacher" or "fid": against real digits) of every model against its step count, mean and
    sd over seeds, with the noise floor and, against real digits, the K-step teacher's own FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    models = sorted({r["model"] for r in agg if r["steps"] != teacher_steps or not r["model"].startswith("teacher")})
    for model in models:
        rs = sorted([r for r in agg if r["model"] == model and r["steps"] != teacher_steps], key=lambda r: r["steps"])
        if rs:
            ax.errorbar([r["steps"] for r in rs], [r[metric] for r in rs],
                        yerr=[r[metric + "_spread"] for r in rs], marker="o", capsize=3, label=model)
    if metric == "fid":
        teacher = next(r for r in agg if r["model"].startswith("teacher") and r["steps"] == teacher_steps)
        ax.axhline(teacher["fid"], color="black", linestyle="--", label=f"teacher, {teacher_steps} steps")
        ax.axhline(floors["real"], color="grey", linestyle=":", label="real digits, two halves")
    else:
        ax.axhline(floors["teacher"], color="grey", linestyle=":", label="teacher samples, N vs N")
    ax.set_yscale("log")  # the undistilled teacher's few-step FIDs are 10x the students'
    ax.set_xticks(sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}))
    save_figure(fig, path, "sampling steps", "FID against " + ("real digits" if metric == "fid" else "the teacher's samples"))


def plot_exposure(agg: list[dict], path: Path) -> None:
    """Per-step error against the teacher's trajectory, fed the teacher's states (dashed) and on the student's own
    states (solid), one panel per S, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in agg if "exposure" in r})
    if not steps:
        return
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, s in zip(axes[0], steps):
        for i, r in enumerate(sorted((r for r in agg if r["steps"] == s and "exposure" in r), key=lambda r: r["model"])):
            x = range(1, s + 1)
            ax.plot(x, r["exposure"]["own"], marker="o", color=f"C{i % 10}", label=f"{r['model']} (own)")
            ax.plot(x, r["exposure"]["fed"], marker="x", linestyle="--", color=f"C{i % 10}")
        ax.set_title(f"S = {s} (dashed: fed the teacher's states)")
        ax.set_yscale("log")
        ax.set_xticks(list(range(1, s + 1)))
    save_figure(fig, path, "student step s (error of x_{s})", "MSE to the teacher's state")


def report_stem(name: str) -> str:
    """File stem of the report --name: <results>/<stem>.{json,md,png}."""
    return name.replace("-", "_")


# Issue 9's grid (ARD_METHOD.md sec. 8): every student depth, each trained on the teacher's and on its own states,
# at the long budget (iterations, trajectories).
GRID_MODELS = ("baseline", "ard-N1", "ard-N2", "ard")
GRID_RECIPES = ("", "rollout")
GRID_BUDGET = (1200, 8192)


def recipe_grid(results: str, names: list[str]) -> str:
    """Markdown: per S, every student (GRID_MODELS, then any other one the reports hold) against every recipe
    (GRID_RECIPES, then any other one run at that S), the FID against the teacher's samples and the same-noise MSE, mean ± sd
    over seeds, from the committed reports `names` (a cell found in several: the one with most seeds, then the
    later report); "not run" where none holds it. Then, per S, the same table sampled with noise correction (the
    reports' NC rows), with the rows and recipes that have any."""
    cells: dict[tuple[str, int, str, str], tuple[dict, int]] = {}  # (NC or "", S, model, recipe)
    for i, name in enumerate(names):
        path = ROOT / results / f"{report_stem(name)}.json"
        report = json.loads(path.read_text())
        budget = report["settings"]["max_steps"], report["settings"]["num_trajectories"]
        if budget != GRID_BUDGET:
            raise SystemExit(f"{path}: trained {budget[0]} iterations on {budget[1]} trajectories, not the grid's "
                             f"{GRID_BUDGET[0]} on {GRID_BUDGET[1]}")
        for r in report["aggregated"]:
            variant = r["model"].removesuffix(NC)
            if variant not in VARIANTS:  # teachers, GAN stages
                continue
            model, _, recipe = variant.partition("+")
            key = (NC if r["model"].endswith(NC) else "", r["steps"], model, recipe)
            if key not in cells or r["seeds"] >= cells[key][0]["seeds"]:
                cells[key] = r, i
    label = {"": "teacher forcing", "ard": "ard (N = 6)"}
    lines = ["FID against the teacher's samples / same-noise MSE, mean ± sd over the training seeds (n), "
             f"{GRID_BUDGET[0]} iterations on {GRID_BUDGET[1]} trajectories; the letter names the report. Reports: "
             + ", ".join(f"({chr(97 + i)}) `{n}`" for i, n in enumerate(names)) + ".", ""]
    for nc in ("", NC):
        held = {k[1:] for k in cells if k[0] == nc}
        if nc and held:
            lines += ["Sampled with noise correction (the first step's predicted noise replaced by the input noise; "
                      "the same students):", ""]
        models = [m for m in GRID_MODELS if not nc or any(k[1] == m for k in held)]
        models += sorted({k[1] for k in held} - set(GRID_MODELS))
        for steps in sorted({k[0] for k in held}, reverse=True):
            at = {k[2] for k in held if k[0] == steps}  # the recipes run at this S
            recipes = [r for r in GRID_RECIPES if not nc or r in at] + sorted(at - set(GRID_RECIPES))
            lines += [f"| S = {steps}{nc} | " + " | ".join(label.get(r, r) for r in recipes) + " |",
                      "|---|" + "---|" * len(recipes)]
            for model in models:
                row = []
                for recipe in recipes:
                    r, i = cells.get((nc, steps, model, recipe), (None, None))
                    if r is None:
                        row.append("not run")
                        continue
                    sd = (f" ± {r['fid_vs_teacher_spread']:.1f}", f" ± {r['mse_vs_teacher_spread']:.4f}") \
                        if r["seeds"] > 1 else ("", "")
                    row.append(f"{r['fid_vs_teacher']:.1f}{sd[0]} / {r['mse_vs_teacher']:.4f}{sd[1]} "
                               f"({r['seeds']}, {chr(97 + i)})")
                if any(c != "not run" for c in row) or (model in GRID_MODELS and not nc):
                    lines.append(f"| {label.get(model, model)} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


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
    parser.add_argument("--train-only", action="store_true", help="train the students, evaluate nothing")
    parser.add_argument("--noise-correction", action="store_true",
                        help="also evaluate every student (and the undistilled teacher) with noise correction")
    parser.add_argument("--refresh-teacher-rows", action="store_true",
                        help="re-evaluate only the teacher rows and floors of the committed report --name, keep the rest")
    parser.add_argument("--merge", action="store_true",
                        help="keep the student rows of the committed report --name that this invocation does not "
                             "evaluate (runs of an earlier checkout), if it was evaluated the same way")
    parser.add_argument("--grid", nargs="+", metavar="REPORT",
                        help="only write the recipe grid (recipe_grid) of these committed reports to "
                             "<results>/<name>.md and the README section --name")
    parser.add_argument("--results", default="docs/results", help="where the report goes")
    parser.add_argument("--name", default="digits-benchmark",
                        help="report file stem and README section (<!-- NAME:start --> ... <!-- NAME:end -->)")
    args = parser.parse_args()

    if args.grid:
        table = recipe_grid(args.results, args.grid)
        write_text_atomic(ROOT / args.results / f"{report_stem(args.name)}.md", table)
        return update_readme(table, args.name)
    work = (ROOT / args.work).resolve()
    if args.refresh_teacher_rows:
        return refresh_teacher_rows(args.results, args.name, work)
    store = work / "store"
    start = time.time()
    manifest = store / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):  # a finished store is kept
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
    if args.train_only:
        return

    from ard.evaluate import evaluate

    rows, floors = [], {}
    for s in sorted({j[1] for j in jobs}):
        trained = [(v, seed, d) for (v, steps, seed), d in zip(jobs, students) if steps == s]
        for nc in (False, True) if args.noise_correction else (False,):
            named = {f"{v}{NC if nc else ''}-seed{seed}": str(d) for v, seed, d in trained}
            out = work / "eval" / f"S{s}{'-nc' if nc else ''}"
            done = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
            if not done or done["settings"]["students"] != named or done["settings"]["num_samples"] != args.num_samples:
                evaluate(students=named, store=str(store), undistilled_steps=[s], num_samples=args.num_samples,
                         out=str(out), cache_dir=str(work / "cache"), wandb=False, noise_correction=nc)
            report = json.loads((out / "report.json").read_text())
            for r in report["rows"]:
                if r["model"] in named:
                    r["history_gate"] = history_gate(Path(named[r["model"]]))
                    r["train_seconds"] = train_seconds(Path(named[r["model"]]))
                    core, seed = r["model"].rsplit("-seed", 1)
                    variant = core.removesuffix(NC)
                    if variant in GAN_VARIANTS:  # the second stage's time against the regression stage it starts from
                        reg = named.get(f"{GAN_VARIANTS[variant][0]}{NC if nc else ''}-seed{seed}")
                        seconds = r["train_seconds"], reg and train_seconds(Path(reg))
                        r["gan_time_ratio"] = seconds[0] / seconds[1] if all(seconds) else None
                        if GAN_VARIANTS[variant][1]:
                            r["health"] = health(Path(named[r["model"]]).parent)
                    if not nc:
                        r["exposure"] = exposure(Path(named[r["model"]]), store, s)
                elif r["model"].startswith("teacher") and nc:
                    r["model"] += NC
            k = report["settings"]["teacher_steps"]  # the K-step teacher row: once, from the first evaluation
            rows += [r for r in report["rows"] if not (rows and r["steps"] == k and r["model"].startswith("teacher"))]
            floors = report["noise_floor"]
    settings = {**repo_relative(report["settings"]), "max_steps": args.max_steps, "num_trajectories": args.num_trajectories,
                "seeds": args.seeds, "invocation_seconds": time.time() - start}  # finished runs are reused
    if args.gan_variants:
        settings |= {"gan_preset": "configs/digits/ard_gan.yaml", "gan_steps": args.gan_steps, "gan_args": args.gan_args}
    if args.merge:
        rows, settings = merge_committed(rows, settings, args.results, args.name)
    write_report(rows, floors, settings, args.results, args.name)


def merge_committed(rows: list[dict], settings: dict, results: str, name: str) -> tuple[list[dict], dict]:
    """Add to this invocation's rows the student rows of the committed report --name that it did not evaluate
    (other seeds or variants, from runs of an earlier checkout that no longer exist), after checking that both
    evaluations are the same: equal EVAL_KEYS, and the K-step teacher row's metrics equal (the same evaluation
    noises, teacher samples and reference features). A row evaluated now replaces its committed one."""
    path = ROOT / results / f"{report_stem(name)}.json"
    if not path.exists():
        return rows, settings
    old = json.loads(path.read_text())
    differ = [k for k in EVAL_KEYS if old["settings"].get(k) != settings.get(k)]
    if differ:
        raise SystemExit(f"--merge: {path} was evaluated with other settings ({', '.join(differ)}); use another --name")

    def k_step_teacher(runs: list[dict]) -> dict:
        return next(r for r in runs if r["steps"] == settings["teacher_steps"] and r["model"].startswith("teacher"))

    old_teacher, new_teacher = k_step_teacher(old["runs"]), k_step_teacher(rows)
    if any(abs(old_teacher[m] - new_teacher[m]) > 1e-3 for m in ("fid", "is", "precision", "recall")):
        raise SystemExit(f"--merge: the teacher's row of {path} differs from this evaluation's (FID vs real "
                         f"{old_teacher['fid']:.4f} against {new_teacher['fid']:.4f}): not the same evaluation set")
    fresh = {(r["model"], r["steps"]) for r in rows}
    kept = [r for r in old["runs"] if not r["model"].startswith("teacher") and (r["model"], r["steps"]) not in fresh]
    seeds = sorted(set(settings["seeds"]) | set(old["settings"]["seeds"]))
    students = {**old["settings"]["students"], **settings["students"]}
    return rows + kept, {**settings, "seeds": seeds, "students": students,
                         "merged_rows": sorted(r["model"] for r in kept)}


def refresh_teacher_rows(results: str, name: str, work: Path) -> None:
    """Re-evaluate only the teacher rows (the K-step teacher, the undistilled teacher at each S) and the noise
    floors of a committed report with today's evaluator, on the same evaluation set (seed and size), and rewrite
    the report. The student rows are kept: their samples, the teacher's samples they are compared with and the
    metrics are unchanged by what a refresh is for (the undistilled rows' timesteps, the teacher floor)."""
    from ard.evaluate import evaluate

    stem = report_stem(name)
    old = json.loads((ROOT / results / f"{stem}.json").read_text())
    settings = old["settings"]
    steps = sorted({r["steps"] for r in old["runs"]} - {settings["teacher_steps"]})
    out = work / "eval" / f"{stem}-teacher"
    evaluate(undistilled_steps=steps, num_samples=settings["num_samples"], seed=settings["seed"],
             teacher_steps=settings["teacher_steps"], guidance_scale=settings["guidance_scale"],
             out=str(out), cache_dir=str(work / "cache"), wandb=False)
    report = json.loads((out / "report.json").read_text())
    kept = [r for r in old["runs"] if not r["model"].startswith("teacher")]
    if not old["settings"].get("teacher_rows_refreshed"):  # written when "ard" meant the closed history start
        for r in kept:
            variant, seed = r["model"].rsplit("-seed", 1)
            r["model"] = f"{RENAMED_SINCE_PLAIN_DEFAULT.get(variant, variant)}-seed{seed}"
    rows = report["rows"] + kept
    write_report(rows, report["noise_floor"], {**repo_relative(old["settings"]), "teacher_rows_refreshed": True},
                 results, name)


def write_report(rows: list[dict], floors: dict, settings: dict, results: str, name: str) -> None:
    """Aggregate, judge, and write <results>/<stem>.{json,md,png}, <stem>_exposure.png and the README section."""
    agg = aggregate(rows)
    checks = verdict(agg, settings["teacher_steps"])
    gan_checks = gan_verdict(agg, settings["teacher_steps"])
    results = ROOT / results
    stem = report_stem(name)
    table = markdown(agg, checks, gan_checks, floors, settings)
    write_text_atomic(results / f"{stem}.json", json.dumps(
        {"settings": settings, "noise_floor": floors, "aggregated": agg, "verdict": checks, "gan_verdict": gan_checks,
         "runs": rows}, indent=1))
    write_text_atomic(results / f"{stem}.md", table)
    plot(agg, floors, results / f"{stem}.png", settings["teacher_steps"])
    if gan_checks:  # the GAN stage's target is the data
        plot(agg, floors, results / f"{stem}_fid_real.png", settings["teacher_steps"], metric="fid")
    plot_exposure(agg, results / f"{stem}_exposure.png")
    update_readme(table, name)
    print(json.dumps({"aggregated": agg, "verdict": checks, "gan_verdict": gan_checks}, indent=1))


if __name__ == "__main__":
    main()
