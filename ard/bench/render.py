"""The Markdown of one report file: a benchmark report (metrics, verdicts, exposure, GAN goals and health, notes)
and the GAN pilot's table; every table drawn by ard.metrics.table."""
from __future__ import annotations

from dataclasses import replace

from ard.bench.aggregate import GAN_FID_REDUCTION, METRICS, OPTIONAL_METRICS, SENSITIVITY, TARGET_RATIO
from ard.bench.probes import HEALTH_WINDOW
from ard.metrics.table import COLUMNS, Column, metrics_table


def _over_seeds(metric: str) -> Column:
    """The metric's column with its sd over seeds after ± (and, for an FID, one run's bootstrap sd in brackets)."""
    bracket = metric + "_bootstrap_sd" if metric in ("fid", "fid_vs_teacher") else None
    return replace(COLUMNS[metric], pm=metric + "_spread", bracket=bracket)


# A benchmark report's metrics table, over aggregated rows
REPORT_COLUMNS = ["model", "steps", "seeds", *(_over_seeds(m) for m in METRICS if m != "sec_per_image"),
                  replace(COLUMNS["sec_per_image"], fmt="{:.1e}")]
# The discriminator's health (ard.bench.probes.health), over rows that hold its keys
HEALTH_COLUMNS = [Column(header, key, "{:.2f}") for header, key in (
    ("D loss", "d_loss"), ("logit real", "logits_real"), ("logit fake", "logits_fake"),
    ("logit held-out", "logits_holdout"), ("lambda", "weight"))]
# The GAN pilot's table, over its rows with their health: ± one run's bootstrap sd
PILOT_COLUMNS = ["model", "fid", "fid_vs_teacher", replace(COLUMNS["mse_vs_teacher"], pm=None), "precision", "recall",
                 Column("time / iteration", "seconds_per_iteration_vs_regression", "{:.2f}x"), *HEALTH_COLUMNS]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table of cells already written."""
    return metrics_table([{str(i): c for i, c in enumerate(r)} for r in rows],
                         [Column(h, str(i)) for i, h in enumerate(header)]).split("\n")


def mean_sd(row: dict, metric: str, fmt: str) -> str:
    """An aggregated row's mean of `metric`, with its sd over seeds when it has several: "21.6 ± 1.3"."""
    return f"{row[metric]:{fmt}}" + (f" ± {row[metric + '_spread']:{fmt}}" if row["seeds"] > 1 else "")


def report_markdown(report: dict) -> str:
    """A benchmark report (the dict of <results>/<stem>.json) as Markdown: <results>/<stem>.md."""
    agg, settings = report["aggregated"], report["settings"]
    lines = [_preamble(settings, report["noise_floor"]), ""]
    lines += _metrics_table(agg, settings["teacher_steps"])
    lines += _verdict_table(report["verdict"])
    lines += _exposure_table(agg)
    lines += _gan_table(report.get("gan_verdict", []), settings["teacher_steps"])
    lines += _health_table(agg)
    lines += _cpu_table(agg, settings)
    lines += _notes(agg)
    return "\n".join(lines) + "\n"


def _preamble(settings: dict, floors: dict) -> str:
    ema = settings.get("ema", "Lightning's EMAWeightAveraging (decay 0.999, no warm-up)")  # absent: before ard.ema
    plain = "WarmupEMA" not in ema  # a plain EMA keeps 0.999^n of a stage's start
    matched = "cpu_match" in settings  # the continued students' length: the GAN stage's CPU time, or its iterations
    gan = (f" GAN stages (`-gan`) and their comparisons (`-continued`): {settings['gan_steps']} more iterations "
           + ("(the continued students: as many as take the same CPU time) " if matched else "")
           + f"from the regression student of the same S and seed, {settings['gan_preset']} "
           f"{' '.join(settings['gan_args'])}"
           + (f"; the EMA (decay 0.999) of each run, which in a stage this short keeps "
              f"{0.999 ** settings['gan_steps']:.2f} of the weights it started from." if plain else ".")
           if "gan_steps" in settings else "")
    text = settings.get("conditioning") == "text"  # evaluated on a text store (ard-eval): conditions are prompts
    conditions = "prompts" if text else "labels"
    data = ("Caption digits (the PixArt teacher trained on the digits' captions; prompt adherence: the digit "
            "classifier's agreement with the caption's digit)" if text else "Digits")
    return (f"{data}, teacher K = {settings['teacher_steps']} DDIM steps with CFG {settings['guidance_scale']}; "
            f"{settings['num_samples']} samples per model on the same noises and {conditions}; students trained "
            f"{settings['max_steps']} iterations on {settings['num_trajectories']} trajectories, each its EMA "
            f"({ema}); mean ± sd over training seeds (the teacher rows: one run), and in brackets the bootstrap sd "
            "of one run's FID. Same-noise MSE is per pixel in [-1, 1] units. Noise floors: FID vs teacher "
            f"{floors['teacher']:.2f} (the teacher's {settings['num_samples']} samples against as many from "
            f"independent noises and {conditions}, the rows' footing), FID vs real {floors['real']:.2f} (two random "
            "halves of the real digits). The undistilled teacher at S steps samples at the students' boundary "
            "timesteps." + gan)


