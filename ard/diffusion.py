"""The teacher's solvers with CFG (no network inside): DDIM for variance-preserving teachers, Euler for flow ones.

The variance-preserving schedule is DiT's: linear betas 1e-4..0.02 over 1000 training steps, epsilon prediction;
its solver is diffusers' `DDIMScheduler` with eta = 0 (Song et al. 2021, eq. 12 with sigma = 0: a discretised
probability-flow ODE). A flow teacher predicts the velocity and is stepped by Euler on an explicit sigma grid
(`flow_sample`). The schedules' maths (coefficients, the jump between two times) is in ard/schedules.py.

Grid convention (used by the store and the student): a K-step trajectory has K + 1 states,
x_0 .. x_K, where state i < K is the input of teacher step i and is sitting at timestep
`grid_timesteps[i]`, and state K is the final sample, whose timestep we write as -1 (clean,
alpha_bar = 1).

Timestep spacing, chosen on purpose: DDIMScheduler steps from t to t - 1000 // K. That is only
consistent with its own timestep grid when every grid timestep is a multiple of 1000 // K, i.e. for
"leading" spacing (timesteps k * (1000 // K), e.g. K = 24: 943, 902, ..., 41, 0) or for "trailing"
spacing with K dividing 1000 (K = 25: 999, 959, ..., 39). "trailing" with K = 24 would tell the model
timestep 957 for a state the scheduler put at 958, so `ddim_grid` refuses it. "linspace" is
facebookresearch/DiT's respacing (`space_timesteps(1000, "25")`: round(k * 999 / (K - 1)), K = 25: 999, 957,
..., 42, 0; the ARD re-implementation's teacher): its steps are uneven, so the sampler steps it with the same
DDIM equation by hand (`ddim_jump` between consecutive grid timesteps) instead of DDIMScheduler.step. The digits
configs use K = 24 "leading": one teacher grid then serves 2-, 3-, 4-, 6-, 8- and 12-step students.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np
import torch

from ard.backbones import backbone_of
from ard.checks import CLEAN  # noqa: F401 (re-exported: the timestep label of the clean state)
from ard.schedules import (FlowSchedule, Schedule, TimestepSpacing, alpha_bar, ddim_jump, make_scheduler,
                           predict_x0)

# Which epsilon channels CFG guides: "all" (ard's default) or "dit", facebookresearch/DiT's forward_with_cfg,
# which guides only the first 3 channels and keeps the conditional epsilon elsewhere (4-channel latents: the
# fourth channel is unguided).
CfgChannels = Literal["all", "dit"]
DIT_GUIDED_CHANNELS = 3  # DiT models.py forward_with_cfg: `eps, rest = model_out[:, :3], model_out[:, 3:]`
# Autocast dtype of the teacher's forward passes: part of what the teacher computes, so recorded in the store.
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPE: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Lightning's trainer precisions that are an autocast of fp32 weights (what older manifests recorded).
TRAINER_PRECISION: dict[str, str] = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}




def ddim_grid(num_steps: int, spacing: TimestepSpacing = "leading", num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps of the K + 1 grid states (the last one is CLEAN); refuses spacings that DDIMScheduler.step
    would not follow ("linspace" is stepped by hand: `ddim_sample`)."""
    scheduler = make_scheduler(spacing, num_train_timesteps=num_train_timesteps)
    scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    ratio = num_train_timesteps // num_steps
    for a, b in zip(timesteps[:-1], timesteps[1:]) if spacing != "linspace" else ():
        if a - ratio != b:
            raise ValueError(f"timestep_spacing={spacing!r} with K={num_steps}: DDIMScheduler steps {a} -> "
                             f"{a - ratio} but its grid continues at {b}; use 'leading' or a K dividing "
                             f"{num_train_timesteps}")
    return timesteps + [CLEAN]


