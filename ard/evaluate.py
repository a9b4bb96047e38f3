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

A text store (a PixArt or SD3 teacher's: ard/store/text.py) makes the evaluation set's labels prompt indices: every
row samples each noise with the same prompt's stored encoding (`Conditions`; SD3's with its pooled embedding, which
the store must hold), and where the store's prompts are the digits' captions (ard/data/captions.py) each row also
reports its prompt adherence: the share of its samples the digit classifier assigns to the digit their caption
names. SD3's latents are decoded with its VAE's scale and shift (`latent_scale` 1.5305, `latent_shift` 0.0609).

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

The pipeline (`evaluate`): resolve_teacher, build_rows (one RowSpec per row, the K-step teacher first: the
reference), eval_set, then per row stream (sample, time, decode, features) and report_row (metrics), and
write_report (report.json, report.md, samples.png, W&B).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterator

import numpy as np
import torch
from jsonargparse import ArgumentParser
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ard.atomic import atomic_directory, write_text_atomic
from ard.checks import (NUM_TRAIN_TIMESTEPS, AtLeastOne, AtLeastTwo, Finite, NonNegative, NonNegativeInt, Positive,
                        check_finite_samples, check_knobs, check_writable)
from ard.cli import one_line
from ard.data.digits import to_uint8
from ard.diffusion import (CfgChannels, Precision, autocast, flow_solver_identity, recorded_solver, sample_at, solve,
                           solver_grid, solver_identity, student_grid_indices, trajectory_inputs)
from ard.latents import LATENT_SCALE, decode_latents, load_vae
from ard.schedules import TimestepSpacing, schedule_of
from ard.metrics import (DigitFeatures, FeatureExtractor, FeatureStats, InceptionFeatures, Reference, adm_npz_writer,
                         bootstrap_fid, digits_images, fid_from_features, fid_noise_floor, metrics_of_features,
                         reference_from_adm_npz, reference_from_images)
from ard.metrics.precision_recall import MIN_IMAGES
from ard.metrics.reference import check_npz_images
from ard.metrics.table import metrics_table
from ard.student import sample
from ard.student.export import exported_noise_correction, load_exported
from ard.backbones import SERVED, TEXT, backbone_of
from ard.backbones.dit import Numerics, num_classes
from ard.data.captions import caption_digit, digit_captions
from ard.teacher import DIGITS_TEACHER, check_teacher, load_teacher, teacher_identity
from ard.viz import image_grid, label_rows, save_png

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise (B,C,H,W), labels (B,)) -> (B,C,H,W)
Decoder = Callable[[torch.Tensor], torch.Tensor]  # model outputs (B,C,h,w) -> uint8 images (B,1|3,H,W) on CPU
REPORT_KEYS = ("model", "steps", "nfe", "fid", "fid_sd", "fid_vs_teacher", "fid_vs_teacher_sd", "mse_vs_teacher",
               "mse_vs_teacher_se", "is", "precision", "recall", "num_samples", "sec_per_image", "gflops_per_image")
REPORT_COLUMNS = ("model", "steps", "nfe", "fid", "fid_vs_teacher", "mse_vs_teacher", "is", "precision", "recall",
                  "sec_per_image", "gflops_per_image")  # report.md's (ard.metrics.table.COLUMNS)
ADHERENCE = "prompt_adherence"  # a row's key and column where the prompts name digits (the captions of the digits)
CLIP = "clip_score"  # a row's CLIP score against its prompts (text stores, given a local CLIP)
DECODE = "decode_sec_per_image"  # the decoder's (VAE's) seconds per image, apart from the sampling's: latent rows
NOISE_FLOOR_METHOD = {
    "teacher": "FID of the teacher's N samples against N more from independent noises and labels (N vs N, as the rows)",
    "real": "FID between two random halves of the real reference"}
# The teacher's sampling settings without a store and without an explicit value (ard.diffusion.solver_identity).
SOLVER_DEFAULTS = dict(num_steps=24, timestep_spacing="leading", guidance_scale=2.0, clip_sample=True,
                       cfg_channels="all", precision="fp32")
