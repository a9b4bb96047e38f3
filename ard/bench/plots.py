"""The benchmark report's figures: FID (against the teacher's samples or real digits) against the step count, and
the per-step exposure errors."""
from __future__ import annotations

from pathlib import Path

from ard.bench.aggregate import k_step_teacher
from ard.viz import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fid(agg: list[dict], floors: dict, path: Path, teacher_steps: int, metric: str = "fid_vs_teacher") -> None:
    """`metric` ("fid_vs_teacher" or "fid": against real digits) of every model against its step count, mean and
    sd over seeds, with the noise floor and, against real digits, the K-step teacher's own FID."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    models = sorted({r["model"] for r in agg if r["steps"] != teacher_steps or not r["model"].startswith("teacher")})
    for model in models:
        rs = sorted([r for r in agg if r["model"] == model and r["steps"] != teacher_steps], key=lambda r: r["steps"])
        if rs:
            ax.errorbar([r["steps"] for r in rs], [r[metric] for r in rs],
                        yerr=[r[metric + "_spread"] for r in rs], marker="o", capsize=3, label=model)
    if metric == "fid":
        ax.axhline(k_step_teacher(agg, teacher_steps)["fid"], color="black", linestyle="--",
                   label=f"teacher, {teacher_steps} steps")
        ax.axhline(floors["real"], color="grey", linestyle=":", label="real digits, two halves")
    else:
        ax.axhline(floors["teacher"], color="grey", linestyle=":", label="teacher samples, N vs N")
    ax.set_yscale("log")  # the undistilled teacher's few-step FIDs are 10x the students'
    ax.set_xticks(sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}))
    against = "real digits" if metric == "fid" else "the teacher's samples"
    save_figure(fig, path, "sampling steps", f"FID against {against}")


def plot_exposure(agg: list[dict], path: Path) -> None:
    """Per-step error against the teacher's trajectory, fed the teacher's states (dashed) and on the student's own
    states (solid), one panel per S, one colour per model; nothing without exposure rows."""
    steps = sorted({r["steps"] for r in agg if "exposure" in r})
    if not steps:
        return
    fig, axes = _pyplot().subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, s in zip(axes[0], steps):
        rows = sorted((r for r in agg if r["steps"] == s and "exposure" in r), key=lambda r: r["model"])
        for i, r in enumerate(rows):
            x = range(1, s + 1)
            ax.plot(x, r["exposure"]["own"], marker="o", color=f"C{i % 10}", label=f"{r['model']} (own)")
            ax.plot(x, r["exposure"]["fed"], marker="x", linestyle="--", color=f"C{i % 10}")
        ax.set_title(f"S = {s} (dashed: fed the teacher's states)")
        ax.set_yscale("log")
        ax.set_xticks(list(range(1, s + 1)))
    save_figure(fig, path, "student step s (error of x_{s})", "MSE to the teacher's state")
