"""The main job (scripts/demo.py) end to end on a tiny budget: store, two students, the report with every
key for all four rows, the pictures; re-running the same command resumes instead of starting over.

Both are slow tests (`pytest -m slow`; about a minute each, mostly the start-up of its four subprocesses): every
stage the demo chains has its own tests in the default suite, and the README's main command is run from a fresh
clone before a release."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ard.evaluate import REPORT_KEYS
from ard.store.format import verify

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path) -> str:
    cmd = [sys.executable, "scripts/demo.py", "--out", str(out), "--num-trajectories", "128", "--val-count", "32",
           "--max-steps", "3", "--num-samples", "40", "--threads", "1"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def check_outputs(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [
        ("teacher (DDIM, w=2)", 24), ("teacher (DDIM, w=2)", 2), ("baseline", 2), ("ARD", 2)]
    for row in report["rows"]:
        assert set(REPORT_KEYS) <= set(row) and row["num_samples"] == 40
    assert (out / "report.md").read_text().count("\n| ") == 4  # one line per row
    for picture in ("samples.png", "curves.png"):
        assert (out / picture).stat().st_size > 0
    manifest, problems = verify(out / "store")
    assert manifest["complete"] and manifest["num_trajectories"] == 128 and not problems
    for name in ("baseline", "ard"):
        assert (out / name / "student_ema" / "ard_sampling.json").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    run_demo(tmp_path / "demo")
    check_outputs(tmp_path / "demo")


@pytest.mark.slow
def test_demo_resumes(tmp_path):
    """The same command again skips every finished stage."""
    out = tmp_path / "demo"
    run_demo(out)
    stamp = (out / "baseline" / "student_ema" / "ard_sampling.json").stat().st_mtime_ns
    again = run_demo(out)
    assert again.count("done already") == 2
    assert (out / "baseline" / "student_ema" / "ard_sampling.json").stat().st_mtime_ns == stamp
    check_outputs(out)
