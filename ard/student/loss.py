"""Per-step regression loss of the ARD student (ARD sec. 3.3), EDM2-style: a small callable returning
the unreduced loss, so the caller chooses step weights and reduction (and logs each step's loss).

The recipe (what the student is fed, what it regresses) is in ard/student/recipe.py; SRL's retention and step
weights in ard/student/srl.py."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ard.diffusion import CfgChannels
from ard.schedules import Schedule, VPSchedule
from ard.student.model import ARDStudent
from ard.student.recipe import TargetKind, shifted_reconstruction, teacher_from_state
from ard.student.srl import SRLWeights, snr_weights


class StepLosses(NamedTuple):
    """One pass's per-step losses (StepMSELoss.terms)."""

    loss: torch.Tensor  # (B, S) the objective of each step: the target's MSE (+ srl_weight * weighted SRL)
    states: torch.Tensor  # (B, S, C, H, W) the predicted next states, with their graph
    target: torch.Tensor | None  # (B, S) MSE to the trajectory / teacher_from_state target (None under SRL alone)
    srl: torch.Tensor | None  # (B, S) SRL's x0-space MSE, unweighted (None without SRL)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-step mean squared error (B, S) of (B, S, C, H, W) tensors, in fp32."""
    return (pred.float() - target.float()).square().flatten(2).mean(dim=2)  # (B, S)


@contextmanager
def unclipped(student: ARDStudent):
    """The student's forward without its x0 clipping (clip_x0), restored on exit."""
    clip, student.clip_x0 = student.clip_x0, False
    try:
        yield student
    finally:
        student.clip_x0 = clip


def clipped_states(schedule: Schedule, inputs: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor,
                   noise_correction: bool = False) -> torch.Tensor:
    """The next states (B, S, C, H, W) of a clip_x0 student from its unclipped x0-predictions x0 (B, S, C, H, W) at
    inputs (B, S, C, H, W), timesteps (B, S+1): the epsilon that x0 implies, then the schedule's jump with x0
    clamped to [-1, 1] (ARDStudent's clip_x0), step 0's direction term x_T under noise correction."""
    x = inputs.to(x0.dtype)  # (B, S, C, H, W)
    if schedule.kind == "vp":  # as DDIM: sqrt of alpha_bar in the states' dtype
        a = schedule.alpha_bar(timesteps[:, :-1]).to(x0.dtype)[..., None, None, None]  # (B, S, 1, 1, 1)
        b = schedule.alpha_bar(timesteps[:, 1:]).to(x0.dtype)[..., None, None, None]  # (B, S, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # (B, S, C, H, W)
        a_to, b_to = b.sqrt(), (1 - b).sqrt()  # (B, S, 1, 1, 1) each
    else:
        a, b = (c.to(x0.dtype)[..., None, None, None] for c in schedule.coefficients(timesteps[:, :-1]))
        eps = (x - a * x0) / b  # (B, S, C, H, W)
        a_to, b_to = (c.to(x0.dtype)[..., None, None, None] for c in schedule.coefficients(timesteps[:, 1:]))
    direction = torch.cat([x[:, :1], eps[:, 1:]], dim=1) if noise_correction else eps  # (B, S, C, H, W)
    return a_to * x0.clamp(-1, 1) + b_to * direction  # (B, S, C, H, W)


