"""A control report over several teachers' benchmark reports (one per teacher grid, ard.bench.registry.GRIDS): per
teacher and S, the baseline's degradation against its own teacher (FID against the teacher's samples, same-noise
MSE; mean and sd over seeds), ARD's, and ARD's ratio to the baseline, seed by seed (ARD and the baseline of one seed
share the seed's data order and initial noise), with its mean and sd. Written to <results>/<stem>.{json,md,png}; the
per-teacher reports are kept inside the JSON, so the control report alone holds every row it was made from."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ard.atomic import write_atomic, write_text_atomic
from ard.bench.aggregate import k_step_teacher
from ard.bench.plots import _pyplot
from ard.bench.reports import load_report, report_path
from ard.bench.render import table

DEGRADATION = ("fid_vs_teacher", "mse_vs_teacher")  # what a student loses against its own teacher


@dataclass(frozen=True)
class Control:
    """A control: the question it answers and its teachers, each a label and the name of its benchmark report."""
    question: str
    teachers: tuple[tuple[str, str], ...]


CONTROLS: dict[str, Control] = {
    "digits-flow": Control("Control 1, the teacher's parametrisation: does history help more (or less) when the "
                           "teacher is a flow-matching model than when it predicts epsilon? Same architecture, data, "
                           "recipe, budget and CFG scale.",
                           (("epsilon (DDIM)", "control-cfg15"), ("flow (Euler)", "control-flow"))),
    "digits-size": Control("Control 2, model size: does history matter more for small or for large teachers? Three "
                           "epsilon teachers of one family (6 blocks, 4 heads) at widths 32 / 64 / 128, same recipe, "
                           "budget and CFG scale.",
                           (("width 32", "control-w32"), ("width 64", "control-w64"), ("width 128", "control-cfg15"))),
}


def _seed_rows(report: dict, variant: str, steps: int) -> dict[int, dict]:
    """The report's per-seed rows of `variant` at S = `steps`, by seed."""
    pattern = re.compile(re.escape(variant) + r"-seed(\d+)$")
    return {int(m.group(1)): r for r in report["runs"] if r["steps"] == steps and (m := pattern.match(r["model"]))}


