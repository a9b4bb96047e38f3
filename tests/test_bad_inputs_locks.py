"""One writer per run directory and per store, and no trace of a refused run.

A second `ard fit` on a run directory a live process holds, or a second precompute into a store another process is
writing, stops before any work with one line naming that process; a lock left by a killed process blocks nothing.
A run refused before its first optimiser step (a refused resume, a rotten store at the first batch) leaves its run
directory exactly as it found it, with CSV logs and with offline W&B. Every refusal goes through `expect_one_line`
(tests/test_bad_inputs.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ard.cli as cli
import ard.runlock as runlock
from ard.cli import main as ard_main
from ard.runlock import LOCK_NAME, DirectoryLock
from ard.store import format as fmt
from test_bad_inputs import ROOT, copy, expect_one_line, fit_args, predict_args, run, store, teacher  # noqa: F401

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: directories, symlink targets and file digests (what "as it was" compares)."""
    def entry(p: Path) -> str:
        return f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else fmt.sha256_file(p)
    return {str(p.relative_to(root)): entry(p) for p in root.rglob("*")}


def rot_all(out: Path) -> None:
    """NaN in every trajectory of the store: whatever the first batch holds, the reader refuses it."""
    for shard in sorted((out / "shards").iterdir()):
        a = np.load(shard / "states.npy", mmap_mode="r+")
        a[:, 2, 0, 0, 0] = np.nan
        a.flush()


def wait_for_lock(directory: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    """The details `proc` wrote into `directory`'s lock file, once it holds the lock (its stderr goes to `log`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first process ended early: {log.read_text()[-2000:]}"
        try:
            holder = json.loads((directory / LOCK_NAME).read_text())
            if holder["pid"] == proc.pid:
                return holder
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    pytest.fail(f"no lock taken by pid {proc.pid} in {timeout} s")


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`python ARGS` in the background from the repository root, stderr to `log` (a pipe could fill and stall it)."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err,
                                text=True)


def newest_step(root: Path) -> int:
    newest = max((root / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    return torch.load(newest, map_location="cpu", weights_only=True)["global_step"]


# ---------------------------------------------------------------------------------------------- one writer
def test_a_second_fit_on_a_live_run_directory_stops_naming_it_and_a_killed_one_blocks_nothing(
        tmp_path, capsys, teacher, store, run):
    root, log = copy(run, tmp_path / "run"), tmp_path / "first.log"
    first = start(["-m", "ard.cli", *fit_args(root, teacher, store, "--trainer.max_steps=100000")], log)
    try:
        holder = wait_for_lock(root, first, log)
        # a missing teacher would be the first error if the lock were checked after the model is built
        second = fit_args(root, tmp_path / "no-teacher", store, "--trainer.max_steps=3")
        line = expect_one_line(capsys, lambda: ard_main(second), [
            f"trainer.default_root_dir={root}: another process is writing there", f"pid {first.pid}",
            "-m ard.cli fit -c", f"since {holder['since']}", str(root / LOCK_NAME)])
        assert "no-teacher" not in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == first.pid  # left behind, no longer held
    ard_main(fit_args(root, teacher, store, "--trainer.max_steps=3"))  # the resume is not blocked
    assert newest_step(root) >= 3 and not (root / LOCK_NAME).exists()


def test_a_second_precompute_into_a_store_being_written_stops_and_a_killed_one_blocks_nothing(
        tmp_path, capsys, teacher, store):
    """The first writer is a process holding the store's lock as a precompute does (ard.runlock), which starts in
    a fraction of the time a precompute takes."""
    out = copy(store, tmp_path / "store")
    shard = out / "shards" / "shard-000001"
    shutil.rmtree(shard)  # one shard left to compute
    code = ("import sys, time; from ard.runlock import DirectoryLock; "
            "DirectoryLock(sys.argv[1], 'data.path').acquire(); print('locked', flush=True); time.sleep(600)")
    first = start(["-c", code, str(out)], tmp_path / "first.log")
    try:
        assert first.stdout.readline() == "locked\n", (tmp_path / "first.log").read_text()
        expect_one_line(capsys, lambda: ard_main(predict_args(teacher, out)), [
            f"data.path={out}: another process is writing there", f"pid {first.pid}", "from ard.runlock import"], [out])
        assert not shard.exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    ard_main(predict_args(teacher, out))  # the lock file is still there, unheld: the resume computes the shard
    assert fmt.read_manifest(out)["complete"] and not (out / LOCK_NAME).exists()


def test_a_lock_file_its_holder_deleted_is_not_kept(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder deleted it (on release) must lock the file now
    at the path, not the deleted one: else two processes would each hold "the" lock."""
    (tmp_path / LOCK_NAME).write_text("")  # the holder's file
    real, calls = runlock.fcntl.flock, []

    def holder_releases_in_between(fd, operation):
        if not calls:
            (tmp_path / LOCK_NAME).unlink()
        calls.append(fd)
        return real(fd, operation)

    monkeypatch.setattr(runlock.fcntl, "flock", holder_releases_in_between)
    lock = DirectoryLock(tmp_path, "x").acquire()
    monkeypatch.setattr(runlock.fcntl, "flock", real)
    assert len(calls) == 2 and os.fstat(lock._fd).st_ino == os.stat(tmp_path / LOCK_NAME).st_ino
    with pytest.raises(ValueError, match=f"x={tmp_path}: another process is writing there: pid {os.getpid()} on "):
        DirectoryLock(tmp_path, "x").acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's launcher sets these in rank 0 too
    ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False), ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False),
])
def test_only_global_rank_zero_takes_the_lock(monkeypatch, env, zero):
    for name in runlock.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runlock.is_global_rank_zero() is zero


