"""Evaluation metrics (ADM evaluator protocol): FID and Inception Score through torchmetrics, improved
precision/recall (k = 3), bootstrap sd and noise floor, feature extractors, reference statistics.

Images enter every metric as torch uint8 NCHW (N, C, H, W), 0..255 (ADM npz arrays are NHWC:
nhwc_to_nchw / load_npz_images; [-1, 1] floats: ard.data.digits.to_uint8).

    extractor = DigitFeatures()                                   # or InceptionFeatures(weights_path)
    reference = reference_from_images(digits_images("all"), extractor, cache_dir="runs/metrics_cache")
    compute_metrics(samples_uint8, reference, extractor)          # {fid, fid_sd, is, precision, recall, ...}
    fid_between(samples_a, samples_b, extractor)
"""
from ard.metrics.classifier import DIGIT_CLASSIFIER, load_digit_classifier, train_digit_classifier
from ard.metrics.compute import compute_metrics, fid_between, metrics_of_features
from ard.metrics.features import (DigitFeatures, FeatureExtractor, InceptionFeatures, extract,
                                  nhwc_to_nchw)
from ard.metrics.fid import FeatureStats, fid_from_features
from ard.metrics.inception_score import inception_score
from ard.metrics.precision_recall import precision_recall
from ard.metrics.reference import (Reference, adm_npz_writer, digits_images, load_npz_images, reference_from_adm_npz,
                                   reference_from_images, save_npz_images)
from ard.metrics.stats import bootstrap_fid, fid_noise_floor

__all__ = [
    "DIGIT_CLASSIFIER", "load_digit_classifier", "train_digit_classifier", "compute_metrics", "fid_between",
    "metrics_of_features", "adm_npz_writer",
    "DigitFeatures", "FeatureExtractor", "InceptionFeatures", "extract", "nhwc_to_nchw", "FeatureStats",
    "fid_from_features", "inception_score", "precision_recall", "Reference", "digits_images",
    "load_npz_images", "reference_from_adm_npz", "reference_from_images", "save_npz_images", "bootstrap_fid", "fid_noise_floor",
]
