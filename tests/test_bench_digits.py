"""The digits benchmark's bookkeeping (scripts/bench_digits.py): the discriminator's health read from a GAN stage's
CSV log, the GAN verdict against the continued student and the teacher, and merging the rows of a committed report."""
import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_digits as bench  # noqa: E402

TEACHER = {"model": "teacher (DDIM, w=2)", "steps": 24, "fid": 31.4, "is": 9.6, "precision": 0.85, "recall": 0.67}


def test_health_averages_the_last_iterations(tmp_path):
    """Lightning's step counts two optimiser steps per GAN iteration: the window of 50 iterations is 100 steps."""
    log = tmp_path / "csv" / "version_0"
    log.mkdir(parents=True)
    with open(log / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *bench.HEALTH, "train/loss"])
        w.writeheader()
        for step in range(0, 401, 10):  # logged every 10 steps; steps 310..400 are the last 50 iterations
            w.writerow({"step": step, "gan/d_loss": step, "gan/logits_real": 1.0, "gan/logits_fake": -1.0,
                        "gan/logits_holdout": "" if step % 20 else 0.5, "gan/weight": 2.0})
        w.writerow({"step": 400, "train/loss": 0.1})  # a row without the GAN's keys is ignored
    h = bench.health(tmp_path, window=50)
    assert h["d_loss"] == pytest.approx(sum(range(310, 401, 10)) / 10)
    assert (h["logits_real"], h["logits_fake"], h["logits_holdout"], h["weight"]) == (1.0, -1.0, 0.5, 2.0)
    assert bench.health(tmp_path / "none") == {}


def test_gan_verdict_compares_with_the_continued_student_and_the_teacher():
    agg = [TEACHER,
           {"model": "ard-gan", "steps": 2, "fid": 24.0, "precision": 0.90},
           {"model": "ard-continued", "steps": 2, "fid": 32.0, "precision": 0.80},
           {"model": "baseline-gan", "steps": 2, "fid": 34.0, "precision": 0.80},
           {"model": "baseline-continued", "steps": 2, "fid": 36.0, "precision": 0.80},
           {"model": "ard-gan", "steps": 4, "fid": 20.0, "precision": 0.90}]  # no continued student at S = 4: no row
    checks = {(c["model"], c["steps"]): c for c in bench.gan_verdict(agg, teacher_steps=24)}
    assert set(checks) == {("ard-gan", 2), ("baseline-gan", 2)}
    ard, base = checks["ard-gan", 2], checks["baseline-gan", 2]
    assert ard["fid_reduction"] == pytest.approx(0.25) and ard["reduction_ok"]
    assert ard["at_or_below_teacher"] and ard["precision_ok"]
    assert base["fid_reduction"] == pytest.approx(1 - 34 / 36) and not base["reduction_ok"]
    assert not base["at_or_below_teacher"] and not base["precision_ok"]


def committed(tmp_path, runs, **settings):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    base = {k: 1 for k in bench.EVAL_KEYS} | {"seeds": [0, 1], "students": {"ard-seed0": "a0", "ard-seed1": "a1"}}
    (results / "x.json").write_text(json.dumps({"settings": base | settings, "runs": runs}))
    return str(results), base | {"seeds": [2], "students": {"ard-seed2": "a2"}, "teacher_steps": 24}


def test_merge_keeps_committed_rows_not_evaluated_now(tmp_path):
    old = [TEACHER, {"model": "ard-seed0", "steps": 4, "fid": 1.0}, {"model": "ard-seed1", "steps": 4, "fid": 2.0},
           {"model": "ard-seed2", "steps": 4, "fid": 9.0}]
    results, settings = committed(tmp_path, old)
    new = [dict(TEACHER), {"model": "ard-seed2", "steps": 4, "fid": 3.0}]
    rows, merged = bench.merge_committed(new, settings, results, "x")
    assert sorted((r["model"], r["fid"]) for r in rows if r["steps"] == 4) == [
        ("ard-seed0", 1.0), ("ard-seed1", 2.0), ("ard-seed2", 3.0)]  # the new seed-2 row replaces the committed one
    assert sum(r["model"].startswith("teacher") for r in rows) == 1
    assert merged["seeds"] == [0, 1, 2] and set(merged["students"]) == {"ard-seed0", "ard-seed1", "ard-seed2"}
    assert bench.merge_committed(new, settings, results, "y") == (new, settings)  # nothing committed: unchanged


