"""Evaluate the teacher, the undistilled teacher at S steps and distilled students on the same noises
and labels; write `report.json`, `report.md` and a side-by-side sample picture.

    ard-eval --config configs/digits/eval.yaml [--students '{"ard": "runs/digits/ard/student_ema"}'] [--out DIR]
    ard-eval --config configs/imagenet256/eval.yaml --students '{"ard": "..."}'   # DiT-XL/2, ADM protocol

The evaluation set is `num_samples` noises and labels drawn from (seed, i) (ard.diffusion.trajectory_inputs,
the same draw the trajectory store uses) and the teacher's K-step guided samples from them, cached in
`<cache_dir>/eval_set-<key>.npz` keyed by the teacher's weights and every sampling setting. Every model
starts from exactly these noises, so besides FID against real data (the paper's measure) the report has
the distillation-fidelity measures: FID against the teacher's own samples (same extractor) and the
same-noise mean squared distance to the teacher's final sample (per pixel, in [-1, 1] units).

Images enter the metrics as uint8 exactly like the ADM evaluator (round((x + 1) * 127.5), clipped).
FIDs carry a bootstrap standard deviation (resampling the generated set) and the report states the noise
floor of each reference (FID between two random halves of it). Latent models (DiT on ImageNet) are decoded
by the VAE before the metrics; their same-noise MSE is measured on the latents the model outputs.
`export_npz` also writes every row's samples as an ADM batch (`<out>/npz/<row>.npz`, arr_0 uint8 NHWC,
arr_1 labels) for the official TF evaluator.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ard.atomic import write_npz_atomic, write_text_atomic
from ard.checks import check_at_least, check_finite_samples, check_step_counts, check_writable
from ard.data.digits import to_uint8
from ard.diffusion import TimestepSpacing, ddim_sample, trajectory_inputs
from ard.latents import LATENT_SCALE, decode_latents, load_vae
from ard.metrics import (DigitFeatures, FeatureExtractor, InceptionFeatures, Reference, compute_metrics,
                         digits_images, fid_noise_floor, reference_from_adm_npz, reference_from_images,
                         save_npz_images)
from ard.student import sample
from ard.teacher import DIGITS_TEACHER, load_teacher, num_classes
from ard.viz import image_grid, label_rows, save_png

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise (B,C,H,W), labels (B,)) -> (B,C,H,W)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # model outputs (B,C,h,w) -> uint8 images (B,1|3,H,W) on CPU
REPORT_KEYS = ("model", "steps", "nfe", "fid", "fid_sd", "fid_vs_teacher", "fid_vs_teacher_sd", "mse_vs_teacher",
               "mse_vs_teacher_se", "is", "precision", "recall", "num_samples", "sec_per_image", "gflops_per_image")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*")) if path.is_dir() else [path]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_batched(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, batch_size: int,
                device: torch.device = torch.device("cpu"), bf16: bool = False) -> tuple[torch.Tensor, float]:
    """Final samples (N, C, H, W) fp32 on CPU of `sampler` run on `device` over batches, and wall seconds
    per image (sampling only; the device is synchronised before the clock stops)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    out = []
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for n, y in zip(noise.split(batch_size), labels.split(batch_size)):
            out.append(sampler(n.to(device), y.to(device)).float())  # (b, C, H, W)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return torch.cat(out).cpu(), seconds / len(noise)


def gflops_per_image(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor) -> float:
    """GFLOPs of generating one image, counted by torch's FlopCounterMode (2 FLOPs per multiply-add).

    Attention runs on SDPA's math backend while counting: the fused CPU kernel has no FLOP formula and
    would count as 0, hiding exactly the history attention's cost."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        sampler(noise[:1], labels[:1])  # on the device the sampler's model lives on
    return counter.get_total_flops() / 1e9


def teacher_sampler(teacher, steps: int, guidance_scale: float, spacing: TimestepSpacing, clip_sample: bool) -> Sampler:
    return lambda n, y: ddim_sample(teacher, n, y, steps, guidance_scale, spacing, save_indices=[steps],
                                    clip_sample=clip_sample).states[:, -1]


def student_sampler(directory: str, device: torch.device = torch.device("cpu")) -> tuple[Sampler, int]:
    from ard.modules.distill import load_exported

    student, boundaries = load_exported(directory)
    student = student.to(device)
    timesteps = torch.tensor(boundaries, device=device)  # (S+1,)
    return (lambda n, y: sample(student, n, y, timesteps)[:, -1]), student.num_steps


def make_extractor(name: str) -> FeatureExtractor:
    """"digits": the shipped digit classifier; anything else: the path of torch-fidelity's FID Inception weights."""
    return DigitFeatures() if name == "digits" else InceptionFeatures(name)


