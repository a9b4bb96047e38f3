"""Inception Score (Salimans et al. 2016) of logits, computed by torchmetrics' InceptionScore.

IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over a split; the score is averaged over
splits of `split_size` images (the ADM evaluator: 5,000). torchmetrics shuffles before splitting
with torch's global generator; we fork it and seed it so the score is reproducible.
"""
from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.image.inception import InceptionScore

from ard.metrics.features import Precomputed


def inception_score(logits: torch.Tensor, split_size: int = 5000, seed: int = 0) -> tuple[float, float]:
    """(mean, std over splits) of the IS of logits (n, K); std is nan with a single split (n <= split_size)."""
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"expected logits (N, K), got {tuple(logits.shape)}")
    splits = max(1, math.ceil(len(logits) / split_size))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        mean, std = metric.compute()
    return float(mean), float(std) if splits > 1 else math.nan
