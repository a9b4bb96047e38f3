"""The two controls of ARD's "bigger models degrade less" reading: ARD against the baseline on several teachers that
differ in one thing only, from one digits benchmark report per teacher (scripts/bench_digits.py --teacher-grid G
--name control-G, ard.bench.registry.GRIDS), combined into one report with ARD's seed-paired ratio to the baseline.

    # control 1, the teacher's parametrisation (epsilon vs flow), and control 2, model size (widths 32 / 64 / 128):
    for g in cfg15 flow w64 w32; do
      python scripts/bench_digits.py --work runs/controls/$g --teacher-grid $g --steps 2 4 --variants baseline ard-N1 \
        --seeds 0 1 2 --max-steps 600 --num-trajectories 4096 --results runs/controls/results --name control-$g
    done
    python scripts/bench_controls.py digits-flow digits-size --inputs runs/controls/results

Writes <results>/<stem>.{json,md,png} per control (docs/results/digits_flow.*, docs/results/digits_size.*) and prints
its rows as JSON. The code is ard.bench.controls.
"""
from __future__ import annotations

import argparse

from ard.bench.controls import CONTROLS, write_control


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("controls", nargs="+", choices=list(CONTROLS))
    parser.add_argument("--inputs", default="runs/controls/results", help="the teachers' benchmark reports")
    parser.add_argument("--results", default="docs/results", help="where the control reports go")
    parser.add_argument("--baseline", default="baseline", help="the baseline's variant in the teachers' reports")
    parser.add_argument("--ard", default="ard-N1", help="ARD's variant in the teachers' reports")
    args = parser.parse_args(argv)
    for name in args.controls:
        write_control(name, args.inputs, args.results, args.baseline, args.ard)


if __name__ == "__main__":
    main()