EVAL_SET_FORMAT = 2  # the cache directory's layout: noise, labels, teacher, floor .npy files

# Ranges of evaluate's numeric options beyond ard.checks' (the options declare them in their annotations)
StepCount = Annotated[int, Field(ge=1, le=NUM_TRAIN_TIMESTEPS)]  # DDIM steps on the 1000-step schedule
SampleCount = Annotated[int, Field(ge=MIN_IMAGES)]  # precision/recall: each sample's nearest neighbours among them


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
    return lambda n, y: solve(teacher, solver, n, y, save_indices=[k]).states[:, -1]


def undistilled_sampler(teacher, solver: dict, timesteps: list[int], noise_correction: bool = False) -> Sampler:
    """The teacher's DDIM + CFG at given boundary timesteps (the students'), otherwise as `teacher_sampler`."""
    schedule = schedule_of(solver)
    return lambda n, y: sample_at(teacher, schedule, n, y, timesteps, solver["guidance_scale"], solver["clip_sample"],
                                  solver.get("cfg_channels", "all"), noise_correction)


def student_sampler(directory: str, device: torch.device = torch.device("cpu"),
                    noise_correction: bool = False) -> tuple[Sampler, list[int]]:
    """A standalone student's S-step sampler and its boundary timesteps (S + 1, the last CLEAN). A student trained
    with noise correction (its ard_sampling.json) is always sampled with it, as it was trained."""
    student, boundaries = load_exported(directory)
    student = student.to(device)
    corrected = noise_correction or exported_noise_correction(directory)
    timesteps = student.schedule.label_tensor(boundaries, device)  # (S+1,)
    return (lambda n, y: sample(student, n, y, timesteps, corrected)[:, -1]), boundaries


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
    grid = solver_grid(solver)
    try:
        return [grid[i] for i in student_grid_indices(solver["num_steps"], steps)]
    except ValueError as e:
        raise ValueError(f"undistilled_steps {steps}: {e} (or evaluate a {steps}-step student)") from None


def make_extractor(name: str) -> FeatureExtractor:
    """"digits": the shipped digit classifier; anything else: the path of torch-fidelity's FID Inception weights."""
    return DigitFeatures() if name == "digits" else InceptionFeatures(name)


def make_decoder(vae: str | None, latent_scale: float, batch_size: int, device: torch.device,
                 latent_shift: float = 0.0) -> Decoder:
    """Model outputs -> uint8 images as the metrics take them (ADM rounding); latents go through the VAE."""
    if vae is None:
        return to_uint8
    autoencoder = load_vae(vae).to(device)
    return lambda x: to_uint8(decode_latents(autoencoder, x.to(device), latent_scale, batch_size, latent_shift).cpu())


@dataclass
class Conditions:
    """How the evaluation set's labels condition every row: class labels as they are, or a text store's prompt
    indices as their encoded prompts; `classes`: the digit each label asks for where the prompts name digits."""
    count: int  # labels are drawn from 0..count-1
    condition: Callable[[torch.Tensor], object]  # labels (B,) on the device -> the models' condition
    key: dict  # what of the conditioning the evaluation set depends on (its cache key)
    classes: np.ndarray | None = None  # (count,) the digit of each label, for prompt adherence
    encoder_seconds: float | None = None  # the text encoder's seconds per prompt (when the store was made)
    prompts: list[str] | None = None  # (count,) each label's prompt text (the CLIP score's texts)

    @classmethod
    def of(cls, teacher, manifest: dict | None, store: str | None) -> "Conditions":
        from ard.store.format import MANIFEST, conditioning_files
        from ard.store.text import check_pooled, encoding_seconds, store_conditioner

        condition = store_conditioner(store, manifest) if manifest is not None else None
        if condition is None:
            return cls(num_classes(teacher), lambda labels: labels, {})
        cond = manifest["conditioning"]
        check_pooled(cond, backbone_of(teacher).text_dims(teacher)[1], str(Path(store) / MANIFEST))
        stored = [json.loads(line) for line in (Path(store) / cond["prompts"]["file"]).read_text().splitlines()]
        captions = [{"id": p.id, "text": p.text} for p in digit_captions()]
        classes = np.array([caption_digit(i) for i in range(len(captions))]) if stored == captions else None
        return cls(cond["prompts"]["count"], condition,
                   {name: entry["sha256"] for name, entry in conditioning_files(manifest).items()}, classes,
                   encoding_seconds(store), [p["text"] for p in stored])


