"""Noise schedules: where a state x_t = a_t x0 + b_t eps sits, and how to jump between two times.

Every time in ard is a *label* in the network's own time units: DiT / PixArt's integer timestep t in [0, 1000)
(variance preserving), or 1000 sigma, a float in (0, 1000], for flow-matching teachers (SD3's convention); the
clean state is CLEAN (-1) for both. A schedule turns labels into the two coefficients (a_t, b_t) and reads a
network's prediction as the implied (x0, eps); a deterministic step from t to t' is then the affine jump
x' = a_t' x0 + b_t' eps (docs/method.md, "Schedules"):

    VPSchedule    DiT's linear betas (1e-4..0.02, 1000 steps): a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar), the
                  teacher predicts eps; the jump is DDIM (Song et al. 2021, eq. 12, sigma = 0), computed exactly
                  as ard.diffusion's `ddim_jump` always has (the digits results do not move by a bit).
    FlowSchedule  rectified flow (Liu et al. 2023; Esser et al. 2024): a = 1 - sigma, b = sigma, the teacher
                  predicts the velocity v = eps - x0, so x0 = x - sigma v and eps = x + (1 - sigma) v; the jump
                  without clipping or a replaced direction is the Euler step x + (sigma' - sigma) v, which
                  diffusers' FlowMatchEulerDiscreteScheduler takes. Its grid is explicit: sigma_k = shift(1 - k / K),
                  shift(u) = shift u / (1 + (shift - 1) u) (Esser et al. 2024, eq. 23), recorded in the store.

A schedule holds no network (as diffusers' schedulers). `schedule_of(solver)` gives a store's (its manifest's
`solver` field) schedule; the student records it in its ard_student.json.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal, get_args

import torch
from diffusers import DDIMScheduler

from ard.checks import CLEAN

TimestepSpacing = Literal["leading", "trailing", "linspace"]  # the DDIM teacher grid's (ard.diffusion.ddim_grid)
ScheduleKind = Literal["vp", "flow"]  # variance preserving (DDIM) or flow matching (Euler)
# What a student's head is read as (ARD sec. 3.3; docs/method.md, "Output parametrisation"): eps, x0 and velocity
# give the implied (x0, eps) and the schedule's jump to the next boundary; next_state is the next state itself.
OutputKind = Literal["eps", "x0", "velocity", "next_state"]
FLOW_TIME_SCALE = 1000.0  # a flow label is 1000 sigma (SD3's and Sana's timestep input)


def make_scheduler(spacing: TimestepSpacing = "leading", clip_sample: bool = False,
                   num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> DDIMScheduler:
    """DiT's linear-beta schedule as a diffusers DDIMScheduler (eta = 0 is passed at step time)."""
    if spacing not in get_args(TimestepSpacing):
        raise ValueError(f"timestep_spacing must be one of {get_args(TimestepSpacing)}, got {spacing!r}")
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=beta_start, beta_end=beta_end, timestep_spacing=spacing,
                         clip_sample=clip_sample, clip_sample_range=1.0, set_alpha_to_one=True,
                         steps_offset=0, prediction_type="epsilon")

