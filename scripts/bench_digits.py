"""The digits distillation benchmark: baseline (N = 0) against ARD at several student step counts and
knob settings, each over several training seeds, all evaluated on one shared evaluation set.

    python scripts/bench_digits.py [--steps 2 3 4] [--seeds 0 1 2] [--max-steps 600] [--workers 2] [--teacher-grid paper25]
    python scripts/bench_digits.py --refresh-docs [DOC ...]   # the docs' report sections, from docs/results

Runs (resumable: a finished run is skipped when the command is re-run, and refused if it was trained for another
number of iterations, since run directories are named by variant, S and seed only):
  1. the training store: `scripts/precompute_trajectories.py` (K = 24 DDIM, CFG 2, every grid state);
  2. one `ard fit` per (variant, S, seed), `--workers` at a time with one thread each (the seed sets the
     data order and every random draw; the student starts from the teacher's weights, a GAN variant from
     the same-seed regression student of the same S, fine-tuned `--gan-steps` iterations with
     configs/digits/ard_gan.yaml; each run's training time is kept in <run>/train_seconds.json);
  3. `ard.evaluate.evaluate` per S over every student of that S, plus the teacher at K steps and the
     undistilled teacher at S steps (same noises and labels: a held-out seed);
     (skipped when `<work>/eval/S<s>/report.json` already holds the same students and settings);
  4. aggregation over seeds (mean and sd), written to <results>/<name>.{json,md} and a plot <results>/<name>.png;
     with --merge, the student rows of the committed report that this invocation did not evaluate are kept (the
     runs of an earlier checkout, which runs/ does not outlive), if that report was evaluated the same way.
The GAN stages add their verdict (FID vs real against the continued student and the teacher, precision against
the teacher's) and the discriminator's health (their CSV logs).
The report's second table is the verdict, computed here: per S, the baseline's degradation against the
teacher in bootstrap sds (the sensitivity criterion: >= 5) and each ARD variant's degradation as a fraction
of the baseline's (the paper's target: <= 1/5), for FID against the teacher's samples and against real data.
Prints the aggregated rows and the verdict as JSON.
A run writes nothing outside <results> and --work: --refresh-docs copies the committed reports into the docs'
sections `<!-- NAME:start -->` ... `<!-- NAME:end -->` (<results>/<NAME>.md) and the results summary.
The code is the package ard.bench.
"""
from __future__ import annotations

import argparse

from ard.bench import ROOT
from ard.bench.benchmark import benchmark, refresh_teacher_rows
from ard.bench.docs import refresh
from ard.bench.registry import GAN_VARIANTS, GRIDS, VARIANTS
from ard.bench.reports import write_grid

DOCS = ["docs/benchmarks.md", "README.md"]  # where --refresh-docs looks for sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench_digits", help="stores, runs and evaluation caches")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4], help="student step counts S")
    parser.add_argument("--variants", nargs="+", default=["baseline", "ard"], choices=list(VARIANTS))
    parser.add_argument("--knob-variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="extra variants trained at --knob-steps only")
    parser.add_argument("--knob-steps", type=int, default=2)
    parser.add_argument("--gan-variants", nargs="*", default=[], choices=list(GAN_VARIANTS),
                        help="GAN stages (and their continued-regression comparisons) at every --steps")
    parser.add_argument("--gan-steps", type=int, default=600, help="iterations of each GAN stage")
    parser.add_argument("--gan-args", nargs="*", action="extend", default=[],
                        help="extra overrides of every GAN stage (repeatable: --gan-args=--a=1 --gan-args=--b=2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-grid", default="leading24", choices=list(GRIDS),
                        help="the training store's teacher grid and the students' boundaries (ard.bench.registry."
                             "GRIDS; paper25: DiT's 25-step grid, boundaries uniform in t as the paper's setting; "
                             "t2i: the captioned PixArt teacher of configs/digits_t2i/; cfg15, flow, w64, w32: the "
                             "controls' teachers at CFG 1.5, scripts/bench_controls.py)")
    parser.add_argument("--num-trajectories", type=int, default=8192)
    parser.add_argument("--max-steps", type=int, default=600, help="training iterations per student")
    parser.add_argument("--num-samples", type=int, default=2000, help="evaluation set size")
    parser.add_argument("--workers", type=int, default=2, help="students trained at once (one thread each)")
    parser.add_argument("--train-only", action="store_true", help="train the students, evaluate nothing")
    parser.add_argument("--noise-correction", action="store_true",
                        help="also evaluate every student (and the undistilled teacher) with noise correction")
    parser.add_argument("--refresh-teacher-rows", action="store_true",
                        help="re-evaluate only the teacher rows and floors of the committed report --name, "
                             "keep the rest")
    parser.add_argument("--merge", action="store_true",
                        help="keep the student rows of the committed report --name that this invocation does not "
                             "evaluate (runs of an earlier checkout), if it was evaluated the same way")
    parser.add_argument("--grid", nargs="+", metavar="REPORT",
                        help="only write the recipe grid of these committed reports to <results>/<name>.md")
    parser.add_argument("--refresh-docs", nargs="*", metavar="DOC",
                        help=f"only rewrite the report sections of these docs (default: {' '.join(DOCS)}) from "
                             "the committed reports in --results")
    parser.add_argument("--results", default="docs/results", help="where the report goes")
    parser.add_argument("--name", default="digits-benchmark",
                        help="report name: file stem <results>/<name with _>.* and docs section (<!-- NAME:start -->)")
    args = parser.parse_args(argv)

    if args.refresh_docs is not None:
        for doc in args.refresh_docs or DOCS:
            print(f"{doc}: {', '.join(refresh(doc, args.results)) or 'unchanged'}")
        return
    if args.grid:
        write_grid(args.results, args.grid, args.name)
        return
    work = (ROOT / args.work).resolve()
    if args.refresh_teacher_rows:
        return refresh_teacher_rows(args.results, args.name, work)
    benchmark(work=work, results=args.results, name=args.name, steps=args.steps, variants=args.variants,
              knob_variants=args.knob_variants, knob_steps=args.knob_steps, gan_variants=args.gan_variants,
              gan_steps=args.gan_steps, gan_args=args.gan_args, seeds=args.seeds,
              num_trajectories=args.num_trajectories, max_steps=args.max_steps, num_samples=args.num_samples,
              workers=args.workers, train_only=args.train_only, noise_correction=args.noise_correction,
              merge=args.merge, grid=args.teacher_grid)


if __name__ == "__main__":
    main()
