"""The digits benchmark's bookkeeping (ard.bench, scripts/bench_digits.py): the discriminator's health read from a
GAN stage's CSV log, the verdicts, merging the rows of a committed report, the stages' `ard fit` arguments, the
committed reports regenerated from their JSON, the recipe grid, and the docs refreshed from the reports."""
import csv
import json
import re
import runpy
from pathlib import Path

import pytest
import yaml

from ard.bench import ROOT, docs, registry
from ard.bench.aggregate import gan_verdict, verdict
from ard.bench.probes import HEALTH, health
from ard.bench.overview import recipe_grid
from ard.bench.render import pilot_markdown, report_markdown
from ard.bench.reports import EVAL_KEYS, best_regression, build_report, load_report, merge_committed
from ard.bench.runs import ema_setting, fit, stage_args
from ard.cli import main as ard_main

TEACHER = {"model": "teacher (DDIM, w=2)", "steps": 24, "fid": 31.4, "is": 9.6, "precision": 0.85, "recall": 0.67}
RESULTS = ROOT / "docs" / "results"
BENCHMARK_REPORTS = ("digits-benchmark", "digits-benchmark-long", "digits-recipes", "digits-recipes-rollout",
                     "digits-recipes-s2", "digits-recipes-if", "digits-gan", "digits-t2i",
                     "digits-gan-long", "digits-paper", "digits-nc", "digits-srl-if")


def test_health_averages_the_last_iterations(tmp_path):
    """The GAN stage's `step` counts iterations: the window of 50 iterations is the last 50 steps."""
    log = tmp_path / "csv" / "version_0"
    log.mkdir(parents=True)
    with open(log / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *HEALTH, "train/loss"])
        w.writeheader()
        for step in range(0, 201, 10):  # logged every 10 iterations; 160..200 are within the last 50
            w.writerow({"step": step, "gan/d_loss": step, "gan/logits_real": 1.0, "gan/logits_fake": -1.0,
                        "gan/logits_holdout": "" if step % 20 else 0.5, "gan/weight": 2.0})
        w.writerow({"step": 200, "train/loss": 0.1})  # a row without the GAN's keys is ignored
    h = health(tmp_path, window=50)
    assert h["d_loss"] == pytest.approx(sum(range(160, 201, 10)) / 5)
    assert (h["logits_real"], h["logits_fake"], h["logits_holdout"], h["weight"]) == (1.0, -1.0, 0.5, 2.0)
    assert health(tmp_path / "none") == {}


def test_gan_verdict_compares_with_the_continued_student_and_the_best_regression():
    agg = [TEACHER,
           {"model": "ard-gan", "steps": 2, "fid": 24.0, "fid_vs_teacher": 9.0, "recall": 0.58},
           {"model": "ard-continued", "steps": 2, "fid": 32.0, "recall": 0.62, "recall_spread": 0.05},
           {"model": "baseline-gan", "steps": 2, "fid": 34.0, "fid_vs_teacher": 12.0, "recall": 0.50},
           {"model": "baseline-continued", "steps": 2, "fid": 36.0, "recall": 0.60, "recall_spread": 0.05},
           {"model": "ard-N1+rollout-gan", "steps": 4, "fid": 20.0, "fid_vs_teacher": 5.0, "recall": 0.6},
           {"model": "ard-N1+rollout-continued", "steps": 4, "fid": 30.0, "recall": 0.6, "recall_spread": 0.0},
           {"model": "ard-gan", "steps": 4, "fid": 20.0, "recall": 0.6}]  # no continued student: no row
    best = {"2": {"fid": 31.0, "model": "ard-N2", "report": "digits_recipes_s2"}}
    checks = {(c["model"], c["steps"]): c for c in gan_verdict(agg, teacher_steps=24, best_regression=best)}
    assert set(checks) == {("ard-gan", 2), ("baseline-gan", 2), ("ard-N1+rollout-gan", 4)}
    ard, base, rollout = checks["ard-gan", 2], checks["baseline-gan", 2], checks["ard-N1+rollout-gan", 4]
    assert ard["fid_reduction"] == pytest.approx(0.25) and ard["reduction_ok"] and ard["recall_ok"]
    assert ard["below_best_regression"] == pytest.approx(1 - 24 / 31) and ard["below_best_ok"]
    assert base["fid_reduction"] == pytest.approx(1 - 34 / 36) and not base["reduction_ok"]
    assert not base["recall_ok"] and not base["below_best_ok"]  # 0.50 < 0.60 - 0.05; 34 above 31
    assert rollout["continued"] == "ard-N1+rollout-continued" and rollout["reduction_ok"]
    assert "below_best_regression" not in rollout  # no bar at S = 4


