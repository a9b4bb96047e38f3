"""Evaluate the teacher, the undistilled teacher at S steps and distilled students on the same noises
and labels; write `report.json`, `report.md` and a side-by-side sample picture.

    ard-eval --config configs/digits/eval.yaml [--students '{"ard": "runs/digits/ard/student_ema"}'] [--out DIR]
    ard-eval --config configs/imagenet256/eval.yaml --students '{"ard": "..."}'   # DiT-XL/2, ADM protocol

The teacher is the store's: with `store`, its numerics, autocast precision and sampling settings (K, spacing,
guidance, clipping, guided channels) are the manifest's unless given, and a teacher or setting that differs
from the store's is refused (`allow_store_mismatch` evaluates anyway). The evaluation set is `num_samples`
noises and labels drawn from (seed, i) (ard.diffusion.trajectory_inputs, the same draw the store uses) and
the teacher's K-step guided samples from them, cached in `<cache_dir>/eval_set-<key>/` keyed by the teacher's
identity (ard.teacher.teacher_identity: weights, config, numerics) and every sampling setting. Every model
starts from exactly these noises, so besides FID against real data (the paper's measure) the report has the
distillation-fidelity measures: FID against the teacher's own samples (same extractor) and the same-noise
mean squared distance to the teacher's final sample (per pixel, in [-1, 1] units). The undistilled teacher
at S steps samples at exactly the students' boundary timesteps (their ard_sampling.json; without an S-step
student, the grid indices s * K / S the trajectory store serves them from).

Images enter the metrics as uint8 exactly like the ADM evaluator (round((x + 1) * 127.5), clipped).
FIDs carry a bootstrap standard deviation (resampling the generated set) and the report states each
reference's noise floor on the rows' footing: against the teacher, the FID of the teacher's N samples to N
more from independent noises and labels (the rows compare N samples with the teacher's N); against real
data, the FID between two random halves of the reference (it is finite: no second set exists).
Latent models (DiT on ImageNet) are decoded by the VAE before the metrics; their same-noise MSE is measured
on the latents the model outputs. `export_npz` also writes every row's samples as an ADM batch
(`<out>/npz/<row>.npz`, arr_0 uint8 NHWC, arr_1 labels) for the official TF evaluator.

Memory: every row streams batch by batch through sampling, decoding, features (once per row), the npz
export and the picture (which keeps `grid_samples` images per row); the evaluation set is memory-mapped.
What stays is one row's features and logits (N x (D + K) floats) and the real reference's.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ard.atomic import atomic_directory, write_text_atomic
from ard.checks import check_at_least, check_finite_samples, check_step_counts, check_writable
from ard.data.digits import to_uint8
from ard.diffusion import (CfgChannels, Precision, TimestepSpacing, autocast, ddim_grid, ddim_sample,
                           ddim_sample_at, recorded_solver, solver_identity, student_grid_indices, trajectory_inputs)
from ard.latents import LATENT_SCALE, decode_latents, load_vae
from ard.metrics import (DigitFeatures, FeatureExtractor, FeatureStats, InceptionFeatures, adm_npz_writer,
                         bootstrap_fid, digits_images, fid_from_features, fid_noise_floor, metrics_of_features,
                         reference_from_adm_npz, reference_from_images)
from ard.student import sample
from ard.teacher import DIGITS_TEACHER, Numerics, check_teacher, load_teacher, num_classes, teacher_identity
from ard.viz import image_grid, label_rows, save_png

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise (B,C,H,W), labels (B,)) -> (B,C,H,W)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # model outputs (B,C,h,w) -> uint8 images (B,1|3,H,W) on CPU
REPORT_KEYS = ("model", "steps", "nfe", "fid", "fid_sd", "fid_vs_teacher", "fid_vs_teacher_sd", "mse_vs_teacher",
               "mse_vs_teacher_se", "is", "precision", "recall", "num_samples", "sec_per_image", "gflops_per_image")
# The teacher's sampling settings without a store and without an explicit value (ard.diffusion.solver_identity).
SOLVER_DEFAULTS = dict(num_steps=24, timestep_spacing="leading", guidance_scale=2.0, clip_sample=True,
                       cfg_channels="all", precision="fp32")
EVAL_SET_FORMAT = 2  # the cache directory's layout: noise, labels, teacher, floor .npy files


def gflops_per_image(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor) -> float:
    """GFLOPs of generating one image, counted by torch's FlopCounterMode (2 FLOPs per multiply-add).

    Attention runs on SDPA's math backend while counting: the fused CPU kernel has no FLOP formula and
    would count as 0, hiding exactly the history attention's cost."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        sampler(noise[:1], labels[:1])  # on the device the sampler's model lives on
    return counter.get_total_flops() / 1e9


