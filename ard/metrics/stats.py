"""How much an FID can be trusted: bootstrap spread over the generated set and a reference's noise floor.

- bootstrap_fid: resample the generated features with replacement B times (seeded) and recompute
  the FID against fixed reference statistics; the standard deviation of the B values is the
  sampling uncertainty of the generated set (the reference's is not included).
- fid_noise_floor: FID between two disjoint random halves of the reference: what two samples of
  the same distribution of that size score. A model cannot be told apart from the data below it.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ard.metrics.fid import FeatureStats, fid_from_features, fid_metric


def bootstrap_fid(features: torch.Tensor, reference: FeatureStats, num_resamples: int = 10, seed: int = 0,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """FIDs of `num_resamples` with-replacement resamples of features (n, D) against `reference`: (B,) float64."""
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2 for a spread, got {num_resamples}")
    generator = torch.Generator().manual_seed(seed)
    metric = fid_metric(reference, device)
    features = features.to(device, torch.float64)
    values = []
    for _ in tqdm(range(num_resamples), desc="FID bootstrap", disable=len(features) < 10000):
        idx = torch.randint(len(features), (len(features),), generator=generator).to(device)  # (n,)
        metric.reset()  # clears the generated side only (reset_real_features=False)
        metric.update(features[idx], real=False)
        values.append(float(metric.compute()))
    return torch.tensor(values, dtype=torch.float64)


def fid_noise_floor(reference_features: torch.Tensor, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """FID between two disjoint random halves (seeded) of the reference features (n, D)."""
    order = torch.randperm(len(reference_features), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    a, b = reference_features[order[:half]], reference_features[order[half:2 * half]]  # (n/2, D) each
    return fid_from_features(a, b, device)
