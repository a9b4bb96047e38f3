"""Latent teachers (DiT on ImageNet-256): decode the student's latents to images with a diffusers VAE.

DiT's latents are `scale * z` with z the AutoencoderKL's latent (sd-vae-ft-ema / -mse, scale 0.18215);
decoding divides by the scale (DiT sample.py: `vae.decode(samples / 0.18215).sample`).
"""
from __future__ import annotations

from pathlib import Path

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
def decode_latents(vae, latents: torch.Tensor, scale: float = LATENT_SCALE, batch_size: int = 32) -> torch.Tensor:
    """Latents (n, C, h, w) -> images (n, 3, H, W) in [-1, 1] (fp32), decoded in batches."""
    dtype = next(vae.parameters()).dtype
    images = [vae.decode(chunk.to(dtype) / scale).sample.float().clamp(-1, 1)  # (b, 3, H, W)
              for chunk in latents.split(batch_size)]
    return torch.cat(images)  # (n, 3, H, W)
