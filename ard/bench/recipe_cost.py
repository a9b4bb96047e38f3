"""The cost of one training iteration of a training recipe (scripts/bench_recipes.py): a real `ard fit` of the
digits preset with a benchmark student's and recipe's overrides (registry.MODELS, RECIPES), each iteration timed
from batch start to batch end in wall and process CPU seconds."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from ard.atomic import write_text_atomic
from ard.bench import ROOT
from ard.bench.registry import MODELS, RECIPES
from ard.bench.runs import second_stage_args
from ard.cli import ARDCLI


ADVERSARIAL = "--model.init_args.gan.warmup=0"  # a GAN stage's iterations timed past its warm-up


class IterationTimer(L.Callback):
    """Wall and process CPU seconds of every training iteration (batch start to batch end)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


class TimedCLI(ARDCLI):
    """`ard fit` with an IterationTimer on the trainer."""

    def before_fit(self) -> None:
        self.timer = IterationTimer()
        self.trainer.callbacks.append(self.timer)


def time_recipe(store: str, steps: int, model: str, recipe: str, warmup: int, iterations: int,
                extra: tuple[str, ...] = (), stage: tuple[str, ...] = ()) -> dict:
    """Median wall and CPU seconds per iteration of one recipe (the first `warmup` iterations dropped), S = `steps`,
    no validation, checkpoint, logger or sample grid; `extra`: more `ard fit` overrides (another teacher, batch);
    `stage`: overrides right after the preset, before the student's and recipe's knobs, which win (a second stage's
    preset, runs.second_stage_args)."""
    with tempfile.TemporaryDirectory() as root:
        cli = TimedCLI(args=["fit", "-c", str(ROOT / "configs/digits/ard.yaml"), *stage,
                             f"--data.init_args.path={store}",
                             f"--data.init_args.student_steps={steps}", f"--model.init_args.num_steps={steps}",
                             "--model.init_args.samples.per_class=0", f"--trainer.default_root_dir={root}",
                             f"--trainer.max_steps={warmup + iterations}", "--trainer.logger=false",
                             "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                             "--trainer.enable_model_summary=false", *MODELS[model], *RECIPES[recipe], *extra])
    if len(cli.timer.cpu) != warmup + iterations:
        raise RuntimeError(f"timed {len(cli.timer.cpu)} iterations, not {warmup + iterations}")
    wall, cpu = cli.timer.wall[warmup:], cli.timer.cpu[warmup:]
    return dict(wall_s=statistics.median(wall), cpu_s=statistics.median(cpu), iterations=len(cpu),
                batch_size=cli.config.fit.data.init_args.batch_size)


def cpu_matched_iterations(out: Path, store: Path, steps: int, variant: str, init: Path, gan_steps: int,
                           gan_args: tuple[str, ...], overlay: str | None = None, warmup: int = 3,
                           iterations: int = 20) -> dict:
    """How many iterations the student continued without the GAN must train to use the CPU time of `gan_steps`
    GAN-stage iterations: one iteration of each second stage of the regression `variant` ("ard-N1+rollout") from
    its exported student `init`, S = `steps`, timed on this machine with one thread (median CPU seconds), their ratio
    times `gan_steps`. The GAN iterations are timed adversarial (warm-up 0): the warm-up's are cheaper (no generator
    GAN loss), so the continued student gets slightly more than the stage's CPU time, never less. `overlay`: the
    teacher's fit preset. Kept in `out` (JSON), which a re-run reuses."""
    if out.exists():
        return json.loads(out.read_text())
    model, _, recipe = variant.partition("+")
    first = ("-c", overlay) if overlay else ()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost = {name: time_recipe(str(store), steps, model, recipe, warmup, iterations,
                                  stage=(*first, *second_stage_args(adversarial, init, 0, (*gan_args, ADVERSARIAL))))
                for name, adversarial in (("gan", True), ("continued", False))}
    finally:
        torch.set_num_threads(threads)
    ratio = cost["gan"]["cpu_s"] / cost["continued"]["cpu_s"]
    record = {"variant": variant, "steps": steps, "gan_cpu_s": cost["gan"]["cpu_s"],
              "continued_cpu_s": cost["continued"]["cpu_s"], "cpu_ratio": ratio, "gan_steps": gan_steps,
              "continued_steps": round(gan_steps * ratio), "timed_iterations": iterations}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=1))
    return record