def student_grid_indices(num_steps: int, student_steps: int) -> list[int]:
    """Grid indices s * K / S (s = 0..S) of an S-step student's boundaries on the teacher's K-step grid (K = 24,
    S = 4: 0, 6, 12, 18, 24; leading spacing: timesteps 943, 697, 451, 205, clean)."""
    if student_steps < 1 or num_steps % student_steps:
        raise ValueError(f"student_steps={student_steps} must divide the teacher's K={num_steps}")
    return [s * num_steps // student_steps for s in range(student_steps + 1)]










def guided_prediction(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float,
                      cfg_channels: CfgChannels = "all") -> torch.Tensor:
    """Classifier-free guided prediction (Ho & Salimans 2022, eq. 6): p_u + w (p_c - p_u) of the teacher's epsilon
    (or a flow teacher's velocity), on every channel ("all") or, like facebookresearch/DiT ("dit"), on the first 3
    channels only, p_c on the others.

    x: (B, C, H, W); t: (B,) time labels; labels: (B,). One batched forward over [cond, uncond].
    """
    family = backbone_of(model)
    if guidance_scale == 1.0:
        return family.predict(model, x, t, labels)  # (B, C, H, W)
    null = family.null_condition(model, labels)  # (B,)
    eps_c, eps_u = family.predict(model, torch.cat([x, x]), torch.cat([t, t]),
                                  family.cat([labels, null])).chunk(2)  # (B, C, H, W) each
    guided = eps_u + guidance_scale * (eps_c - eps_u)  # (B, C, H, W)
    if cfg_channels == "all":
        return guided
    if cfg_channels != "dit":
        raise ValueError(f"cfg_channels must be one of {get_args(CfgChannels)}, got {cfg_channels!r}")
    return torch.cat([guided[:, :DIT_GUIDED_CHANNELS], eps_c[:, DIT_GUIDED_CHANNELS:]], dim=1)  # (B, C, H, W)


def autocast(device: torch.device, precision: Precision):
    """The autocast context of a teacher precision ("fp32": none)."""
    if precision not in AUTOCAST_DTYPE:
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
    dtype = AUTOCAST_DTYPE[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def precision_of_trainer(trainer_precision: str, where: str = "trainer.precision") -> Precision:
    """A Lightning precision ("16-mixed", ...) as the teacher precision it runs with; one-line error for the
    ones that are not an autocast of fp32 weights."""
    if str(trainer_precision) not in TRAINER_PRECISION:
        raise ValueError(f"{where} is {trainer_precision!r}; the teacher runs fp32 weights under autocast: use one "
                         f"of {sorted(TRAINER_PRECISION)}")
    return TRAINER_PRECISION[str(trainer_precision)]


def solver_identity(num_steps: int, timestep_spacing: TimestepSpacing, guidance_scale: float, clip_sample: bool,
                    cfg_channels: CfgChannels, precision: Precision) -> dict:
    """The teacher's sampling settings as the store's manifest records them (its `solver` field) and the
    evaluation compares them: with `ard.teacher.teacher_identity`, what decides the teacher's samples."""
    if cfg_channels not in get_args(CfgChannels):
        raise ValueError(f"cfg_channels must be one of {get_args(CfgChannels)}, got {cfg_channels!r}")
    if precision not in AUTOCAST_DTYPE:
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
    scheduler = make_scheduler(timestep_spacing, clip_sample=clip_sample).config
    return {"name": "ddim", "eta": 0.0, "num_steps": int(num_steps), "timestep_spacing": timestep_spacing,
            "guidance_scale": float(guidance_scale), "clip_sample": bool(clip_sample), "cfg_channels": cfg_channels,
            "prediction_type": scheduler.prediction_type, "num_train_timesteps": scheduler.num_train_timesteps,
            "beta_schedule": scheduler.beta_schedule, "beta_start": scheduler.beta_start,
            "beta_end": scheduler.beta_end, "precision": precision}


def flow_solver_identity(num_steps: int, shift: float, guidance_scale: float, clip_sample: bool,
                         precision: Precision) -> dict:
    """A flow teacher's sampling settings as the store's manifest records them (`solver`, name "flow_euler"): Euler
    on the grid sigma_k = shift(1 - k / K) (ard.schedules.FlowSchedule), velocity prediction, CFG on every channel."""
    if precision not in AUTOCAST_DTYPE:
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
    FlowSchedule(shift)  # refuses a shift <= 0
    return {"name": "flow_euler", "num_steps": int(num_steps), "shift": float(shift),
            "guidance_scale": float(guidance_scale), "clip_sample": bool(clip_sample), "prediction_type": "flow",
            "precision": precision}


def recorded_solver(solver: dict, where: str) -> dict:
    """A manifest's `solver` field in today's terms: manifests written before cfg_channels was recorded guided
    all channels, and recorded Lightning's precision string; a flow solver guides every channel and clips
    nothing unless it says so."""
    precision = solver.get("precision", "fp32")
    if precision not in AUTOCAST_DTYPE:
        precision = precision_of_trainer(precision, f"{where}: field 'solver.precision'")
    return {**solver, "cfg_channels": solver.get("cfg_channels", "all"),
            "clip_sample": solver.get("clip_sample", False), "precision": precision}


@torch.no_grad()
def teacher_path(model, schedule: Schedule, x: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor,
                 guidance_scale: float, clip_sample: bool = False, cfg_channels: CfgChannels = "all",
                 noise_correction: bool = False) -> torch.Tensor:
    """The teacher's guided deterministic solver from x along `timesteps` (B, m+1) (any decreasing labels, the
    last may be CLEAN): m jumps x_{t_0} -> x_{t_1} -> ... -> x_{t_m} of the schedule (DDIM, Song et al. 2021,
    eq. 12, for variance preserving; Euler for flow); returns x_{t_m} (B, C, H, W).

    Along the teacher's own grid this is the teacher's step: Imagine Flash's backward distillation runs it from
    the student's own state to the student's next boundary.
    noise_correction (Imagine Flash, sec. 3.4; x must then be the pure noise x_T): the first jump's direction
    term uses x itself instead of the guided epsilon, as `ard.student.model.ARDStudent.step` does.
    """
    for i in range(timesteps.shape[1] - 1):
        pred = guided_prediction(model, x, timesteps[:, i], labels, guidance_scale, cfg_channels)  # (B, C, H, W)
        x = schedule.jump(x, pred, timesteps[:, i], timesteps[:, i + 1], schedule.teacher_output, clip_sample,
                          direction=x if noise_correction and i == 0 else None)[0]  # (B, C, H, W)
    return x


@torch.no_grad()
def guided_x0(model, schedule: Schedule, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
              guidance_scale: float, clip_sample: bool = False, cfg_channels: CfgChannels = "all") -> torch.Tensor:
    """The teacher's guided x0-estimate of x (B, C, H, W) at labels t (B,) (Imagine Flash's SRL target)."""
    pred = guided_prediction(model, x, t, labels, guidance_scale, cfg_channels)  # (B, C, H, W)
    return schedule.read(x, pred, t, schedule.teacher_output, clip_sample)[0]  # (B, C, H, W)


@dataclass
class Trajectory:
    states: torch.Tensor  # (B, len(save_indices), C, H, W) the states x_i at the saved grid indices
    grid_indices: list[int]  # saved indices into the K + 1 grid states
    timesteps: list[int]  # timestep of each saved state (CLEAN for the final sample)
    x0: torch.Tensor | None  # (B, len(save_indices), C, H, W) teacher's x0-prediction at each saved state


def _save_indices(num_steps: int, save_indices: Sequence[int] | None) -> list[int]:
    """The saved grid indices, sorted (default: all K + 1); refuses indices outside [0, K]."""
    save = list(range(num_steps + 1)) if save_indices is None else sorted(set(int(i) for i in save_indices))
    if not save or save[0] < 0 or save[-1] > num_steps:
        raise ValueError(f"save_indices must lie in [0, {num_steps}], got {list(save_indices)}")
    return save


def _walk(noise: torch.Tensor, grid: list, save: list[int], step, return_x0: bool, progress: str | None
          ) -> Trajectory:
    """The K steps x_i -> x_{i+1} = step(i, x_i) (which returns (x0-prediction, next state)) from `noise` over a
    grid of K + 1 labels, keeping the states (and x0-predictions) at the saved indices; a tqdm bar named `progress`."""
    num_steps = len(grid) - 1
    x = noise  # (B, C, H, W)
    states, x0s = {}, {}
    steps = range(num_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=progress, leave=False)
    for i in steps:
        if i in save:
            states[i] = x
        x0, x = step(i, x)  # (B, C, H, W) each
        if i in save:
            x0s[i] = x0
    states[num_steps] = x0s[num_steps] = x
    return Trajectory(
        states=torch.stack([states[i] for i in save], dim=1),  # (B, n, C, H, W)
        grid_indices=save,
        timesteps=[grid[i] for i in save],
        x0=torch.stack([x0s[i] for i in save], dim=1) if return_x0 else None,
    )


@torch.no_grad()
def ddim_sample(model, noise: torch.Tensor, labels: torch.Tensor, num_steps: int = 24,
                guidance_scale: float = 1.5, spacing: TimestepSpacing = "leading",
                save_indices: Sequence[int] | None = None, return_x0: bool = False,
                clip_sample: bool = False, progress: bool = False, cfg_channels: CfgChannels = "all") -> Trajectory:
    """Run the teacher's K-step DDIM (eta = 0) with CFG from `noise`, saving a subset of grid states.

    noise: (B, C, H, W) x_T; labels: (B,) class indices. save_indices: indices into the K + 1 grid
    states (default: all). With return_x0, the x0-prediction of each saved state (the final state's
    is the sample itself). Deterministic: same inputs, same trajectory.
    """
    backbone_of(model).check_condition(model, labels)
    grid = ddim_grid(num_steps, spacing)
    scheduler = make_scheduler(spacing, clip_sample=clip_sample)
    scheduler.set_timesteps(num_steps)
    ab = alpha_bar(scheduler, torch.tensor(grid, device=noise.device)) if spacing == "linspace" else None  # (K+1,)

    def step(i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), grid[i], device=x.device, dtype=torch.long)  # (B,)
        eps = guided_prediction(model, x, t, labels, guidance_scale, cfg_channels)  # (B, C, H, W)
        if spacing == "linspace":  # uneven steps: the DDIM equation between this grid timestep and the next
            return predict_x0(x, eps, ab[i].expand(x.shape[0]), clip_sample), ddim_jump(
                x, eps, ab[i].expand(x.shape[0]), ab[i + 1].expand(x.shape[0]), clip_sample)  # (B, C, H, W) each
        out = scheduler.step(eps, grid[i], x, eta=0.0)
        return out.pred_original_sample, out.prev_sample  # (B, C, H, W) each

    return _walk(noise, grid, _save_indices(num_steps, save_indices), step, return_x0, "DDIM" if progress else None)


@torch.no_grad()
def flow_sample(model, noise: torch.Tensor, labels: torch.Tensor, num_steps: int = 24, guidance_scale: float = 1.5,
                shift: float = 1.0, save_indices: Sequence[int] | None = None, return_x0: bool = False,
                clip_sample: bool = False, progress: bool = False) -> Trajectory:
    """Run a flow teacher's K-step Euler solver with CFG on the explicit grid sigma_k = shift(1 - k / K)
    (ard.schedules.FlowSchedule) from `noise`, saving a subset of grid states; as `ddim_sample` otherwise.
    Each step is x + (sigma_{k+1} - sigma_k) v, diffusers' FlowMatchEulerDiscreteScheduler.step (with x0
    clamped to [-1, 1] first under clip_sample)."""
    backbone_of(model).check_condition(model, labels)
    schedule = FlowSchedule(shift)
    grid = schedule.labels(schedule.grid_sigmas(num_steps))  # K + 1 labels, the last CLEAN

    def step(i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), grid[i], device=x.device, dtype=torch.float64)  # (B,)
        v = guided_prediction(model, x, t, labels, guidance_scale)  # (B, C, H, W)
        nxt, x0 = schedule.jump(x, v, t, torch.full_like(t, grid[i + 1]), "velocity", clip_sample)  # (B, C, H, W)
        return x0, nxt

    return _walk(noise, grid, _save_indices(num_steps, save_indices), step, return_x0, "Euler" if progress else None)


