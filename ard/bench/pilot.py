"""The GAN pilot (scripts/pilot_gan.py): one regression student, then from it the student continued without the GAN
and one GAN stage per knob setting (registry.PILOT_KNOBS), one evaluation of all of them with the discriminator's
health and the training times, written to <results>/<stem of name>.{json,md}."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from ard.atomic import write_text_atomic
from ard.bench import ROOT
from ard.bench.probes import health
from ard.bench.registry import GAN_PRESET, PILOT_KNOBS, second_stage
from ard.bench.render import pilot_markdown
from ard.bench.reports import report_path
from ard.bench.runs import ema_setting, fit, precompute, train_seconds

KEPT = ("fid", "fid_sd", "fid_vs_teacher", "fid_vs_teacher_sd", "mse_vs_teacher", "precision", "recall")


def gan_block() -> dict:
    """The GAN block (model.init_args.gan) of GAN_PRESET as it is now: what every knob setting overrides."""
    return yaml.safe_load((ROOT / GAN_PRESET).read_text())["model"]["init_args"]["gan"]


def pilot(*, work: Path, results: str, steps: int, seed: int, num_trajectories: int, reg_steps: int, gan_steps: int,
          warmup: int, knobs: list[str], num_samples: int, health_window: int, workers: int, variant: str = "ard",
          name: str = "gan-pilot") -> dict:
    """Train (resumable), evaluate and write the pilot of the regression `variant` (registry.VARIANTS); returns the
    report (<results>/<stem of name>.json)."""
    from ard.evaluate import evaluate

    store = work / "store"
    start = time.time()
    precompute(store, num_trajectories, work / "precompute.log")
    regression = fit(work, store, variant, steps, seed, reg_steps, 1)
    continued = second_stage(variant, False)
    jobs = [(continued, work, [])] + [
        (second_stage(variant, True), work / k, [f"--model.init_args.gan.warmup={warmup}", *PILOT_KNOBS[k]])
        for k in knobs]
    with ThreadPoolExecutor(workers) as pool:
        students = list(pool.map(
            lambda j: fit(j[1], store, j[0], steps, seed, gan_steps, 1, regression, tuple(j[2])), jobs))
    named = dict(zip([variant, continued, *knobs], map(str, [regression, *students])))
    rows = evaluate(students=named, undistilled_steps=[], num_samples=num_samples, out=str(work / "eval"),
                    cache_dir=str(work / "cache"), wandb=False)
    reg_seconds = train_seconds(regression)
    out_rows = []
    for r in rows:
        row = {"model": r["model"], "steps": r["steps"], **{k: r[k] for k in KEPT}}
        if r["model"] in named:
            seconds = train_seconds(Path(named[r["model"]]))
            iterations = reg_steps if r["model"] == variant else gan_steps
            row |= {"train_seconds": seconds, "iterations": iterations,
                    "seconds_per_iteration_vs_regression": seconds / iterations / (reg_seconds / reg_steps)}
            if r["model"] in knobs:
                row["health"] = health(Path(named[r["model"]]).parent, health_window)
                row["overrides"] = PILOT_KNOBS[r["model"]]
        out_rows.append(row)
    settings = {"variant": variant, "ema": ema_setting(), "steps": steps, "seed": seed,
                "num_trajectories": num_trajectories, "reg_steps": reg_steps, "gan_steps": gan_steps, "warmup": warmup,
                "num_samples": num_samples, "health_window": health_window,
                "gan_preset": GAN_PRESET, "gan_block": gan_block(), "threads_per_run": 1, "workers": workers,
                "load_average_at_end": os.getloadavg(), "invocation_seconds": time.time() - start}
    result = {"settings": settings, "rows": out_rows}
    write_text_atomic(report_path(results, name), json.dumps(result, indent=1) + "\n")
    write_text_atomic(report_path(results, name, ".md"), pilot_markdown(result))
    return result
