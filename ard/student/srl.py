"""Imagine Flash's shifted reconstruction loss (SRL, Kohler et al. 2024, sec. 3.3): how much of its input the
target keeps, the per-step re-noising timesteps chosen from that, and the per-step weights (docs/method.md,
"Training recipes").

SRL re-noises the student's x0-prediction x0_s to tau'_s with fresh noise and regresses the teacher's x0-estimate
T(x0_s) of that state. The paper's stated design: at large t the target stays globally similar to the student's
output and corrects it, at small t it adds detail. How similar it stays is measured here as the retention

    retention(tau') = <T - E[T | class], x0 - E[x0 | class]> / ||x0 - E[x0 | class]||^2

over a batch of clean x0 with labels: the regression slope of the class-centred target on the class-centred
input (1: the target is the input; 0: only the class mean survives, the minimiser is one image per class).
`retention_timesteps` picks tau'_s per student step from a measured retention curve; the recipe's
`srl_timesteps` table carries the picks (scripts/bench_srl_retention.py measures and prints them).

Gradient scale: the x0 of an epsilon-predicting student is (x - sigma eps) / alpha, so an x0-space residual r
gives the epsilon output the gradient -(sigma / alpha) r, and an epsilon-space error e shows up as the residual
(sigma / alpha) e: the x0-space loss of step s scales the epsilon gradient by (sigma_s / alpha_s)^2 (at the K = 24
leading boundaries 943 / 697 / 451 / 205, sigma / alpha = 90.8 / 11.8 / 2.65 / 0.75). `snr_weights` weights step
s by alpha_bar / (1 - alpha_bar) = (alpha / sigma)^2, normalised to mean 1 over the steps, so that equal epsilon
errors give every step the same gradient (x0-space MSE times SNR is the epsilon-space MSE).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from ard.diffusion import CfgChannels, guided_x0
from ard.schedules import VPSchedule

SRLWeights = Literal["uniform", "snr"]  # per-step weights of the SRL loss (`snr_weights`)


def snr_weights(t_from: torch.Tensor) -> torch.Tensor:
    """w_s = SNR(tau_s) / mean_s SNR(tau_s), SNR = alpha_bar / (1 - alpha_bar), for the input timesteps t_from
    (..., S) of the S student steps (integers >= 0). Returns (..., S) float64, mean 1 over the last dimension."""
    snr = VPSchedule().snr(t_from)  # (..., S) float64
    return snr / snr.mean(dim=-1, keepdim=True)


def class_centred(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x (N, ...) minus the mean of its class over the batch (labels (N,)): the sample-specific part."""
    flat = x.flatten(1)  # (N, D)
    classes, index = labels.unique(return_inverse=True)  # (G,), (N,)
    sums = flat.new_zeros(len(classes), flat.shape[1]).index_add_(0, index, flat)  # (G, D)
    counts = torch.bincount(index, minlength=len(classes)).to(flat)  # (G,)
    return (flat - (sums / counts[:, None])[index]).view_as(x)  # (N, ...)


@torch.no_grad()
def retention(teacher, x0: torch.Tensor, labels: torch.Tensor, timesteps: Sequence[int], guidance_scale: float = 1.0,
              clip_sample: bool = False, cfg_channels: CfgChannels = "all", generator: torch.Generator | None = None,
              batch_size: int = 1024) -> list[float]:
    """Retention of SRL's target at each re-noising timestep tau' in `timesteps` (the module docstring).

    x0 (N, C, H, W) clean samples with labels (N,) (at least two of each class present: a class of one sample has
    no sample-specific part). At each tau', every x0 is re-noised with fresh noise (q(x_tau' | x0)) and the
    teacher's guided x0-estimate T of it is taken (`guided_x0`, the teacher's CFG and x0 clipping: SRL's target).
    Returns one slope per tau': sum <T - E[T|c], x0 - E[x0|c]> / sum ||x0 - E[x0|c]||^2 over the batch.
    """
    centred = class_centred(x0.double(), labels)  # (N, C, H, W)
    scale = centred.square().sum()  # ()
    if not scale > 1e-12 * x0.double().square().sum():
        raise ValueError("retention needs samples that differ within their class (no sample-specific content)")
    schedule = VPSchedule()
    out = []
    for tau in timesteps:
        targets = []
        for start in range(0, len(x0), batch_size):
            x, y = x0[start:start + batch_size], labels[start:start + batch_size]  # (b, C, H, W), (b,)
            t = torch.full((len(x),), int(tau), dtype=torch.long, device=x.device)  # (b,)
            noise = torch.randn(x.shape, generator=generator).to(x)  # (b, C, H, W)
            targets.append(guided_x0(teacher, schedule, schedule.q_sample(x, t, noise), t, y, guidance_scale,
                                     clip_sample, cfg_channels))  # (b, C, H, W)
        target = class_centred(torch.cat(targets).double(), labels)  # (N, C, H, W)
        out.append(float((target * centred).sum() / scale))
    return out


def retention_timesteps(curve: Mapping[int, float], boundaries: Sequence[int], top: float) -> list[int]:
    """Re-noising timesteps tau'_s for student steps starting at `boundaries` tau_s (S input timesteps), from a
    measured retention curve {tau': retention} (linearly interpolated between its timesteps): tau'_s is the largest
    timestep t <= tau_s whose retention is at least max(top, retention(tau_s)). A step whose own timestep keeps at
    least `top` of its input is re-noised there (tau'_s = tau_s); a step whose own timestep keeps less (the top
    steps, where the target would be the class mean) is re-noised lower, where `top` of it survives (the same
    tau' for every such step). 0 when no timestep keeps `top`."""
    ts = np.array(sorted(curve), dtype=np.float64)  # ascending timesteps
    rs = np.array([curve[int(t)] for t in ts], dtype=np.float64)
    picks = []
    for tau in boundaries:
        tau = int(tau)
        if tau < 0:
            raise ValueError(f"boundary {tau}: SRL re-noises the inputs of the student's steps (timesteps >= 0)")
        keep = np.interp(np.arange(tau + 1), ts, rs)  # (tau_s + 1,) retention at 0..tau_s, linear in between
        if keep[-1] >= top:  # its own timestep keeps enough: no shift
            picks.append(tau)
            continue
        ok = np.nonzero(keep >= top)[0]  # timesteps below tau_s that keep `top`
        picks.append(int(ok[-1]) if len(ok) else 0)
    return picks
