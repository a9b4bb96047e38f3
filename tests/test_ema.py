"""The students' warmed-up EMA (ard/ema.py): after n updates it holds prod (rate_k) of the initial weights, not d^n;
warmup 0 is Lightning's plain EMA (configs/digits/paper.yaml uses it: tests/test_bench_digits.py)."""
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel

from ard.ema import WarmupEMA


def averaged_after(callback, updates: int) -> float:
    """An AveragedModel with the callback's average function, started at 0 (its first update copies the model in)
    and then fed 1 `updates` times."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    average = AveragedModel(model, use_buffers=False, **callback._kwargs)
    average.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(updates):
        average.update_parameters(model)
    return float(average.module.weight)


def test_the_warmup_forgets_the_start_and_warmup_0_is_the_plain_ema():
    plain = averaged_after(EMAWeightAveraging(decay=0.999), 200)
    assert plain == pytest.approx(1 - 0.999 ** 200, rel=1e-4)
    assert averaged_after(WarmupEMA(decay=0.999, warmup=0), 200) == pytest.approx(plain, rel=1e-6)
    warm = averaged_after(WarmupEMA(decay=0.999, warmup=10), 200)
    left = 1.0
    for n in range(1, 201):
        left *= min(0.999, (1 + n) / (10 + n))
    assert warm == pytest.approx(1 - left, rel=1e-4) and 1 - warm < 0.06 < 1 - plain


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="warmup=-1"):
        WarmupEMA(warmup=-1)
