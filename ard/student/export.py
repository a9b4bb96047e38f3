"""A standalone student on disk: its weights (`ARDStudent.save_pretrained`) plus `ard_sampling.json`, the
boundary timesteps it samples at, the recipe it was trained with (provenance) and, for a student trained with
noise correction, `"noise_correction": true` (how it is meant to be sampled; absent: off), so that sampling and
evaluation need neither the teacher, nor the store, nor a Lightning module.

    <dir>/config.json, diffusion_pytorch_model.safetensors   the diffusers transformer
    <dir>/ard_student.json, ard_student.safetensors          ARD settings, per-step heads and history gates
    <dir>/ard_sampling.json                                   {"timesteps": [tau_0, ..., tau_S = CLEAN], "recipe": {...}}
                                                              (+ "noise_correction": true)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from ard.atomic import atomic_directory
from ard.checks import check_finite_weights, check_timesteps
from ard.schedules import schedule_from_settings
from ard.student.model import SETTING_TYPES, ARDStudent

SAMPLING_CONFIG = "ard_sampling.json"  # beside an exported student: its boundary timesteps and training recipe


def export_student(student: ARDStudent, timesteps: list[int], directory: str | Path, recipe: dict,
                   noise_correction: bool = False) -> Path:
    """Write `student` (its current weights) as a standalone directory, atomically: readers never see a student
    without its timesteps. `recipe`: how it was trained (JSON-serialisable), kept as provenance.
    noise_correction: it was trained with the first-step noise correction, so it is meant to be sampled with it
    (recorded only when true: the file of a student without it is unchanged)."""
    check_finite_weights(student.state_dict(), f"export to {directory} (not written)")
    with atomic_directory(directory) as tmp:
        student.save_pretrained(tmp)
        settings = {"timesteps": list(timesteps), "recipe": recipe}
        if noise_correction:
            settings["noise_correction"] = True
        (tmp / SAMPLING_CONFIG).write_text(json.dumps(settings) + "\n")
    return Path(directory)


def load_exported(directory: str | Path, tie_embedders: bool | None = None) -> tuple[ARDStudent, list[int]]:
    """A standalone student directory (export_student) -> (student in eval mode, boundary timesteps).
    tie_embedders: one timestep + label embedder for every block (ARDStudent.from_pretrained; None: where the
    saved copies are equal)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"student directory not found: {directory}")
    try:
        student = ARDStudent.from_pretrained(directory, tie_embedders)
    except (OSError, RuntimeError) as e:  # diffusers: a weights file missing or unreadable
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{directory}: student weights missing or unreadable ({str(e).strip().splitlines()[0]})") from None
    check_finite_weights(student.state_dict(), str(directory))
    path = directory / SAMPLING_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (export the student with scripts/sample_student.py export)")
    try:
        timesteps = json.loads(path.read_text())["timesteps"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: expected JSON with a list field 'timesteps'") from None
    if not isinstance(timesteps, list) or len(timesteps) != student.num_steps + 1:
        raise ValueError(f"{path}: 'timesteps' must list {student.num_steps + 1} time labels for a "
                         f"{student.num_steps}-step student")
    return student, check_timesteps(timesteps, f"{path}: field 'timesteps'", student.schedule.kind)


def exported_noise_correction(directory: str | Path) -> bool:
    """Whether the exported student in `directory` was trained with noise correction (its ard_sampling.json's
    "noise_correction"; absent: False), i.e. is meant to be sampled with it."""
    path = Path(directory) / SAMPLING_CONFIG
    try:
        value = json.loads(path.read_text()).get("noise_correction", False)
    except (OSError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not readable as JSON with an optional boolean field 'noise_correction'") from None
    if not isinstance(value, bool):
        raise ValueError(f"{path}: field 'noise_correction' must be true or false, got {value!r}")
    return value


class CheckpointStudent(NamedTuple):
    """What `load_checkpoint_student` reads from an `ard fit` checkpoint."""
    student: ARDStudent  # in eval mode, the EMA weights where the run kept them
    timesteps: list[int]  # its S + 1 boundary timesteps, the last CLEAN
    recipe: dict  # the training recipe (provenance)
    noise_correction: bool  # trained with the first-step noise correction: sampled with it


def load_checkpoint_student(path: str | Path) -> CheckpointStudent:
    """The student of an `ard fit` checkpoint with its `state_dict` weights (the EMA weights when it was trained
    with EMAWeightAveraging; the raw ones are under `current_model_state`), its boundary timesteps and the
    training recipe (ard.student.recipe: `hyper_parameters.recipe`, or its six keys flat in checkpoints written
    before it was grouped) and whether it was trained with noise correction. Read weights-only (ard.checkpoints); the student is rebuilt from the checkpoint's
    teacher and student settings, without the Lightning module. Its embedders are tied as the run's
    `tie_embedders` says; unrecorded (None, or a checkpoint of an earlier version): tied unless the student's
    per-block copies differ (a student distilled with one embedder per block is loaded so). One-line errors for
    anything else."""
    from ard.checkpoints import load_checkpoint
    from ard.student.recipe import Recipe
    from ard.backbones.dit_embedders import first_differing_embedder
    from ard.teacher import load_teacher

    checkpoint = load_checkpoint(path)
    timesteps, state = checkpoint.get("boundary_timesteps"), checkpoint.get("state_dict")
    hparams = checkpoint.get("hyper_parameters", {})
    if timesteps is None or state is None or "teacher" not in hparams:
        raise ValueError(f"{path}: no boundary timesteps, state_dict or teacher in the checkpoint (not written by "
                         "`ard fit` of a distillation module)")
    recipe = hparams.get("recipe", {k: hparams[k] for k in Recipe.__dataclass_fields__ if k in hparams})
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: field 'hyper_parameters.recipe' must be a mapping, got {type(recipe).__name__}")
    settings = {k: hparams[k] for k in SETTING_TYPES if k in hparams}  # ARDStudent's knobs
    weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    tie = hparams.get("tie_embedders")
    if tie is None and first_differing_embedder(weights, "transformer.") is not None:
        tie = False  # distilled with one embedder per block: loaded so
    try:
        teacher = load_teacher(hparams["teacher"], hparams.get("teacher_size"), hparams.get("numerics"), tie)
        student = ARDStudent(teacher, **settings, schedule=schedule_from_settings(checkpoint.get("schedule")))
        try:
            student.load_state_dict(weights)
        except ValueError as e:  # a tied student, weights with one embedder per block (tie_embedders=True)
            raise ValueError(f"{path}: {e}") from None
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: does not fit an ARD student ({str(e).strip().splitlines()[0][:200]})") from None
    return CheckpointStudent(student.eval(), check_timesteps(list(timesteps), f"{path}: field 'boundary_timesteps'",
                                                             student.schedule.kind),
                             dict(recipe), hparams.get("noise_correction", False) is True)
