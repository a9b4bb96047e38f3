"""Run every bad-input case (tests/test_bad_inputs*.py) and print the outcome table as JSON.

    python scripts/bench_bad_inputs.py                  # this checkout's cases against this checkout's code
    python scripts/bench_bad_inputs.py --code DIR       # the same cases against the package in DIR (an earlier
                                                        # checkout, e.g. a `git worktree`): the "before" column

A case is a clear named error (or a correct success) when its test passes; a failing test's message starts
with the kind of failure (`expect_one_line` in the test module): TRACEBACK (an exception or more than one
error line), SILENT (exit status 0), DAMAGE (a file written earlier changed) or UNCLEAR (the line lacks the
file, field or value). Goal: every case clear; 0 tracebacks, 0 silent, 0 damage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("TRACEBACK", "SILENT", "DAMAGE", "UNCLEAR")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(ROOT), help="repository whose `ard` package the cases run against")
    args = parser.parse_args(argv)
    code = Path(args.code).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(code)}
        files = sorted(str(p) for p in (ROOT / "tests").glob("test_bad_inputs*.py"))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        "--continue-on-collection-errors",
                        f"--rootdir={ROOT}", *files], cwd=code, env=env, capture_output=True)
        cases = ET.parse(report).getroot().iter("testcase")
        outcomes = Counter()
        failures = []
        for case in cases:
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            if failure is None:
                outcomes["clear"] += 1
                continue
            text = failure.get("message", "")
            kind = next((k for k in KINDS if k in text), "other failure")
            outcomes[kind] += 1
            failures.append({"case": case.get("name"), "kind": kind, "message": text[:300]})
    table = {"code": str(code), "tried": sum(outcomes.values()), "clear": outcomes["clear"],
             "tracebacks": outcomes["TRACEBACK"], "silent": outcomes["SILENT"], "damage": outcomes["DAMAGE"], "unclear": outcomes["UNCLEAR"],
             "other_failures": outcomes["other failure"], "failures": failures}
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
