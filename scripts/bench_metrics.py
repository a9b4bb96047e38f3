"""Sanity anchors of the digits metrics with the shipped classifier; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_metrics.py [--bootstrap 10] [--splits 10]

- classifier: accuracy on the held-out val split (and train) through the uint8 path, vs config.json.
- real_halves: the full suite for one seeded split of the 1797 real digits into disjoint halves
  (second half scored against the first): FID with bootstrap sd, IS, precision, recall. FID here is
  the noise floor at ~900 samples; below it a model cannot be told apart from the data.
- noise_floor: FID between disjoint halves over --splits seeded splits (mean, sd, min, max).
- real_vs_noisy: all real digits with Gaussian pixel noise (sd 0.2 in [-1, 1] units) vs all real.
- real_vs_uniform_noise: 1797 uniform-noise images vs all real digits.
- is_real: Inception Score (one split) of all real digits; 10 would be confident and balanced.
Each section records its wall time in seconds.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ard.data.digits import load_digits_split, to_uint8
from ard.metrics import (DigitFeatures, compute_metrics, digits_images, extract, fid_noise_floor, inception_score,
                         reference_from_images)
from ard.metrics.classifier import accuracy


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return {**out, "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--bootstrap", type=int, default=10, help="resamples for fid_sd")
    parser.add_argument("--splits", type=int, default=10, help="random half-splits for the noise floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    extractor = DigitFeatures()
    config = extractor.classifier_config
    real = digits_images("all")  # (1797, 1, 8, 8) uint8
    reference = reference_from_images(real, extractor)
    g = torch.Generator().manual_seed(0)

    def classifier() -> dict:
        split = dict(val_fraction=config["training"]["val_fraction"], seed=config["training"]["split_seed"])
        acc = {name: accuracy(extractor.classifier, to_uint8(x), y)
               for name in ("val", "train") for x, y in [load_digits_split(name, **split)]}
        return dict(val_accuracy=acc["val"], train_accuracy=acc["train"], recorded_val_accuracy=config["val_accuracy"])

    def real_halves() -> dict:
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
        half = len(real) // 2
        ref_half = reference_from_images(real[order[:half]], extractor)
        return compute_metrics(real[order[half:2 * half]], ref_half, extractor, bootstrap=args.bootstrap)

    def noise_floor() -> dict:
        values = [fid_noise_floor(reference.features, seed) for seed in range(args.splits)]
        return dict(mean=statistics.mean(values), sd=statistics.stdev(values), min=min(values), max=max(values),
                    splits=args.splits, half_size=len(real) // 2)

    def real_vs_noisy() -> dict:
        x, _ = load_digits_split("all")
        noisy = to_uint8(x + 0.2 * torch.randn(x.shape, generator=g))
        return compute_metrics(noisy, reference, extractor, bootstrap=args.bootstrap)

    def real_vs_uniform_noise() -> dict:
        noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=g)
        return compute_metrics(noise, reference, extractor, bootstrap=args.bootstrap)

    def is_real() -> dict:
        return {"is": inception_score(extract(real, extractor)[1])[0]}

    report = dict(
        extractor=extractor.identity,
        num_features=extractor.num_features,
        threads=args.threads,
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        classifier=timed(classifier),
        real_halves=timed(real_halves),
        noise_floor=timed(noise_floor),
        real_vs_noisy=timed(real_vs_noisy),
        real_vs_uniform_noise=timed(real_vs_uniform_noise),
        is_real=timed(is_real),
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
