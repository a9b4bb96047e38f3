"""The error that exposure bias causes, measured directly (docs/method.md, "Exposure bias").

Per student step s, the distance between the student's state x_hat_{tau_{s+1}} and the teacher's state of
the same trajectory, when the student is fed the teacher's states (teacher forcing: the error of one step
alone) and when it runs on its own states from the trajectory's noise (inference: the error of that step
plus everything its earlier steps left behind). The gap between the two is what the student's own states
add, and the most that history could remove.
"""
from __future__ import annotations

import torch

from ard.student.model import ARDStudent
from ard.student.sampling import sample


@torch.no_grad()
def exposure_errors(student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                    noise_correction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """trajectory (B, S+1, C, H, W) the teacher's states at the student's boundaries; timesteps (B, S+1);
    labels (B,). Returns the per-pixel mean squared distance to the teacher's x_{tau_{s+1}}, (B, S) each, of
    the teacher-forced pass and of the student's own S-step rollout (KV cache) from x_T."""
    target = trajectory[:, 1:].float()  # (B, S, C, H, W)
    fed = student(trajectory[:, :-1], timesteps, labels).float()  # (B, S, C, H, W)
    own = sample(student, trajectory[:, 0], labels, timesteps, noise_correction)[:, 1:].float()  # (B, S, C, H, W)
    return (fed - target).square().flatten(2).mean(2), (own - target).square().flatten(2).mean(2)  # (B, S) each