def teacher_sampler(teacher, solver: dict) -> Sampler:
    """The teacher's K-step DDIM + CFG with the store's settings (as the trajectories were made)."""
    k = solver["num_steps"]
    return lambda n, y: ddim_sample(teacher, n, y, k, solver["guidance_scale"], solver["timestep_spacing"],
                                    save_indices=[k], clip_sample=solver["clip_sample"],
                                    cfg_channels=solver["cfg_channels"]).states[:, -1]


def undistilled_sampler(teacher, solver: dict, timesteps: list[int], noise_correction: bool = False) -> Sampler:
    """The teacher's DDIM + CFG at given boundary timesteps (the students'), otherwise as `teacher_sampler`."""
    return lambda n, y: ddim_sample_at(teacher, n, y, timesteps, solver["guidance_scale"], solver["clip_sample"],
                                       solver["cfg_channels"], noise_correction)


def student_sampler(directory: str, device: torch.device = torch.device("cpu"),
                    noise_correction: bool = False) -> tuple[Sampler, list[int]]:
    """A standalone student's S-step sampler and its boundary timesteps (S + 1, the last CLEAN)."""
    from ard.modules.distill import load_exported

    student, boundaries = load_exported(directory)
    student = student.to(device)
    timesteps = torch.tensor(boundaries, device=device)  # (S+1,)
    return (lambda n, y: sample(student, n, y, timesteps, noise_correction)[:, -1]), boundaries


def undistilled_timesteps(steps: int, students: dict[str, list[int]], solver: dict) -> list[int]:
    """Boundary timesteps of the undistilled teacher at `steps` steps: those of the S-step students (all of
    them must agree), else the grid indices s * K / S of the teacher's K-step grid, where the trajectory
    store gives the students their boundaries (ard.data.trajectories.student_boundaries)."""
    same = {name: ts for name, ts in students.items() if len(ts) == steps + 1}
    if len({tuple(ts) for ts in same.values()}) > 1:
        raise ValueError(f"undistilled_steps {steps}: the {steps}-step students have different boundary timesteps "
                         f"({', '.join(f'{n}: {ts}' for n, ts in same.items())})")
    if same:
        return list(next(iter(same.values())))
    grid = ddim_grid(solver["num_steps"], solver["timestep_spacing"])
    try:
        return [grid[i] for i in student_grid_indices(solver["num_steps"], steps)]
    except ValueError as e:
        raise ValueError(f"undistilled_steps {steps}: {e} (or evaluate a {steps}-step student)") from None


def make_extractor(name: str) -> FeatureExtractor:
    """"digits": the shipped digit classifier; anything else: the path of torch-fidelity's FID Inception weights."""
    return DigitFeatures() if name == "digits" else InceptionFeatures(name)


def make_decoder(vae: str | None, latent_scale: float, batch_size: int, device: torch.device) -> Decoder:
    """Model outputs -> uint8 images as the metrics take them (ADM rounding); latents go through the VAE."""
    if vae is None:
        return to_uint8
    autoencoder = load_vae(vae).to(device)
    return lambda x: to_uint8(decode_latents(autoencoder, x.to(device), latent_scale, batch_size).cpu())


