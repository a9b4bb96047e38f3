"""Lightning checkpoints read safely: never unpickled beyond tensors and plain containers, one-line errors
for files that are not checkpoints, and a resume that refuses changed hyperparameters.

`ResumeCheck` is a callback the `ard` command always adds (`--resume.override true` turns its comparison
off): at setup it gives the trainer's strategy a `SafeCheckpointIO`, which loads `ckpt_path` (e.g. `last`)
with `torch.load(weights_only=True)` whatever the torch default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says,
and compares the checkpoint's model and data hyperparameters with this run's before anything is restored (after
the module's `upgrade_checkpoint(checkpoint, path)`, where it has one, brought a checkpoint of an earlier layout
to today's or refused it in one line).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Hyperparameters that may change on resume without changing what is trained.
RESUME_FREE = frozenset({"num_workers"})


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """torch.load(weights_only=True) of a checkpoint file; one-line ValueError naming it when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused: holds objects other than tensors and plain containers, which are "
                         f"never unpickled ({reason[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint


def first_changed(saved: dict, current: dict) -> tuple[str, Any, Any] | None:
    """(name, saved value, current value) of the first hyperparameter that differs (RESUME_FREE excepted)."""
    for name in sorted(set(saved) | set(current)):
        if name not in RESUME_FREE and saved.get(name) != current.get(name):
            return name, saved.get(name), current.get(name)
    return None


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose loading is weights-only and, unless `override`, refuses a resume whose model or
    data hyperparameters differ from the checkpoint's."""

    def __init__(self, trainer: L.Trainer, override: bool):
        super().__init__()
        self.trainer, self.override = trainer, override

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        checkpoint = load_checkpoint(path, map_location or "cpu")
        trainer = self.trainer
        upgrade = getattr(trainer.lightning_module, "upgrade_checkpoint", None)
        if upgrade is not None:  # a checkpoint of an earlier layout: today's, or a one-line refusal saying why
            checkpoint = upgrade(checkpoint, str(path))
        if self.override:
            return checkpoint
        for key, saved_key, obj in (("model", "hyper_parameters", trainer.lightning_module),
                                    ("data", "datamodule_hyper_parameters", trainer.datamodule)):
            if obj is None or saved_key not in checkpoint:
                continue
            changed = first_changed(dict(checkpoint[saved_key]), dict(obj.hparams))
            if changed:
                name, old, new = changed
                raise ValueError(f"{path}: {key}.{name} is {old!r} in the checkpoint but {new!r} in this run: resume "
                                 f"with the checkpoint's value, use another trainer.default_root_dir, or pass "
                                 "--resume.override true to resume with the new value")
        return checkpoint


class ResumeCheck(L.Callback):
    """Loads the resumed checkpoint weights-only and checks its hyperparameters (see the module docstring)."""

    def __init__(self, override: bool = False):
        """
        Args:
            override: resume even when the model's or data's hyperparameters differ from the checkpoint's
                (the new values are used; weights that no longer fit still fail to load).
        """
        self.override = override

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.strategy.checkpoint_io = SafeCheckpointIO(trainer, self.override)