def alpha_bar(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar(t) for integer timesteps, with CLEAN (-1) mapped to 1."""
    table = torch.cat([torch.ones(1, dtype=torch.float64), scheduler.alphas_cumprod.double()])
    return table.to(timesteps.device)[timesteps.long() + 1]

def q_sample(x0: torch.Tensor, ab: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) noise: a draw of q(x_t | x0) (Ho et al. 2020, eq. 4); ab = alpha_bar_t
    broadcastable to x0 (e.g. (B, 1, 1, 1)) and of its dtype."""
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

def predict_x0(x: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, clip_x0: bool = False) -> torch.Tensor:
    """x0 implied by an epsilon prediction (Ho et al. 2020, eq. 15): (x - sqrt(1 - a) eps) / sqrt(a).

    x, eps: (B, C, H, W); ab: (B,) alpha_bar of x's timestep. clip_x0 clamps to [-1, 1] (pixel space).
    """
    a = ab.to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # (B, C, H, W)
    return x0.clamp(-1, 1) if clip_x0 else x0

def ddim_jump(x: torch.Tensor, eps: torch.Tensor, ab_from: torch.Tensor, ab_to: torch.Tensor,
              clip_x0: bool = False, direction: torch.Tensor | None = None) -> torch.Tensor:
    """One deterministic DDIM step of any size (Song et al. 2021, eq. 12, sigma = 0).

    x, eps: (B, C, H, W); ab_from, ab_to: (B,) alpha_bar of the source and target timesteps.
    `direction` replaces eps in the direction term sqrt(1 - a_to) eps only (noise correction, see
    `ard.student.model.ARDStudent.step`); x0 is always the one `eps` implies.
    """
    b = ab_to.to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x0 = predict_x0(x, eps, ab_from, clip_x0)  # (B, C, H, W) as DDIMScheduler(clip_sample): eps kept for the direction
    return b.sqrt() * x0 + (1 - b).sqrt() * (eps if direction is None else direction)  # (B, C, H, W)


class Schedule(ABC):
    kind: ClassVar[str]  # a ScheduleKind
    teacher_output: ClassVar[str]  # what the teacher predicts: the student output that reproduces it ("eps"...)
    label_dtype: ClassVar[torch.dtype]  # of its time labels

    def label_tensor(self, labels, device: torch.device | str = "cpu") -> torch.Tensor:
        """Time labels (a list) as a tensor of the schedule's label dtype."""
        return torch.tensor(list(labels), dtype=self.label_dtype, device=device)

    @abstractmethod
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) float64 of time labels t (any shape), CLEAN -> (1, 0)."""

    @abstractmethod
    def settings(self) -> dict:
        """What defines the schedule, as the student's ard_student.json records it (`schedule_from_settings`)."""

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of q(x_t | x0) = a_t x0 + b_t noise (Ho et al. 2020, eq. 4; Liu et al. 2023, eq. 1): x0, noise
        (B, C, H, W), t (B,)."""
        a, b = (c.to(x0.dtype).view(-1, 1, 1, 1) for c in self.coefficients(t))  # (B, 1, 1, 1) each
        return a * x0 + b * noise  # (B, C, H, W)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio (a_t / b_t)^2 of labels t, float64."""
        a, b = self.coefficients(t)
        return (a / b).square()

    def check_output(self, output: str, top: torch.Tensor | None = None) -> None:
        """One-line ValueError when a student output cannot be read on this schedule (at input labels `top`)."""

    @abstractmethod
    def read(self, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, output: str,
             clip_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x0, eps) that a prediction `pred` (R, C, H, W) read as `output` (eps / x0 / velocity) implies at x
        (R, C, H, W), labels t (R,); x0 clamped to [-1, 1] with clip_x0 (eps stays the implied one, as DDIM's
        clip_sample keeps the model's)."""

    @abstractmethod
    def jump(self, x: torch.Tensor, pred: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, output: str,
             clip_x0: bool = False, direction: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic step of a prediction from t_from to t_to (R,): (x', x0), x' = a' x0 + b' eps, where
        `direction` (R, C, H, W), given, replaces eps in b' eps only (noise correction, ARDStudent.step)."""


class VPSchedule(Schedule):
    """DiT's variance-preserving schedule (a diffusers DDIMScheduler's alphas_cumprod); labels are int64."""
    kind = "vp"
    teacher_output = "eps"
    label_dtype = torch.long

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps, self.beta_start, self.beta_end = num_train_timesteps, beta_start, beta_end
        self.scheduler = make_scheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                        beta_end=beta_end)

    def settings(self) -> dict:
        return dict(kind=self.kind, num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t) float64 of integer labels, CLEAN -> 1."""
        return alpha_bar(self.scheduler, t)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1 - ab).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(x0, self.alpha_bar(t).to(x0.dtype).view(-1, 1, 1, 1), noise)  # (B, C, H, W)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def check_output(self, output: str, top: torch.Tensor | None = None) -> None:
        if output == "velocity":
            raise ValueError("output='velocity' reads the head as a flow velocity: this teacher's schedule is "
                             "variance preserving (use 'eps' or 'x0')")

    def _eps(self, x: torch.Tensor, pred: torch.Tensor, ab: torch.Tensor, output: str) -> torch.Tensor:
        """The epsilon of an eps or x0 prediction (the x0 one through its implied epsilon, in x's dtype)."""
        self.check_output(output)
        if output == "eps":
            return pred
        a = ab.to(x.dtype).view(-1, 1, 1, 1)  # (R, 1, 1, 1)
        return (x - a.sqrt() * pred) / (1 - a).sqrt()  # (R, C, H, W) eps implied by x0

    def read(self, x, pred, t, output, clip_x0=False):
        ab = self.alpha_bar(t)  # (R,)
        eps = self._eps(x, pred, ab, output)  # (R, C, H, W)
        return predict_x0(x, eps, ab, clip_x0), eps  # (R, C, H, W) each

    def jump(self, x, pred, t_from, t_to, output, clip_x0=False, direction=None):
        a, b = self.alpha_bar(t_from), self.alpha_bar(t_to)  # (R,) float64
        eps = self._eps(x, pred, a, output)  # (R, C, H, W)
        x0 = predict_x0(x, eps, a, clip_x0=clip_x0)  # (R, C, H, W)
        return ddim_jump(x, eps, a, b, clip_x0=clip_x0, direction=direction), x0  # (R, C, H, W) each


class FlowSchedule(Schedule):
    """Rectified flow, sigma = label / 1000 (labels float64, CLEAN -> sigma 0); `shift` only shapes its grid."""
    kind = "flow"
    teacher_output = "velocity"
    label_dtype = torch.float64

    def __init__(self, shift: float = 1.0):
        if not shift > 0:
            raise ValueError(f"shift={shift!r} must be > 0")
        self.shift = float(shift)

    def settings(self) -> dict:
        return dict(kind=self.kind, shift=self.shift)

    def grid_sigmas(self, num_steps: int) -> list[float]:
        """The K + 1 sigmas of a K-step grid: shift(1 - k / K), k = 0..K (1 for the noise, 0 for the clean state)."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)  # (K+1,)
        return (self.shift * u / (1 + (self.shift - 1) * u)).tolist()

    @staticmethod
    def labels(sigmas: list[float]) -> list[float]:
        """Time labels of sigmas: 1000 sigma, CLEAN for sigma 0."""
        return [FLOW_TIME_SCALE * s if s > 0 else float(CLEAN) for s in sigmas]

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        """sigma float64 of labels t (CLEAN -> 0)."""
        t = t.double()
        return torch.where(t == CLEAN, torch.zeros_like(t), t / FLOW_TIME_SCALE)

    def coefficients(self, t):
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def check_output(self, output: str, top: torch.Tensor | None = None) -> None:
        if output == "eps" and top is not None and bool((self.sigma(top) >= 1).any()):
            raise ValueError("output='eps' cannot give x0 at sigma = 1, where the state is the noise itself: use "
                             "'velocity' (the flow teacher's own) or 'x0'")

    def read(self, x, pred, t, output, clip_x0=False):
        sigma = self.sigma(t).to(x.dtype).view(-1, 1, 1, 1)  # (R, 1, 1, 1)
        if output == "velocity":
            x0, eps = x - sigma * pred, x + (1 - sigma) * pred  # (R, C, H, W) each
        elif output == "x0":
            x0, eps = pred, (x - (1 - sigma) * pred) / sigma  # (R, C, H, W) each
        elif output == "eps":
            x0, eps = (x - sigma * pred) / (1 - sigma), pred  # (R, C, H, W) each
        else:
            raise ValueError(f"output={output!r} is no prediction of (x0, eps); one of 'eps', 'x0', 'velocity'")
        return (x0.clamp(-1, 1) if clip_x0 else x0), eps

    def jump(self, x, pred, t_from, t_to, output, clip_x0=False, direction=None):
        x0, eps = self.read(x, pred, t_from, output, clip_x0)  # (R, C, H, W) each
        if output == "velocity" and not clip_x0 and direction is None:  # the Euler step, as diffusers takes it
            step = (self.sigma(t_to) - self.sigma(t_from)).to(x.dtype).view(-1, 1, 1, 1)  # (R, 1, 1, 1)
            return x + step * pred, x0  # (R, C, H, W) each
        a, b = (c.to(x.dtype).view(-1, 1, 1, 1) for c in self.coefficients(t_to))  # (R, 1, 1, 1) each
        return a * x0 + b * (eps if direction is None else direction), x0  # (R, C, H, W) each


def schedule_from_settings(settings: dict | None) -> Schedule:
    """The schedule a student's ard_student.json records (None: a student of before, variance preserving)."""
    if settings is None:
        return VPSchedule()
    kind = settings.get("kind")
    if kind not in get_args(ScheduleKind):
        raise ValueError(f"schedule.kind={kind!r}: must be one of {get_args(ScheduleKind)}")
    options = {k: v for k, v in settings.items() if k != "kind"}
    try:
        return VPSchedule(**options) if kind == "vp" else FlowSchedule(**options)
    except TypeError as e:
        raise ValueError(f"schedule: {e}") from None


def schedule_of(solver: dict) -> Schedule:
    """The schedule of a store's teacher (its manifest's `solver` field: "ddim" or "flow_euler")."""
    if solver.get("name") == "flow_euler":
        return FlowSchedule(solver["shift"])
    return VPSchedule(solver.get("num_train_timesteps", 1000), solver.get("beta_start", 1e-4),
                      solver.get("beta_end", 0.02))
