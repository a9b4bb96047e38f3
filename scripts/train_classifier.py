"""Train the digit classifier the digits metrics use, and write it as model.safetensors + config.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_classifier.py            # reproduces ard/assets/digit_classifier
    .venv/bin/python scripts/train_classifier.py --out /tmp/clf --seed 1 --epochs 20

The defaults are the shipped settings (ard.metrics.classifier.ClassifierTraining / ClassifierArch);
every field of both is a flag. config.json records the architecture, the training settings, the
accuracy on the held-out val split of ard.data.digits and the weights' sha256. Training is seeded
and single-threaded by default (--threads), about 40 s on one core; prints a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from ard.metrics.classifier import (DIGIT_CLASSIFIER, ClassifierArch, ClassifierTraining, save_digit_classifier,
                                    train_digit_classifier)

MIN_VAL_ACCURACY = 0.97  # the metrics need a classifier at least this accurate on the held-out split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DIGIT_CLASSIFIER), help="output directory (replaced atomically)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the reference setting)")
    for cls in (ClassifierTraining, ClassifierArch):
        group = parser.add_argument_group(cls.__name__)
        for field in dataclasses.fields(cls):
            group.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                               help=f"(default {field.default})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    training = ClassifierTraining(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClassifierTraining)})
    arch = ClassifierArch(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClassifierArch)})
    start = time.perf_counter()
    model, val_accuracy = train_digit_classifier(training, arch)
    seconds = time.perf_counter() - start
    if val_accuracy < MIN_VAL_ACCURACY:
        print(f"error: val accuracy {val_accuracy:.4f} < {MIN_VAL_ACCURACY}; nothing written", file=sys.stderr)
        sys.exit(1)
    out = save_digit_classifier(model, args.out, training, val_accuracy)
    print(json.dumps(dict(out=str(out), val_accuracy=val_accuracy, train_seconds=round(seconds, 1),
                          threads=args.threads, torch=torch.__version__), indent=2))


if __name__ == "__main__":
    main()
