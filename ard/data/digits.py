"""scikit-learn's bundled digits (8x8, 10 classes) as images in [-1, 1]: the embedded default's data."""
from __future__ import annotations

from typing import Annotated

import lightning as L
import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, TensorDataset

from ard.checks import AtLeastOne, NonNegativeInt, check_knobs


def load_digits_split(split: str = "train", val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, 8, 8) fp32 with pixel value v in 0..16 mapped to v / 8 - 1, and labels (n,) int64.

    The split is fixed by `seed`: a seeded permutation of the 1797 images, the last `val_fraction`
    of it being the validation set. split: "train", "val" or "all".
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(data.target.astype(np.int64))  # (1797,)
    if split == "all":
        return images, labels
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_val = int(round(val_fraction * len(labels)))
    idx = order[: len(labels) - n_val] if split == "train" else order[len(labels) - n_val:]
    return images[idx], labels[idx]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255, the ADM evaluator's conversion: round((x + 1) * 127.5), clipped."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class DigitsDataModule(L.LightningDataModule):
    """Real 8x8 digits with a fixed, seeded train/val split; batches are (images, labels)."""

    def __init__(self, batch_size: AtLeastOne = 128, val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
                 split_seed: NonNegativeInt = 0, num_workers: NonNegativeInt = 0):
        """
        Args:
            batch_size: images per batch (per process under DDP).
            val_fraction: share of the 1797 images held out for validation.
            split_seed: seed of the fixed train/val permutation.
            num_workers: DataLoader workers (0: load in the main process; the data is 450 KB).
        """
        check_knobs(DigitsDataModule.__init__, {k: v for k, v in locals().items() if k != "self"}, "data.")
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = TensorDataset(*load_digits_split("train", hp.val_fraction, hp.split_seed))
        self.val_set = TensorDataset(*load_digits_split("val", hp.val_fraction, hp.split_seed))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