def _metrics_table(agg: list[dict], teacher_steps: int) -> list[str]:
    """The K-step teacher first, then by S and name; a row of one seed has no sd."""
    rows = [r if r["seeds"] > 1 else {k: v for k, v in r.items() if not k.endswith("_spread")}
            for r in sorted(agg, key=lambda r: (r["steps"] != teacher_steps, r["steps"], r["model"]))]
    optional = [_over_seeds(m) for m in OPTIONAL_METRICS if any(m in r for r in rows)]
    return metrics_table(rows, REPORT_COLUMNS + optional).split("\n")


def _verdict_table(checks: list[dict]) -> list[str]:
    rows = []
    for c in checks:
        cells = [str(c["steps"]), c["model"]]
        for m in ("fid_vs_teacher", "fid"):
            v = c[m]
            cells += [f"{v['baseline_degradation']:.2f} ({v['baseline_in_bootstrap_sd']:.1f}"
                      f"{'' if v['sensitive'] else ', not sensitive'})", f"{v['degradation']:.2f}",
                      "-" if v["ratio"] is None
                      else f"{v['ratio']:.2f}" + (" (target met)" if v["meets_target"] else "")]
        rows.append(cells)
    return ["", f"Degradation against the teacher (computed by the tool): the baseline's in bootstrap sds (sensitive "
            f"when >= {SENSITIVITY:g}), and each variant's as a fraction of the baseline's (the paper's target: "
            f"<= {TARGET_RATIO:g}). Against the teacher's samples the degradation is the FID; against real data, "
            "FID minus the teacher's.", ""] + table(
        ["steps", "model", "baseline Δ vs teacher (sds)", "Δ vs teacher", "ratio", "baseline Δ vs real (sds)",
         "Δ vs real", "ratio"], rows)


def _exposure_table(agg: list[dict]) -> list[str]:
    exposed = sorted((r for r in agg if "exposure" in r), key=lambda r: (r["steps"], r["model"]))
    if not exposed:
        return []
    rows = []
    for r in exposed:
        fed, own = r["exposure"]["fed"], r["exposure"]["own"]
        cost = r.get("train_cost_vs_teacher_forcing")
        rows.append([str(r["steps"]), r["model"], " / ".join(f"{v:.4f}" for v in fed),
                     " / ".join(f"{v:.4f}" for v in own), f"{own[-1] / fed[-1]:.2f}",
                     "-" if cost is None else f"{cost:.2f}x"])
    return ["", "Exposure bias (ard.student.exposure, the store's 512 held-out trajectories): per student step, "
            "the mean squared distance to the teacher's next state when fed the teacher's states (fed) and on "
            "the student's own states from x_T (own); the last step's gap is what the student's own states add "
            "to its final error, the most that history could remove. Training cost: wall time of the run "
            "against the same model trained with teacher forcing (one thread each; the machine was shared).",
            ""] + table(["steps", "model", "fed, per step", "own, per step", "own / fed at the last step",
                         "training cost"], rows)


def _gan_table(gan_checks: list[dict], teacher_steps: int) -> list[str]:
    if not gan_checks:
        return []
    rows = []
    for c in gan_checks:
        best = ("-" if "fid_best_regression" not in c else
                f"{c['fid_best_regression']:.2f} ({c['best_regression']}): {c['below_best_regression']:.0%}")
        rows.append([str(c["steps"]), c["model"], f"{c['fid']:.2f}", f"{c['fid_continued']:.2f}",
                     f"{c['fid_reduction']:.0%}" + (" (goal met)" if c["reduction_ok"] else ""),
                     best + (" (goal met)" if c.get("below_best_ok") else ""),
                     f"{c['recall']:.3f}", f"{c['recall_continued']:.3f} ± {c['recall_continued_spread']:.3f}",
                     "yes" if c["recall_ok"] else "no", f"{c['fid_vs_teacher']:.2f}", f"{c['fid_teacher']:.2f}"])
    return ["", "ARD + GAN (computed by the tool): each GAN stage's FID against real data against the same student "
            f"continued without the GAN (goal: at least {GAN_FID_REDUCTION:.0%} lower), against the best regression "
            f"student of the committed digits reports evaluated the same way (goal at S = 2: at least "
            f"{GAN_FID_REDUCTION:.0%} lower), its recall against the continued student's (goal: not lower by more "
            f"than that student's seed sd), its FID against the teacher and the {teacher_steps}-step teacher's "
            "FID against real data.", ""] + table(
        ["steps", "model", "FID vs real", "continued", "reduction", "best regression: reduction", "recall",
         "continued's", "recall kept", "FID vs teacher", "teacher's FID vs real"], rows)