class StepMSELoss:
    """Mean squared error between the student's predictions and their targets at each student step.

    __call__(student, trajectory (B, S+1, C, H, W), timesteps (B, S+1), labels (B,), inputs=None, teacher=None,
    generator=None, return_states=False) -> loss (B, S) (and with return_states the predicted next states
    (B, S, C, H, W), with their graph): one pass of the student over `inputs` (B, S, C, H, W) (default: the
    teacher's states x_{tau_0..tau_{S-1}}, teacher forcing), regressing, per `targets`,
        trajectory:             x_{tau_1..tau_S} of the trajectory;
        teacher_from_state:     the frozen `teacher`'s DDIM from each input state to the next boundary;
        shifted_reconstruction: (in x0 space) the teacher's x0-estimate of the student's re-noised x0 (SRL).
    loss[b, s] = mean over (C, H, W) of the squared error of step s; SRL's is weighted per step by `srl_weights`
    ("uniform": 1; "snr": ard.student.srl.snr_weights) and, with `srl_weight` > 0, added times srl_weight to the
    trajectory / teacher_from_state error. SRL regresses the student's unclipped x0 (a clip_x0 student's next
    states stay clipped). `terms` returns the parts as well (StepLosses).
    noise_correction: the student's step 0 jumps with x_T as its direction term (ARDStudent.forward) and the
    teacher_from_state target of step 0 is the teacher's path from x_T with the same correction.
    """

    def __init__(self, targets: TargetKind = "trajectory", guidance_scale: float = 1.0, clip_sample: bool = False,
                 substep_paths: torch.Tensor | None = None, srl_shift: float = 1.0, cfg_channels: CfgChannels = "all",
                 srl_timesteps: Sequence[int] | None = None, srl_weights: SRLWeights = "uniform",
                 srl_weight: float = 0.0, noise_correction: bool = False, schedule: Schedule | None = None):
        self.targets = targets  # a TargetKind, checked by the caller
        self.guidance_scale = guidance_scale  # the teacher's CFG scale (the store's)
        self.clip_sample = clip_sample  # the teacher's x0 clipping (the store's)
        self.substep_paths = substep_paths  # (S, m+1) sub-step timesteps (teacher_from_state)
        self.srl_shift = srl_shift  # gamma of recipe.shift_timesteps (SRL without a table)
        self.cfg_channels = cfg_channels  # which channels the teacher's CFG guides (the store's)
        self.srl_timesteps = None if srl_timesteps is None else list(srl_timesteps)  # SRL's tau'_s per step
        self.srl_weights = srl_weights  # SRL's per-step weights: "uniform" or "snr"
        self.srl_weight = srl_weight  # weight of SRL added to the other targets (0: none)
        self.noise_correction = noise_correction  # step 0's direction term is x_T (student and teacher_from_state)
        self.schedule = schedule or VPSchedule()  # the store's teacher's (teacher_from_state, clipped states)

    @property
    def uses_srl(self) -> bool:
        return self.targets == "shifted_reconstruction" or self.srl_weight > 0

    def __call__(self, student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor,
                 labels: torch.Tensor, inputs: torch.Tensor | None = None, teacher=None,
                 generator: torch.Generator | None = None, return_states: bool = False):
        out = self.terms(student, trajectory, timesteps, labels, inputs, teacher, generator)
        return (out.loss, out.states) if return_states else out.loss

    def terms(self, student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
              inputs: torch.Tensor | None = None, teacher=None,
              generator: torch.Generator | None = None) -> StepLosses:
        """The per-step losses with their parts and the predicted next states (StepLosses)."""
        inputs = trajectory[:, :-1] if inputs is None else inputs  # (B, S, C, H, W)
        nc = self.noise_correction
        x0 = None
        if self.uses_srl:  # one pass gives the next states and the unclipped x0 that SRL regresses
            with unclipped(student):
                states, x0 = student(inputs, timesteps, labels, return_x0=True,
                                     noise_correction=nc)  # (B, S, C, H, W) each
            if student.clip_x0:
                states = clipped_states(self.schedule, inputs, x0, timesteps, nc)  # (B, S, C, H, W): the student's
        else:
            states = student(inputs, timesteps, labels, noise_correction=nc)  # (B, S, C, H, W) next states
        target = None
        if self.targets != "shifted_reconstruction":
            goal = trajectory[:, 1:] if self.targets == "trajectory" else teacher_from_state(
                teacher, self.schedule, inputs.float(), self.substep_paths, labels, self.guidance_scale,
                self.clip_sample, self.cfg_channels, nc)  # (B, S, C, H, W)
            target = mse(states, goal)  # (B, S)
        if x0 is None:
            return StepLosses(target, states, target, None)
        srl, weighted = self.srl(teacher, x0, timesteps[:, :-1], labels, generator)  # (B, S) each
        loss = weighted if target is None else target + self.srl_weight * weighted  # (B, S)
        return StepLosses(loss, states, target, srl)

    def srl(self, teacher, x0: torch.Tensor, t_from: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SRL of the student's x0-predictions x0 (B, S, C, H, W) (with their graph) at its input timesteps t_from
        (B, S): the x0-space MSE to the teacher's x0-estimate of x0 re-noised to tau'_s, unweighted and weighted
        by `srl_weights`, (B, S) each."""
        goal = shifted_reconstruction(teacher, x0.detach().float(), t_from, labels, self.guidance_scale,
                                      self.clip_sample, self.srl_shift, generator, self.cfg_channels,
                                      self.srl_timesteps)  # (B, S, C, H, W)
        srl = mse(x0, goal)  # (B, S)
        if self.srl_weights == "uniform":
            return srl, srl
        return srl, snr_weights(t_from).to(srl) * srl  # (B, S) each
