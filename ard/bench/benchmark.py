"""One benchmark invocation (scripts/bench_digits.py): the store, every student trained (`--workers` at a time),
each S evaluated over all its students with the teacher rows, the probes added to each student's row, and the
report written; and the refresh of a committed report's teacher rows with today's evaluator."""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ard.bench.probes import exposure, health, history_gate
from ard.bench.registry import GAN_PRESET, GAN_VARIANTS, GRIDS, NC, RENAMED_SINCE_PLAIN_DEFAULT
from ard.bench.reports import (best_regression, load_report, merge_committed, report_stem, repo_relative,
                               write_report)
from ard.bench.runs import ema_setting, fit, precompute, train_seconds

Job = tuple[str, int, int]  # (variant, S, seed)


def train(work: Path, store: Path, jobs: list[Job], gan_jobs: list[Job], max_steps: int, gan_steps: int,
          gan_args: tuple[str, ...], workers: int, grid: str = "leading24") -> tuple[dict[Job, Path], list[dict]]:
    """Every regression student, then every second stage from the regression student of its S and seed (which
    `jobs` must hold); `workers` runs at a time, one thread each. A GAN stage trains `gan_steps` iterations, the
    student continued without it as many as use the same CPU time (recipe_cost.cpu_matched_iterations, timed once
    per regression variant and S from its first seed's student). Returns job -> exported EMA student, and the CPU
    matches."""
    from ard.bench.recipe_cost import cpu_matched_iterations

    missing = sorted({GAN_VARIANTS[v][0] for v, s, seed in gan_jobs if (GAN_VARIANTS[v][0], s, seed) not in jobs})
    if missing:
        raise SystemExit(f"--gan-variants need the regression variants {missing} in --variants")
    with ThreadPoolExecutor(workers) as pool:
        students = dict(zip(jobs, pool.map(lambda j: fit(work, store, *j, max_steps, 1, grid=grid), jobs)))
        matches = {}
        key = hashlib.sha256(json.dumps([gan_steps, *gan_args]).encode()).hexdigest()[:12]  # the match's cache key
        for v, s, seed in gan_jobs:
            reg = GAN_VARIANTS[v][0]
            if not GAN_VARIANTS[v][1] and (reg, s) not in matches:
                first = students[next(j for j in jobs if j[:2] == (reg, s))]
                matches[reg, s] = cpu_matched_iterations(work / "cpu_match" / f"{reg}-S{s}-{key}.json", store, s,
                                                         reg, first, gan_steps, gan_args, GRIDS[grid].fit)

        def second(job: Job) -> Path:
            reg, adversarial = GAN_VARIANTS[job[0]]
            iterations = gan_steps if adversarial else matches[reg, job[1]]["continued_steps"]
            return fit(work, store, *job, iterations, 1, students[(reg, *job[1:])], gan_args, grid)
        students |= dict(zip(gan_jobs, pool.map(second, gan_jobs)))
    return students, list(matches.values())


def probe(row: dict, named: dict[str, str], store: Path, steps: int, nc: bool) -> None:
    """Add to a student's evaluation row its history gate, training time, exposure bias (sampled without noise
    correction) and, for a second stage, its time against its regression stage and the discriminator's health."""
    student = Path(named[row["model"]])
    row["history_gate"] = history_gate(student)
    row["train_seconds"] = train_seconds(student)
    row["cpu_seconds"] = train_seconds(student, "cpu_seconds")
    core, seed = row["model"].rsplit("-seed", 1)
    variant = core.removesuffix(NC)
    if variant in GAN_VARIANTS:  # the second stage's time against the regression stage it starts from
        reg = named.get(f"{GAN_VARIANTS[variant][0]}{NC if nc else ''}-seed{seed}")
        seconds = row["train_seconds"], reg and train_seconds(Path(reg))
        row["gan_time_ratio"] = seconds[0] / seconds[1] if all(seconds) else None
        if GAN_VARIANTS[variant][1]:
            row["health"] = health(student.parent)
    if not nc:
        row["exposure"] = exposure(student, store, steps)