def _cpu_table(agg: list[dict], settings: dict) -> list[str]:
    """The CPU time of each stage (runs recorded with it), and how the continued students' length was matched."""
    timed = sorted((r for r in agg if r.get("cpu_seconds")), key=lambda r: (r["steps"], r["model"]))
    if not timed:
        return []
    matches = "; ".join(f"{m['variant']} S = {m['steps']}: {m['gan_cpu_s']:.3f} s against {m['continued_cpu_s']:.3f} s "
                        f"({m['cpu_ratio']:.2f}x), {m['continued_steps']} iterations"
                        for m in settings.get("cpu_match", []))
    return ["", "CPU time of each run (user + system seconds of its `ard fit`, one thread, mean over seeds; a second "
            "stage's excludes its regression stage)." + (
                f" The continued students train as many iterations as use the CPU time of {settings['gan_steps']} "
                "GAN-stage iterations: the median CPU seconds of one iteration of each second stage, timed from the "
                f"first seed's student ({matches})." if matches else ""), ""] + table(
        ["steps", "model", "CPU s", "wall s"], [[str(r["steps"]), r["model"], f"{r['cpu_seconds']:.0f}",
                                                 f"{r['train_seconds']:.0f}"] for r in timed])


def _health_table(agg: list[dict]) -> list[str]:
    healthy = sorted((r for r in agg if r.get("health")), key=lambda r: (r["steps"], r["model"]))
    if not healthy:
        return []
    return ["", f"The discriminator's health (the GAN stage's CSV log, means over its last {HEALTH_WINDOW} iterations "
            "and over seeds): D loss (hinge: 2 when it cannot tell real from fake), the mean logits on real "
            "training digits, on fakes and on held-out real digits (far below the real ones: memorisation), "
            "and the adaptive GAN weight lambda.", ""] + metrics_table(
        [{**r, **r["health"]} for r in healthy], ["steps", "model", *HEALTH_COLUMNS]).split("\n")


def _notes(agg: list[dict]) -> list[str]:
    lines = []
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
    return lines


def pilot_markdown(result: dict) -> str:
    """A GAN pilot (the dict of <results>/<stem>.json, ard.bench.pilot) as Markdown: <results>/<stem>.md."""
    st = result["settings"]
    variant = st.get("variant", "ard")  # absent: the first pilot, of the teacher-forced ARD student (N = 6)
    ema = (f"Every student is its run's EMA ({st['ema']})." if "ema" in st else
           "Every student is its run's EMA (decay 0.999, as the preset): in runs this short it stays close to where "
           "the run started (0.999^120 = 0.89), so the differences are damped.")
    gan = st.get("gan_block")  # absent: reports from before the screens recorded the preset's GAN block
    preset = (f" (overrides of {st['gan_preset']}'s GAN block: "
              + ", ".join(f"{k} {v}" for k, v in gan.items()) + ")") if gan else ""
    return (f"S = {st['steps']}, seed {st['seed']}, {st['num_trajectories']} trajectories: the regression student "
            f"`{variant}` after {st['reg_steps']} iterations (batch 64), then {st['gan_steps']} more iterations "
            f"(batch 48, lr 1e-4) without the GAN (`{variant}-continued`) or with it (warm-up {st['warmup']}), one "
            f"per knob setting{preset}; {st['num_samples']} samples each, ± the bootstrap sd. {ema} Health: means "
            f"over the last {st['health_window']} iterations (logits on real training digits, on fakes, on the 359 "
            "held-out digits). Time: seconds per iteration over the regression stage's, wall time on a machine "
            "shared with other jobs.\n\n"
            + metrics_table([{**r, **r.get("health", {})} for r in result["rows"]], PILOT_COLUMNS) + "\n")
