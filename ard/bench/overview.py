"""Markdown views over several committed reports: the recipe grid (every student against every recipe, per S) and
the docs' results summary (one headline comparison per report)."""
from __future__ import annotations

import textwrap

from ard.bench.aggregate import TARGET_RATIO
from ard.bench.registry import GAN_VARIANTS, NC, VARIANTS
from ard.bench.render import mean_sd, table

# The recipe grid (docs/method.md, "Training recipes"): every student depth, each trained on the teacher's and on
# its own states, at the long budget (iterations, trajectories).
GRID_MODELS = ("baseline", "ard-N1", "ard-N2", "ard")
GRID_RECIPES = ("", "rollout")
GRID_BUDGET = (1200, 8192)


def recipe_grid(reports: dict[str, dict]) -> str:
    """Markdown: per S, every student (GRID_MODELS, then any other one the reports hold) against every recipe
    (GRID_RECIPES, then any other one run at that S), the FID against the teacher's samples and the same-noise MSE,
    mean ± sd over seeds, from the committed reports (name -> report; a cell found in several: the one with most
    seeds, then the later report); "not run" where none holds it. Then, per S, the same table sampled with noise
    correction (the reports' NC rows), with the rows and recipes that have any."""
    cells: dict[tuple[str, int, str, str], tuple[dict, int]] = {}  # (NC or "", S, model, recipe)
    for i, (name, report) in enumerate(reports.items()):
        budget = report["settings"]["max_steps"], report["settings"]["num_trajectories"]
        if budget != GRID_BUDGET:
            raise SystemExit(f"report {name}: trained {budget[0]} iterations on {budget[1]} trajectories, not the "
                             f"grid's {GRID_BUDGET[0]} on {GRID_BUDGET[1]}")
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
             + ", ".join(f"({chr(97 + i)}) `{n}`" for i, n in enumerate(reports)) + ".", ""]
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
            rows = []
            for model in models:
                row = [_grid_cell(*cells.get((nc, steps, model, recipe), (None, None))) for recipe in recipes]
                if any(c != "not run" for c in row) or (model in GRID_MODELS and not nc):
                    rows.append([label.get(model, model), *row])
            lines += table([f"S = {steps}{nc}", *(label.get(r, r) for r in recipes)], rows) + [""]
    return "\n".join(lines)


def _grid_cell(r: dict | None, report: int | None) -> str:
    """"FID vs teacher / MSE (seeds, report letter)", with the sds over seeds when there are several."""
    if r is None:
        return "not run"
    return (f"{mean_sd(r, 'fid_vs_teacher', '.1f')} / {mean_sd(r, 'mse_vs_teacher', '.4f')} "
            f"({r['seeds']}, {chr(97 + report)})")


RECIPE_LABELS = {"": "teacher forcing", "backward": "backward distillation", "rollout+srl-if": "rollout + SRL"}
PARAMETRISATION_LABELS = {"baseline-direct": ", next state per step"}  # baseline -> what the recipe label adds


def headline(report: dict) -> dict | None:
    """The verdict row of a benchmark report that the summary shows (None: no ARD student has a baseline): of the
    comparisons sampled without noise correction against a baseline with the most seeds, the S and baseline
    furthest from the teacher (in bootstrap sds: where ARD's claim is tested hardest), and there the ARD student
    with the most seeds, then the lowest FID against the teacher."""
    agg = {(r["model"], r["steps"]): r for r in report["aggregated"]}
    checks = [c for c in report["verdict"] if not c["model"].endswith(NC)]
    if not checks:
        return None
    most = max(agg[c["baseline"], c["steps"]]["seeds"] for c in checks)
    checks = [c for c in checks if agg[c["baseline"], c["steps"]]["seeds"] == most]
    top = max(checks, key=lambda c: c["fid_vs_teacher"]["baseline_in_bootstrap_sd"])
    group = [agg[c["model"], c["steps"]] | {"check": c} for c in checks
             if (c["steps"], c["baseline"]) == (top["steps"], top["baseline"])]
    most = max(r["seeds"] for r in group)
    return min((r for r in group if r["seeds"] == most), key=lambda r: r["fid_vs_teacher"])["check"]


