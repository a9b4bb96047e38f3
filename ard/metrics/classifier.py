"""The digits metrics' feature network: a small CNN trained by us on the fixed train split of the 8x8 digits.

It plays the part Inception-v3 plays for ImageNet: FID / precision / recall use its penultimate
features, the Inception Score its logits. It sees images exactly as the metrics do: uint8 0..255,
NCHW (N, 1, 8, 8), converted to floats by `uint8_to_float` (x / 127.5 - 1, the inverse of
ard.data.digits.to_uint8); it is trained on `to_uint8` of the training images, so it has seen the
same quantisation as every sample it will score.

The shipped weights (ard/assets/digit_classifier: model.safetensors + config.json holding the
architecture, the training config, the measured held-out accuracy and the weights' sha256) are
reproduced by `python scripts/train_classifier.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ard.atomic import atomic_directory
from ard.data.digits import load_digits_split, to_uint8

DIGIT_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] as x / 127.5 - 1 (the one conversion every digits metric uses)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    return images.float() / 127.5 - 1


@dataclass(frozen=True)
class ClassifierArch:
    """Architecture of the digit classifier (stored in config.json under "architecture")."""

    in_channels: int = 1  # greyscale digits
    image_size: int = 8  # 8x8 pixels; two 2x2 poolings leave (image_size / 4)^2 positions
    width: int = 32  # channels of the first conv stage; the second has 2 * width
    num_features: int = 64  # penultimate (feature) dimension used by FID / precision / recall
    num_classes: int = 10  # digits 0..9


class DigitClassifier(nn.Module):
    """conv-conv-pool, conv-conv-pool, linear (features, ReLU), linear (logits). Takes uint8 NCHW images."""

    def __init__(self, arch: ClassifierArch = ClassifierArch()):
        super().__init__()
        if arch.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {arch.image_size}")
        self.arch = arch
        w = arch.width
        self.conv = nn.Sequential(
            nn.Conv2d(arch.in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = arch.image_size // 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * side * side, arch.num_features), nn.ReLU())
        self.head = nn.Linear(arch.num_features, arch.num_classes)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) -> penultimate features (N, num_features) and logits (N, num_classes)."""
        h = self.conv(uint8_to_float(images))  # (N, 2w, H/4, W/4)
        feats = self.features(h)  # (N, num_features)
        return feats, self.head(feats)  # (N, num_features), (N, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> logits (N, num_classes)."""
        return self.features_and_logits(images)[1]


@dataclass(frozen=True)
class ClassifierTraining:
    """How the shipped classifier was trained (stored in config.json under "training")."""

    seed: int = 0  # torch seed: initialisation, batch order and augmentation
    epochs: int = 40  # passes over the training split
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # AdamW peak learning rate, cosine-decayed to 0 over all steps
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_shift: int = 1  # augmentation: random translation by up to this many pixels (background fill)
    val_fraction: float = 0.2  # load_digits_split's held-out share (the fixed split)
    split_seed: int = 0  # load_digits_split's permutation seed


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image by (dy, dx) in [-max_shift, max_shift]^2, filling with 0 (background)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (N, C, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)  # (N, C, H, W+2s)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    return cropped.gather(3, cols)  # (N, C, H, W)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy on uint8 (N, C, H, W) images."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def train_digit_classifier(training: ClassifierTraining = ClassifierTraining(),
                           arch: ClassifierArch = ClassifierArch()) -> tuple[DigitClassifier, float]:
    """Train on to_uint8 of the train split; return (model in eval mode, accuracy on the val split).

    Deterministic for a given seed, torch build and thread count (single-threaded CPU is the reference).
    """
    torch.manual_seed(training.seed)
    generator = torch.Generator().manual_seed(training.seed)
    train_x, train_y = load_digits_split("train", training.val_fraction, training.split_seed)
    val_x, val_y = load_digits_split("val", training.val_fraction, training.split_seed)
    train_x, val_x = to_uint8(train_x), to_uint8(val_x)  # (n, 1, 8, 8) uint8: what the metrics see
    model = DigitClassifier(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    steps_per_epoch = len(train_y) // training.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=training.epochs * steps_per_epoch)
    bar = tqdm(range(training.epochs), desc="digit classifier", unit="epoch")
    for _ in bar:
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * training.batch_size:(i + 1) * training.batch_size]
            x = _random_shift(train_x[idx], training.max_shift, generator)  # (B, 1, 8, 8) uint8
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval(), accuracy(model, val_x, val_y)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_digit_classifier(model: DigitClassifier, directory: str | Path, training: ClassifierTraining,
                          val_accuracy: float) -> Path:
    """Write model.safetensors + config.json into `directory`, atomically (a temp dir renamed into place)."""
    a = model.arch
    with atomic_directory(directory) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))
        config = dict(
            format_version=FORMAT_VERSION,
            input=f"uint8 NCHW (N, {a.in_channels}, {a.image_size}, {a.image_size}), 0..255, as x / 127.5 - 1",
            architecture=dataclasses.asdict(a),
            training=dataclasses.asdict(training),
            val_accuracy=val_accuracy,
            sha256=_sha256(tmp / WEIGHTS_NAME),
        )
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
    return Path(directory)


def load_digit_classifier(path: str | Path = DIGIT_CLASSIFIER) -> tuple[DigitClassifier, dict]:
    """Load a directory written by save_digit_classifier -> (model in eval mode, its config dict).

    Raises FileNotFoundError / ValueError naming the file when a file is missing, the weights' sha256
    differs from the config's, or the weights do not fit the recorded architecture.
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"digit classifier file missing: {f} (python scripts/train_classifier.py writes it)")
    try:
        config = json.loads(config_path.read_text())
        arch = ClassifierArch(**config["architecture"])
        expected_sha = config["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a digit classifier config ({type(e).__name__}: {e})") from None
    if _sha256(weights_path) != expected_sha:
        raise ValueError(f"{weights_path}: sha256 differs from the one recorded in {config_path} (mismatched files)")
    model = DigitClassifier(arch)
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"{weights_path}: weights do not fit the architecture in {config_path}: {first}") from None
    return model.eval().requires_grad_(False), config