def solve(model, solver: dict, noise: torch.Tensor, labels: torch.Tensor, save_indices: Sequence[int] | None = None,
          return_x0: bool = False, progress: bool = False) -> Trajectory:
    """The teacher's K-step trajectory with a store's solver settings (its manifest's `solver` field, in today's
    terms: `recorded_solver`): DDIM (`ddim_sample`) or flow Euler (`flow_sample`)."""
    if solver.get("name") == "flow_euler":
        return flow_sample(model, noise, labels, solver["num_steps"], solver["guidance_scale"], solver["shift"],
                           save_indices, return_x0, solver["clip_sample"], progress)
    return ddim_sample(model, noise, labels, solver["num_steps"], solver["guidance_scale"],
                       solver["timestep_spacing"], save_indices, return_x0, solver["clip_sample"], progress,
                       solver["cfg_channels"])


def solver_grid(solver: dict) -> list:
    """The K + 1 time labels of a solver's grid (the last CLEAN): DDIM timesteps, or 1000 sigma for flow."""
    if solver.get("name") == "flow_euler":
        schedule = FlowSchedule(solver["shift"])
        return schedule.labels(schedule.grid_sigmas(solver["num_steps"]))
    return ddim_grid(solver["num_steps"], solver["timestep_spacing"])


@torch.no_grad()
def sample_at(model, schedule: Schedule, noise: torch.Tensor, labels: torch.Tensor, timesteps: Sequence,
              guidance_scale: float = 1.5, clip_sample: bool = False, cfg_channels: CfgChannels = "all",
              noise_correction: bool = False) -> torch.Tensor:
    """The teacher's solver + CFG over given boundary labels tau_0 > ... > tau_S = CLEAN (e.g. an S-step
    student's, a subset of the K-step grid), one jump per step: the undistilled teacher at S steps on exactly the
    students' footing. noise: (B, C, H, W); returns the final sample (B, C, H, W). On the full K-step grid it
    equals the teacher's K-step sample to float rounding. noise_correction: see `teacher_path`."""
    timesteps = list(timesteps)
    if len(timesteps) < 2 or timesteps[-1] != CLEAN or any(a <= b for a, b in zip(timesteps[:-1], timesteps[1:])):
        raise ValueError(f"timesteps must decrease and end at {CLEAN} (clean), got {timesteps}")
    backbone_of(model).check_condition(model, labels)
    path = schedule.label_tensor(timesteps, noise.device).expand(noise.shape[0], -1)  # (B, S+1)
    return teacher_path(model, schedule, noise, labels, path, guidance_scale, clip_sample, cfg_channels,
                        noise_correction)


def trajectory_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed that depends only on (seed, trajectory index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def trajectory_inputs(seed: int, indices: Sequence[int], shape: Sequence[int], num_classes: int,
                      labels: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise x_T and class label of each trajectory index, each a function of (seed, index) alone.

    Returns noise (n, *shape) fp32 and labels (n,) int64; given `labels` are used as they are.
    """
    noises, drawn = [], []
    for i in indices:
        g = torch.Generator().manual_seed(trajectory_seed(seed, int(i)))
        drawn.append(int(torch.randint(num_classes, (1,), generator=g)))
        noises.append(torch.randn(tuple(shape), generator=g))
    out_labels = torch.tensor(drawn if labels is None else list(labels), dtype=torch.long)
    return torch.stack(noises), out_labels