def clip_metric(clip: str | None, conditions: Conditions):
    """The CLIP score's metric (one for every row, reset before each; None without `clip`)."""
    if clip is None:
        return None
    if conditions.prompts is None:
        raise ValueError(f"clip={clip}: the CLIP score compares samples with their prompts: evaluate a text store")
    from ard.metrics.clip import clip_score_metric

    return clip_score_metric(clip)


def conditioned(sampler: Sampler, conditions: Conditions) -> Sampler:
    """`sampler` fed the evaluation set's labels through `conditions`."""
    return lambda noise, labels: sampler(noise, conditions.condition(labels))


def resolve_teacher(teacher: str, teacher_size: str | None, store: str | None, numerics: Numerics | None,
                    given: dict, allow_store_mismatch: bool):
    """Load the teacher and settle its sampling settings: the explicit ones, else the store's, else
    SOLVER_DEFAULTS. Refuses (one line naming the manifest field) a teacher or setting that differs from the
    store's unless `allow_store_mismatch`. Returns (teacher model, its identity, solver settings, the store's
    manifest or None)."""
    manifest, where = None, None
    if store is not None:
        from ard.store.format import MANIFEST, read_manifest

        manifest, where = read_manifest(store), str(Path(store) / MANIFEST)
    recorded = recorded_solver(manifest["solver"], where) if manifest else {}
    settings = {k: given[k] if given.get(k) is not None else recorded.get(k, default)
                for k, default in SOLVER_DEFAULTS.items()}
    if recorded.get("name") == "flow_euler":  # Euler on the store's sigma grid: no DDIM spacing, every channel guided
        for key in ("timestep_spacing", "cfg_channels"):
            if given.get(key) is not None:
                raise ValueError(f"{where}: a flow teacher's store (Euler): {key}={given[key]!r} does not apply")
        solver = flow_solver_identity(settings["num_steps"], recorded["shift"], settings["guidance_scale"],
                                      settings["clip_sample"], settings["precision"])
    else:
        solver = solver_identity(**settings)
    if numerics is None and manifest is not None:
        numerics = manifest["teacher"].get("numerics")  # None (an older store): the checkpoint's own
    text = manifest is not None and (manifest.get("conditioning") or {}).get("kind") == "text"
    model = load_teacher(teacher, teacher_size, numerics, families=(*SERVED, *TEXT) if text else SERVED)
    identity = teacher_identity(model)
    if manifest is not None and not allow_store_mismatch:
        check_teacher(manifest["teacher"], identity, where, f"teacher={teacher}")
        for key, value in solver.items():
            if key in recorded and recorded[key] != value:
                raise ValueError(f"{where}: field 'solver.{key}' is {recorded[key]!r}, the evaluation has {value!r} "
                                 "(pass allow_store_mismatch: true to evaluate against another teacher setting)")
    return model, identity, solver, manifest


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
             device: torch.device, conditions: Conditions) -> dict[str, np.ndarray]:
    """Noises, labels and the teacher's K-step samples of the evaluation set, and the teacher's samples from N
    more noises and labels (indices N..2N-1 of the same seed: independent) for the FID-vs-teacher noise floor;
    cached in <cache_dir>/eval_set-<key>/ as .npy files written batch by batch, returned memory-mapped."""
    what = [EVAL_SET_FORMAT, identity, solver, num_samples, seed] + ([conditions.key] if conditions.key else [])
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"eval_set-{key}"
    if not path.exists():
        config = teacher.config
        shape = (config.in_channels, config.sample_size, config.sample_size)  # (C, H, W)
        sampler = conditioned(teacher_sampler(teacher, solver), conditions)
        with atomic_directory(path) as tmp:
            def array(name, dtype, item_shape=()):
                return np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, (num_samples, *item_shape))

            noise, labels = array("noise", np.float32, shape), array("labels", np.int64)
            final, floor = array("teacher", np.float32, shape), array("floor_teacher", np.float32, shape)
            for a in range(0, num_samples, batch_size):
                b = min(a + batch_size, num_samples)
                for first, out in ((0, final), (num_samples, floor)):
                    n, y = trajectory_inputs(seed, range(first + a, first + b), shape, conditions.count)
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


