"""Precompute a teacher's trajectory store: a thin wrapper over `ard predict -c CONFIG` (the same code path).

    python scripts/precompute_trajectories.py -c configs/digits/trajectories.yaml [-c OVERLAY.yaml] \
        --out runs/digits/trajectories --num-trajectories 16384 [--devices 2] [--batch-size 256] [any further
        `ard predict` options]

Re-running the same command resumes (complete shards are kept, the rest computed). --batch-size is the
teacher's micro-batch (model.micro_batch_size), part of the store's identity; --devices > 1 runs DDP (gloo on
CPU, NCCL on GPUs) and gives the same store as one process.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ard.cli import main as ard_main


def predict_args(argv: list[str] | None = None) -> list[str]:
    """This script's options as `ard predict` arguments; unknown options are passed through."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, action="append",
                        help="a trajectories YAML (configs/<setting>/trajectories.yaml); more -c files overlay it")
    parser.add_argument("--out", required=True, help="the store directory (data.path)")
    parser.add_argument("--num-trajectories", type=int, required=True, help="trajectories in the store")
    parser.add_argument("--devices", type=int, default=None, help="processes (trainer.devices); default: the config's")
    parser.add_argument("--batch-size", type=int, default=None, help="teacher micro-batch (model.micro_batch_size)")
    args, rest = parser.parse_known_args(argv)
    out = ["predict", *(a for config in args.config for a in ("-c", config)), f"--data.init_args.path={args.out}",
           f"--data.init_args.num_trajectories={args.num_trajectories}"]
    if args.devices is not None:
        out += [f"--trainer.devices={args.devices}"]
        if args.devices > 1:
            out += ["--trainer.strategy=ddp"]
    if args.batch_size is not None:
        out += [f"--model.init_args.micro_batch_size={args.batch_size}"]
    return out + rest


if __name__ == "__main__":
    # DDP re-runs this script with the same sys.argv in every process, so sys.argv stays as it is.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    ard_main(predict_args(sys.argv[1:]))
