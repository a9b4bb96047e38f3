"""Latent teachers (DiT on ImageNet-256, PixArt, SD3): decode the student's latents to images with a diffusers VAE.

DiT's latents are `scale * z` with z the AutoencoderKL's latent (sd-vae-ft-ema / -mse, scale 0.18215);
decoding divides by the scale (DiT sample.py: `vae.decode(samples / 0.18215).sample`). SD3's 16-channel VAE also
shifts them: latents are `scale * (z - shift)` (scaling_factor 1.5305, shift_factor 0.0609 in its config.json), and
decoding is `vae.decode(latents / scale + shift)`, as diffusers' StableDiffusion3Pipeline does; shift 0 is DiT's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scale used by DiT


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from a local directory (config.json + weights), frozen, in eval mode."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").exists():
        if (path / "vae" / "config.json").exists():  # a full pipeline snapshot
            path = path / "vae"
        else:
            raise FileNotFoundError(f"VAE not found: {path} has no config.json (a diffusers AutoencoderKL directory)")
    return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float = LATENT_SCALE, batch_size: int = 32,
                   shift: float = 0.0) -> torch.Tensor:
    """Latents (n, C, h, w) = scale * (z - shift) -> images (n, 3, H, W) in [-1, 1] (fp32), decoded in batches."""
    dtype = next(vae.parameters()).dtype
    images = [vae.decode(chunk.to(dtype) / scale + shift).sample.float().clamp(-1, 1)  # (b, 3, H, W)
              for chunk in latents.split(batch_size)]
    return torch.cat(images)  # (n, 3, H, W)


def center_crop(image, size: int = 256) -> np.ndarray:
    """ADM's / DiT's `center_crop_arr`: a PIL image -> RGB uint8 (size, size, 3), the short side resized to
    `size` (box-halved while at least twice as large, then bicubic) and the centre cropped."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))  # (H', W', 3)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]  # (size, size, 3)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, scale: float = LATENT_SCALE, generator: torch.Generator | None = None,
                  shift: float = 0.0):
    """Images (n, 3, H, W) in [-1, 1] -> latents scale * (z - shift) (n, C, h, w), z drawn from the VAE's posterior
    (DiT's train.py: `vae.encode(x).latent_dist.sample().mul_(0.18215)`)."""
    dtype = next(vae.parameters()).dtype
    return (vae.encode(images.to(dtype)).latent_dist.sample(generator).float() - shift) * scale  # (n, C, h, w)
