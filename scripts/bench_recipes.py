"""Cost of one training iteration of each training recipe against teacher forcing (issue 9); prints JSON.

    .venv/bin/python scripts/bench_recipes.py --store runs/bench/store [--steps 2 4] [--iterations 20]

Per student step count S and recipe (bench_digits.RECIPES: inputs x targets, ard/student/recipe.py), the
student of configs/digits/ard.yaml with `--model` (default: history in 2 blocks) is built by the `ard fit` CLI
itself (the preset plus the recipe's overrides, exactly what bench_digits trains) and trained by Lightning's loop
for --warmup + --iterations iterations on --store, one thread, no validation, checkpoint or logger. A callback
times every iteration from batch start to batch end (the recipe's rollout or teacher run, the student's forward
and backward, the optimiser step, the EMA update): wall time and this process's CPU time. Medians over the timed
iterations; the ratio to teacher forcing uses CPU time (the 2-core machine may be shared: wall time depends on
the other jobs, the CPU time of a one-thread process much less). `mixed` draws rollout inputs with a probability
ramped over bench_digits's 600 iterations: in the first iterations timed here it costs about what teacher forcing
does, at the end of its ramp what `rollout` does.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_digits import MODELS, RECIPES, ROOT  # noqa: E402 - the recipes bench_digits trains

from ard.cli import ARDCLI  # noqa: E402


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
                extra: tuple[str, ...] = ()) -> dict:
    """Median wall and CPU seconds per iteration of one recipe (the first `warmup` iterations dropped); `extra`:
    more `ard fit` overrides (another teacher, batch size)."""
    with tempfile.TemporaryDirectory() as root:
        cli = TimedCLI(args=["fit", "-c", str(ROOT / "configs/digits/ard.yaml"), f"--data.init_args.path={store}",
                             f"--data.init_args.student_steps={steps}", f"--model.init_args.num_steps={steps}",
                             "--model.init_args.samples_per_class=0", f"--trainer.default_root_dir={root}",
                             f"--trainer.max_steps={warmup + iterations}", "--trainer.logger=false",
                             "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                             "--trainer.enable_model_summary=false", *MODELS[model], *RECIPES[recipe], *extra])
    if len(cli.timer.cpu) != warmup + iterations:
        raise RuntimeError(f"timed {len(cli.timer.cpu)} iterations, not {warmup + iterations}")
    wall, cpu = cli.timer.wall[warmup:], cli.timer.cpu[warmup:]
    return dict(wall_s=statistics.median(wall), cpu_s=statistics.median(cpu), iterations=len(cpu),
                batch_size=cli.config.fit.data.init_args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a digits trajectory store (scripts/precompute_trajectories.py)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4], help="student step counts S")
    parser.add_argument("--model", default="ard-N2", choices=list(MODELS), help="bench_digits.MODELS student")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help='bench_digits.RECIPES suffixes; "" is teacher forcing')
    parser.add_argument("--warmup", type=int, default=3, help="iterations not timed")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per recipe")
    parser.add_argument("--args", nargs="*", default=[], help="more `ard fit` overrides of every run")
    args = parser.parse_args()
    if "" not in args.recipes:
        parser.error('--recipes must include "" (teacher forcing): the ratios are against it')
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # this script's own argv
    start = time.perf_counter()
    rows = []
    for steps in args.steps:
        times = {r: time_recipe(args.store, steps, args.model, r, args.warmup, args.iterations, tuple(args.args))
                 for r in args.recipes}
        for recipe, t in times.items():
            rows.append(dict(steps=steps, model=args.model, recipe=recipe or "teacher forcing", **t,
                             cpu_ratio_to_teacher_forcing=t["cpu_s"] / times[""]["cpu_s"]))
    print(json.dumps(dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=1,
                          warmup=args.warmup, rows=rows,
                          runtime_s=time.perf_counter() - start), indent=2))


if __name__ == "__main__":
    main()