def make_decoder(vae: str | None, latent_scale: float, batch_size: int, device: torch.device) -> Decoder:
    """Model outputs -> uint8 images as the metrics take them (ADM rounding); latents go through the VAE."""
    if vae is None:
        return to_uint8
    autoencoder = load_vae(vae).to(device)
    return lambda x: to_uint8(decode_latents(autoencoder, x.to(device), latent_scale, batch_size).cpu())


def eval_set(teacher_path: str, teacher, num_samples: int, seed: int, steps: int, guidance_scale: float,
             spacing: TimestepSpacing, clip_sample: bool, batch_size: int, cache_dir: Path, device: torch.device,
             bf16: bool) -> dict[str, torch.Tensor]:
    """Noises, labels and the teacher's K-step samples of the evaluation set (cached on disk)."""
    config = teacher.config
    key = hashlib.sha256(json.dumps([_sha256(Path(teacher_path)), num_samples, seed, steps, guidance_scale, spacing,
                                     clip_sample] + (["bf16"] if bf16 else [])).encode()).hexdigest()[:16]
    path = cache_dir / f"eval_set-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in ("noise", "labels", "teacher")}
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable evaluation cache, truncated or corrupt ({e}); delete it to "
                             "recompute") from None
    noise, labels = trajectory_inputs(seed, range(num_samples), (config.in_channels, config.sample_size,
                                                                  config.sample_size), num_classes(teacher))
    final, _ = run_batched(teacher_sampler(teacher, steps, guidance_scale, spacing, clip_sample), noise, labels,
                           batch_size, device, bf16)
    check_finite_samples(final, f"teacher {teacher_path} ({steps} steps), evaluation set (not cached)")
    write_npz_atomic(path, noise=noise.numpy(), labels=labels.numpy(), teacher=final.numpy())
    return {"noise": noise, "labels": labels, "teacher": final}


def metric_row(name: str, steps: int, nfe: int, final: torch.Tensor, images: torch.Tensor,
               teacher_final: torch.Tensor, sec_per_image: float, gflops: float, real: Reference,
               teacher_ref: Reference, extractor, bootstrap: int) -> dict:
    """One report row: `final` the model's outputs (N, C, h, w), `images` them as uint8 (N, 1|3, H, W)."""
    vs_real = compute_metrics(images, real, extractor, bootstrap=bootstrap)
    vs_teacher = compute_metrics(images, teacher_ref, extractor, bootstrap=bootstrap)
    sq = (final.float() - teacher_final.float()).pow(2).mean(dim=(1, 2, 3))  # (N,) same-noise distance
    return {"model": name, "steps": steps, "nfe": nfe, "fid": vs_real["fid"], "fid_sd": vs_real["fid_sd"],
            "fid_vs_teacher": vs_teacher["fid"], "fid_vs_teacher_sd": vs_teacher["fid_sd"],
            "mse_vs_teacher": float(sq.mean()), "mse_vs_teacher_se": float(sq.std() / len(sq) ** 0.5),
            "is": vs_real["is"], "precision": vs_real["precision"], "recall": vs_real["recall"],
            "num_samples": len(final), "sec_per_image": sec_per_image, "gflops_per_image": gflops}


def markdown_table(rows: list[dict], floors: dict[str, float]) -> str:
    def pm(row, key):
        return f"{row[key]:.2f} ± {row[key + '_sd']:.2f}"

    lines = ["| model | steps | NFE | FID vs real | FID vs teacher | same-noise MSE | IS | precision | recall | "
             "s / image | GFLOPs / image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | {pm(r, 'fid')} | {pm(r, 'fid_vs_teacher')} | "
                     f"{r['mse_vs_teacher']:.4f} ± {r['mse_vs_teacher_se']:.4f} | {r['is']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['sec_per_image']:.2e} | "
                     f"{r['gflops_per_image']:.4f} |")
    lines.append("")
    lines.append(f"{rows[0]['num_samples']} samples per model, the same noises and labels for every row; "
                 "± is the bootstrap sd of FID and the standard error of the MSE. Noise floors (FID between two "
                 f"random halves): real reference {floors['real']:.2f}, teacher samples {floors['teacher']:.2f}. "
                 "samples.png: one row per model in the table's order, one noise and label per column.")
    return "\n".join(lines) + "\n"


