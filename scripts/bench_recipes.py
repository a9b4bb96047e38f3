"""Cost of one training iteration of each training recipe against teacher forcing; prints JSON.

    .venv/bin/python scripts/bench_recipes.py --store runs/bench/store [--steps 2 4] [--iterations 20]

Per student step count S and recipe (ard.bench.registry.RECIPES: inputs x targets, ard/student/recipe.py), the
student of configs/digits/ard.yaml with `--model` (default: history in 2 blocks) is built by the `ard fit` CLI
itself (the preset plus the recipe's overrides, exactly what bench_digits trains) and trained by Lightning's loop
for --warmup + --iterations iterations on --store, one thread, no validation, checkpoint or logger. A callback
times every iteration from batch start to batch end (the recipe's rollout or teacher run, the student's forward
and backward, the optimiser step, the EMA update): wall time and this process's CPU time. Medians over the timed
iterations; the ratio to teacher forcing uses CPU time (the 2-core machine may be shared: wall time depends on
the other jobs, the CPU time of a one-thread process much less). `mixed` draws rollout inputs with a probability
ramped over bench_digits's 600 iterations: in the first iterations timed here it costs about what teacher forcing
does, at the end of its ramp what `rollout` does. With --gan, one iteration of the GAN stage on teacher-forced
inputs is timed too (a student step on L_reg + lambda L_gan with the fake taken from the regression pass, then a
discriminator step; ard.bench.registry.GAN_ITERATION). The code is ard.bench.recipe_cost.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch

from ard.bench.recipe_cost import time_recipe
from ard.bench.registry import GAN_ITERATION, MODELS, RECIPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a digits trajectory store (scripts/precompute_trajectories.py)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4], help="student step counts S")
    parser.add_argument("--model", default="ard-N2", choices=list(MODELS), help="ard.bench.registry.MODELS student")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help='ard.bench.registry.RECIPES suffixes; "" is teacher forcing')
    parser.add_argument("--warmup", type=int, default=3, help="iterations not timed")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per recipe")
    parser.add_argument("--args", nargs="*", default=[], help="more `ard fit` overrides of every run")
    parser.add_argument("--gan", action="store_true", help="also time a GAN stage iteration on teacher-forced "
                        "inputs (ard.bench.registry.GAN_ITERATION: the fake is the regression pass's last step)")
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
        if args.gan:
            times["GAN stage"] = time_recipe(args.store, steps, args.model, "", args.warmup, args.iterations,
                                             (*GAN_ITERATION, *args.args))
        for recipe, t in times.items():
            rows.append(dict(steps=steps, model=args.model, recipe=recipe or "teacher forcing", **t,
                             cpu_ratio_to_teacher_forcing=t["cpu_s"] / times[""]["cpu_s"]))
    print(json.dumps(dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=1,
                          warmup=args.warmup, rows=rows,
                          runtime_s=time.perf_counter() - start), indent=2))


if __name__ == "__main__":
    main()
