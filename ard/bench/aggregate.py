"""Aggregation of a benchmark's evaluation rows over training seeds, and the verdicts computed from it: each ARD
variant's degradation against the baseline's (the paper's 1/5 target), and each GAN stage against the student
continued without the GAN and against the teacher (the goals of docs/benchmarks.md, "ARD + GAN")."""
from __future__ import annotations

import re

import numpy as np

from ard.bench.registry import BASELINES, GAN_VARIANTS, NC, second_stage

METRICS = ("fid", "fid_vs_teacher", "mse_vs_teacher", "is", "precision", "recall", "sec_per_image")
OPTIONAL_METRICS = ("prompt_adherence",)  # aggregated where every seed's row has it (ard.evaluate: captions of digits)
SENSITIVITY = 5.0  # the baseline's degradation must be at least this many bootstrap sds
TARGET_RATIO = 0.2  # the paper: ARD degrades at most 1/5 as much as the baseline
GAN_FID_REDUCTION = 0.2  # the goal at S = 2: the GAN stage's FID vs real >= 20% below the continued student's


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds of every metric, per (model, steps): rows named <model>-seed<n> -> one row <model>."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((re.sub(r"-seed\d+$", "", r["model"]), r["steps"]), []).append(r)
    out = []
    for (model, steps), rs in groups.items():
        row = {"model": model, "steps": steps, "nfe": rs[0]["nfe"], "seeds": len(rs)}
        for m in METRICS + tuple(m for m in OPTIONAL_METRICS if all(m in r for r in rs)):
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
        for key in ("train_seconds", "cpu_seconds"):  # wall and CPU seconds of the run, mean over seeds
            if all(r.get(key) for r in rs):
                row[key] = float(np.mean([r[key] for r in rs]))
        out.append(row)
    for row in out:  # training cost relative to the same model trained with teacher forcing
        plain = next((r for r in out if r["model"] == row["model"].split("+")[0] and r["steps"] == row["steps"]), None)
        if "+" in row["model"] and plain and "train_seconds" in row and "train_seconds" in plain:
            row["train_cost_vs_teacher_forcing"] = row["train_seconds"] / plain["train_seconds"]
    return out


def k_step_teacher(rows: list[dict], teacher_steps: int) -> dict:
    """The row of the teacher at its own K steps (the reference every verdict measures against)."""
    return next(r for r in rows if r["model"].startswith("teacher") and r["steps"] == teacher_steps)


def verdict(agg: list[dict], teacher_steps: int) -> list[dict]:
    """Per student step count S and ARD variant: degradations against the teacher, the baseline's in
    bootstrap sds, and ARD's as a fraction of the baseline's. Against the teacher's samples the degradation
    is the FID itself (the teacher scores 0); against real data it is FID(model) - FID(teacher)."""
    teacher = k_step_teacher(agg, teacher_steps)
    out = []
    for s in sorted({r["steps"] for r in agg if r["steps"] != teacher_steps}):
        for r in agg:
            if r["steps"] != s or r["model"].startswith(("baseline", "teacher")):
                continue
            core = r["model"].removesuffix(NC)  # compared with the baseline trained and sampled the same way
            regression, adversarial = GAN_VARIANTS.get(core, (core, None))
            # against the baseline of the same parametrisation (older reports' models: "baseline"), recipe and stage
            model, _, recipe = regression.partition("+")
            base_core = BASELINES.get(model, "baseline") + ("+" + recipe if recipe else "")
            if adversarial is not None:
                base_core = second_stage(base_core, adversarial)
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


def gan_verdict(agg: list[dict], teacher_steps: int, best_regression: dict | None = None) -> list[dict]:
    """Per S and GAN stage (docs/method.md, "The GAN stage"; the goals of docs/benchmarks.md, "ARD + GAN"): its FID
    against real data against the same student continued as long in CPU time without the GAN (`-continued`: at
    least GAN_FID_REDUCTION lower), against the best regression student of the committed digits reports at that S
    (`best_regression`: str(S) -> {"fid", "model", "report"}, from the report's settings; the goal holds at S = 2),
    its recall against the continued student's (not lower by more than that student's seed sd), beside its FID
    against the teacher and the K-step teacher's FID against real data."""
    teacher = k_step_teacher(agg, teacher_steps)
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
        check = {"steps": r["steps"], "model": r["model"], "continued": name, "fid": r["fid"],
                 "fid_continued": other["fid"], "fid_reduction": reduction,
                 "reduction_ok": reduction >= GAN_FID_REDUCTION, "fid_vs_teacher": r["fid_vs_teacher"],
                 "fid_teacher": teacher["fid"], "recall": r["recall"], "recall_continued": other["recall"],
                 "recall_continued_spread": other.get("recall_spread", 0.0),
                 "recall_ok": r["recall"] >= other["recall"] - other.get("recall_spread", 0.0)}
        best = (best_regression or {}).get(str(r["steps"]))
        if best:
            below = 1 - r["fid"] / best["fid"]
            check |= {"fid_best_regression": best["fid"], "best_regression": f"{best['report']}: {best['model']}",
                      "below_best_regression": below, "below_best_ok": below >= GAN_FID_REDUCTION}
        out.append(check)
    return out
