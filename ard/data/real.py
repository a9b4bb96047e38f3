"""Real samples in the student's space for the GAN stage's discriminator (docs/method.md, "The GAN stage"), drawn
at random.

A source is named by one string:
    "digits:train" / "digits:val"  the real 8x8 digits in [-1, 1], the DigitsDataModule's fixed split (the
                                   digits teacher was trained on "train"; "val" is held out from both);
    DIR                            precomputed latents: DIR/latents.npy (N, C, H, W) float16/float32 in the
                                   student's space (VAE latents times 0.18215 for DiT) and DIR/labels.npy (N,)
                                   integers (classes, or a text store's prompt indices), memory-mapped
                                   (scripts/encode_real_latents.py writes them from an image folder, centre-cropped
                                   to 256 and VAE-encoded).
Draws are with replacement, from a generator the caller seeds (so they are reproducible on resume).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ard.data.digits import load_digits_split

LATENTS, LABELS = "latents.npy", "labels.npy"


class RealSamples:
    """Real samples (x, labels) of one source (see the module docstring)."""

    def __init__(self, source: str, field: str = "gan_real"):
        if source.startswith("digits:"):
            images, labels = load_digits_split(source.split(":", 1)[1])
            self.images, self.labels = images.numpy(), labels.numpy()
            return
        root = Path(source)
        for name in (LATENTS, LABELS):
            if not (root / name).exists():
                raise FileNotFoundError(f"{root / name}: not found ({field}={source!r} must be 'digits:train', "
                                        f"'digits:val' or a directory with {LATENTS} and {LABELS})")
        self.images = np.load(root / LATENTS, mmap_mode="r", allow_pickle=False)  # (N, C, H, W)
        self.labels = np.load(root / LABELS, mmap_mode="r", allow_pickle=False)  # (N,)
        if self.images.ndim != 4 or self.images.dtype not in (np.float16, np.float32):
            raise ValueError(f"{root / LATENTS}: expected a float16/float32 array (N, C, H, W), got "
                             f"{self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != (len(self.images),) or self.labels.dtype.kind not in "iu":
            raise ValueError(f"{root / LABELS}: expected {len(self.images)} integer labels, got "
                             f"{self.labels.dtype} {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])  # (C, H, W)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples with replacement: x (n, C, H, W) float32 and labels (n,) int64."""
        index = np.sort(torch.randint(0, len(self), (n,), generator=generator).numpy())  # (n,) sorted: mmap reads
        return (torch.from_numpy(np.asarray(self.images[index], dtype=np.float32)),
                torch.from_numpy(np.asarray(self.labels[index], dtype=np.int64)))
