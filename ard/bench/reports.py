"""The report files of a benchmark, <results>/<stem>.{json,md,png} (docs/results by default): building a report
from evaluation rows, writing it, reading a committed one, merging a committed report's rows into a new one, and
the recipe grid over several of them."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ard.atomic import write_text_atomic
from ard.bench import ROOT
from ard.bench.aggregate import aggregate, gan_verdict, k_step_teacher, verdict
from ard.bench.plots import plot_exposure, plot_fid
from ard.bench.registry import GAN_VARIANTS, NC
from ard.bench.overview import recipe_grid
from ard.bench.render import report_markdown

# Evaluation settings that must be equal for rows of a committed report to be merged with new ones (--merge)
EVAL_KEYS = ("teacher", "teacher_identity", "solver", "num_samples", "seed", "reference", "extractor", "max_steps",
             "num_trajectories", "ema")
GAN_KEYS = ("gan_preset", "gan_steps", "gan_args")  # ... and of their second stages, where both reports have them


def report_stem(name: str) -> str:
    """File stem of the report `name` (--name, the docs' section): digits-recipes -> digits_recipes."""
    return name.replace("-", "_")


def report_path(results: str | Path, name: str, suffix: str = ".json") -> Path:
    """<results>/<stem><suffix>, `results` relative to the repository (or absolute)."""
    return ROOT / results / f"{report_stem(name)}{suffix}"


def load_report(results: str | Path, name: str) -> dict:
    return json.loads(report_path(results, name).read_text())


def repo_relative(settings: dict) -> dict:
    """The report's settings with the paths under the repository written relative to it (committed results)."""
    def rel(path):
        return os.path.relpath(path, ROOT) if path and Path(path).resolve().is_relative_to(ROOT) else path

    return {**settings, "teacher": rel(settings["teacher"]), "store": rel(settings.get("store")),
            "students": {name: rel(path) for name, path in settings["students"].items()}}


def build_report(rows: list[dict], floors: dict, settings: dict) -> dict:
    """The report (<stem>.json): per-run rows aggregated over seeds and judged."""
    agg = aggregate(rows)
    return {"settings": settings, "noise_floor": floors, "aggregated": agg,
            "verdict": verdict(agg, settings["teacher_steps"]),
            "gan_verdict": gan_verdict(agg, settings["teacher_steps"], settings.get("best_regression")), "runs": rows}


def write_report(rows: list[dict], floors: dict, settings: dict, results: str | Path, name: str) -> dict:
    """Build the report and write <results>/<stem>.{json,md,png}, <stem>_exposure.png (and <stem>_fid_real.png with
    GAN stages, whose target is the data); print its aggregated rows and verdicts as JSON."""
    report = build_report(rows, floors, settings)
    agg, teacher_steps = report["aggregated"], settings["teacher_steps"]
    write_text_atomic(report_path(results, name), json.dumps(report, indent=1))
    write_text_atomic(report_path(results, name, ".md"), report_markdown(report))
    plot_fid(agg, floors, report_path(results, name, ".png"), teacher_steps)
    if report["gan_verdict"]:
        plot_fid(agg, floors, report_path(results, name, "_fid_real.png"), teacher_steps, metric="fid")
    plot_exposure(agg, report_path(results, name, "_exposure.png"))
    print(json.dumps({k: report[k] for k in ("aggregated", "verdict", "gan_verdict")}, indent=1))
    return report


def merge_committed(rows: list[dict], settings: dict, results: str | Path, name: str) -> tuple[list[dict], dict]:
    """Add to this invocation's rows the student rows of the committed report `name` that it did not evaluate
    (other seeds or variants, from runs of an earlier checkout that no longer exist), after checking that both
    evaluations are the same: equal EVAL_KEYS, and the K-step teacher row's metrics equal (the same evaluation
    noises, teacher samples and reference features). A row evaluated now replaces its committed one."""
    path = report_path(results, name)
    if not path.exists():
        return rows, settings
    old = json.loads(path.read_text())
    differ = [k for k in EVAL_KEYS if old["settings"].get(k) != settings.get(k)]
    if differ:
        raise SystemExit(f"--merge: {path} was evaluated with other settings ({', '.join(differ)}); use another --name")
    old_teacher, new_teacher = (k_step_teacher(r, settings["teacher_steps"]) for r in (old["runs"], rows))
    if any(abs(old_teacher[m] - new_teacher[m]) > 1e-3 for m in ("fid", "is", "precision", "recall")):
        raise SystemExit(f"--merge: the teacher's row of {path} differs from this evaluation's (FID vs real "
                         f"{old_teacher['fid']:.4f} against {new_teacher['fid']:.4f}): not the same evaluation set")
    stages = [k for k in GAN_KEYS if k in old["settings"] and k in settings and old["settings"][k] != settings[k]]
    if stages:
        raise SystemExit(f"--merge: {path}'s second stages were trained with other settings ({', '.join(stages)}); "
                         "use another --name")
    fresh = {(r["model"], r["steps"]) for r in rows}
    kept = [r for r in old["runs"] if (r["model"], r["steps"]) not in fresh]  # the undistilled teacher at other S too
    seeds = sorted(set(settings["seeds"]) | set(old["settings"]["seeds"]))
    students = {**old["settings"]["students"], **settings["students"]}
    merged = {**settings, "seeds": seeds, "students": students, "merged_rows": sorted(r["model"] for r in kept)}
    if "cpu_match" in settings:  # the CPU matches of the (variant, S) not timed now
        now = {(m["variant"], m["steps"]) for m in settings["cpu_match"]}
        merged["cpu_match"] = [m for m in old["settings"].get("cpu_match", []) if (m["variant"], m["steps"]) not in now
                               ] + settings["cpu_match"]
    if "best_regression" in settings:  # the regression bars of the S not evaluated now
        merged["best_regression"] = {**old["settings"].get("best_regression", {}), **settings["best_regression"]}
    return rows + kept, merged


def best_regression(results: str | Path, rows: list[dict], settings: dict) -> dict:
    """Per S of `rows` (this evaluation's), the regression student (no second stage, no teacher, sampled without
    noise correction) with the lowest mean FID against real data among `rows` and the committed reports in
    `results` evaluated the same way (the teacher, guidance, evaluation set and feature extractor of `settings`):
    str(S) -> {"fid", "model", "report"}; the bar a GAN stage must clear (aggregate.gan_verdict)."""
    same = ("teacher_identity", "guidance_scale", "teacher_steps", "num_samples", "seed", "reference", "extractor")
    candidates = [("this report", r) for r in aggregate(rows)]
    for path in sorted((ROOT / results).glob("*.json")):
        report = json.loads(path.read_text())
        if "aggregated" in report and all(report["settings"].get(k) == settings.get(k) for k in same):
            candidates += [(path.stem, r) for r in report["aggregated"]]
    best = {}
    for s in sorted({r["steps"] for r in rows} - {settings["teacher_steps"]}):
        regression = [(name, r) for name, r in candidates if r["steps"] == s and not r["model"].startswith("teacher")
                      and r["model"] not in GAN_VARIANTS and not r["model"].endswith(NC)]
        if regression:
            name, r = min(regression, key=lambda c: c[1]["fid"])
            best[str(s)] = {"fid": r["fid"], "model": r["model"], "report": name}
    return best


def write_grid(results: str | Path, names: list[str], name: str) -> str:
    """The recipe grid of the committed reports `names`, written to <results>/<stem of name>.md."""
    grid = recipe_grid({n: load_report(results, n) for n in names})
    write_text_atomic(report_path(results, name, ".md"), grid)
    return grid