def resolve_teacher(teacher: str, teacher_size: str | None, store: str | None, numerics: Numerics | None,
                    given: dict, allow_store_mismatch: bool):
    """Load the teacher and settle its sampling settings: the explicit ones, else the store's, else
    SOLVER_DEFAULTS. Refuses (one line naming the manifest field) a teacher or setting that differs from the
    store's unless `allow_store_mismatch`. Returns (teacher model, its identity, solver settings)."""
    manifest, where = None, None
    if store is not None:
        from ard.store.format import MANIFEST, read_manifest

        manifest, where = read_manifest(store), str(Path(store) / MANIFEST)
    recorded = recorded_solver(manifest["solver"], where) if manifest else {}
    settings = {k: given[k] if given.get(k) is not None else recorded.get(k, default)
                for k, default in SOLVER_DEFAULTS.items()}
    solver = solver_identity(**settings)
    if numerics is None and manifest is not None:
        numerics = manifest["teacher"].get("numerics")  # None (an older store): the checkpoint's own
    model = load_teacher(teacher, teacher_size, numerics)
    identity = teacher_identity(model)
    if manifest is not None and not allow_store_mismatch:
        check_teacher(manifest["teacher"], identity, where, f"teacher={teacher}")
        for key, value in solver.items():
            if key in recorded and recorded[key] != value:
                raise ValueError(f"{where}: field 'solver.{key}' is {recorded[key]!r}, the evaluation has {value!r} "
                                 "(pass allow_store_mismatch: true to evaluate against another teacher setting)")
    return model, identity, solver


def tensor(array: np.ndarray) -> torch.Tensor:
    """A slice of the memory-mapped (read-only) evaluation set as a tensor of its own (a copy)."""
    return torch.from_numpy(np.array(array))


def sample_batches(sampler: Sampler, noise: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                   precision: Precision) -> Iterator[tuple[int, torch.Tensor, float]]:
    """Run `sampler` on `device` over batches of (noise, labels); yields (first index, final samples (b, C, h, w)
    fp32 on CPU, sampling seconds; the device is synchronised before the clock stops)."""
    for a in range(0, len(noise), batch_size):
        n, y = tensor(noise[a:a + batch_size]), tensor(labels[a:a + batch_size])
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, precision):
            final = sampler(n.to(device), y.to(device)).float()  # (b, C, h, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield a, final.cpu(), time.perf_counter() - start


def eval_set(teacher, identity: dict, solver: dict, num_samples: int, seed: int, batch_size: int, cache_dir: Path,
             device: torch.device) -> dict[str, np.ndarray]:
    """Noises, labels and the teacher's K-step samples of the evaluation set, and the teacher's samples from N
    more noises and labels (indices N..2N-1 of the same seed: independent) for the FID-vs-teacher noise floor;
    cached in <cache_dir>/eval_set-<key>/ as .npy files written batch by batch, returned memory-mapped."""
    key = hashlib.sha256(json.dumps([EVAL_SET_FORMAT, identity, solver, num_samples, seed],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"eval_set-{key}"
    if not path.exists():
        config = teacher.config
        shape = (config.in_channels, config.sample_size, config.sample_size)  # (C, H, W)
        sampler = teacher_sampler(teacher, solver)
        with atomic_directory(path) as tmp:
            def array(name, dtype, item_shape=()):
                return np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, (num_samples, *item_shape))

            noise, labels = array("noise", np.float32, shape), array("labels", np.int64)
            final, floor = array("teacher", np.float32, shape), array("floor_teacher", np.float32, shape)
            for a in range(0, num_samples, batch_size):
                b = min(a + batch_size, num_samples)
                for first, out in ((0, final), (num_samples, floor)):
                    n, y = trajectory_inputs(seed, range(first + a, first + b), shape, num_classes(teacher))
                    if first == 0:
                        noise[a:b], labels[a:b] = n.numpy(), y.numpy()
                    batches = sample_batches(sampler, n.numpy(), y.numpy(), b - a, device, solver["precision"])
                    final_batch = next(batches)[1]  # (b - a, C, H, W)
                    check_finite_samples(final_batch, f"teacher, evaluation set samples {first + a}..{first + b - 1} "
                                                      "(not cached)")
                    out[a:b] = final_batch
            for mm in (noise, labels, final, floor):
                mm.flush()
            del noise, labels, final, floor
    try:
        return {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in ("noise", "labels", "teacher", "floor_teacher")}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable evaluation cache, truncated or corrupt ({e}); delete it to "
                         "recompute") from None