@dataclass
class RowSpec:
    """What one row of the report evaluates: a named sampler and the boundary timesteps it samples at."""

    name: str
    nfe: int  # network evaluations per sample (2 per step with CFG)
    sampler: Sampler
    timesteps: list[int]  # (S+1,), the last CLEAN
    noise_correction: bool = False
    reference: bool = False  # the K-step teacher: its samples are the evaluation set's (one batch timed)

    @property
    def steps(self) -> int:
        """S, the steps it samples in."""
        return len(self.timesteps) - 1


@dataclass
class Setup:
    """What every row is measured with: the evaluation set (eval_set), decoder, extractor, real reference."""

    data: dict[str, np.ndarray]
    decode: Decoder
    extractor: FeatureExtractor
    real: Reference
    device: torch.device
    precision: Precision
    batch_size: int
    bootstrap: int
    grid_samples: int
    image_size: tuple[int, int]  # (H, W) of the decoded images
    npz_dir: Path | None  # export_npz: where each row's ADM batch goes
    classes: np.ndarray | None = None  # the digit each label asks for (prompt adherence), where known
    clip: object | None = None  # the CLIP-score metric (text stores with `clip`), reset for every row
    prompts: list[str] | None = None  # the text of each label's prompt (the CLIP score's texts)


def build_rows(teacher, solver: dict, students: dict[str, str], undistilled_steps: list[int] | None,
               noise_correction: bool, device: torch.device, conditions: Conditions) -> list[RowSpec]:
    """The report's rows in order: the K-step teacher (the reference), the undistilled teacher at each of
    `undistilled_steps` (at the students' boundaries), the students; every sampler fed through `conditions`."""
    k, w = solver["num_steps"], solver["guidance_scale"]
    cfg_passes = 1 if w == 1.0 else 2
    name = f"teacher ({'Euler' if solver.get('name') == 'flow_euler' else 'DDIM'}, w={w:g})"
    loaded = {row: student_sampler(directory, device, noise_correction) for row, directory in students.items()}
    boundaries = {row: timesteps for row, (_, timesteps) in loaded.items()}
    rows = [RowSpec(name, k * cfg_passes, conditioned(teacher_sampler(teacher, solver), conditions),
                    solver_grid(solver), reference=True)]
    for s in undistilled_steps or []:
        timesteps = undistilled_timesteps(s, boundaries, solver)
        sampler = conditioned(undistilled_sampler(teacher, solver, timesteps, noise_correction), conditions)
        rows.append(RowSpec(name, s * cfg_passes, sampler, timesteps, noise_correction))
    return rows + [RowSpec(row, len(ts) - 1, conditioned(sampler, conditions), ts, noise_correction)
                   for row, (sampler, ts) in loaded.items()]


class Row:
    """One model streamed through the evaluation, batch by batch: the same-noise distance to the teacher,
    decoding, features and logits (once per sample), the npz export and the few images of the picture."""

    def __init__(self, decode: Decoder, extractor: FeatureExtractor, grid_samples: int, clip=None):
        self.decode, self.extractor, self.grid_samples, self.clip = decode, extractor, grid_samples, clip
        self.features, self.logits, self.sq, self.grid = [], [], [], []
        self.decode_seconds = 0.0  # the decoder's (the VAE's, for latents) time, apart from the sampling

    @torch.no_grad()
    def add(self, final: torch.Tensor, target: torch.Tensor | None = None, write: Callable | None = None,
            texts: list[str] | None = None) -> None:
        """final: (b, C, h, w) model outputs on CPU; target: the teacher's (b, C, h, w) from the same noises; texts:
        their prompts, for the CLIP score."""
        if target is not None:
            self.sq.append((final.float() - target.float()).pow(2).mean(dim=(1, 2, 3)))  # (b,)
        start = time.perf_counter()
        images = self.decode(final)  # (b, 1|3, H, W) uint8
        self.decode_seconds += time.perf_counter() - start
        if self.clip is not None and texts is not None:
            self.clip.update(images.expand(-1, 3, -1, -1), texts)  # (b, 3, H, W) uint8
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


