"""Convert an official facebookresearch/DiT checkpoint to a diffusers DiTTransformer2DModel directory, or back.

    python scripts/convert_dit_checkpoint.py DiT-XL-2-256x256.pt --size DiT-XL/2 --out teachers/dit_xl2_256
    python scripts/convert_dit_checkpoint.py teachers/dit_xl2_256 --to-official --out DiT-XL-2-256x256.pt

The checkpoint is read by `ard.teacher.load_teacher` (torch.load(weights_only=True); a training
checkpoint's "ema" weights are used), mapped by `ard.backbones.dit_official`, checked against the chosen size, and
written as config.json + safetensors (every block's embedder keys, equal values); the config records the
official DiT numerics (`ard.backbones.dit.set_numerics`), which `load_teacher` restores. The directory appears
atomically (`ard.atomic`); an existing non-empty one is replaced only with --force.

--to-official: a diffusers DiT directory (a teacher, or an exported student without history attention and
with the shared head, which is a plain DiT) -> an official state dict (.pt: one t_embedder / y_embedder, qkv,
pos_embed; `ard.backbones.dit_official.to_official_state_dict`), refused when its blocks' embedders differ. The official code
computes with the "dit" numerics: weights recorded with other numerics are written with a note on stderr.
Errors: one line naming the file or key, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ard.atomic import atomic_directory, write_atomic
from ard.backbones.dit import DIT_SIZES, NUMERICS_KEY, numerics_of
from ard.backbones.dit_official import to_official_state_dict
from ard.teacher import load_teacher

STUDENT_CONFIG = "ard_student.json"  # beside an exported student's transformer (ard.student.model)


def convert(checkpoint: Path, size: str, out: Path, force: bool) -> str:
    """Write `out`; returns the numerics recorded in its config."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out}: exists and is not empty (pass --force to replace it)")
    model = load_teacher(checkpoint, size)  # converts, checks every key and shape, sets "dit" numerics, ties
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return model.config.get(NUMERICS_KEY, "diffusers")


def to_official(directory: Path, size: str | None, out: Path, force: bool) -> str:
    """Write the official state dict of the diffusers DiT at `directory` to `out`; returns its numerics."""
    if out.exists() and not force:
        raise ValueError(f"{out}: exists (pass --force to replace it)")
    if not directory.is_dir():
        raise ValueError(f"{directory}: --to-official reads a diffusers model directory")
    student = directory / STUDENT_CONFIG
    if student.is_file():
        settings = json.loads(student.read_text())
        if settings.get("history_blocks") != 0 or settings.get("heads") != "shared":
            raise ValueError(f"{student}: history_blocks {settings.get('history_blocks')!r}, heads "
                             f"{settings.get('heads')!r}: only a student without history attention and with the "
                             "shared head is an official DiT")
    model = load_teacher(directory, size)
    state = to_official_state_dict(model.state_dict(), model.config.num_layers, model.config.sample_size)
    write_atomic(out, lambda f: torch.save(state, f))
    return numerics_of(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="official DiT checkpoint (.pt), e.g. DiT-XL-2-256x256.pt; "
                        "with --to-official a diffusers DiT directory")
    parser.add_argument("--size", choices=list(DIT_SIZES), help="the checkpoint's DiT size (required for a .pt)")
    parser.add_argument("--out", required=True, type=Path, help="diffusers model directory to write (with "
                        "--to-official: the .pt file)")
    parser.add_argument("--to-official", action="store_true", help="convert a diffusers directory to the "
                        "official layout instead")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if not args.to_official and args.size is None:
        parser.error("--size is required to convert an official checkpoint")
    try:
        if args.to_official:
            numerics = to_official(args.checkpoint, args.size, args.out, args.force)
        else:
            numerics = convert(args.checkpoint, args.size, args.out, args.force)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.to_official and numerics != "dit":
        print(f"note: {args.checkpoint} computes with {numerics!r} numerics; the official DiT code uses its own "
              "('dit'), so it will not compute exactly the same", file=sys.stderr)
    print(f"wrote {args.out} ({'official layout' if args.to_official else args.size}, {numerics} numerics)")


if __name__ == "__main__":
    main()
