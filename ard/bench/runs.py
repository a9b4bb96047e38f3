"""The benchmark's subprocesses: the training store (scripts/precompute_trajectories.py) and one `ard fit` per
student, each resumable, one thread each, with its log beside its run directory and its wall time recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ard.atomic import write_text_atomic
from ard.bench import ROOT
from ard.bench.registry import GAN_PRESET, GAN_VARIANTS, GRIDS, VARIANTS

# The EMA of the runs recorded before ard.ema (no "ema" in their train_seconds.json)
PLAIN_EMA = "lightning.pytorch.callbacks.EMAWeightAveraging(decay=0.999)"
# The GAN stage's CSV logger (the discriminator's health, ard.bench.probes.health), under <run>/csv/
CSV_LOGGER = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s", "name": "csv"}}'


def ema_setting(grid: str = "leading24") -> str:
    """The students' EMA as configs/digits/ard.yaml (and the grid's overlay) configure it, e.g.
    "ard.ema.WarmupEMA(decay=0.999, warmup=10)": recorded with every run and report, since students averaged
    otherwise are not comparable (ard/ema.py)."""
    callbacks = []
    for preset in ("configs/digits/ard.yaml", GRIDS[grid].fit):
        if preset:
            callbacks = yaml.safe_load((ROOT / preset).read_text())["trainer"].get("callbacks", callbacks)
    ema = next(c for c in callbacks if c["class_path"].split(".")[-1] in ("WarmupEMA", "EMAWeightAveraging"))
    args = ", ".join(f"{k}={v}" for k, v in ema.get("init_args", {}).items() if k != "use_buffers")
    return f"{ema['class_path']}({args})"


def run(cmd: list[str], log: Path, threads: int) -> float:
    """Run `cmd` from the repository root with `threads` threads, its output to `log`; raise if it fails. Returns the
    CPU seconds (user + system) the command and the processes it waited for used."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: leave no orphan writing into the run directory
            proc.kill()
            proc.wait()
            raise
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {returncode}); see {log}")
    return usage.ru_utime + usage.ru_stime


def precompute(store: Path, num_trajectories: int, log: Path, grid: str = "leading24") -> None:
    """The digits training store (DDIM, CFG 2, every grid state; K = 24 leading, or the GRIDS overlay's grid); a
    complete store is kept as it is."""
    manifest = store / "manifest.json"
    overlay = GRIDS[grid].trajectories
    kept = json.loads(manifest.read_text()) if manifest.exists() else {}
    if kept.get("complete") and kept.get("num_trajectories") != num_trajectories:
        raise SystemExit(f"{manifest}: a complete store of {kept.get('num_trajectories')} trajectories, not the "
                         f"{num_trajectories} asked for; use another --work or --num-trajectories")
    if not kept.get("complete"):
        run([sys.executable, "scripts/precompute_trajectories.py", "-c", "configs/digits/trajectories.yaml",
             *(["-c", overlay] if overlay else []), "--out", str(store), "--num-trajectories", str(num_trajectories)],
            log, 2)


def second_stage_args(adversarial: bool, init: Path | None, seed: int, gan_args: tuple[str, ...]) -> list[str]:
    """The overrides that turn configs/digits/ard.yaml into a second stage from `init` (an exported student): the
    GAN stage of GAN_PRESET (`gan_args` adds overrides) or, without the GAN, the regression module with the
    preset's batch and lr (its GAN group is dropped)."""
    stage = ["-c", GAN_PRESET]
    if not adversarial:
        stage += ["--model.class_path=ard.modules.distill.ARDDistillation", "--trainer.gradient_clip_val=1.0"]
    stage += [f"--model.init_args.init_student={init}"]
    return stage + ([f"--model.init_args.gan.seed={seed}", *gan_args] if adversarial else [])


def stage_args(variant: str, run_dir: Path, seed: int, max_steps: int, init: Path | None,
               gan_args: tuple[str, ...]) -> list[str]:
    """The `ard fit` overrides of a student's stage: a regression student from the teacher's weights, or a second
    stage (second_stage_args; the GAN stage's CSV log holds the discriminator's health). Every stage trains
    `max_steps` iterations (the GAN stage counts iterations, not optimiser steps)."""
    steps = [f"--trainer.max_steps={max_steps}"]  # after the preset, which sets its own
    if variant not in GAN_VARIANTS:
        return steps + ["--trainer.logger=false"]
    stage = second_stage_args(GAN_VARIANTS[variant][1], init, seed, gan_args)
    preset, overrides = stage[:2], stage[2:]  # max_steps after the preset, which sets its own
    return [*preset, *steps, *overrides, f"--trainer.logger={CSV_LOGGER % run_dir}", "--trainer.log_every_n_steps=10"]


def fit(work: Path, store: Path, variant: str, steps: int, seed: int, max_steps: int, threads: int,
        init: Path | None = None, gan_args: tuple[str, ...] = (), grid: str = "leading24") -> Path:
    """Train one student of `variant` (VARIANTS or GAN_VARIANTS) with S = `steps`, `max_steps` iterations, into
    <work>/runs/<variant>-S<steps>-seed<seed> (resumable; the store's GRIDS entry `grid` gives its boundaries);
    returns its exported EMA student. A finished run trained
    for another number of iterations is refused: run directories are named by variant, S and seed only."""
    run_dir = work / "runs" / f"{variant}-S{steps}-seed{seed}"
    done = run_dir / "train_seconds.json"
    ema = ema_setting(grid)
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("iterations", max_steps) != max_steps:
            raise SystemExit(f"{run_dir} was trained {record['iterations']} iterations, not {max_steps}: use another "
                             "--work for another training length")
        if record.get("ema", PLAIN_EMA) != ema:
            raise SystemExit(f"{run_dir} was averaged by {record.get('ema', PLAIN_EMA)}, not {ema}: use another --work")
    if not (run_dir / "student_ema" / "ard_sampling.json").exists():
        teacher = GRIDS[grid]
        data = [f"--data.init_args.boundaries={teacher.boundaries(steps)}"] if teacher.boundaries else []
        overlay = ["-c", teacher.fit] if teacher.fit else []  # before the run's own settings, which win
        start = time.time()
        cpu = run([sys.executable, "-m", "ard.cli", "fit", "-c", "configs/digits/ard.yaml", *overlay,
             *stage_args(variant, run_dir, seed, max_steps, init, gan_args),
             f"--data.init_args.path={store}", f"--data.init_args.student_steps={steps}",
             f"--model.init_args.num_steps={steps}", f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
             f"--trainer.default_root_dir={run_dir}", f"--trainer.val_check_interval={max_steps}",
             "--trainer.enable_progress_bar=false", *data, *VARIANTS[GAN_VARIANTS.get(variant, (variant,))[0]]],
            run_dir.with_suffix(".log"), threads)
        seconds = time.time() - start
        write_text_atomic(done, json.dumps({"seconds": seconds, "cpu_seconds": cpu, "threads": threads,
                                            "iterations": max_steps, "ema": ema}))
        print(f"trained {run_dir.name} in {seconds:.0f} s", flush=True)
    return run_dir / "student_ema"


def train_seconds(student_dir: Path, key: str = "seconds") -> float | None:
    """Wall seconds the student's `ard fit` took (one thread, the machine's load as it was), or with `key`
    "cpu_seconds" the CPU seconds it used (None: unknown; runs recorded before CPU time was)."""
    path = student_dir.parent / "train_seconds.json"
    return json.loads(path.read_text()).get(key) if path.exists() else None