def npz_writer(npz_dir: Path | None, name: str, steps: int, size: tuple[int, int], labels: np.ndarray):
    """The ADM batch writer of one row, <npz_dir>/<name>-<steps>steps.npz; a no-op without npz_dir."""
    if npz_dir is None:
        return nullcontext(None)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return adm_npz_writer(npz_dir / f"{slug}-{steps}steps.npz", len(labels), size, tensor(labels))


def stream(spec: RowSpec, setup: Setup) -> tuple[Row, float]:
    """Stream one row's samples through a Row; returns it and the sampling seconds per image. The reference's
    samples are the cached ones and one batch of its sampling is timed; every other row is sampled and timed."""
    noise, labels, target = setup.data["noise"], setup.data["labels"], setup.data["teacher"]
    n, b, where = len(noise), setup.batch_size, (setup.device, setup.precision)
    if spec.reference:
        timed = min(b, n)
        seconds = sum(t for *_, t in sample_batches(spec.sampler, noise[:timed], labels[:timed], timed, *where))
        batches = ((a, tensor(target[a:a + b]), 0.0) for a in range(0, n, b))
    else:
        timed, seconds = n, 0.0
        batches = sample_batches(spec.sampler, noise, labels, b, *where)
    if setup.clip is not None:
        setup.clip.reset()  # this row's samples only
    row = Row(setup.decode, setup.extractor, setup.grid_samples, setup.clip)
    texts = (lambda a, b: [setup.prompts[int(i)] for i in labels[a:b]]) if setup.clip else (lambda a, b: None)
    with npz_writer(setup.npz_dir, spec.name, spec.steps, setup.image_size, labels) as write:
        for a, final, t in batches:
            check_finite_samples(final, f"{spec.name} ({spec.steps} steps): nothing reported; in the batch from "
                                        f"sample {a}")
            row.add(final, tensor(target[a:a + len(final)]), write, texts(a, a + len(final)))
            seconds += t
    return row, seconds / timed


def teacher_floor(setup: Setup, teacher: FeatureStats) -> float:
    """FID of the teacher's N samples from N more independent noises and labels against its N (the rows' footing)."""
    floor = Row(setup.decode, setup.extractor, 0)
    for a in range(0, len(setup.data["floor_teacher"]), setup.batch_size):
        floor.add(tensor(setup.data["floor_teacher"][a:a + setup.batch_size]))
    return fid_from_features(floor.gathered()[0], teacher, setup.device)


def report_row(spec: RowSpec, row: Row, sec: float, teacher: FeatureStats, setup: Setup) -> dict:
    """One row of report.json: REPORT_KEYS, the boundary timesteps and whether noise correction was on."""
    feats, logits = row.gathered()  # (N, D), (N, K)
    dev = setup.device
    vs_real = metrics_of_features(feats, logits, setup.real, bootstrap=setup.bootstrap, device=dev)
    sq = torch.cat(row.sq)  # (N,) per-sample squared distance to the teacher's final sample
    noise, labels = (tensor(setup.data[k][:1]).to(dev) for k in ("noise", "labels"))  # (1, C, h, w), (1,)
    gflops = gflops_per_image(spec.sampler, noise, labels)
    clip = {} if row.clip is None else {CLIP: float(row.clip.compute())}
    adherence = {} if setup.classes is None else {ADHERENCE: float(
        (logits.argmax(dim=1) == torch.from_numpy(setup.classes[np.asarray(setup.data["labels"])])).float().mean())}
    return {"model": spec.name, "steps": spec.steps, "nfe": spec.nfe, "fid": vs_real["fid"],
            "fid_sd": vs_real["fid_sd"], "fid_vs_teacher": fid_from_features(feats, teacher, dev),
            "fid_vs_teacher_sd": float(bootstrap_fid(feats, teacher, setup.bootstrap, 0, dev).std()),
            "mse_vs_teacher": float(sq.mean()), "mse_vs_teacher_se": float(sq.std() / len(sq) ** 0.5),
            "is": vs_real["is"], "precision": vs_real["precision"], "recall": vs_real["recall"],
            "num_samples": len(sq), "sec_per_image": sec, "decode_sec_per_image": row.decode_seconds / len(sq),
            "gflops_per_image": gflops,
            "timesteps": [int(t) for t in spec.timesteps], "noise_correction": spec.noise_correction, **adherence,
            **clip}