def test_best_regression_is_the_lowest_fid_of_reports_evaluated_the_same_way(tmp_path):
    """Second stages, teachers, noise-corrected rows and reports evaluated otherwise are not candidates."""
    settings = {"teacher_identity": "t", "guidance_scale": 2.0, "teacher_steps": 24, "num_samples": 2000, "seed": 1,
                "reference": "digits", "extractor": "x"}

    def rows(fid: float) -> list[dict]:
        kept = [("ard-N2", 2, fid), ("ard-gan", 2, 1.0), ("teacher (DDIM, w=2)", 2, 2.0), ("ard [nc]", 2, 3.0),
                ("baseline", 4, fid + 5)]
        return [{"model": m, "steps": s, "fid": f} for m, s, f in kept]
    (tmp_path / "same.json").write_text(json.dumps({"settings": settings, "aggregated": rows(19.0)}))
    (tmp_path / "other.json").write_text(json.dumps({"settings": {**settings, "num_samples": 500},
                                                     "aggregated": rows(5.0)}))
    own = [{**r, "model": r["model"] + "-seed0", "nfe": r["steps"], "fid_sd": 0.1, "fid_vs_teacher": 0.0,
            "fid_vs_teacher_sd": 0.1, **{m: 0.0 for m in ("mse_vs_teacher", "is", "precision", "recall",
                                                             "sec_per_image")}} for r in rows(20.0)]
    best = best_regression(tmp_path, own, settings)
    assert best == {"2": {"fid": 19.0, "model": "ard-N2", "report": "same"},
                    "4": {"fid": 24.0, "model": "baseline", "report": "same"}}


def committed(tmp_path, runs, **settings):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    base = {k: 1 for k in EVAL_KEYS} | {"seeds": [0, 1], "students": {"ard-seed0": "a0", "ard-seed1": "a1"}}
    (results / "x.json").write_text(json.dumps({"settings": base | settings, "runs": runs}))
    return str(results), base | {"seeds": [2], "students": {"ard-seed2": "a2"}, "teacher_steps": 24}


def test_merge_keeps_committed_rows_not_evaluated_now(tmp_path):
    old = [TEACHER, {"model": "ard-seed0", "steps": 4, "fid": 1.0}, {"model": "ard-seed1", "steps": 4, "fid": 2.0},
           {"model": "ard-seed2", "steps": 4, "fid": 9.0}]
    results, settings = committed(tmp_path, old)
    new = [dict(TEACHER), {"model": "ard-seed2", "steps": 4, "fid": 3.0}]
    rows, merged = merge_committed(new, settings, results, "x")
    assert sorted((r["model"], r["fid"]) for r in rows if r["steps"] == 4) == [
        ("ard-seed0", 1.0), ("ard-seed1", 2.0), ("ard-seed2", 3.0)]  # the new seed-2 row replaces the committed one
    assert sum(r["model"].startswith("teacher") for r in rows) == 1
    assert merged["seeds"] == [0, 1, 2] and set(merged["students"]) == {"ard-seed0", "ard-seed1", "ard-seed2"}
    assert merge_committed(new, settings, results, "y") == (new, settings)  # nothing committed: unchanged


