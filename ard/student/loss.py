"""Per-step regression loss of the ARD student (ARD sec. 3.3), EDM2-style: a small callable returning
the unreduced loss, so the caller chooses step weights and reduction (and logs each step's loss).

The recipe (what the student is fed, what it regresses) is in ard/student/recipe.py."""
from __future__ import annotations

import torch

from ard.diffusion import CfgChannels
from ard.student.model import ARDStudent
from ard.student.recipe import TargetKind, shifted_reconstruction, teacher_from_state


class StepMSELoss:
    """Mean squared error between the student's predictions and their targets at each student step.

    __call__(student, trajectory (B, S+1, C, H, W), timesteps (B, S+1), labels (B,), inputs=None, teacher=None,
    generator=None, return_states=False) -> loss (B, S) (and with return_states the predicted next states
    (B, S, C, H, W), with their graph): one pass of the student over `inputs` (B, S, C, H, W) (default: the
    teacher's states x_{tau_0..tau_{S-1}}, teacher forcing), regressing, per `targets`,
        trajectory:             x_{tau_1..tau_S} of the trajectory;
        teacher_from_state:     the frozen `teacher`'s DDIM from each input state to the next boundary;
        shifted_reconstruction: (in x0 space) the teacher's x0-estimate of the student's re-noised x0.
    loss[b, s] = mean over (C, H, W) of the squared error of step s.
    """

    def __init__(self, targets: TargetKind = "trajectory", guidance_scale: float = 1.0, clip_sample: bool = False,
                 substep_paths: torch.Tensor | None = None, srl_shift: float = 1.0, cfg_channels: CfgChannels = "all"):
        self.targets = targets  # a TargetKind, checked by the caller
        self.guidance_scale = guidance_scale  # the teacher's CFG scale (the store's)
        self.clip_sample = clip_sample  # the teacher's x0 clipping (the store's)
        self.substep_paths = substep_paths  # (S, m+1) sub-step timesteps (teacher_from_state)
        self.srl_shift = srl_shift  # gamma of recipe.shift_timesteps (shifted_reconstruction)
        self.cfg_channels = cfg_channels  # which channels the teacher's CFG guides (the store's)

    def __call__(self, student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor,
                 labels: torch.Tensor, inputs: torch.Tensor | None = None, teacher=None,
                 generator: torch.Generator | None = None, return_states: bool = False):
        inputs = trajectory[:, :-1] if inputs is None else inputs  # (B, S, C, H, W)
        if self.targets == "shifted_reconstruction":
            states, pred = student(inputs, timesteps, labels, return_x0=True)  # (B, S, C, H, W) each: x0 regressed
            target = shifted_reconstruction(teacher, pred.detach().float(), timesteps[:, :-1], labels,
                                            self.guidance_scale, self.clip_sample, self.srl_shift, generator,
                                            self.cfg_channels)
        else:
            states = pred = student(inputs, timesteps, labels)  # (B, S, C, H, W) next states
            target = trajectory[:, 1:] if self.targets == "trajectory" else teacher_from_state(
                teacher, inputs.float(), self.substep_paths, labels, self.guidance_scale, self.clip_sample,
                self.cfg_channels)
        loss = (pred.float() - target.float()).square().flatten(2).mean(dim=2)  # (B, S)
        return (loss, states) if return_states else loss
