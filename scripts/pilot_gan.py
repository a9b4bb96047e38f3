"""A short ARD + GAN pilot on digits (one S, one seed): which re-noising and which fake to make the defaults, and
whether the discriminator memorises the 1438 training digits. Not the benchmark (scripts/bench_digits.py
--gan-variants runs that: S = 2 and 4, 3 seeds).

    python scripts/pilot_gan.py [--steps 2] [--reg-steps 300] [--gan-steps 250] [--warmup 50] [--workers 2]
    python scripts/pilot_gan.py --variant ard-N1+rollout --reg-steps 1200 --name gan-screen ...  # another student

1. the training store and the regression student --variant (ard.bench.runs.fit, resumable);
2. from that student: the same student trained --gan-steps more iterations without the GAN (same batch and lr:
   the comparison), and one GAN stage per knob setting (ard.bench.registry.PILOT_KNOBS);
3. one evaluation of all of them (ard.evaluate, the shared held-out noises), the discriminator's health over
   the last --health-window iterations (CSV logs: D loss, mean logits on real, fake and held-out real digits,
   the adaptive weight) and the training times; written to <results>/<stem of --name>.{json,md} and printed
   (`scripts/bench_digits.py --refresh-docs` copies the table into the docs' section of that name).
The code is ard.bench.pilot.
"""
from __future__ import annotations

import argparse
import json

from ard.bench import ROOT
from ard.bench.pilot import pilot
from ard.bench.registry import PILOT_KNOBS, VARIANTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/gan_pilot")
    parser.add_argument("--steps", type=int, default=2, help="student steps S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-trajectories", type=int, default=4096)
    parser.add_argument("--reg-steps", type=int, default=300, help="iterations of the regression student")
    parser.add_argument("--gan-steps", type=int, default=250, help="iterations of each second stage")
    parser.add_argument("--warmup", type=int, default=50, help="GAN warm-up iterations")
    parser.add_argument("--knobs", nargs="+", default=list(PILOT_KNOBS), choices=list(PILOT_KNOBS))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--health-window", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", default="ard", choices=list(VARIANTS), help="the regression student")
    parser.add_argument("--name", default="gan-pilot", help="report name: <results>/<name with _>.{json,md}")
    parser.add_argument("--results", default="docs/results")
    args = parser.parse_args(argv)
    result = pilot(work=(ROOT / args.work).resolve(), results=args.results, steps=args.steps, seed=args.seed,
                   num_trajectories=args.num_trajectories, reg_steps=args.reg_steps, gan_steps=args.gan_steps,
                   warmup=args.warmup, knobs=args.knobs, num_samples=args.num_samples,
                   health_window=args.health_window, workers=args.workers, variant=args.variant, name=args.name)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