def summary_table(reports: dict[str, dict], links: dict[str, str]) -> str:
    """Markdown: one row per benchmark report (name -> its JSON), its headline comparison: the baseline against the
    best ARD student of the same recipe or stage, FID against the teacher's samples / same-noise MSE, mean ± sd over
    seeds, and the ratio of their degradations; each report's name links to `links[name]`, and the reports without
    a headline (the GAN pilot, the grid: no verdict) follow in one line."""
    checks = {n: headline(r) for n, r in reports.items() if "verdict" in r}
    judged = {n: reports[n] for n, c in checks.items() if c}
    rows = [[f"[{n}]({links[n]})", *_summary_cells(r, checks[n])] for n, r in judged.items()]

    def values(get, fmt: str = "{:g}") -> str:  # a setting of the reports: its one value, or each of them
        return " or ".join(sorted({fmt.format(get(r)) for r in judged.values()}))
    caption = (f"Digits (the shipped teacher, {values(lambda r: r['settings']['teacher_steps'])} DDIM steps, CFG "
               f"{values(lambda r: r['settings']['guidance_scale'])}): per report, the baseline (N = 0) against the "
               "ARD student with the lowest FID against the teacher, same recipe, where the baseline is furthest from "
               "the teacher (in bootstrap sds, among the comparisons with the most seeds). FID vs the teacher's "
               "samples / same-noise MSE, mean ± sd over training seeds (FID floor "
               f"{values(lambda r: r['noise_floor']['teacher'], '{:.2f}')}); ratio: ARD's degradation over the "
               f"baseline's (the paper's target: <= {TARGET_RATIO:g}).")
    others = [f"[{n}]({links[n]})" for n in reports if n not in judged]
    header = ["report", "S", "recipe, iterations", "seeds", "baseline", "best ARD", "ratio"]
    text = [_wrap(caption), "\n".join(table(header, rows))]
    text += [_wrap("Also: " + ", ".join(others) + ".")] if others else []
    return "\n\n".join(text) + "\n"


def _wrap(paragraph: str) -> str:
    """A paragraph in lines of at most 115 characters, as the README's."""
    return textwrap.fill(paragraph, 115, break_long_words=False, break_on_hyphens=False)


def _summary_cells(report: dict, check: dict) -> list[str]:
    """A summary row after the report's name: S, recipe or stage and iterations, seeds (the baseline's, and the
    ARD student's where they differ), both students' FID vs teacher / MSE, the ratio of their degradations."""
    agg = {(r["model"], r["steps"]): r for r in report["aggregated"]}
    base, ard = agg[check["baseline"], check["steps"]], agg[check["model"], check["steps"]]
    stage, (baseline, _, recipe) = GAN_VARIANTS.get(check["baseline"]), check["baseline"].partition("+")
    label = ("GAN stage" if stage[1] else "continued without the GAN") if stage else RECIPE_LABELS.get(recipe, recipe)
    label += PARAMETRISATION_LABELS.get(baseline, "")
    iterations = f"{report['settings']['max_steps']}" + (f" + {report['settings']['gan_steps']}" if stage else "")
    seeds = f"{base['seeds']}" + (f" / {ard['seeds']}" if ard["seeds"] != base["seeds"] else "")
    ratio = check["fid_vs_teacher"]["ratio"]

    def cell(r: dict) -> str:
        return f"{mean_sd(r, 'fid_vs_teacher', '.2f')} / {mean_sd(r, 'mse_vs_teacher', '.4f')}"
    return [str(check["steps"]), f"{label}, {iterations}", seeds, cell(base), f"{ard['model']}: {cell(ard)}",
            "-" if ratio is None else f"{ratio:.2f}"]
