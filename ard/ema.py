"""The students' exponential moving average, with a warm-up of its decay.

Lightning's `EMAWeightAveraging` averages with a fixed decay d from the first update, so after n updates the average
still holds d^n of the initial weights: 0.999^1200 = 30% on a 1200-iteration digits run. A student that starts as a
good model (epsilon output: the teacher at S DDIM steps) does not mind; a direct next-state head, which starts as the
teacher's epsilon head and is far from any next state, does: on the paper-parametrisation digits runs its EMA student
had same-noise MSE 0.397 where its raw weights had 0.0154 (docs/benchmarks.md). `WarmupEMA` averages with
d_n = min(d, (1 + n) / (warmup + n)) after n updates (the warm-up of the EMA in diffusers' EMAModel and timm), so
the initial weights are forgotten within a few times `warmup` updates while the long-run decay stays d; warmup 0 is
the plain EMA. The re-implementation's 300k iterations at 0.9999 leave e^-30 of the start, so the warm-up changes
nothing at the paper's length.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from ard.checks import NonNegativeInt, Probability, check_knobs


def warmup_ema_fn(decay: float, warmup: int):
    """The AveragedModel average function of `WarmupEMA`: (average, current, updates so far) -> the new average."""
    def update(average: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        n = float(updates)
        rate = decay if warmup == 0 else min(decay, (1 + n) / (warmup + n))
        return rate * average + (1 - rate) * current
    return update


class WarmupEMA(EMAWeightAveraging):
    """EMAWeightAveraging whose decay warms up (see the module docstring); otherwise the same callback."""

    def __init__(self, decay: Probability = 0.999, warmup: NonNegativeInt = 10, **kwargs: Any):
        """
        Args:
            decay: the long-run decay d.
            warmup: updates after which the decay reaches (1 + n) / (warmup + n) >= d (0: the plain EMA).
            kwargs: EMAWeightAveraging's (device, use_buffers, update_every_n_steps, ...).
        """
        check_knobs(WarmupEMA.__init__, {"decay": decay, "warmup": warmup}, "trainer.callbacks.")
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = warmup_ema_fn(decay, warmup)