def report_markdown(rows: list[dict], floors: dict[str, float], settings: dict) -> str:
    """report.md: the rows' table and what its numbers are (the first row is the reference, the K-step teacher);
    latent rows add the VAE's decoding time apart from the sampling's, text stores the text encoder's per prompt."""
    undistilled = [r for r in rows[1:] if r["model"] == rows[0]["model"]]
    n = rows[0]["num_samples"]
    note = (f"{n} samples per model, the same noises and labels for every row; ± is the bootstrap sd of FID "
            "and the standard error of the MSE. " + "".join(
                f"The undistilled teacher at {r['steps']} steps samples at the students' boundary timesteps "
                f"{', '.join(str(t) for t in r['timesteps'][:-1])}. " for r in undistilled) +
            f"Noise floors: FID vs teacher {floors['teacher']:.2f} (the teacher's {n} samples against {n} more "
            f"from independent noises and labels), FID vs real {floors['real']:.2f} (two random halves of the "
            "real reference). samples.png: one row per model in the table's order, one noise and label per column.")
    if settings.get("text_encoder_sec_per_prompt") is not None:
        seconds = settings["text_encoder_sec_per_prompt"]
        note += (f" Text: each prompt encoded once, into the store, in {seconds:.2e} s (the encoding's machine); "
                 "s / image is the transformer's sampling alone.")
    columns = (REPORT_COLUMNS + ((DECODE,) if settings.get("vae") else ())
               + ((ADHERENCE,) if ADHERENCE in rows[0] else ()) + ((CLIP,) if CLIP in rows[0] else ()))
    return metrics_table(rows, columns) + "\n\n" + note + "\n"


def write_report(out_dir: Path, report: dict, grid: list[torch.Tensor], grid_samples: int, wandb: bool) -> None:
    """report.json, report.md, samples.png (one row of `grid_samples` images per model), the W&B log."""
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out_dir / "report.md", report_markdown(report["rows"], report["noise_floor"], report["settings"]))
    names = [f"{r['model']}, {r['steps']} steps" for r in report["rows"]]
    picture = save_png(label_rows(image_grid(torch.cat(grid), nrow=grid_samples), names), out_dir / "samples.png")
    if wandb:
        _log_wandb(out_dir, report, picture)


