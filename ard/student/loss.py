"""Per-step regression loss of the ARD student (ARD sec. 3.3), EDM2-style: a small callable returning
the unreduced loss, so the caller chooses step weights and reduction (and logs each step's loss)."""
from __future__ import annotations

import torch

from ard.student.model import ARDStudent


class StepMSELoss:
    """Mean squared error between predicted and teacher states at each student step.

    __call__(student, trajectory (B, S+1, C, H, W), timesteps (B, S+1), labels (B,)) -> loss (B, S):
    the student is fed the teacher's states x_{tau_0..tau_{S-1}} (teacher forcing, one pass) and
    regresses x_{tau_1..tau_S}; loss[b, s] = mean over (C, H, W) of the squared error of step s.
    """

    def __call__(self, student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        pred = student(trajectory[:, :-1], timesteps, labels)  # (B, S, C, H, W)
        return (pred.float() - trajectory[:, 1:].float()).square().flatten(2).mean(dim=2)  # (B, S)