def evaluate_all(work: Path, store: Path, students: dict[Job, Path], num_samples: int,
                 noise_correction: bool, grid: str = "leading24") -> tuple[list[dict], dict, dict]:
    """`ard.evaluate.evaluate` per S over every student of that S (and, with `noise_correction`, again sampled with
    it), the K-step and the undistilled S-step teacher included; an evaluation of the same students and size in
    <work>/eval is reused. Returns the rows (probed; the K-step teacher's once), the noise floors and the last
    evaluation's settings."""
    from ard.evaluate import evaluate

    rows = []
    for s in sorted({steps for _, steps, _ in students}):
        for nc in (False, True) if noise_correction else (False,):
            named = {f"{v}{NC if nc else ''}-seed{seed}": str(d) for (v, steps, seed), d in students.items()
                     if steps == s}
            out = work / "eval" / f"S{s}{'-nc' if nc else ''}"
            done = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
            if not done or done["settings"]["students"] != named or done["settings"]["num_samples"] != num_samples:
                teacher = {"teacher": GRIDS[grid].teacher} if GRIDS[grid].teacher else {}  # else ard-eval's default
                evaluate(students=named, store=str(store), undistilled_steps=[s], num_samples=num_samples,
                         out=str(out), cache_dir=str(work / "cache"), wandb=False, noise_correction=nc, **teacher)
            report = json.loads((out / "report.json").read_text())
            for r in report["rows"]:
                if r["model"] in named:
                    probe(r, named, store, s, nc)
                elif r["model"].startswith("teacher") and nc:
                    r["model"] += NC
            k = report["settings"]["teacher_steps"]  # the K-step teacher row: once, from the first evaluation
            rows += [r for r in report["rows"] if not (rows and r["steps"] == k and r["model"].startswith("teacher"))]
    return rows, report["noise_floor"], report["settings"]


def benchmark(*, work: Path, results: str, name: str, steps: list[int], variants: list[str],
              knob_variants: list[str], knob_steps: int, gan_variants: list[str], gan_steps: int, gan_args: list[str],
              seeds: list[int], num_trajectories: int, max_steps: int, num_samples: int, workers: int,
              train_only: bool, noise_correction: bool, merge: bool, grid: str = "leading24") -> None:
    """The store, the students of `variants` at every S of `steps` (`knob_variants` at `knob_steps` only, the GAN
    stages of `gan_variants` at every S) over `seeds`; unless `train_only`, their evaluation and the report
    <results>/<stem of name>.* (with `merge`, the committed report's rows this invocation did not evaluate kept).
    `grid`: the training store's teacher grid and the students' boundaries on it (ard.bench.registry.GRIDS)."""
    store = work / "store"
    start = time.time()
    precompute(store, num_trajectories, work / "precompute.log", grid)
    jobs = [(v, s, seed) for s in steps for v in variants for seed in seeds]
    jobs += [(v, knob_steps, seed) for v in knob_variants for seed in seeds]
    gan_jobs = [(v, s, seed) for s in steps for v in gan_variants for seed in seeds]
    students, matches = train(work, store, jobs, gan_jobs, max_steps, gan_steps, tuple(gan_args), workers, grid)
    if train_only:
        return
    rows, floors, evaluated = evaluate_all(work, store, students, num_samples, noise_correction, grid)
    settings = {**repo_relative(evaluated), "max_steps": max_steps, "num_trajectories": num_trajectories,
                "seeds": seeds, "grid": grid, "ema": ema_setting(grid),
                "invocation_seconds": time.time() - start}  # finished runs are reused
    if gan_variants:
        settings |= {"gan_preset": GAN_PRESET, "gan_steps": gan_steps, "gan_args": gan_args, "cpu_match": matches,
                     "best_regression": best_regression(results, rows, settings)}
    if merge:
        rows, settings = merge_committed(rows, settings, results, name)
    write_report(rows, floors, settings, results, name)


def refresh_teacher_rows(results: str, name: str, work: Path) -> None:
    """Re-evaluate only the teacher rows (the K-step teacher, the undistilled teacher at each S) and the noise
    floors of a committed report with today's evaluator, on the same evaluation set (seed and size), and rewrite
    the report. The student rows are kept: their samples, the teacher's samples they are compared with and the
    metrics are unchanged by what a refresh is for (the undistilled rows' timesteps, the teacher floor)."""
    from ard.evaluate import evaluate

    old = load_report(results, name)
    settings = old["settings"]
    steps = sorted({r["steps"] for r in old["runs"]} - {settings["teacher_steps"]})
    out = work / "eval" / f"{report_stem(name)}-teacher"
    evaluate(undistilled_steps=steps, num_samples=settings["num_samples"], seed=settings["seed"],
             teacher_steps=settings["teacher_steps"], guidance_scale=settings["guidance_scale"],
             out=str(out), cache_dir=str(work / "cache"), wandb=False)
    report = json.loads((out / "report.json").read_text())
    kept = [r for r in old["runs"] if not r["model"].startswith("teacher")]
    if not settings.get("teacher_rows_refreshed"):  # written when "ard" meant the closed history start
        for r in kept:
            variant, seed = r["model"].rsplit("-seed", 1)
            r["model"] = f"{RENAMED_SINCE_PLAIN_DEFAULT.get(variant, variant)}-seed{seed}"
    write_report(report["rows"] + kept, report["noise_floor"],
                 {**repo_relative(settings), "teacher_rows_refreshed": True}, results, name)
