"""Encode an image folder into the real latents of the GAN stage (ard.data.real: latents.npy + labels.npy).

    python scripts/encode_real_latents.py --images imagenet/train --vae pretrained/sd-vae-ft-ema \
        --out runs/imagenet256/real_latents/train [--size 256] [--batch-size 64] [--device cuda]

The folder holds one subfolder per class (ImageNet's layout: the sorted subfolder names are classes 0..K-1) with
.jpg / .jpeg / .png images. Each image is centre-cropped to --size as ADM / DiT do, scaled to [-1, 1] and encoded
by the VAE (a posterior sample, seeded by --seed and the batch, as DiT's training draws one) times 0.18215 (SD3's VAE:
minus --shift 0.0609, times --scale 1.5305).
Writes <out>/latents.npy (N, C, h, w) float16 and <out>/labels.npy (N,) int64 into a directory that appears whole.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ard.atomic import atomic_directory
from ard.data.real import LABELS, LATENTS
from ard.latents import LATENT_SCALE, center_crop, encode_images, load_vae

EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(root: Path) -> tuple[list[Path], list[int]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, label) for label, d in enumerate(classes) for f in sorted(d.iterdir())
             if f.suffix.lower() in EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"{root}: no class subfolders with {'/'.join(EXTENSIONS)} images")
    return [f for f, _ in files], [label for _, label in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="image folder with one subfolder per class")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory (sd-vae-ft-ema)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--scale", type=float, default=LATENT_SCALE)
    parser.add_argument("--shift", type=float, default=0.0, help="latents = scale * (VAE latents - shift)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from PIL import Image

    files, labels = list_images(Path(args.images))
    vae = load_vae(args.vae).to(args.device)
    with atomic_directory(args.out) as tmp:
        latents = None
        for start in tqdm(range(0, len(files), args.batch_size), desc="encode", unit="batch"):
            chunk = np.stack([center_crop(Image.open(f), args.size) for f in files[start: start + args.batch_size]])
            images = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(args.device)  # (b, 3, H, W) uint8
            images = images.float() / 127.5 - 1  # (b, 3, H, W) in [-1, 1]
            g = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + start)
            z = encode_images(vae, images, args.scale, g, args.shift).cpu().numpy()  # (b, C, h, w)
            if latents is None:  # memory-mapped: ImageNet's 1.28M latents do not need to fit in memory
                latents = np.lib.format.open_memmap(tmp / LATENTS, mode="w+", dtype=np.float16,
                                                    shape=(len(files), *z.shape[1:]))
            latents[start: start + len(z)] = z
        latents.flush()
        del latents
        np.save(tmp / LABELS, np.asarray(labels, dtype=np.int64))
    print(f"wrote {len(files)} latents of {len(set(labels))} classes to {args.out}")


if __name__ == "__main__":
    main()