def evaluate(
    students: dict[str, str] | None = None,
    teacher: str = str(DIGITS_TEACHER),
    teacher_size: str | None = None,
    store: str | None = None,
    numerics: Numerics | None = None,
    teacher_steps: StepCount | None = None,
    guidance_scale: NonNegative | None = None,
    spacing: TimestepSpacing | None = None,
    clip_sample: bool | None = None,
    cfg_channels: CfgChannels | None = None,
    precision: Precision | None = None,
    allow_store_mismatch: bool = False,
    undistilled_steps: list[StepCount] | None = None,
    noise_correction: bool = False,
    num_samples: SampleCount = 1000,
    seed: NonNegativeInt = 10_000,
    reference: str = "digits",
    extractor: str = "digits",
    vae: str | None = None,
    latent_scale: Positive = LATENT_SCALE,
    latent_shift: Finite = 0.0,
    bootstrap: AtLeastTwo = 10,
    batch_size: AtLeastOne = 500,
    device: str | None = None,
    export_npz: bool = False,
    out: str = "runs/eval",
    cache_dir: str = "runs/cache",
    grid_samples: AtLeastOne = 10,
    clip: str | None = None,
    wandb: bool = True,
) -> list[dict]:
    """Evaluate the teacher and students on one shared evaluation set; write report.json and report.md.

    The numeric options declare their ranges in their annotations (ard.checks range types, StepCount, SampleCount):
    ard-eval refuses a value out of range as it parses it, and a Python call before anything is loaded.

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
        num_samples: size of the evaluation set (papers: 50,000); at least MIN_IMAGES (precision/recall).
        seed: seed of its noises and labels (different from the training store's seed: held out).
        reference: "digits" (all 1797 real digits) or the path of an ADM reference batch .npz
            (e.g. VIRTUAL_imagenet256_labeled.npz; its mu/sigma give FID, its images precision/recall).
        extractor: "digits" (the shipped digit classifier) or the path of torch-fidelity's FID Inception
            weights (weights-inception-2015-12-05-6726825d.pth; needs the `gpu` extra).
        vae: diffusers AutoencoderKL directory that decodes latent samples to images (latent teachers).
        latent_scale: the teacher's latents are latent_scale times the VAE's (minus latent_shift).
        latent_shift: the VAE's shift (SD3's: 0.0609, its config's shift_factor; with latent_scale 1.5305).
        bootstrap: resamples for the FID standard deviations (at least 2: a spread).
        batch_size: images per sampling (and decoding, feature) batch.
        device: where sampling and features run (default: cuda when available, else cpu).
        export_npz: also write each row's samples as an ADM batch, <out>/npz/<row>.npz.
        out: output directory (report.json, report.md, samples.png).
        cache_dir: where the evaluation set and reference statistics are cached.
        grid_samples: columns of samples.png (one row per model, same noises and labels).
        clip: a local CLIP directory (transformers CLIPModel + CLIPProcessor): every row's CLIP score against its
            prompts (text stores only; ard/metrics/clip.py).
        wandb: log the table and the picture to W&B (offline).
    """
    check_knobs(evaluate, locals())  # the ranges in the annotations (first thing: locals() holds the arguments)
    out_dir, cache = Path(out), Path(cache_dir)
    check_writable(out_dir, "out")
    check_writable(cache, "cache_dir")
    if reference == "digits" and extractor != "digits":
        raise ValueError("reference 'digits' needs extractor 'digits'; pass an ADM reference .npz for Inception")
    if reference != "digits":
        check_npz_images(reference, MIN_IMAGES)  # its format, before anything is loaded or sampled
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = make_extractor(extractor).to(dev)
    given = dict(num_steps=teacher_steps, timestep_spacing=spacing, guidance_scale=guidance_scale,
                 clip_sample=clip_sample, cfg_channels=cfg_channels, precision=precision)
    teacher_model, identity, solver, manifest = resolve_teacher(teacher, teacher_size, store, numerics, given,
                                                                allow_store_mismatch)
    conditions = Conditions.of(teacher_model, manifest, store)
    clip_score = clip_metric(clip, conditions)  # (loaded, or refused in one line, before anything is sampled)
    teacher_model = teacher_model.to(dev)
    if teacher_model.config.in_channels not in (1, 3) and vae is None:
        raise ValueError(f"the teacher makes {teacher_model.config.in_channels}-channel latents: pass vae "
                         "(a diffusers AutoencoderKL directory)")
    decode = make_decoder(vae, latent_scale, batch_size, dev, latent_shift)
    specs = build_rows(teacher_model, solver, students or {}, undistilled_steps, noise_correction, dev, conditions)
    config = teacher_model.config
    size = tuple(decode(torch.zeros(1, config.in_channels, config.sample_size, config.sample_size,
                                    device=dev)).shape[2:])  # (H, W) of the images
    real = (reference_from_images(digits_images("all"), features, cache) if reference == "digits"
            else reference_from_adm_npz(reference, features, cache, image_size=size))
    setup = Setup(eval_set(teacher_model, identity, solver, num_samples, seed, batch_size, cache, dev, conditions),
                  decode, features, real, dev, solver["precision"], batch_size, bootstrap, grid_samples, size,
                  out_dir / "npz" if export_npz else None, conditions.classes if extractor == "digits" else None,
                  clip_score, conditions.prompts)

    rows, grid, floors = [], [], {"real": fid_noise_floor(real.features)}
    for spec in specs:
        row, sec = stream(spec, setup)
        if spec.reference:  # the first row: every row's FID vs teacher is against its features
            teacher_stats = FeatureStats.of(row.gathered()[0])
            floors["teacher"] = teacher_floor(setup, teacher_stats)
        rows.append(report_row(spec, row, sec, teacher_stats, setup))
        grid.append(torch.cat(row.grid))
        del row  # one row's features at a time
        print(f"evaluated {spec.name} ({spec.steps} steps): FID {rows[-1]['fid']:.2f}, "
              f"FID vs teacher {rows[-1]['fid_vs_teacher']:.2f}, MSE {rows[-1]['mse_vs_teacher']:.4f}")

    settings = {"teacher": teacher, "teacher_identity": identity, "store": store, "solver": solver,
                "teacher_steps": solver["num_steps"], "guidance_scale": solver["guidance_scale"],
                "spacing": solver.get("timestep_spacing"), "num_samples": num_samples, "seed": seed,
                "reference": reference, "extractor": features.identity, "vae": vae,
                "latent_scale": latent_scale, "latent_shift": latent_shift, "precision": solver["precision"],
                "device": str(dev), "students": students or {},
                "conditioning": "class" if conditions.prompts is None else "text",
                "text_encoder_sec_per_prompt": conditions.encoder_seconds}
    write_report(out_dir, {"rows": rows, "noise_floor": floors, "noise_floor_method": NOISE_FLOOR_METHOD,
                           "settings": settings}, grid, grid_samples, wandb)
    return rows


