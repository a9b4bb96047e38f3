"""What the student is fed during distillation, and what it regresses (docs/method.md, "Training recipes").

Inputs (`InputKind`):
    teacher   the teacher's stored states x_{tau_0..tau_{S-1}} (teacher forcing, ARD sec. 3.3). The teacher's
              DDIM is a deterministic ODE solver, so its next state is a function of the current one alone:
              under teacher forcing the history carries no information about the target.
    rollout   the student's own S-step rollout from the trajectory's noise x_T (no grad, KV cache): x_T exact,
              then its own states, as at inference (SFD, Zhou et al. 2024; Self Forcing, Huang et al. 2025;
              Imagine Flash's backward iterations). The target is then no longer a function of the input
              state alone, and only history (x_T in the cache) can say where the teacher's trajectory is.
    mixed     per trajectory, the rollout with probability p, else the teacher's states (scheduled
              sampling, Bengio et al. 2015); p can ramp linearly from 0 over the first iterations.
Targets (`TargetKind`):
    trajectory              the stored teacher state x_{tau_{s+1}} of the same trajectory (no teacher at
                            training time).
    teacher_from_state      Imagine Flash's backward distillation (Kohler et al. 2024, sec. 3.2): the teacher's
                            guided DDIM from the student's own input state at tau_s to tau_{s+1}, in m sub-steps
                            on the teacher's grid (m = K / S: the teacher itself; fed the teacher's own state it
                            reproduces the stored state).
    shifted_reconstruction  Imagine Flash's shifted reconstruction loss (sec. 3.3): the student's (unclipped)
                            x0-prediction x0_s, re-noised to tau'_s with fresh noise, and the teacher's guided
                            x0-estimate of that as the target; the loss is taken in x0 space. tau'_s is the
                            per-step table `srl_timesteps` (ard/student/srl.py picks it from the target's
                            retention) or else shift(tau_s); `srl_weights` "snr" weights step s by (alpha / sigma)^2
                            (mean 1), which gives every step the same epsilon-gradient scale.
`srl_weight` > 0 adds that SRL loss, times srl_weight, to the `trajectory` or `teacher_from_state` target.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from einops import rearrange
from pydantic import Field

from ard.checks import (NUM_TRAIN_TIMESTEPS, AtLeastOne, NonNegative, NonNegativeInt, Positive, Probability,
                        check_choice, check_fields)
from ard.diffusion import CfgChannels, guided_x0, teacher_path
from ard.schedules import Schedule, VPSchedule
from ard.student.model import ARDStudent
from ard.student.sampling import sample
from ard.student.srl import SRLWeights

InputKind = Literal["teacher", "rollout", "mixed"]
TargetKind = Literal["trajectory", "teacher_from_state", "shifted_reconstruction"]
# Ranged forms of the SRL knobs (ard.checks: a knob declares its range in its annotation)
Timesteps = Annotated[list[Annotated[int, Field(ge=0, lt=NUM_TRAIN_TIMESTEPS)]], Field(min_length=1)]
SRLWeightsKnob = Annotated[SRLWeights, Field()]


@dataclass(frozen=True)
class Recipe:
    """The training recipe: what the student is fed and what it regresses (the module docstring), as
    `model.init_args.recipe` of the distillation presets. Checked here, once, when it is made."""

    inputs: InputKind = "teacher"  # the teacher's stored states (ARD), the student's own rollout, or a mix
    rollout_prob: Probability = 0.5  # "mixed": probability of rollout inputs per trajectory (after the ramp)
    rollout_ramp_steps: NonNegativeInt = 0  # "mixed": iterations over which that probability ramps up (0: constant)
    targets: TargetKind = "trajectory"  # the stored next state, the teacher run from the input, or SRL
    target_substeps: AtLeastOne | None = None  # "teacher_from_state": teacher DDIM sub-steps per step (None: K / S)
    srl_shift: Positive = 1.0  # SRL: time shift of the re-noising timestep (1: the input's)
    srl_timesteps: Timesteps | None = None  # SRL: tau'_s, one per student step (replaces srl_shift; None: shift)
    srl_weights: SRLWeightsKnob = "uniform"  # SRL: per-step weights, "uniform" or "snr" ((alpha / sigma)^2, mean 1)
    srl_weight: NonNegative = 0.0  # weight of SRL added to the trajectory / teacher_from_state target (0: off)

    def __post_init__(self):
        check_choice("recipe.inputs", self.inputs, InputKind)
        check_choice("recipe.targets", self.targets, TargetKind)
        check_fields(self, "recipe.")
        if self.srl_timesteps is not None and self.srl_shift != 1.0:
            raise ValueError(f"recipe.srl_timesteps={self.srl_timesteps}: replaces srl_shift={self.srl_shift}; set "
                             "one of them")
        if self.srl_weight > 0 and self.targets == "shifted_reconstruction":
            raise ValueError(f"recipe.srl_weight={self.srl_weight}: adds SRL to the 'trajectory' or "
                             "'teacher_from_state' targets; with targets 'shifted_reconstruction' SRL is the whole "
                             "loss (leave srl_weight at 0)")

    @property
    def uses_srl(self) -> bool:
        """Whether the loss has an SRL term (alone or added to another target)."""
        return self.targets == "shifted_reconstruction" or self.srl_weight > 0

    def rollout_probability(self, iteration: int) -> float:
        """Probability that a trajectory's inputs are the student's own rollout at training `iteration`."""
        if self.inputs == "teacher":
            return 0.0
        if self.inputs == "rollout":
            return 1.0
        ramp = self.rollout_ramp_steps
        return self.rollout_prob * min(1.0, iteration / ramp) if ramp > 0 else self.rollout_prob  # scheduled sampling


@torch.no_grad()
def student_inputs(student: ARDStudent, trajectory: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                   prob: float, generator: torch.Generator | None = None,
                   noise_correction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of one training pass: trajectory (B, S+1, C, H, W), timesteps (B, S+1), labels (B,).

    Each trajectory is, with probability `prob`, replaced by the student's own rollout from its noise x_T
    (`sample`, with the KV cache, under no_grad: no gradient flows through the rollout). Returns the inputs
    (B, S, C, H, W) and which rows are rollouts (B,) bool. Only the rollout rows are sampled, with the
    first-step noise correction when `noise_correction` (as the student is then sampled at inference).
    """
    teacher = trajectory[:, :-1]  # (B, S, C, H, W)
    batch = trajectory.shape[0]
    if prob >= 1:
        use = torch.ones(batch, dtype=torch.bool)  # (B,)
    else:
        use = torch.rand(batch, generator=generator) < prob  # (B,) on the CPU: the same draw on every device
    if not use.any():
        return teacher, use
    rows = use.nonzero().squeeze(1).to(trajectory.device)  # (R,)
    own = sample(student, trajectory[rows, 0], labels[rows], timesteps[rows],
                 noise_correction)[:, :-1]  # (R, S, C, H, W)
    inputs = teacher.clone()  # (B, S, C, H, W)
    inputs[rows] = own.to(teacher.dtype)
    return inputs, use


