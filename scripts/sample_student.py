"""Generate S-step samples from a trained ARD student (its EMA weights), or export it as a standalone directory.

Sample (a PNG grid of the first samples, and with --npz all samples as uint8 images in the ADM
evaluator's layout, arr_0 (N, H, W, 3), with the labels as arr_1):

    # from the standalone EMA student written when `ard fit` ends (needs neither teacher nor store)
    python scripts/sample_student.py sample --student runs/digits/ard/student_ema \
        --labels 0 1 2 3 4 5 6 7 8 9 --per-label 8 --out samples/digits_ard
    # from a Lightning checkpoint (its state_dict holds the EMA weights; needs the teacher path it was
    # trained with), 50k ImageNet samples with random labels, decoded by the VAE, for the ADM evaluator
    python scripts/sample_student.py sample --checkpoint runs/imagenet256/ard/checkpoints/last.ckpt \
        --num-samples 50000 --vae pretrained/sd-vae-ft-ema --npz --out samples/imagenet256_ard

A text-to-image student (a PixArt or SD3 teacher's) samples the prompts of its text store: --labels are then prompt
indices of --store (each prompt's stored encoding, SD3's with its pooled embedding; CFG is not used by students;
SD3's latents: --vae <snapshot>/vae --latent-scale 1.5305 --latent-shift 0.0609):

    python scripts/sample_student.py sample --student runs/digits_t2i/ard/student_ema \
        --store runs/digits_t2i/trajectories --labels 0 4 8 12 16 20 24 28 32 36 --per-label 8 --out samples/t2i

Export a checkpoint's EMA student as a standalone directory:

    python scripts/sample_student.py export --checkpoint runs/digits/ard/checkpoints/last.ckpt \
        --out runs/digits/ard/student_ema

Noise and label of sample i are a function of (--seed, i) alone (ard.diffusion.trajectory_inputs, the
teacher's trajectory store uses the same), so results do not depend on the batch size, a run can be
split over machines with --start-index, and the student's sample i starts from the same noise as the
teacher's trajectory i of a store written with the same seed.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from ard.checks import check_finite_samples, check_writable
from ard.data.digits import to_uint8
from ard.diffusion import trajectory_inputs
from ard.latents import LATENT_SCALE, decode_latents, load_vae
from ard.metrics import save_npz_images
from ard.backbones import TEXT
from ard.backbones.dit import num_classes
from ard.student import ARDStudent, sample
from ard.student.export import export_student, exported_noise_correction, load_checkpoint_student, load_exported
from ard.viz import image_grid, save_png


def load_student(args) -> tuple[ARDStudent, list[int], bool]:
    """The student, its boundary timesteps and whether it was trained with noise correction (then always sampled
    with it), from --checkpoint (its EMA weights) or --student."""
    if args.checkpoint:
        loaded = load_checkpoint_student(args.checkpoint)
        return loaded.student, loaded.timesteps, loaded.noise_correction
    return (*load_exported(args.student), exported_noise_correction(args.student))


def run_sample(args) -> None:
    check_writable(args.out, "--out")
    student, timesteps, trained_corrected = load_student(args)
    device = torch.device(args.device)
    student = student.to(device)
    config = student.transformer.config
    shape = (config.in_channels, config.sample_size, config.sample_size)  # (C, H, W)
    condition, n_classes = store_conditions(student, args.store)
    if args.labels is not None:
        labels = [label for label in args.labels for _ in range(args.per_label)]
        bad = [label for label in labels if not 0 <= label < n_classes]
        if bad:
            raise ValueError(f"--labels: class {bad[0]} out of range [0, {n_classes})")
    else:
        labels = None
    num = len(labels) if labels is not None else args.num_samples
    if shape[0] not in (1, 3) and args.vae is None:
        raise ValueError(f"the student makes {shape[0]}-channel latents: pass --vae (a diffusers AutoencoderKL dir)")
    vae = load_vae(args.vae).to(device) if args.vae else None
    timesteps = torch.tensor(timesteps, device=device)  # (S+1,)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    out, all_labels = [], []
    indices = list(range(args.start_index, args.start_index + num))
    for start in tqdm(range(0, num, args.batch_size), desc=f"{student.num_steps}-step student"):
        idx = indices[start:start + args.batch_size]
        noise, y = trajectory_inputs(args.seed, idx, shape, n_classes,
                                     labels=labels[start:start + len(idx)] if labels is not None else None)
        with torch.no_grad(), autocast:
            x = sample(student, noise.to(device), condition(y.to(device)), timesteps,
                       args.noise_correction or trained_corrected)[:, -1].float()  # (b, C, H, W)
            check_finite_samples(x, f"student samples {idx[0]}..{idx[-1]} (nothing written)")
            images = (decode_latents(vae, x, args.latent_scale, shift=args.latent_shift) if vae is not None
                      else x)  # (b, 3|1, H', W')
        out.append(to_uint8(images.cpu()))
        all_labels.append(y)
    images = torch.cat(out)  # (N, C, H, W) uint8
    out_dir = Path(args.out)
    nrow = args.per_label if labels is not None else args.nrow
    png = save_png(image_grid(images[: args.grid], nrow=nrow), out_dir / "grid.png")
    print(f"wrote {png}")
    if args.npz:
        path = out_dir / f"samples_{len(images)}x{images.shape[2]}x{images.shape[3]}x3.npz"
        print(f"wrote {save_npz_images(path, images, torch.cat(all_labels))}")  # ADM layout arr_0 (N, H, W, 3)


def store_conditions(student: ARDStudent, store: str | None):
    """How labels condition the student, and how many there are: class labels as they are, or (a text family's
    student) prompt indices of the text store `store`, read as their stored encodings."""
    if student.backbone.family not in TEXT:
        if store is not None:
            raise ValueError(f"--store {store}: a class-conditional student samples class labels; drop --store")
        return (lambda labels: labels), num_classes(student.transformer)
    if store is None:
        raise ValueError(f"a {student.backbone.family!r} student is conditioned on text: pass --store, the text "
                         "store whose prompts --labels index")
    from ard.store.format import read_manifest
    from ard.store.text import store_conditioner

    manifest = read_manifest(store)
    condition = store_conditioner(store, manifest)
    if condition is None:
        raise ValueError(f"--store {store}: not a text store (its manifest has no text conditioning)")
    return condition, manifest["num_classes"]  # (a text store's labels: its prompts)


def run_export(args) -> None:
    check_writable(Path(args.out).parent, "--out (its parent)")
    loaded = load_checkpoint_student(args.checkpoint)
    print(f"wrote {export_student(loaded.student, loaded.timesteps, args.out, loaded.recipe, loaded.noise_correction)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="generate samples: a PNG grid and optionally an ADM .npz")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", help="standalone student directory (student_ema/ or an export)")
    src.add_argument("--checkpoint", help="Lightning checkpoint of `ard fit` (uses its EMA weights)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--labels", type=int, nargs="+", help="class labels, one grid row each")
    who.add_argument("--num-samples", type=int, help="number of samples with labels drawn from (seed, index)")
    p.add_argument("--per-label", type=int, default=8, help="samples per label given by --labels")
    p.add_argument("--store", help="text students: the text store whose prompts the labels index")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i's noise depends on (seed, i) only")
    p.add_argument("--start-index", type=int, default=0, help="index of the first sample (to split a run)")
    p.add_argument("--out", required=True, help="output directory (grid.png, samples_*.npz)")
    p.add_argument("--npz", action="store_true", help="also write all samples as uint8 arr_0 (N, H, W, 3)")
    p.add_argument("--grid", type=int, default=100, help="samples shown in grid.png")
    p.add_argument("--nrow", type=int, default=10, help="grid columns with --num-samples")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory (latent students)")
    p.add_argument("--latent-scale", type=float, default=LATENT_SCALE,
                   help="latents = scale * (VAE latents - shift) (SD3's VAE: 1.5305)")
    p.add_argument("--latent-shift", type=float, default=0.0, help="(SD3's VAE: 0.0609)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--noise-correction", action="store_true",
                   help="Imagine Flash's first-step noise correction (eps / x0 students; ARDStudent.step)")
    p.set_defaults(run=run_sample)
    e = sub.add_parser("export", help="write a checkpoint's EMA student as a standalone directory")
    e.add_argument("--checkpoint", required=True, help="Lightning checkpoint of `ard fit`")
    e.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    e.set_defaults(run=run_export)
    args = parser.parse_args(argv)
    for name in ("per_label", "num_samples", "batch_size", "grid"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample_student: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
