"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"), k = 3 as in the ADM evaluator.

A set of features Phi approximates its manifold by the union of balls around each phi in Phi whose
radius is the distance to the k-th nearest neighbour of phi in Phi (itself excluded) (paper eq. 1-2):
    f(x, Phi) = 1 if ||x - phi|| <= ||phi - NN_k(phi, Phi)|| for some phi in Phi, else 0.
    precision = mean over generated g of f(g, Phi_real)   (generated samples inside the real manifold)
    recall    = mean over real r of f(r, Phi_gen)         (real samples inside the generated manifold)
Distances are Euclidean (torch.cdist) in blocks of `batch_size` rows against the whole other set.
"""
from __future__ import annotations

import torch

PR_K = 3  # the ADM evaluator's k
MIN_IMAGES = PR_K + 1  # the fewest images of a set scored here: each one's PR_K nearest neighbours in the set


def manifold_radii(features: torch.Tensor, k: int = PR_K, batch_size: int = 10000) -> torch.Tensor:
    """Distance of each feature (n, D) to its k-th nearest neighbour in the same set, itself excluded: (n,)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} features, got {k}")
    radii = []
    for start in range(0, len(features), batch_size):
        d = torch.cdist(features[start:start + batch_size], features)  # (b, n)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # (b,): the k+1-th smallest skips the point itself (0)
    return torch.cat(radii)  # (n,)


def inside_manifold(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor,
                    batch_size: int = 10000) -> torch.Tensor:
    """f(x, Phi) for each point (n, D): inside some ball (centers (m, D), radii (m,))? Bool (n,)."""
    inside = []
    for start in range(0, len(points), batch_size):
        d = torch.cdist(points[start:start + batch_size], centers)  # (b, m)
        inside.append((d <= radii[None, :]).any(dim=1))  # (b,)
    return torch.cat(inside)  # (n,)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K, batch_size: int = 10000,
                     device: str | torch.device = "cpu", real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` (n, D) against real features `real` (m, D);
    `real_radii` (m,): the real set's k-NN radii when already computed (ard.metrics.Reference.radii)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected real (m, D) and fake (n, D) features, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    if real_radii is None:
        real_radii = manifold_radii(real, k, batch_size)  # (m,)
    precision = inside_manifold(fake, real, real_radii.to(device), batch_size)  # (n,)
    recall = inside_manifold(real, fake, manifold_radii(fake, k, batch_size), batch_size)  # (m,)
    return precision.double().mean().item(), recall.double().mean().item()
