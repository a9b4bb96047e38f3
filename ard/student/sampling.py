"""S-step sampling from an ARD student with an explicit KV cache (ARD sec. 3.4).

Each step's history is the student's own earlier states: the keys/values of steps 0..s-1 in the history
blocks come from the cache, so step s costs one DiT forward plus the extra attention over the cached keys.
"""
from __future__ import annotations

import torch

from ard.student.model import ARDStudent


def sample(student: ARDStudent, noise: torch.Tensor, labels: torch.Tensor, timesteps: torch.Tensor,
           noise_correction: bool = False, grad_from_step: int = 0) -> torch.Tensor:
    """Run the S student steps from `noise` (B, C, H, W) with labels (B,) (the family's condition of B rows:
    class labels, or a TextCondition) over the boundary timesteps
    (S+1,) or (B, S+1) (the last is CLEAN = -1). Returns all states (B, S+1, C, H, W), the first being
    the noise and the last the sample. Steps from `grad_from_step` on run under the caller's grad mode
    (wrap in torch.no_grad() for inference), earlier ones without grad (see `rollout_final`).
    noise_correction: Imagine Flash's first-step correction (see ARDStudent.step); off by default."""
    batch = noise.shape[0]
    if timesteps.ndim == 1:
        timesteps = timesteps.expand(batch, -1)  # (B, S+1)
    if tuple(timesteps.shape) != (batch, student.num_steps + 1):
        raise ValueError(f"timesteps {tuple(timesteps.shape)}: expected ({student.num_steps + 1},) or "
                         f"({batch}, {student.num_steps + 1}) for a {student.num_steps}-step student")
    if not noise.is_meta:  # (meta tensors: FLOP counting) checks need values
        student.backbone.check_condition(student.transformer, labels, allow_null=True)
    timesteps = timesteps.to(noise.device)
    cache = student.new_cache(batch)
    states = [noise]
    for s in range(student.num_steps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and s >= grad_from_step):
            states.append(student.step(states[-1], s, timesteps[:, s], timesteps[:, s + 1], labels, cache,
                                       noise_correction))  # (B, C, H, W)
    return torch.stack(states, dim=1)  # (B, S+1, C, H, W)


def rollout_final(student: ARDStudent, noise: torch.Tensor, labels: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """The student's own S-step sample from `noise` (B, C, H, W) (KV cache), differentiable through the last
    step only: steps 0..S-2 run without grad, so the history (states and cached keys) is detached, as in Self
    Forcing and SFD. timesteps (B, S+1). Returns (B, C, H, W)."""
    return sample(student, noise, labels, timesteps, grad_from_step=student.num_steps - 1)[:, -1]  # (B, C, H, W)
