"""The metric suite in one call: FID (+ bootstrap sd), Inception Score, precision and recall of samples.

The extractor runs once over the samples; its features feed FID, the bootstrap and
precision/recall, its logits the Inception Score. Statistics are computed on the extractor's device.
`metrics_of_features` is the same suite on features extracted elsewhere (batch by batch while sampling).
"""
from __future__ import annotations

import torch

from ard.metrics.features import FeatureExtractor, extract
from ard.metrics.fid import fid_from_features
from ard.metrics.inception_score import inception_score
from ard.metrics.precision_recall import PR_K, precision_recall
from ard.metrics.reference import Reference
from ard.metrics.stats import bootstrap_fid


def _device(extractor: FeatureExtractor) -> torch.device:
    return next(extractor.parameters()).device


def compute_metrics(samples: torch.Tensor, reference: Reference, extractor: FeatureExtractor, k: int = PR_K,
                    bootstrap: int = 10, seed: int = 0, is_split_size: int = 5000,
                    batch_size: int = 500) -> dict:
    """Metrics of uint8 NCHW `samples` against `reference` (built with the same extractor).

    Args:
        samples: generated images, uint8 (N, C, H, W), 0..255.
        reference: real-set statistics and features (ard.metrics.reference).
        extractor: feature network (DigitFeatures, InceptionFeatures), on the device to compute on.
        k: neighbourhood size of precision/recall (Kynkaanniemi et al.; ADM: 3).
        bootstrap: resamples of the generated set for fid_sd.
        seed: seed of the bootstrap and of the Inception Score's split shuffle.
        is_split_size: images per Inception Score split (ADM: 5000).
        batch_size: images per extractor forward.

    Returns: dict(fid, fid_sd, is, precision, recall, num_samples, num_reference, extractor).
    """
    if not reference.identity.startswith(f"{extractor.identity}/"):
        raise ValueError(f"reference {reference.identity} was not built with extractor {extractor.identity}")
    features, logits = extract(samples, extractor, batch_size)  # (N, D), (N, K)
    return {**metrics_of_features(features, logits, reference, k, bootstrap, seed, is_split_size, _device(extractor)),
            "extractor": extractor.identity}


def metrics_of_features(features: torch.Tensor, logits: torch.Tensor, reference: Reference, k: int = PR_K,
                        bootstrap: int = 10, seed: int = 0, is_split_size: int = 5000,
                        device: str | torch.device = "cpu") -> dict:
    """`compute_metrics` of samples whose features (N, D) and logits (N, K) are already extracted (e.g. batch
    by batch while sampling); the reference's k-NN radii are computed once per reference.

    Returns: dict(fid, fid_sd, is, precision, recall, num_samples, num_reference).
    """
    precision, recall = precision_recall(reference.features, features, k, device=device,
                                         real_radii=reference.radii(k, device))
    return {
        "fid": fid_from_features(features, reference.stats, device),
        "fid_sd": float(bootstrap_fid(features, reference.stats, bootstrap, seed, device).std()),
        "is": inception_score(logits, is_split_size, seed)[0],
        "precision": precision,
        "recall": recall,
        "num_samples": len(features),
        "num_reference": reference.stats.n,
    }


def fid_between(samples_a: torch.Tensor, samples_b: torch.Tensor, extractor: FeatureExtractor,
                batch_size: int = 500) -> float:
    """FID between two uint8 NCHW image sets (e.g. student vs teacher samples from the same noises)."""
    features_a, _ = extract(samples_a, extractor, batch_size)  # (N, D)
    features_b, _ = extract(samples_b, extractor, batch_size)  # (M, D)
    return fid_from_features(features_a, features_b, _device(extractor))
