"""Prompt adherence and FID against real digits of a digits teacher, at several guidance scales (DDIM, K steps,
leading spacing; or, `--schedule flow`, a flow teacher's Euler on sigma_k = 1 - k / K). Prints JSON.

Adherence is class agreement: the share of its samples the shipped digit classifier assigns to the digit they were
asked for: the class label of a class-conditional DiT, the digit of the caption of a text teacher (the captions of
ard/data/captions.py, balanced over digits and captions, encoded as the teacher was trained). FID against the real
digits (all 1797) uses the same classifier's features, as `ard-eval`.

    python scripts/bench_teacher.py [--teacher ard/assets/digits_teacher] [--num-samples 1000] [--guidance 1.5 2 3]
        [--grid docs/teacher_samples.png]   (a grid of the first guidance scale's samples: one column per class)
        [--schedule flow]                   (a rectified-flow teacher: configs/digits_flow/teacher.yaml)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ard.backbones import SERVED, TEXT, backbone_of
from ard.data.captions import TEMPLATES, CaptionConditions
from ard.data.digits import to_uint8
from ard.diffusion import flow_solver_identity, solve, solver_identity, trajectory_inputs
from ard.metrics import DigitFeatures, digits_images, fid_between
from ard.metrics.classifier import load_digit_classifier
from ard.teacher import DIGITS_TEACHER, load_teacher
from ard.text_encoders import load_text_encoder
from ard.viz import image_grid, save_png

ROOT = Path(__file__).resolve().parents[1]


def conditions(teacher, labels: torch.Tensor):
    """The teacher's condition of digit labels: the labels, or (a text teacher) captions of those digits, every
    caption equally often (sample i gets caption (i // 10) mod len(TEMPLATES) of its digit)."""
    if backbone_of(teacher).family not in TEXT:
        return labels
    captions = CaptionConditions(load_text_encoder("hash", teacher.config.caption_channels))
    return captions(labels, torch.arange(len(labels)) // 10 % len(TEMPLATES))


def class_agreement(teacher, classifier, num_samples: int, guidance: float, steps: int, seed: int,
                    grid: str | None = None, schedule: str = "vp") -> dict:
    noise, _ = trajectory_inputs(seed, range(num_samples), (1, 8, 8), 10)
    labels = torch.arange(num_samples) % 10  # balanced: num_samples / 10 per class
    condition = conditions(teacher, labels)
    solver = (solver_identity(steps, "leading", guidance, True, "all", "fp32") if schedule == "vp"
              else flow_solver_identity(steps, 1.0, guidance, True, "fp32"))
    start = time.perf_counter()
    final = torch.cat([solve(teacher, solver, noise[a:a + 500], condition[a:a + 500],
                             save_indices=[steps]).states[:, -1] for a in range(0, num_samples, 500)])  # (N, 1, 8, 8)
    seconds = time.perf_counter() - start
    if grid:
        save_png(image_grid(final[:100], nrow=10), grid)  # 10 rows of the classes 0..9
    with torch.no_grad():
        predicted = classifier(to_uint8(final)).argmax(dim=1)  # (N,)
    per_class = [float((predicted[labels == c] == c).float().mean()) for c in range(10)]
    fid = fid_between(to_uint8(final), digits_images("all"), DigitFeatures())
    return {"guidance_scale": guidance, "steps": steps, "solver": solver["name"], "num_samples": num_samples,
            "class_agreement": float((predicted == labels).float().mean()), "per_class": per_class,
            "fid_vs_real": fid, "sec_per_image": seconds / num_samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(DIGITS_TEACHER))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--grid", help="PNG of the first guidance scale's first 100 samples")
    parser.add_argument("--schedule", choices=["vp", "flow"], default="vp",
                        help="the teacher's training schedule: vp (DDIM) or flow (Euler, shift 1)")
    args = parser.parse_args()
    teacher = load_teacher(args.teacher, families=(*SERVED, *TEXT))
    classifier, config = load_digit_classifier()
    parser_grid = [args.grid] + [None] * (len(args.guidance) - 1)
    rows = [class_agreement(teacher, classifier, args.num_samples, w, args.steps, args.seed, g, args.schedule)
            for w, g in zip(args.guidance, parser_grid)]
    teacher_path = Path(args.teacher).resolve()  # committed results name files relative to the repository
    shown = os.path.relpath(teacher_path, ROOT) if teacher_path.is_relative_to(ROOT) else args.teacher
    print(json.dumps({"teacher": shown, "schedule": args.schedule,
                      "classifier_val_accuracy": config.get("val_accuracy"), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
