"""Pictures: sample grids as uint8 arrays, PNG files (atomic), and W&B image logging."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from ard.atomic import write_atomic
from ard.data.digits import to_uint8


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, upscale: int | None = None) -> np.ndarray:
    """Images (N, C, H, W), floats in [-1, 1] or uint8 (as the metrics see them) -> one uint8 grid
    (rows * (H + pad), nrow * (W + pad), 3).

    Small images (8x8 digits) are upscaled by nearest neighbour so the grid is readable.
    """
    x = images.detach().cpu()
    x = x if x.dtype == torch.uint8 else to_uint8(x)  # (N, C, H, W) uint8
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    up = upscale or max(1, 32 // x.shape[-1])
    x = x.repeat_interleave(up, dim=2).repeat_interleave(up, dim=3)  # (N, 3, H*up, W*up)
    n = x.shape[0]
    rows = -(-n // nrow)
    x = torch.cat([x, torch.zeros(rows * nrow - n, *x.shape[1:], dtype=x.dtype)])  # (rows*nrow, 3, h, w)
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=255)  # (rows*nrow, 3, h+pad, w+pad)
    return rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=nrow).numpy()


def label_rows(grid: np.ndarray, labels: list[str]) -> np.ndarray:
    """A uint8 grid (H, W, 3) of len(labels) equal-height rows with each row's label in a white left margin."""
    from PIL import Image, ImageDraw

    height, width, _ = grid.shape
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 8 + int(max(probe.textlength(text) for text in labels))
    canvas = Image.new("RGB", (width + margin, height), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = height / len(labels)
    for i, text in enumerate(labels):
        draw.text((4, int((i + 0.5) * row_height) - 5), text, fill="black")
    return np.asarray(canvas)  # (H, margin + W, 3)


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as a PNG atomically (temporary file, then rename)."""
    from PIL import Image

    return write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))


def log_image(logger, key: str, grid: np.ndarray, step: int) -> None:
    """Log a grid to W&B when the logger is a WandbLogger; other loggers are left alone."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[grid], step=step)


def save_figure(fig, path: str | Path, xlabel: str, ylabel: str) -> Path:
    """Label a one-axes matplotlib figure (log y, legend, grid) and save it as a PNG atomically."""
    ax = fig.axes[0]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