def test_merge_of_another_s_keeps_its_undistilled_teacher_cpu_matches_and_regression_bar(tmp_path):
    match = {"variant": "ard", "continued_steps": 600}
    gan = {"gan_preset": "p.yaml", "gan_steps": 200, "gan_args": ["--a=1"]}
    old = [TEACHER, {"model": "teacher (DDIM, w=2)", "steps": 2, "fid": 90.0}, {"model": "ard-seed0", "steps": 2}]
    results, settings = committed(tmp_path, old, **gan, cpu_match=[match | {"steps": 2}],
                                  best_regression={"2": {"fid": 18.0}})
    new = [dict(TEACHER), {"model": "teacher (DDIM, w=2)", "steps": 4, "fid": 40.0}, {"model": "ard-seed0", "steps": 4}]
    now = settings | gan | {"cpu_match": [match | {"steps": 4}], "best_regression": {"4": {"fid": 11.0}}}
    rows, merged = merge_committed(new, now, results, "x")
    assert sorted((r["model"], r["steps"]) for r in rows if r["model"].startswith("teacher")) == [
        ("teacher (DDIM, w=2)", 2), ("teacher (DDIM, w=2)", 4), ("teacher (DDIM, w=2)", 24)]
    assert [m["steps"] for m in merged["cpu_match"]] == [2, 4]
    assert merged["best_regression"] == {"2": {"fid": 18.0}, "4": {"fid": 11.0}}
    with pytest.raises(SystemExit, match="gan_args"):
        merge_committed(new, now | {"gan_args": ["--a=2"]}, results, "x")


def test_merge_refuses_another_evaluation(tmp_path):
    results, settings = committed(tmp_path, [TEACHER], num_samples=1000)
    with pytest.raises(SystemExit, match="num_samples"):
        merge_committed([TEACHER], settings, results, "x")
    results, settings = committed(tmp_path, [TEACHER])
    with pytest.raises(SystemExit, match="not the same evaluation set"):
        merge_committed([TEACHER | {"fid": 30.0}], settings, results, "x")


def test_verdict_compares_with_the_baseline_of_the_same_parametrisation_and_stage():
    def row(model, fid_vs_teacher):
        return {"model": model, "steps": 2, "fid": 40.0, "fid_vs_teacher": fid_vs_teacher, "fid_bootstrap_sd": 1.0,
                "fid_vs_teacher_bootstrap_sd": 1.0}

    agg = [TEACHER | {"fid_bootstrap_sd": 1.0, "fid_vs_teacher": 0.0, "fid_vs_teacher_bootstrap_sd": 1.0},
           row("baseline", 10.0), row("ard", 9.0), row("baseline-gan", 30.0), row("ard-gan", 6.0),
           row("baseline-continued", 20.0), row("ard-continued", 8.0), row("ard+rollout", 5.0),
           row("baseline-direct", 4.0), row("ard-direct", 2.0), row("ard-N6-direct", 3.0)]
    checks = {c["model"]: c for c in verdict(agg, teacher_steps=24)}
    assert {m: c["baseline"] for m, c in checks.items()} == {  # no baseline+rollout row; direct with direct
        "ard": "baseline", "ard-gan": "baseline-gan", "ard-continued": "baseline-continued",
        "ard-direct": "baseline-direct", "ard-N6-direct": "baseline-direct"}
    assert checks["ard-gan"]["fid_vs_teacher"]["ratio"] == pytest.approx(0.2)
    assert checks["ard-gan"]["fid_vs_teacher"]["meets_target"]
    assert checks["ard-continued"]["fid_vs_teacher"]["ratio"] == pytest.approx(0.4)