def _mean_sd(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def control_rows(report: dict, teacher: str, baseline: str, ard: str) -> list[dict]:
    """One row per S of one teacher's report: the undistilled teacher's, the baseline's and ARD's degradation, and
    ARD's per-seed ratio to the baseline (seeds both have)."""
    k = report["settings"]["teacher_steps"]
    rows = []
    for s in sorted({r["steps"] for r in report["runs"]} - {k}):
        base, hist = _seed_rows(report, baseline, s), _seed_rows(report, ard, s)
        seeds = sorted(set(base) & set(hist))
        if not seeds:
            continue
        undistilled = k_step_teacher(report["aggregated"], s)  # the teacher's row at S steps: undistilled
        row = {"teacher": teacher, "steps": s, "seeds": seeds,
               "undistilled": {m: undistilled[m] for m in DEGRADATION}}
        for m in DEGRADATION:
            row[f"baseline_{m}"] = _mean_sd([base[i][m] for i in seeds])
            row[f"ard_{m}"] = _mean_sd([hist[i][m] for i in seeds])
            row[f"ratio_{m}"] = _mean_sd([hist[i][m] / base[i][m] for i in seeds])
        rows.append(row)
    return rows


def _teacher_summary(report: dict) -> dict:
    """The teacher's own figures in its report: FID against real digits at K steps, the teacher-vs-teacher floor."""
    settings = report["settings"]
    k_step = k_step_teacher(report["aggregated"], settings["teacher_steps"])
    return {"teacher": settings["teacher"], "solver": settings["solver"]["name"],
            "guidance_scale": settings["guidance_scale"], "fid_vs_real": k_step["fid"],
            "teacher_floor": report["noise_floor"]["teacher"], "real_floor": report["noise_floor"]["real"]}


def build_control(name: str, results: str | Path, baseline: str, ard: str) -> dict:
    """The control report `name` (CONTROLS) from its teachers' committed-or-work reports under `results`."""
    control = CONTROLS[name]
    reports = {label: load_report(results, report) for label, report in control.teachers}
    shared = ("max_steps", "num_trajectories", "seeds", "num_samples", "ema", "guidance_scale")
    settings = {key: {label: r["settings"].get(key) for label, r in reports.items()} for key in shared}
    differ = [key for key, values in settings.items() if len({json.dumps(v) for v in values.values()}) > 1]
    if differ:
        raise SystemExit(f"{name}: its teachers' reports differ in {', '.join(differ)}; a control compares teachers "
                         "under one budget and evaluation")
    return {"name": name, "question": control.question, "baseline": baseline, "ard": ard,
            "settings": {key: next(iter(v.values())) for key, v in settings.items()},
            "teachers": {label: _teacher_summary(r) for label, r in reports.items()},
            "rows": [row for label, r in reports.items() for row in control_rows(r, label, baseline, ard)],
            "reports": reports}


def _cell(stat: dict, fmt: str) -> str:
    return f"{stat['mean']:{fmt}} ± {stat['sd']:{fmt}}"


def control_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [report["question"], "",
             f"Students: `{report['baseline']}` (N = 0) and `{report['ard']}`, {s['max_steps']} iterations, seeds "
             f"{', '.join(map(str, s['seeds']))}, {s['num_trajectories']} trajectories per store, the teacher's CFG "
             f"{s['guidance_scale']}, {s['ema']}; every student evaluated on {s['num_samples']} held-out noises "
             "against its own teacher's samples from the same noises. Cells: mean ± sd over seeds; the ratio is ARD "
             "over the baseline of the same seed (below 1: history helps).", "",
             "The teachers (24 steps, the evaluation's samples; FID of two independent teacher sample sets as the "
             "floor of FID vs teacher):", ""]
    lines += table(["teacher", "solver", "FID vs real", "teacher vs teacher floor", "path"],
                   [[label, t["solver"], f"{t['fid_vs_real']:.2f}", f"{t['teacher_floor']:.2f}", f"`{t['teacher']}`"]
                    for label, t in report["teachers"].items()])
    lines += ["", "Each student's degradation against its own teacher, and the undistilled teacher at S steps:", ""]
    lines += table(["teacher", "S", "undistilled FID vs teacher / MSE", "baseline FID vs teacher", "baseline MSE",
                    "ARD FID vs teacher", "ARD MSE", "ratio FID vs teacher", "ratio MSE"],
                   [[r["teacher"], str(r["steps"]),
                     f"{r['undistilled']['fid_vs_teacher']:.2f} / {r['undistilled']['mse_vs_teacher']:.4f}",
                     _cell(r["baseline_fid_vs_teacher"], ".2f"), _cell(r["baseline_mse_vs_teacher"], ".4f"),
                     _cell(r["ard_fid_vs_teacher"], ".2f"), _cell(r["ard_mse_vs_teacher"], ".4f"),
                     _cell(r["ratio_fid_vs_teacher"], ".2f"), _cell(r["ratio_mse_vs_teacher"], ".3f")]
                    for r in report["rows"]])
    return "\n".join(lines) + "\n"


def plot_control(report: dict, path: Path) -> None:
    """Per S, the baseline's same-noise MSE (left) and ARD's ratio to it (right) against the teacher, seed sd bars."""
    plt = _pyplot()
    labels = list(report["teachers"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for s in sorted({r["steps"] for r in report["rows"]}):
        rows = {r["teacher"]: r for r in report["rows"] if r["steps"] == s}
        x = [i for i, label in enumerate(labels) if label in rows]
        for ax, key in zip(axes, ("baseline_mse_vs_teacher", "ratio_mse_vs_teacher")):
            stats = [rows[labels[i]][key] for i in x]
            ax.errorbar(x, [st["mean"] for st in stats], yerr=[st["sd"] for st in stats], marker="o", capsize=3,
                        label=f"S = {s}")
    axes[0].set_ylabel("baseline same-noise MSE to its teacher")
    axes[1].set_ylabel("ARD / baseline (same seed)")
    axes[1].axhline(1.0, color="grey", linestyle=":")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_control(name: str, inputs: str | Path, results: str | Path, baseline: str, ard: str) -> dict:
    """Build the control `name` from the teachers' reports in `inputs`; write <results>/<stem>.{json,md,png}."""
    report = build_control(name, inputs, baseline, ard)
    write_text_atomic(report_path(results, name), json.dumps(report, indent=1))
    write_text_atomic(report_path(results, name, ".md"), control_markdown(report))
    plot_control(report, report_path(results, name, ".png"))
    print(json.dumps(report["rows"], indent=1))
    return report
