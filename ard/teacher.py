"""The teacher, whatever its family: loaded through its family's adapter (ard/backbones/), identified, and checked
against what a store recorded.

`load_teacher` reads a teacher directory's config.json first (ard/backbones/files.py: the family its `_class_name`
names, `teacher_family`) and hands it to that family's adapter, which checks the config and that its safetensors
weights exist before anything is built, so a teacher that cannot be served stops in one line. `teacher_identity` is
the one definition of "the same teacher" that the store's manifest records and distillation and evaluation compare
against (`check_teacher`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from ard.backbones import SERVED, backbone, backbone_of
from ard.backbones.files import CONFIG_NAME, family_of, model_directory, read_config

ASSETS = Path(__file__).parent / "assets"
DIGITS_TEACHER = ASSETS / "digits_teacher"  # shipped EMA weights of the embedded default's teacher


def load_teacher(path: str | Path = DIGITS_TEACHER, size: str | None = None, numerics: str | None = None,
                 tie_embedders: bool | None = None, families: tuple[str, ...] = SERVED) -> nn.Module:
    """Load a teacher in eval mode, ready for distillation (the family's own condition dropout off).

    path: a diffusers-format directory (config.json + safetensors, e.g. a snapshot of
          facebook/DiT-XL-2-256, its `transformer/` subfolder or the directory itself), or, for DiT, an official
          facebookresearch/DiT checkpoint (`DiT-XL-2-256x256.pt`, converted on the fly by
          ard/backbones/dit_official.py), or a `.safetensors` file of either layout. `size` (a named size of the
          family) is required for single files and, for directories, checked against the directory's config.
          A directory's config.json and weights are checked before anything is built: a teacher that cannot be
          served stops in one line, not inside diffusers.
    numerics: None uses the checkpoint's own: "dit" for an official checkpoint, the recorded value for
          a directory (none recorded: "diffusers"). Pass "dit" for a diffusers snapshot of official
          weights (e.g. facebook/DiT-XL-2-256) to compute exactly like the official DiT.
    tie_embedders: share block 0's timestep + label embedder with every block, as the official DiT does
          (ard/backbones/dit_embedders.py; outputs and `teacher_identity` unchanged). None: tie when every block's
          copy equals block 0's (official weights, converted or a diffusers snapshot of them, anything saved tied),
          else keep one per block (a DiT trained so, such as the shipped digits teacher); True: tie, and refuse
          (one line naming the file and the key) weights whose copies differ; False: one embedder per block.
    families: the families the caller serves (text teachers: precompute only, so far).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    family = "dit"  # a single file is read as a DiT
    if path.is_dir():
        directory = model_directory(path)
        config = read_config(directory)
        family = family_of(config, directory / CONFIG_NAME)
        if family not in families:
            raise ValueError(f"{directory / CONFIG_NAME}: field '_class_name' is {config['_class_name']!r} (family "
                             f"{family!r}); this stage serves the {', '.join(map(repr, families))} family only")
    return backbone(family).load(path, size, numerics, tie_embedders)


def teacher_identity(model: nn.Module) -> dict[str, str]:
    """What a teacher computes, whatever it was loaded from (a pipeline snapshot, its transformer/ subfolder,
    an official .pt): sha256 of its weights (state dict: names, dtypes, shapes, bytes, in name order), of its
    config (the diffusers config without private keys: the path it came from, versions, the numerics flag),
    and its numerics; its family where it is not a DiT (absent for DiTs, as in stores written before other
    families). The store's manifest records it, and distillation and evaluation compare against it."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        weights.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config_bytes = json.dumps(config, sort_keys=True, default=str).encode()
    family = backbone_of(model)
    return {"weights_sha256": weights.hexdigest(), "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "numerics": family.numerics(model), **({} if family.family == "dit" else {"family": family.family})}


def check_teacher(recorded: dict, ours: dict, where: str, what: str) -> None:
    """One-line ValueError unless the `teacher_identity` `ours` is the one `recorded` (a manifest's `teacher`
    field, read at `where`; `what` names our teacher in the message). A manifest written before `numerics`
    was recorded separately counts as "diffusers" numerics (its config hash then only matches a teacher
    loaded without recorded numerics), one without `family` as a DiT's; `ours` without `family` is a DiT's."""
    recorded = {"numerics": "diffusers", "family": "dit", **recorded}
    if recorded["family"] != ours.get("family", "dit"):
        raise ValueError(f"{where}: field 'teacher.family' is {recorded['family']!r}, {what} is a "
                         f"{ours.get('family', 'dit')!r} teacher: a store of another teacher family")
    for field in ("weights_sha256", "numerics", "config_sha256"):  # numerics first: they change the config too
        if recorded.get(field) != ours[field]:
            source = f" ({recorded['path']})" if recorded.get("path") else ""
            hint = f"; load it with numerics={recorded['numerics']!r}" if field == "numerics" else ""
            raise ValueError(f"{where}: field 'teacher.{field}' is {str(recorded.get(field))[:16]!r}, {what} has "
                             f"{ours[field][:16]!r}: not the teacher the store was made with{source}{hint}")