# ---------------------------------------------------------------------------------------------- no trace
def spy_discard(monkeypatch) -> list[set[str]]:
    """Record what each refused run had added when it was discarded (to show that there was something)."""
    added, real = [], cli.RunDirectory.discard

    def discard(self):
        added.append(set(cli._entries(self.root)) - set(self.before))
        real(self)

    monkeypatch.setattr(cli.RunDirectory, "discard", discard)
    return added


@pytest.mark.parametrize("case", ["hyperparameter", "rotten_store"])
def test_a_refused_resume_leaves_the_run_directory_as_it_was(tmp_path, capsys, monkeypatch, teacher, store, run, case):
    """Refused when the checkpoint is restored (another lr), or at the first batch after it (a store whose values
    rotted; --resume.override accepts its other path): the CSV version, config.yaml and lock file it made are gone."""
    root, data = copy(run, tmp_path / "run"), store
    if case == "hyperparameter":
        extra, needle = ["--model.init_args.lr=5e-4"], "model.lr is 0.0002 in the checkpoint but 0.0005"
    else:
        data = copy(store, tmp_path / "rotten")
        rot_all(data)
        extra, needle = ["--resume.override=true"], "holds NaN, inf or a value beyond"
    added, before = spy_discard(monkeypatch), tree(root)
    expect_one_line(capsys, lambda: ard_main(fit_args(root, teacher, data, "--trainer.max_steps=3", *extra)), needle,
                    [root])
    assert tree(root) == before and "csv/version_1" in added[0]


def test_a_run_refused_at_its_first_batch_leaves_no_wandb_trace(tmp_path, capsys, monkeypatch, teacher, store):
    """The presets' offline W&B logger: the refused run's offline-run directory, the symlinks it re-pointed to it
    (latest-run, debug.log) and its config.yaml go; a new run directory goes entirely."""
    data = copy(store, tmp_path / "rotten")
    rot_all(data)
    added = spy_discard(monkeypatch)

    def wandb_args(root):
        return [a for a in fit_args(root, teacher, data) if not a.startswith("--trainer.logger=")]

    fresh = tmp_path / "fresh"
    expect_one_line(capsys, lambda: ard_main(wandb_args(fresh)), "holds NaN, inf or a value beyond")
    assert not fresh.exists()
    earlier = tmp_path / "earlier"  # an earlier W&B run's files
    logs = earlier / "wandb" / "offline-run-20250101_000000-abcd1234" / "logs"
    logs.mkdir(parents=True)
    (logs / "debug.log").write_text("the earlier run\n")
    (earlier / "wandb" / "latest-run").symlink_to("offline-run-20250101_000000-abcd1234")
    (earlier / "wandb" / "debug.log").symlink_to("offline-run-20250101_000000-abcd1234/logs/debug.log")
    (earlier / "notes.txt").write_text("mine")
    before = tree(earlier)
    expect_one_line(capsys, lambda: ard_main(wandb_args(earlier)), "holds NaN, inf or a value beyond", [earlier])
    assert tree(earlier) == before
    for names in added:  # each had made a W&B run and a config.yaml (in <project>/<run id>)
        assert {n.split("/")[0] for n in names} >= {"wandb", "ard-digits"}
        assert any(n.startswith("wandb/offline-run-") for n in names)