def evaluate(
    students: dict[str, str] | None = None,
    teacher: str = str(DIGITS_TEACHER),
    teacher_size: str | None = None,
    teacher_steps: int = 24,
    guidance_scale: float = 2.0,
    spacing: TimestepSpacing = "leading",
    clip_sample: bool = True,
    undistilled_steps: list[int] | None = None,
    num_samples: int = 1000,
    seed: int = 10_000,
    reference: str = "digits",
    extractor: str = "digits",
    vae: str | None = None,
    latent_scale: float = LATENT_SCALE,
    bootstrap: int = 10,
    batch_size: int = 500,
    device: str | None = None,
    bf16: bool = False,
    export_npz: bool = False,
    out: str = "runs/eval",
    cache_dir: str = "runs/cache",
    grid_samples: int = 10,
    wandb: bool = True,
) -> list[dict]:
    """Evaluate the teacher and students on one shared evaluation set; write report.json and report.md.

    Args:
        students: row name -> standalone student directory (written when `ard fit` ends: <run>/student_ema).
        teacher: the teacher (diffusers directory or official DiT .pt); its K-step samples are the target.
        teacher_size: DIT_SIZES key, needed for an official .pt teacher (ard.teacher.load_teacher).
        teacher_steps: K, the teacher's DDIM steps (as in the trajectory store).
        guidance_scale: CFG scale of the teacher (as in the trajectory store).
        spacing: DDIM timestep spacing (as in the trajectory store).
        clip_sample: clip the teacher's x0-predictions to [-1, 1] (pixel space; false for latents).
        undistilled_steps: also evaluate the teacher itself at these few DDIM steps (same guidance).
        num_samples: size of the evaluation set (papers: 50,000).
        seed: seed of its noises and labels (different from the training store's seed: held out).
        reference: "digits" (all 1797 real digits) or the path of an ADM reference batch .npz
            (e.g. VIRTUAL_imagenet256_labeled.npz; its mu/sigma give FID, its images precision/recall).
        extractor: "digits" (the shipped digit classifier) or the path of torch-fidelity's FID Inception
            weights (weights-inception-2015-12-05-6726825d.pth; needs the `gpu` extra).
        vae: diffusers AutoencoderKL directory that decodes latent samples to images (latent teachers).
        latent_scale: the teacher's latents are latent_scale times the VAE's.
        bootstrap: resamples for the FID standard deviations.
        batch_size: images per sampling batch.
        device: where sampling and features run (default: cuda when available, else cpu).
        bf16: bf16 autocast while sampling (GPU).
        export_npz: also write each row's samples as an ADM batch, <out>/npz/<row>.npz.
        out: output directory (report.json, report.md, samples.png).
        cache_dir: where the evaluation set and reference statistics are cached.
        grid_samples: columns of samples.png (one row per model, same noises and labels).
        wandb: log the table and the picture to W&B (offline).
    """
    out_dir, cache = Path(out), Path(cache_dir)
    check_at_least(1, num_samples=num_samples, batch_size=batch_size, bootstrap=bootstrap, grid_samples=grid_samples)
    check_step_counts("teacher_steps", [teacher_steps])
    check_step_counts("undistilled_steps", undistilled_steps)
    check_writable(out_dir, "out")
    check_writable(cache, "cache_dir")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = make_extractor(extractor).to(dev)
    if reference == "digits" and not isinstance(features, DigitFeatures):
        raise ValueError("reference 'digits' needs extractor 'digits'; pass an ADM reference .npz for Inception")
    teacher_model = load_teacher(teacher, teacher_size).to(dev)
    if teacher_model.config.in_channels not in (1, 3) and vae is None:
        raise ValueError(f"the teacher makes {teacher_model.config.in_channels}-channel latents: pass vae "
                         "(a diffusers AutoencoderKL directory)")
    decode = make_decoder(vae, latent_scale, batch_size, dev)
    cfg_passes = 1 if guidance_scale == 1.0 else 2
    timing = slice(0, min(num_samples, batch_size))  # the teacher's full set is cached: time one batch
    models: list[tuple[str, int, int, Sampler]] = [
        (f"teacher (DDIM, w={guidance_scale:g})", teacher_steps, teacher_steps * cfg_passes,
         teacher_sampler(teacher_model, teacher_steps, guidance_scale, spacing, clip_sample))]
    for s in undistilled_steps or []:
        models.append((f"teacher (DDIM, w={guidance_scale:g})", s, s * cfg_passes,
                       teacher_sampler(teacher_model, s, guidance_scale, spacing, clip_sample)))
    for name, directory in (students or {}).items():
        sampler, s = student_sampler(directory, dev)
        models.append((name, s, s, sampler))

    image_size = tuple(decode(torch.zeros(1, teacher_model.config.in_channels, teacher_model.config.sample_size,
                                          teacher_model.config.sample_size)).shape[2:])  # (H, W) of the samples
    real = (reference_from_images(digits_images("all"), features, cache) if reference == "digits"
            else reference_from_adm_npz(reference, features, cache, image_size=image_size))
    data = eval_set(teacher, teacher_model, num_samples, seed, teacher_steps, guidance_scale, spacing, clip_sample,
                    batch_size, cache, dev, bf16)
    noise, labels, teacher_final = data["noise"], data["labels"], data["teacher"]
    teacher_images = decode(teacher_final)  # (N, 1|3, H, W) uint8
    teacher_ref = reference_from_images(teacher_images, features)
    floors = {"real": fid_noise_floor(real.features), "teacher": fid_noise_floor(teacher_ref.features)}

    rows, grid = [], []
    for i, (name, steps, nfe, sampler) in enumerate(models):
        if i == 0:
            final, images = teacher_final, teacher_images
            _, sec = run_batched(sampler, noise[timing], labels[timing], batch_size, dev, bf16)
        else:
            final, sec = run_batched(sampler, noise, labels, batch_size, dev, bf16)
            check_finite_samples(final, f"{name} ({steps} steps): nothing reported")
            images = decode(final)  # (N, 1|3, H, W) uint8
        gflops = gflops_per_image(sampler, noise[:1].to(dev), labels[:1].to(dev))
        rows.append(metric_row(name, steps, nfe, final, images, teacher_final, sec, gflops, real, teacher_ref,
                               features, bootstrap))
        grid.append(images[:grid_samples])
        if export_npz:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
            save_npz_images(out_dir / "npz" / f"{slug}-{steps}steps.npz", images, labels)
        print(f"evaluated {name} ({steps} steps): FID {rows[-1]['fid']:.2f}, "
              f"FID vs teacher {rows[-1]['fid_vs_teacher']:.2f}, MSE {rows[-1]['mse_vs_teacher']:.4f}")

    report = {"rows": rows, "noise_floor": floors, "settings": {
        "teacher": teacher, "teacher_steps": teacher_steps, "guidance_scale": guidance_scale, "spacing": spacing,
        "num_samples": num_samples, "seed": seed, "reference": reference, "extractor": features.identity,
        "vae": vae, "bf16": bf16, "device": str(dev), "students": students or {}}}
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    table = markdown_table(rows, floors)
    write_text_atomic(out_dir / "report.md", table)
    names = [f"{r['model']}, {r['steps']} steps" for r in rows]
    picture = save_png(label_rows(image_grid(torch.cat(grid), nrow=grid_samples), names), out_dir / "samples.png")
    if wandb:
        _log_wandb(out_dir, report, picture)
    return rows


def _log_wandb(out_dir: Path, report: dict, picture: Path) -> None:
    import wandb

    run = wandb.init(project="ard-eval", dir=str(out_dir), mode="offline", config=report["settings"])
    table = wandb.Table(columns=list(REPORT_KEYS), data=[[r[k] for k in REPORT_KEYS] for r in report["rows"]])
    run.log({"report": table, "samples": wandb.Image(str(picture))})
    run.finish()


def main(args: list[str] | None = None) -> None:
    import os

    from jsonargparse import auto_cli

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        auto_cli(evaluate, args=args, as_positional=False)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"ard-eval: error: {e}") from None


if __name__ == "__main__":
    main()
