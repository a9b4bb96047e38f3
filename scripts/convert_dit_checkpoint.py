"""Convert an official facebookresearch/DiT checkpoint to a diffusers DiTTransformer2DModel directory.

    python scripts/convert_dit_checkpoint.py DiT-XL-2-256x256.pt --size DiT-XL/2 --out teachers/dit_xl2_256

The checkpoint is read by `ard.teacher.load_teacher` (torch.load(weights_only=True); a training
checkpoint's "ema" weights are used), mapped by `ard.convert`, checked against the chosen size, and
written as config.json + safetensors; the config records the official DiT numerics
(`ard.teacher.set_numerics`), which `load_teacher` restores. The directory appears atomically
(`ard.atomic`); an existing non-empty one is replaced only with --force. Errors: one line naming the
file or key, exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ard.atomic import atomic_directory
from ard.teacher import DIT_SIZES, NUMERICS_KEY, load_teacher


def convert(checkpoint: Path, size: str, out: Path, force: bool) -> str:
    """Write `out`; returns the numerics recorded in its config."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: exists and is not empty (pass --force to replace it)")
    model = load_teacher(checkpoint, size)  # converts, checks every key and shape, sets "dit" numerics
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return model.config.get(NUMERICS_KEY, "diffusers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="official DiT checkpoint (.pt), e.g. DiT-XL-2-256x256.pt")
    parser.add_argument("--size", required=True, choices=list(DIT_SIZES), help="the checkpoint's DiT size")
    parser.add_argument("--out", required=True, type=Path, help="diffusers model directory to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    args = parser.parse_args(argv)
    try:
        numerics = convert(args.checkpoint, args.size, args.out, args.force)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out} ({args.size}, {numerics} numerics)")


if __name__ == "__main__":
    main()