def _log_wandb(out_dir: Path, report: dict, picture: Path) -> None:
    import wandb

    run = wandb.init(project="ard-eval", dir=str(out_dir), mode="offline", config=report["settings"])
    table = wandb.Table(columns=list(REPORT_KEYS), data=[[r[k] for k in REPORT_KEYS] for r in report["rows"]])
    run.log({"report": table, "samples": wandb.Image(str(picture))})
    run.finish()


_KEY = re.compile(r'^Parser key "([^"]+)":', re.M)
_VALUE = re.compile(r"(?:Got|Given) value: (.*)$", re.M)


def parse_error(message: str) -> str:
    """jsonargparse's error about an option as one line: ard.cli.one_line's (the key and every reason), with the
    value given when that does not name it, and for a value written as JSON (`{...}`, `[...]`) that does not
    parse, `--option=value: not valid JSON: <the decoder's message and position>` instead."""
    key, values, line = _KEY.search(message), _VALUE.findall(message), one_line(message)
    if not (key and values):
        return line
    value = values[-1]
    if "Given value type: <class 'str'>" in message and value.lstrip()[:1] in ("{", "["):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            return f"--{key.group(1)}={value}: not valid JSON: {e}"
    return line if f"Got value: {value}" in line else f"{line}; got {value}"


class EvalArgumentParser(ArgumentParser):
    """ard-eval's parser: the ranges declared in `evaluate`'s annotations are checked as soon as the options are
    parsed (naming `--option`), and a bad option stops with `ard-eval: error: <one line>` (parse_error), not the
    usage."""

    def parse_args(self, *args, **kwargs):
        config = super().parse_args(*args, **kwargs)
        try:
            check_knobs(evaluate, dict(config.items()), "--")
        except ValueError as e:  # already one line (one_line would take the leading "--" for a list bullet)
            raise SystemExit(f"ard-eval: error: {e}") from None
        return config

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        raise SystemExit(f"ard-eval: error: {parse_error(message)}")


def main(args: list[str] | None = None) -> None:
    import os

    from jsonargparse import auto_cli

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        auto_cli(evaluate, args=args, as_positional=False, parser_class=EvalArgumentParser)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"ard-eval: error: {e}") from None


if __name__ == "__main__":
    main()