def substep_paths(grid_timesteps: list[int], boundaries: list[int], substeps: int) -> list[list[int]]:
    """Time labels of the teacher's m = `substeps` solver sub-steps inside each student step: for step s, m + 1
    labels from tau_s to tau_{s+1} on the teacher's K-step grid (grid_timesteps has K + 1 entries, the last
    CLEAN; boundaries are S + 1 grid indices). m must divide every step's K / S grid steps."""
    paths = []
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        if substeps < 1 or (b - a) % substeps:
            raise ValueError(f"target_substeps={substeps} must divide the {b - a} teacher grid steps of a student "
                             f"step (sub-steps lie on the teacher's grid)")
        paths.append([grid_timesteps[a + j * (b - a) // substeps] for j in range(substeps + 1)])
    return paths


@torch.no_grad()
def teacher_from_state(teacher, schedule: Schedule, inputs: torch.Tensor, paths: torch.Tensor, labels: torch.Tensor,
                       guidance_scale: float, clip_sample: bool, cfg_channels: CfgChannels = "all",
                       noise_correction: bool = False) -> torch.Tensor:
    """Backward-distillation targets: the teacher's guided solver (`schedule`'s: DDIM or flow Euler) from each input
    state along its step's path.

    inputs (B, S, C, H, W); paths (S, m+1) timesteps of each student step's sub-steps; labels (B,).
    Returns (B, S, C, H, W): the teacher's state at tau_{s+1} reached from the input state at tau_s.
    noise_correction: step 0's path (from the noise x_T) takes its first jump with x_T as the direction term
    (`teacher_path`), as the noise-corrected student's step 0 does; the other steps' paths are unchanged.
    """
    batch, steps = inputs.shape[:2]
    if noise_correction:
        first = teacher_path(teacher, schedule, inputs[:, 0], labels, paths[:1].to(inputs.device).expand(batch, -1),
                             guidance_scale, clip_sample, cfg_channels, noise_correction=True)  # (B, C, H, W)
        if steps == 1:
            return first[:, None]  # (B, 1, C, H, W)
        rest = teacher_from_state(teacher, schedule, inputs[:, 1:], paths[1:], labels, guidance_scale, clip_sample,
                                  cfg_channels)  # (B, S-1, C, H, W)
        return torch.cat([first[:, None], rest], dim=1)  # (B, S, C, H, W)
    x = rearrange(inputs, "b s c h w -> (b s) c h w")  # (B*S, C, H, W)
    t = paths.to(inputs.device).repeat(batch, 1)  # (B*S, m+1) rows ordered (b, s)
    y = labels.repeat_interleave(steps)  # (B*S,)
    out = teacher_path(teacher, schedule, x, y, t, guidance_scale, clip_sample, cfg_channels)  # (B*S, C, H, W)
    return rearrange(out, "(b s) c h w -> b s c h w", b=batch)  # (B, S, C, H, W)


def shift_timesteps(t: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """tau' = gamma(tau): the time shift of rectified-flow samplers (Esser et al. 2024, eq. 23) on u = t / (T - 1),
    gamma(u) = shift u / (1 + (shift - 1) u); shift = 1 keeps t, shift > 1 moves towards more noise."""
    top = num_train_timesteps - 1
    u = t.clamp(min=0).double() / top  # (R,)
    return (top * shift * u / (1 + (shift - 1) * u)).round().long()  # (R,)


def srl_timesteps(t_from: torch.Tensor, shift: float = 1.0, table: Sequence[int] | None = None) -> torch.Tensor:
    """SRL's re-noising timesteps tau'_s (B, S) for the student's input timesteps t_from (B, S): the per-step
    `table` (S timesteps, recipe.srl_timesteps) when given, else shift_timesteps(t_from, shift)."""
    if table is None:
        return shift_timesteps(t_from, shift)  # (B, S)
    if len(table) != t_from.shape[-1]:
        raise ValueError(f"srl_timesteps={list(table)}: one timestep per student step, {t_from.shape[-1]} needed")
    return torch.tensor([int(t) for t in table], dtype=torch.long, device=t_from.device).expand_as(t_from)


@torch.no_grad()
def shifted_reconstruction(teacher, x0: torch.Tensor, t_from: torch.Tensor, labels: torch.Tensor,
                           guidance_scale: float, clip_sample: bool, shift: float,
                           generator: torch.Generator | None = None, cfg_channels: CfgChannels = "all",
                           table: Sequence[int] | None = None) -> torch.Tensor:
    """SRL targets: x0 (B, S, C, H, W) the student's (detached) x0-predictions at its input timesteps t_from
    (B, S); each is re-noised to tau'_s = srl_timesteps(t_from, shift, table) with fresh noise (q(x_tau' | x0),
    Ho et al. 2020, eq. 4) and the teacher's guided x0-estimate of it is returned (B, S, C, H, W)."""
    batch, steps = x0.shape[:2]
    x0 = rearrange(x0, "b s c h w -> (b s) c h w")  # (B*S, C, H, W)
    t = rearrange(srl_timesteps(t_from, shift, table), "b s -> (b s)")  # (B*S,)
    schedule = VPSchedule()  # SRL's timesteps are DiT's (distillation refuses SRL on a flow store)
    noise = torch.randn(x0.shape, generator=generator).to(x0)  # (B*S, C, H, W)
    x = schedule.q_sample(x0, t, noise)  # (B*S, C, H, W)
    target = guided_x0(teacher, schedule, x, t, labels.repeat_interleave(steps), guidance_scale, clip_sample,
                       cfg_channels)  # (B*S, C, H, W)
    return rearrange(target, "(b s) c h w -> b s c h w", b=batch)  # (B, S, C, H, W)
