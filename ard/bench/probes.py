"""Post-hoc measurements of a trained student, added to its evaluation row: the exposure bias (per-step error fed
the teacher's states and on its own), the opening of a closed start's history gates, and a GAN stage's
discriminator health read from its CSV log."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# The discriminator's health as the GAN stage (ard.modules.distill_gan.ARDGANDistillation) logs it, and the window
# of the last iterations it is averaged over in the report
HEALTH = ("gan/d_loss", "gan/logits_real", "gan/logits_fake", "gan/logits_holdout", "gan/weight")
HEALTH_WINDOW = 50


def health(run_dir: Path, window: int = HEALTH_WINDOW) -> dict[str, float | None]:
    """Means of the discriminator's logged health (HEALTH) over the last `window` iterations of a GAN stage (its
    CSV logs under <run_dir>/csv; their `step` counts iterations); {} without a log."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("gan/d_loss")]
    if not rows:
        return {}
    last = max(int(r["step"]) for r in rows)
    out = {}
    for key in HEALTH:
        values = [float(r[key]) for r in rows if r.get(key) and int(r["step"]) > last - window]
        out[key.split("/")[1]] = float(np.mean(values)) if values else None
    return out


def exposure(student_dir: Path, store: Path, steps: int) -> dict[str, list[float]]:
    """Per student step, the mean squared distance to the teacher's state on the store's held-out trajectories,
    fed the teacher's states ("fed") and on its own states ("own"): ard.student.exposure."""
    from ard.data.trajectories import TrajectoryDataModule
    from ard.store.format import read_manifest
    from ard.student.export import load_exported
    from ard.student.exposure import exposure_errors

    student, timesteps = load_exported(student_dir)
    saved = read_manifest(store)["grid"]
    index = dict(zip(saved["timesteps"], saved["indices"]))  # the store's saved timesteps -> their grid indices
    data = TrajectoryDataModule(str(store), steps, batch_size=512, boundaries=[index[t] for t in timesteps])
    data.setup()
    batch = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)  # (a text store's: its prompts)
    fed, own = exposure_errors(student, batch["states"], batch["timesteps"], batch["labels"])  # (B, S) each
    return {"fed": fed.mean(0).tolist(), "own": own.mean(0).tolist()}


def history_gate(student_dir: Path) -> float | None:
    """Largest opening max(g, 0) of a closed-start student's history gates (None: no gates); at 0 the
    student computes exactly the baseline, so this says how much history the training switched on."""
    from safetensors.torch import load_file

    path = student_dir / "ard_student.safetensors"
    gate = load_file(path).get("history_gate") if path.exists() else None
    return None if gate is None else float(gate.clamp(min=0).max())
