"""Feature extractors: uint8 images -> features (FID, precision/recall) and logits (Inception Score).

Image convention of every metric in ard.metrics: torch uint8 tensors, NCHW, values 0..255 -- what
torchmetrics' FID/IS take with normalize=False and what torch-fidelity's Inception takes. ADM .npz
files hold NHWC (arr_0, (N, H, W, 3)); `nhwc_to_nchw` is the one conversion. Float images in [-1, 1]
go through ard.data.digits.to_uint8 (the ADM evaluator's rounding) before they reach a metric, so a
metric never sees values a saved sample could not have.

Every extractor is an `nn.Module` usable as torchmetrics' `feature=`: `forward(images)` returns the
features (N, num_features) and it has the `num_features` attribute torchmetrics reads; `logits_head()`
returns a module for `InceptionScore(feature=...)`. `features_and_logits` gives both in one pass and
`identity` names network and weights (it keys the reference-statistics cache).

- DigitFeatures: the shipped digit classifier (ard/metrics/classifier.py), 64-d penultimate
  features, 10 logits; 1-channel 8x8 input (3-channel grey, as in ADM npz files, is accepted).
- InceptionFeatures: torch-fidelity's 'inception-v3-compat' (the PyTorch port of the ADM
  evaluator's TF Inception): pool_3 (2048-d) and 'logits_unbiased' (1008), any input size (it
  resizes to 299 itself). Needs the optional torch-fidelity (the `gpu` extra) and a local weights file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ard.metrics.classifier import DIGIT_CLASSIFIER, load_digit_classifier


def nhwc_to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """ADM layout (N, H, W, C) uint8 -> the metrics' layout (N, C, H, W) uint8 (contiguous)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def check_images(images: torch.Tensor, channels: tuple[int, ...], what: str = "images") -> None:
    """One-line error unless `images` is a uint8 (N, C, H, W) tensor with C in `channels`."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"{what}: expected a uint8 tensor (0..255; convert [-1, 1] floats with to_uint8), got {got}")
    if images.ndim != 4 or images.shape[1] not in channels:
        raise ValueError(f"{what}: expected NCHW (N, C, H, W) with C in {channels}, got shape {tuple(images.shape)}"
                         " (ADM npz arrays are NHWC: use nhwc_to_nchw)")


class FeatureExtractor(nn.Module):
    """Base of the extractors: uint8 NCHW images -> (features, logits). Subclasses set the attributes."""

    num_features: int  # feature dimension (torchmetrics reads it instead of probing with a 299x299 image)
    num_classes: int  # logits dimension
    identity: str  # network + weights (sha256 prefix): the reference cache's key
    channels: tuple[int, ...]  # accepted channel counts

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) -> features (N, num_features) float32, logits (N, num_classes) float32."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> features (N, num_features): torchmetrics' FID `feature=` interface."""
        return self.features_and_logits(images)[0]

    def logits_head(self) -> nn.Module:
        """A module mapping uint8 images to logits (N, num_classes), for InceptionScore(feature=...)."""
        return _Logits(self)


class _Logits(nn.Module):
    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.features_and_logits(images)[1]  # (N, num_classes)


class DigitFeatures(FeatureExtractor):
    """The shipped digit classifier as an extractor: 64-d penultimate features and 10 logits of 8x8 digits."""

    channels = (1, 3)

    def __init__(self, path: str | Path = DIGIT_CLASSIFIER):
        super().__init__()
        self.classifier, self.classifier_config = load_digit_classifier(path)  # model, config.json
        self.num_features = self.classifier.arch.num_features
        self.num_classes = self.classifier.arch.num_classes
        self.identity = f"digit_classifier-{self.classifier_config['sha256'][:16]}"

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images, self.channels)
        if images.shape[1] == 3:  # grey stored as RGB (ADM npz): all channels must agree
            if not (images == images[:, :1]).all():
                raise ValueError("the digit classifier takes greyscale images; got 3 channels that differ")
            images = images[:, :1]  # (N, 1, H, W)
        size = self.classifier.arch.image_size
        if images.shape[2:] != (size, size):
            raise ValueError(f"the digit classifier takes {size}x{size} images, got {tuple(images.shape[2:])}")
        return self.classifier.features_and_logits(images)  # (N, 64), (N, 10)


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's 'inception-v3-compat' (the ADM evaluator's Inception): pool_3 2048-d, 1008 logits.

    weights_path: a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (no
    download happens here). Grey (1-channel) images are repeated to RGB.
    """

    channels = (1, 3)
    num_features = 2048
    num_classes = 1008

    def __init__(self, weights_path: str | Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(f"InceptionFeatures needs torch-fidelity (pip install 'ard[gpu]'): {e}") from None
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {weights_path}")
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights_path))
        digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        self.identity = f"inception-v3-compat-{digest[:16]}"

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images, self.channels)
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # (N, 3, H, W)
        features, logits = self.net(rgb)  # (N, 2048), (N, 1008)
        return features, logits


class Precomputed(nn.Module):
    """Identity `feature=` module: hands features (or logits) computed once by `extract` to torchmetrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(features.shape)}")
        return features


@torch.no_grad()
def extract(images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 500,
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and logits (N, K) of uint8 NCHW `images`, on the extractor's device, returned on CPU."""
    check_images(images, extractor.channels)
    device = next(extractor.parameters()).device
    extractor.eval()
    feats, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=f"features ({extractor.identity})",
                      disable=not progress or len(images) < 20 * batch_size):
        f, lg = extractor.features_and_logits(images[start:start + batch_size].to(device))
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats), torch.cat(logits)  # (N, D), (N, K)