class Row:
    """One model streamed through the evaluation, batch by batch: the same-noise distance to the teacher,
    decoding, features and logits (once per sample), the npz export and the few images of the picture."""

    def __init__(self, decode: Decoder, extractor: FeatureExtractor, grid_samples: int):
        self.decode, self.extractor, self.grid_samples = decode, extractor, grid_samples
        self.features, self.logits, self.sq, self.grid = [], [], [], []

    @torch.no_grad()
    def add(self, final: torch.Tensor, target: torch.Tensor | None = None, write: Callable | None = None) -> None:
        """final: (b, C, h, w) model outputs on CPU; target: the teacher's (b, C, h, w) from the same noises."""
        if target is not None:
            self.sq.append((final.float() - target.float()).pow(2).mean(dim=(1, 2, 3)))  # (b,)
        images = self.decode(final)  # (b, 1|3, H, W) uint8
        device = next(self.extractor.parameters()).device
        features, logits = self.extractor.eval().features_and_logits(images.to(device))  # (b, D), (b, K)
        self.features.append(features.float().cpu())
        self.logits.append(logits.float().cpu())
        kept = sum(len(g) for g in self.grid)
        if kept < self.grid_samples:
            self.grid.append(images[: self.grid_samples - kept])
        if write is not None:
            write(images)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and logits (N, K) of every sample added."""
        return torch.cat(self.features), torch.cat(self.logits)


def _npz_writer(out_dir: Path, export: bool, name: str, steps: int, count: int, size: tuple[int, int],
                labels: np.ndarray):
    if not export:
        return nullcontext(None)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    labels = tensor(labels)  # (N,)
    return adm_npz_writer(out_dir / "npz" / f"{slug}-{steps}steps.npz", count, size, labels)


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
    undistilled = [r for r in rows[1:] if r["model"] == rows[0]["model"]]
    n = rows[0]["num_samples"]
    lines.append("")
    lines.append(f"{n} samples per model, the same noises and labels for every row; ± is the bootstrap sd of FID "
                 "and the standard error of the MSE. " + "".join(
                     f"The undistilled teacher at {r['steps']} steps samples at the students' boundary timesteps "
                     f"{', '.join(str(t) for t in r['timesteps'][:-1])}. " for r in undistilled) +
                 f"Noise floors: FID vs teacher {floors['teacher']:.2f} (the teacher's {n} samples against {n} more "
                 f"from independent noises and labels), FID vs real {floors['real']:.2f} (two random halves of the "
                 "real reference). samples.png: one row per model in the table's order, one noise and label per "
                 "column.")
    return "\n".join(lines) + "\n"


def evaluate(
    students: dict[str, str] | None = None,
    teacher: str = str(DIGITS_TEACHER),
    teacher_size: str | None = None,
    store: str | None = None,
    numerics: Numerics | None = None,
    teacher_steps: int | None = None,
    guidance_scale: float | None = None,
    spacing: TimestepSpacing | None = None,
    clip_sample: bool | None = None,
    cfg_channels: CfgChannels | None = None,
    precision: Precision | None = None,
    allow_store_mismatch: bool = False,
    undistilled_steps: list[int] | None = None,
    noise_correction: bool = False,
    num_samples: int = 1000,
    seed: int = 10_000,
    reference: str = "digits",
    extractor: str = "digits",
    vae: str | None = None,
    latent_scale: float = LATENT_SCALE,
    bootstrap: int = 10,
    batch_size: int = 500,
    device: str | None = None,
    export_npz: bool = False,
    out: str = "runs/eval",
    cache_dir: str = "runs/cache",
    grid_samples: int = 10,
    wandb: bool = True,
) -> list[dict]:
    """Evaluate the teacher and students on one shared evaluation set; write report.json and report.md.

    Args:
        students: row name -> standalone student directory (written when `ard fit` ends: <run>/student_ema).
        teacher: the teacher (diffusers pipeline snapshot, its transformer/ subfolder, or official DiT .pt); its
            K-step samples are the target.
        teacher_size: DIT_SIZES key, needed for an official .pt teacher (ard.teacher.load_teacher).
        store: the students' trajectory store: the teacher and every sampling setting below default to its
            manifest's, and a teacher or setting that differs from it is refused.
        numerics: the teacher's numerics ("dit" | "diffusers"); None: the store's, else the checkpoint's own.
        teacher_steps: K, the teacher's DDIM steps; None: the store's, else 24.
        guidance_scale: CFG scale of the teacher; None: the store's, else 2.0.
        spacing: DDIM timestep spacing; None: the store's, else "leading".
        clip_sample: clip the teacher's x0-predictions to [-1, 1] (pixel space; false for latents); None: the
            store's, else true.
        cfg_channels: epsilon channels CFG guides: "all" or "dit" (the first 3, as facebookresearch/DiT); None:
            the store's, else "all".
        precision: autocast dtype while sampling ("fp32" | "bf16" | "fp16"), every row; None: the store's,
            else "fp32".
        allow_store_mismatch: evaluate even when the teacher or a setting differs from the store's.
        undistilled_steps: also evaluate the teacher itself at these few steps, at the S-step students'
            boundary timesteps (none with S steps: the grid indices s * K / S the store serves them from).
        noise_correction: sample the students and the undistilled teacher with Imagine Flash's first-step noise
            correction (the DDIM direction term of step 0 uses x_T; ARDStudent.step); the K-step teacher, the
            reference, never. Rows say so in their `noise_correction` field.
        num_samples: size of the evaluation set (papers: 50,000).
        seed: seed of its noises and labels (different from the training store's seed: held out).
        reference: "digits" (all 1797 real digits) or the path of an ADM reference batch .npz
            (e.g. VIRTUAL_imagenet256_labeled.npz; its mu/sigma give FID, its images precision/recall).
        extractor: "digits" (the shipped digit classifier) or the path of torch-fidelity's FID Inception
            weights (weights-inception-2015-12-05-6726825d.pth; needs the `gpu` extra).
        vae: diffusers AutoencoderKL directory that decodes latent samples to images (latent teachers).
        latent_scale: the teacher's latents are latent_scale times the VAE's.
        bootstrap: resamples for the FID standard deviations.
        batch_size: images per sampling (and decoding, feature) batch.
        device: where sampling and features run (default: cuda when available, else cpu).
        export_npz: also write each row's samples as an ADM batch, <out>/npz/<row>.npz.
        out: output directory (report.json, report.md, samples.png).
        cache_dir: where the evaluation set and reference statistics are cached.
        grid_samples: columns of samples.png (one row per model, same noises and labels).
        wandb: log the table and the picture to W&B (offline).
    """
    out_dir, cache = Path(out), Path(cache_dir)
    check_at_least(1, num_samples=num_samples, batch_size=batch_size, bootstrap=bootstrap, grid_samples=grid_samples)
    check_step_counts("teacher_steps", None if teacher_steps is None else [teacher_steps])
    check_step_counts("undistilled_steps", undistilled_steps)
    check_writable(out_dir, "out")
    check_writable(cache, "cache_dir")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = make_extractor(extractor).to(dev)
    if reference == "digits" and not isinstance(features, DigitFeatures):
        raise ValueError("reference 'digits' needs extractor 'digits'; pass an ADM reference .npz for Inception")
    given = dict(num_steps=teacher_steps, timestep_spacing=spacing, guidance_scale=guidance_scale,
                 clip_sample=clip_sample, cfg_channels=cfg_channels, precision=precision)
    teacher_model, identity, solver = resolve_teacher(teacher, teacher_size, store, numerics, given,
                                                      allow_store_mismatch)
    teacher_model = teacher_model.to(dev)
    if teacher_model.config.in_channels not in (1, 3) and vae is None:
        raise ValueError(f"the teacher makes {teacher_model.config.in_channels}-channel latents: pass vae "
                         "(a diffusers AutoencoderKL directory)")
    decode = make_decoder(vae, latent_scale, batch_size, dev)
    k, w, prec = solver["num_steps"], solver["guidance_scale"], solver["precision"]
    cfg_passes = 1 if w == 1.0 else 2
    name = f"teacher (DDIM, w={w:g})"
    loaded = {row: student_sampler(directory, dev, noise_correction) for row, directory in (students or {}).items()}
    models: list[tuple[str, int, Sampler, list[int]]] = [
        (name, k * cfg_passes, teacher_sampler(teacher_model, solver), ddim_grid(k, solver["timestep_spacing"]))]
    for s in undistilled_steps or []:
        timesteps = undistilled_timesteps(s, {row: ts for row, (_, ts) in loaded.items()}, solver)
        models.append((name, s * cfg_passes, undistilled_sampler(teacher_model, solver, timesteps, noise_correction),
                       timesteps))
    models += [(row, len(ts) - 1, sampler, ts) for row, (sampler, ts) in loaded.items()]

    config = teacher_model.config
    size = tuple(decode(torch.zeros(1, config.in_channels, config.sample_size, config.sample_size,
                                    device=dev)).shape[2:])  # (H, W) of the images
    real = (reference_from_images(digits_images("all"), features, cache) if reference == "digits"
            else reference_from_adm_npz(reference, features, cache, image_size=size))
    data = eval_set(teacher_model, identity, solver, num_samples, seed, batch_size, cache, dev)
    noise, labels, teacher_final = data["noise"], data["labels"], data["teacher"]

    rows, grid, floors = [], [], {"real": fid_noise_floor(real.features)}
    teacher_stats = None
    for i, (row_name, nfe, sampler, timesteps) in enumerate(models):
        steps = len(timesteps) - 1
        row = Row(decode, features, grid_samples)
        with _npz_writer(out_dir, export_npz, row_name, steps, num_samples, size, labels) as write:
            if i == 0:  # the teacher's samples are cached: stream them, and time one batch of sampling
                for a in range(0, num_samples, batch_size):
                    row.add(tensor(teacher_final[a:a + batch_size]), None, write)
                timed = min(batch_size, num_samples)
                seconds = sum(t for _, _, t in sample_batches(sampler, noise[:timed], labels[:timed], timed, dev, prec))
                sec = seconds / timed
            else:
                seconds = 0.0
                for a, final, t in sample_batches(sampler, noise, labels, batch_size, dev, prec):
                    check_finite_samples(final, f"{row_name} ({steps} steps): nothing reported; in the batch from "
                                                f"sample {a}")
                    row.add(final, tensor(teacher_final[a:a + len(final)]), write)
                    seconds += t
                sec = seconds / num_samples
        feats, logits = row.gathered()  # (N, D), (N, K)
        if i == 0:
            teacher_stats = FeatureStats.of(feats)
            floor = Row(decode, features, 0)
            for a in range(0, num_samples, batch_size):
                floor.add(tensor(data["floor_teacher"][a:a + batch_size]))
            floors["teacher"] = fid_from_features(floor.gathered()[0], teacher_stats, dev)
            del floor
        vs_real = metrics_of_features(feats, logits, real, bootstrap=bootstrap, device=dev)
        sq = torch.zeros(num_samples, dtype=torch.float64) if i == 0 else torch.cat(row.sq)  # (N,)
        gflops = gflops_per_image(sampler, tensor(noise[:1]).to(dev), tensor(labels[:1]).to(dev))
        rows.append({"model": row_name, "steps": steps, "nfe": nfe, "fid": vs_real["fid"], "fid_sd": vs_real["fid_sd"],
                     "fid_vs_teacher": fid_from_features(feats, teacher_stats, dev),
                     "fid_vs_teacher_sd": float(bootstrap_fid(feats, teacher_stats, bootstrap, 0, dev).std()),
                     "mse_vs_teacher": float(sq.mean()), "mse_vs_teacher_se": float(sq.std() / len(sq) ** 0.5),
                     "is": vs_real["is"], "precision": vs_real["precision"], "recall": vs_real["recall"],
                     "num_samples": num_samples, "sec_per_image": sec, "gflops_per_image": gflops,
                     "timesteps": [int(t) for t in timesteps], "noise_correction": noise_correction and i > 0})
        grid.append(torch.cat(row.grid))
        del row, feats, logits
        print(f"evaluated {row_name} ({steps} steps): FID {rows[-1]['fid']:.2f}, "
              f"FID vs teacher {rows[-1]['fid_vs_teacher']:.2f}, MSE {rows[-1]['mse_vs_teacher']:.4f}")

    report = {"rows": rows, "noise_floor": floors, "noise_floor_method": {
        "teacher": "FID of the teacher's N samples against N more from independent noises and labels (N vs N, "
                   "as the rows)", "real": "FID between two random halves of the real reference"},
        "settings": {
            "teacher": teacher, "teacher_identity": identity, "store": store, "solver": solver,
            "teacher_steps": k, "guidance_scale": w, "spacing": solver["timestep_spacing"],
            "num_samples": num_samples, "seed": seed, "reference": reference, "extractor": features.identity,
            "vae": vae, "precision": prec, "device": str(dev), "students": students or {}}}
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