def test_a_finished_run_of_another_length_or_ema_is_refused(tmp_path):
    """Run directories are named by variant, S and seed: a finished run trained for another number of iterations,
    or averaged by another EMA (a run of before ard.ema records none: the plain EMA), must not be taken for this
    invocation's."""
    run_dir = tmp_path / "runs" / "baseline-S2-seed0"
    (run_dir / "student_ema").mkdir(parents=True)
    (run_dir / "student_ema" / "ard_sampling.json").write_text("{}")
    record = {"seconds": 1.0, "threads": 1, "iterations": 400, "ema": ema_setting()}
    (run_dir / "train_seconds.json").write_text(json.dumps(record))
    assert ema_setting() == "ard.ema.WarmupEMA(decay=0.999, warmup=10)"  # configs/digits/ard.yaml's
    assert fit(tmp_path, tmp_path / "store", "baseline", 2, 0, 400, 1) == run_dir / "student_ema"
    with pytest.raises(SystemExit, match="trained 400 iterations, not 1200"):
        fit(tmp_path, tmp_path / "store", "baseline", 2, 0, 1200, 1)
    del record["ema"]
    (run_dir / "train_seconds.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="averaged by lightning.pytorch.callbacks.EMAWeightAveraging"):
        fit(tmp_path, tmp_path / "store", "baseline", 2, 0, 400, 1)


def test_stage_arguments():
    """A GAN stage trains max_steps iterations (Lightning counts iterations, not optimiser steps) with the GAN
    preset and its seed; the continued comparison is the regression module with the preset's batch and lr."""
    run_dir, init = Path("/w/runs/ard-gan-S2-seed3"), Path("/w/runs/ard-S2-seed3/student_ema")
    assert stage_args("ard-N1+rollout", run_dir, 3, 600, None, ()) == [
        "--trainer.max_steps=600", "--trainer.logger=false"]
    gan = stage_args("ard-gan", run_dir, 3, 200, init, ("--model.init_args.gan.warmup=5",))
    assert gan[:3] == ["-c", registry.GAN_PRESET, "--trainer.max_steps=200"]  # after the preset: it sets its own
    seed = gan.index("--model.init_args.gan.seed=3")
    assert gan[seed + 1] == "--model.init_args.gan.warmup=5"
    assert f"--model.init_args.init_student={init}" in gan and not any(a.startswith("--model.class_path") for a in gan)
    continued = stage_args("ard-N1+rollout-continued", run_dir, 3, 200, init, ("--model.init_args.gan.warmup=5",))
    assert continued[:5] == ["-c", registry.GAN_PRESET, "--trainer.max_steps=200",
                             "--model.class_path=ard.modules.distill.ARDDistillation",
                             "--trainer.gradient_clip_val=1.0"]
    assert not any(a.startswith("--model.init_args.gan.") for a in continued)
    assert any(a.startswith("--trainer.logger=") and str(run_dir) in a for a in continued)  # the CSV log
    assert registry.GAN_VARIANTS["ard-N1+rollout-continued"] == ("ard-N1+rollout", False)


def test_overrides_are_those_of_the_fit_cli(monkeypatch, capsys):
    """The registry's overrides and the stages' arguments parse with today's `ard fit` (--print_config: parsed and
    type-checked, nothing built), each group in one call: every model's, every recipe's, the GAN stage with every
    pilot knob (max_steps counts iterations), and the continued comparison (the regression module, the preset's
    batch and lr, no GAN)."""
    monkeypatch.chdir(ROOT)  # the tool runs `ard fit` from the repository

    def config(*args: str) -> dict:
        with pytest.raises(SystemExit) as exit_info:
            ard_main(["fit", "-c", "configs/digits/ard.yaml", *args, "--print_config"])
        assert not exit_info.value.code, capsys.readouterr().err
        return yaml.safe_load(capsys.readouterr().out)

    def last_values(overrides: list[str], prefix: str) -> dict:  # knob -> its last override's value, parsed
        return {a.split("=")[0][len(prefix):]: yaml.safe_load(a.split("=", 1)[1]) for a in overrides}

    models = [a for o in registry.MODELS.values() for a in o]
    model = config(*models)["model"]["init_args"]
    assert last_values(models, "--model.init_args.").items() <= model.items()
    recipes = [a for o in registry.RECIPES.values() for a in o]
    recipe = config(*recipes)["model"]["init_args"]["recipe"]
    assert last_values(recipes, "--model.init_args.recipe.").items() <= recipe.items()
    run_dir, init = ROOT / "runs" / "x", ROOT / "runs" / "y" / "student_ema"
    knobs = tuple(a for o in registry.PILOT_KNOBS.values() for a in o)
    gan = config(*stage_args("ard-gan", run_dir, 3, 200, init, knobs), *registry.VARIANTS["ard"])
    assert gan["model"]["class_path"] == "ard.modules.distill_gan.ARDGANDistillation"
    assert gan["model"]["init_args"]["gan"]["seed"] == 3 and gan["trainer"]["max_steps"] == 200
    continued = config(*stage_args("ard-continued", run_dir, 3, 200, init, knobs), *registry.VARIANTS["ard"])
    model = continued["model"]
    assert model["class_path"] == "ard.modules.distill.ARDDistillation" and "gan" not in model["init_args"]
    kept = model["init_args"]["lr"], model["init_args"]["init_student"], continued["data"]["init_args"]["batch_size"]
    assert kept == (gan["model"]["init_args"]["lr"], str(init), gan["data"]["init_args"]["batch_size"])
    assert continued["trainer"]["gradient_clip_val"] == 1.0 and continued["trainer"]["max_steps"] == 200


@pytest.mark.parametrize("name", BENCHMARK_REPORTS)
def test_committed_reports_regenerate(name):
    """Every committed benchmark report: its runs aggregate and judge to its JSON, and its JSON renders to its
    Markdown, the text committed."""
    report = load_report(RESULTS, name)
    rebuilt = build_report(report["runs"], report["noise_floor"], report["settings"])
    assert json.loads(json.dumps(rebuilt["aggregated"])) == report["aggregated"]
    assert json.loads(json.dumps(rebuilt["verdict"])) == report["verdict"]
    assert json.loads(json.dumps(rebuilt["gan_verdict"])) == report.get("gan_verdict", [])
    committed_md = (RESULTS / f"{name.replace('-', '_')}.md").read_text()
    assert report_markdown(report) == committed_md


def test_committed_pilot_and_grid_regenerate():
    for name in ("gan_pilot", "gan_screen", "gan_screen_s4", "gan_screen_s4_seed1", "gan_screen_s4_seed2"):
        pilot = json.loads((RESULTS / f"{name}.json").read_text())
        assert pilot_markdown(pilot) == (RESULTS / f"{name}.md").read_text()
    grid = (RESULTS / "digits_recipes_grid.md").read_text()
    names = re.findall(r"\([a-z]\) `([\w-]+)`", grid.splitlines()[0])
    assert recipe_grid({n: load_report(RESULTS, n) for n in names}) == grid


def test_recipe_grid_takes_each_cell_from_the_report_with_most_seeds():
    def report(rows, max_steps=1200):
        agg = [{"model": m, "steps": s, "seeds": n, "fid_vs_teacher": fid, "fid_vs_teacher_spread": 1.0,
                "mse_vs_teacher": 0.03, "mse_vs_teacher_spread": 0.001} for m, s, n, fid in rows]
        return {"settings": {"max_steps": max_steps, "num_trajectories": 8192}, "aggregated": agg}

    old = report([("baseline", 4, 3, 30.0), ("ard-N2", 4, 1, 31.0), ("teacher (DDIM, w=2)", 4, 1, 99.0),
                  ("baseline [nc]", 4, 3, 29.0)])
    new = report([("ard-N2", 4, 3, 32.0), ("ard-N2+rollout", 4, 1, 20.0), ("ard-closed-gatelr+rollout", 4, 1, 19.0),
                  ("baseline+rollout", 2, 2, 25.0), ("ard-N1+backward", 4, 2, 31.5)])
    table = recipe_grid({"old": old, "new": new})
    s4 = table.split("| S = 2 |")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in s4.splitlines() if line.startswith("| ")}
    assert "| baseline | 30.0 ± 1.0 / 0.0300 ± 0.0010 (3, a) | not run |" in table  # S = 4, from the first report
    assert "32.0 ± 1.0 / 0.0300 ± 0.0010 (3, b) | 20.0 / 0.0300 (1, b) |" in rows["ard-N2"]  # 3 seeds beat 1
    assert rows["ard (N = 6)"].endswith("not run | not run |") and "99.0" not in table
    assert "| ard-closed-gatelr | not run | 19.0 / 0.0300 (1, b) |" in s4  # models beyond the grid: a row of their own
    assert "| S = 4 | teacher forcing | rollout | backward |" in table  # a recipe beyond the grid: its own column,
    assert "31.5 ± 1.0 / 0.0300 ± 0.0010 (2, b) |" in rows["ard-N1"]  # only where it was run
    assert "| S = 2 | teacher forcing | rollout |\n" in table
    assert "| baseline | not run | 25.0 ± 1.0 / 0.0300 ± 0.0010 (2, b) |" in table.split("| S = 2 |")[1]
    nc = table.split("| S = 4 [nc] |")[1]  # noise-corrected rows: their own table, only what was sampled that way
    assert "29.0" not in table.split("| S = 4 [nc] |")[0] and "| S = 2 [nc]" not in table
    assert nc.splitlines()[0] == " teacher forcing |" and "| baseline | 29.0 ± 1.0 / 0.0300 ± 0.0010 (3, a) |" in nc
    assert "ard-N2" not in nc
    with pytest.raises(SystemExit, match="report short: trained 400 iterations"):
        recipe_grid({"short": report([("baseline", 4, 3, 30.0)], max_steps=400)})


