"""Frechet distance (FID) between feature sets, computed by torchmetrics' FrechetInceptionDistance.

FID (Heusel et al. 2017, eq. 6) between Gaussians fitted to two feature sets:
    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)),
with unbiased (n - 1) covariances, as the ADM evaluator's np.cov. torchmetrics accumulates the
sums in float64 and evaluates the formula; we feed it features computed once by
ard.metrics.features.extract (through a `Precomputed` identity module), so features are reused by
precision/recall and the bootstrap, and preload its real side from `FeatureStats` (mean/covariance
from an ADM reference batch or from our cache), which it keeps across reset().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ard.metrics.features import Precomputed


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and unbiased covariance (D, D) of n feature vectors, float64."""

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int

    def __post_init__(self):
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FeatureStats: expected mu (D,) and sigma (D, D), got {tuple(self.mu.shape)} "
                             f"and {tuple(self.sigma.shape)}")
        if self.n < 2:
            raise ValueError(f"FeatureStats: need n >= 2 samples, got {self.n}")

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @classmethod
    def of(cls, features: torch.Tensor) -> "FeatureStats":
        """Statistics of features (n, D)."""
        f = features.double()
        return cls(mu=f.mean(0), sigma=torch.cov(f.T), n=len(f))  # (D,), (D, D)


def fid_metric(reference: FeatureStats, device: str | torch.device = "cpu") -> FrechetInceptionDistance:
    """torchmetrics' FID taking precomputed features (update(features, real=False)), its real side
    preloaded with `reference` and kept by reset(), so it can score many feature sets in turn."""
    metric = FrechetInceptionDistance(feature=Precomputed(reference.dim), reset_real_features=False).to(device)
    mu = reference.mu.to(device, torch.float64)  # (D,)
    sigma = reference.sigma.to(device, torch.float64)  # (D, D)
    n = reference.n
    # torchmetrics keeps sum_i f_i and sum_i f_i f_i^T; its compute() turns them back into exactly mu and
    # the (n - 1) covariance sigma.
    metric.real_features_sum = mu * n  # (D,)
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)  # (D, D)
    metric.real_features_num_samples = torch.tensor(n, device=device)
    return metric


def fid_from_features(features: torch.Tensor, reference: FeatureStats | torch.Tensor,
                      device: str | torch.device = "cpu") -> float:
    """FID between features (n, D) and a reference given as statistics or as its own features (m, D)."""
    if isinstance(reference, torch.Tensor):
        reference = FeatureStats.of(reference)
    if features.ndim != 2 or features.shape[1] != reference.dim:
        raise ValueError(f"features {tuple(features.shape)} do not match reference statistics of dimension "
                         f"{reference.dim} (different extractor?)")
    metric = fid_metric(reference, device)
    metric.update(features.to(device, torch.float64), real=False)
    return float(metric.compute())