def test_merge_refuses_another_evaluation(tmp_path):
    results, settings = committed(tmp_path, [TEACHER], num_samples=1000)
    with pytest.raises(SystemExit, match="num_samples"):
        bench.merge_committed([TEACHER], settings, results, "x")
    results, settings = committed(tmp_path, [TEACHER])
    with pytest.raises(SystemExit, match="not the same evaluation set"):
        bench.merge_committed([TEACHER | {"fid": 30.0}], settings, results, "x")


def test_verdict_compares_a_second_stage_with_the_baselines_same_stage():
    def row(model, fid_vs_teacher):
        return {"model": model, "steps": 2, "fid": 40.0, "fid_vs_teacher": fid_vs_teacher, "fid_bootstrap_sd": 1.0,
                "fid_vs_teacher_bootstrap_sd": 1.0}

    agg = [TEACHER | {"fid_bootstrap_sd": 1.0, "fid_vs_teacher": 0.0, "fid_vs_teacher_bootstrap_sd": 1.0},
           row("baseline", 10.0), row("ard", 9.0), row("baseline-gan", 30.0), row("ard-gan", 6.0),
           row("baseline-continued", 20.0), row("ard-continued", 8.0), row("ard+rollout", 5.0)]
    checks = {c["model"]: c for c in bench.verdict(agg, teacher_steps=24)}
    assert {m: c["baseline"] for m, c in checks.items()} == {
        "ard": "baseline", "ard-gan": "baseline-gan", "ard-continued": "baseline-continued"}  # no baseline+rollout row
    assert checks["ard-gan"]["fid_vs_teacher"]["ratio"] == pytest.approx(0.2)
    assert checks["ard-gan"]["fid_vs_teacher"]["meets_target"]
    assert checks["ard-continued"]["fid_vs_teacher"]["ratio"] == pytest.approx(0.4)


def test_a_finished_run_of_another_length_is_refused(tmp_path):
    """Run directories are named by variant, S and seed: a finished run trained for another number of iterations
    must not be taken for this invocation's."""
    run_dir = tmp_path / "runs" / "baseline-S2-seed0"
    (run_dir / "student_ema").mkdir(parents=True)
    (run_dir / "student_ema" / "ard_sampling.json").write_text("{}")
    (run_dir / "train_seconds.json").write_text(json.dumps({"seconds": 1.0, "threads": 1, "iterations": 400}))
    assert bench.fit(tmp_path, tmp_path / "store", "baseline", 2, 0, 400, 1) == run_dir / "student_ema"
    with pytest.raises(SystemExit, match="trained 400 iterations, not 1200"):
        bench.fit(tmp_path, tmp_path / "store", "baseline", 2, 0, 1200, 1)


def test_recipe_grid_takes_each_cell_from_the_report_with_most_seeds(tmp_path):
    def report(name, rows, max_steps=1200):
        agg = [{"model": m, "steps": s, "seeds": n, "fid_vs_teacher": fid, "fid_vs_teacher_spread": 1.0,
                "mse_vs_teacher": 0.03, "mse_vs_teacher_spread": 0.001} for m, s, n, fid in rows]
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"settings": {"max_steps": max_steps, "num_trajectories": 8192}, "aggregated": agg}))

    report("old", [("baseline", 4, 3, 30.0), ("ard-N2", 4, 1, 31.0), ("teacher (DDIM, w=2)", 4, 1, 99.0),
                   ("baseline [nc]", 4, 3, 29.0)])
    report("new", [("ard-N2", 4, 3, 32.0), ("ard-N2+rollout", 4, 1, 20.0), ("ard-closed-gatelr+rollout", 4, 1, 19.0),
                   ("baseline+rollout", 2, 2, 25.0), ("ard-N1+backward", 4, 2, 31.5)])
    table = bench.recipe_grid(str(tmp_path), ["old", "new"])
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
    report("short", [("baseline", 4, 3, 30.0)], max_steps=400)
    with pytest.raises(SystemExit, match="short.json: trained 400 iterations"):
        bench.recipe_grid(str(tmp_path), ["short"])