def test_refresh_docs_fills_every_section_from_the_committed_reports(tmp_path, capsys):
    """--refresh-docs rewrites a doc's report sections and its results summary, nothing else."""
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    for stem in ("digits_benchmark", "digits_recipes_rollout", "gan_pilot", "digits_recipes_grid"):
        for suffix in (".json", ".md"):
            if (RESULTS / f"{stem}{suffix}").exists():
                (results / f"{stem}{suffix}").write_text((RESULTS / f"{stem}{suffix}").read_text())
    (results / "bench_store.json").write_text('{"rows": []}')  # another benchmark's JSON, no report: not summarised
    doc, readme = tmp_path / "docs" / "benchmarks.md", tmp_path / "README.md"
    doc.write_text("# Benchmarks\n\n<!-- digits-benchmark:start -->\nold\n<!-- digits-benchmark:end -->\nreading\n"
                   "<!-- digits-recipes-grid:start --><!-- digits-recipes-grid:end -->\n<!-- gan-pilot:start -->\n"
                   "<!-- gan-pilot:end -->\n")
    readme.write_text("intro\n<!-- results-summary:start -->\n<!-- results-summary:end -->\nmore\n")
    script = runpy.run_path(str(ROOT / "scripts/bench_digits.py"))
    script["main"](["--refresh-docs", str(doc), "--results", str(results)])
    assert capsys.readouterr().out == f"{doc}: digits-benchmark, digits-recipes-grid, gan-pilot\n"
    text = doc.read_text()
    for name in ("digits-benchmark", "digits-recipes-grid", "gan-pilot"):
        body = (results / f"{name.replace('-', '_')}.md").read_text()
        assert f"<!-- {name}:start -->\n{body}<!-- {name}:end -->" in text
    assert text.startswith("# Benchmarks\n\n") and "<!-- digits-benchmark:end -->\nreading\n" in text
    assert docs.refresh(doc, results) == []  # refreshed: nothing changes

    assert docs.refresh(readme, results) == ["results-summary"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- results-summary:end -->\nmore\n")
    summary = text.split("<!-- results-summary:start -->\n")[1].split("<!-- results-summary:end -->")[0]
    caption, rest = summary.split("\n\n", 1)  # the caption, wrapped as the README, then the table
    assert caption.startswith("Digits (the shipped teacher, 24 DDIM steps, CFG 2): ") and "2.48" in caption
    assert max(map(len, caption.splitlines())) <= 115
    assert rest.splitlines() == [
        "| report | S | recipe, iterations | seeds | baseline | best ARD | ratio |",
        "|---|---|---|---|---|---|---|",
        # the S where the baseline is furthest from the teacher (S = 2: 9.9 bootstrap sds; S = 3, 4: 7.2, 7.6)
        "| [digits_benchmark](docs/results/digits_benchmark.md) | 2 | teacher forcing, 400 | 3 | 27.76 ± 1.11 / "
        "0.0560 ± 0.0012 | ard-closed: 26.00 ± 1.26 / 0.0558 ± 0.0011 | 0.94 |",
        # of the ARD students, those with the most seeds (not ard-closed-gatelr+rollout: 20.70, one seed)
        "| [digits_recipes_rollout](docs/results/digits_recipes_rollout.md) | 4 | rollout, 1200 | 3 | 21.59 ± 1.31 / "
        "0.0271 ± 0.0003 | ard-N2+rollout: 21.63 ± 1.65 / 0.0276 ± 0.0003 | 1.00 |",
        "",  # the reports without a verdict, links relative to the doc
        "Also: [digits_recipes_grid](docs/results/digits_recipes_grid.md), [gan_pilot](docs/results/gan_pilot.md)."]
    doc.write_text("<!-- digits-gan:start -->\n<!-- digits-gan:end -->\n")
    with pytest.raises(SystemExit, match="section digits-gan has no report"):
        docs.refresh(doc, results)


def test_the_paper_grid_gives_boundaries_uniform_in_t_and_its_presets_agree(monkeypatch, capsys):
    """--teacher-grid paper25: the store of configs/digits/paper_trajectories.yaml (DiT's 25-step respacing) and students
    whose boundaries are T (S - s) / S on it, as configs/digits/paper.yaml states for S = 4."""
    from ard.diffusion import ddim_grid

    overlay, boundaries = registry.GRIDS["paper25"].trajectories, registry.GRIDS["paper25"].boundaries
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        ard_main(["predict", "-c", "configs/digits/trajectories.yaml", "-c", overlay, "--print_config"])
    store = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    grid = ddim_grid(store["num_steps"], store["timestep_spacing"])
    assert [grid[i] for i in boundaries(4)] == [999, 749, 500, 250, -1]
    assert [grid[i] for i in boundaries(2)] == [999, 500, -1]
    with pytest.raises(SystemExit):
        ard_main(["fit", "-c", "configs/digits/ard.yaml", "-c", "configs/digits/paper.yaml", "--print_config"])
    paper = yaml.safe_load(capsys.readouterr().out)
    model = paper["model"]["init_args"]
    assert paper["data"]["init_args"]["boundaries"] == boundaries(model["num_steps"])
    assert (model["output"], model["heads"], model["recipe"]["inputs"]) == ("next_state", "per_step", "teacher")
    assert [c["class_path"] for c in paper["trainer"]["callbacks"]][:1] == ["ard.ema.WarmupEMA"]  # its warmed-up EMA
    assert registry.GRIDS["paper25"].fit == "configs/digits/paper.yaml"
    assert registry.GRIDS["leading24"] == registry.TeacherGrid()  # the default store: boundaries s * K / S
    script = runpy.run_path(str(ROOT / "scripts" / "precompute_trajectories.py"))  # the tool's store command
    args = script["predict_args"](["-c", "configs/digits/trajectories.yaml", "-c", overlay, "--out", "s",
                                   "--num-trajectories", "8"])
    assert args[:5] == ["predict", "-c", "configs/digits/trajectories.yaml", "-c", overlay]


@pytest.mark.parametrize("grid", ["cfg15", "flow", "w64", "w32"])
def test_the_control_grids_sample_their_teacher_at_one_guidance(grid, monkeypatch, capsys):
    """The two controls (epsilon vs flow teacher, model size) compare teachers at one CFG scale: each grid's store
    resolves to CFG 1.5 and to the grid's teacher, and its students distil that teacher (their architecture)."""
    from ard.backbones.dit import DIT_SIZES

    entry = registry.GRIDS[grid]
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        ard_main(["predict", "-c", "configs/digits/trajectories.yaml", "-c", entry.trajectories, "--print_config"])
    store = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert store["guidance_scale"] == 1.5
    with pytest.raises(SystemExit):
        ard_main(["fit", "-c", "configs/digits/ard.yaml", *(["-c", entry.fit] if entry.fit else []), "--print_config"])
    student = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    where = {(ROOT / path).resolve() for path in (store["teacher"], student["teacher"],
                                                  entry.teacher or "ard/assets/digits_teacher")}
    assert len(where) == 1 and next(iter(where)).is_dir()
    assert (store["schedule"] == "flow") == (grid == "flow") == (student["output"] == "velocity")
    if grid.startswith("w"):  # the size control's teachers: the shipped teacher's geometry at another width
        config = json.loads((ROOT / entry.teacher / "config.json").read_text())
        width = config["num_attention_heads"] * config["attention_head_dim"]
        assert width == int(grid[1:]) and config["num_layers"] == DIT_SIZES["digits"]["num_layers"]


def _teacher_report(mse: dict[str, list[float]], **settings) -> dict:
    """A benchmark report of one teacher at S = 2: per variant, one same-noise MSE per seed (FID vs teacher 100x)."""
    runs = [{"model": f"{v}-seed{i}", "steps": 2, "mse_vs_teacher": m, "fid_vs_teacher": 100 * m}
            for v, ms in mse.items() for i, m in enumerate(ms)]
    teacher = [{"model": "teacher (DDIM, w=1.5)", "steps": s, "fid": 9.0, "fid_vs_teacher": f,
                "mse_vs_teacher": f / 100} for s, f in ((24, 0.0), (2, 50.0))]
    return {"settings": {"teacher": "t", "solver": {"name": "ddim"}, "teacher_steps": 24, "guidance_scale": 1.5,
                         "max_steps": 600, "num_trajectories": 64, "seeds": [0, 1], "num_samples": 8, "ema": "e",
                         **settings},
            "noise_floor": {"teacher": 2.0, "real": 9.8}, "aggregated": teacher, "runs": teacher + runs}


def test_a_control_pairs_ard_and_the_baseline_by_seed_and_refuses_unequal_budgets(tmp_path, monkeypatch, capsys):
    from ard.bench import controls

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.json").write_text(json.dumps(_teacher_report({"baseline": [0.02, 0.04], "ard-N1": [0.01, 0.04]})))
    (inputs / "b.json").write_text(json.dumps(_teacher_report({"baseline": [0.01, 0.01], "ard-N1": [0.02, 0.01]})))
    monkeypatch.setitem(controls.CONTROLS, "c", controls.Control("?", (("A", "a"), ("B", "b"))))
    report = controls.write_control("c", inputs, tmp_path / "out", "baseline", "ard-N1")
    a, b = report["rows"]
    assert (a["teacher"], a["steps"], a["seeds"]) == ("A", 2, [0, 1])
    assert a["ratio_mse_vs_teacher"]["mean"] == pytest.approx(0.75)  # 0.5 and 1.0, not 0.05 / 0.06
    assert b["ratio_mse_vs_teacher"]["mean"] == pytest.approx(1.5) and b["ratio_fid_vs_teacher"]["sd"] > 0
    assert a["undistilled"] == {"fid_vs_teacher": 50.0, "mse_vs_teacher": 0.5}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"c.json", "c.md", "c.png"}
    assert "| B | 2 |" in (tmp_path / "out" / "c.md").read_text()
    (inputs / "b.json").write_text(json.dumps(_teacher_report({"baseline": [0.01], "ard-N1": [0.01]}, max_steps=1200)))
    with pytest.raises(SystemExit, match="c: its teachers' reports differ in max_steps"):
        controls.build_control("c", inputs, "baseline", "ard-N1")
