"""The ARD student on a tiny PixArt (text-conditioned, ard/backbones/pixart.py): history on the image
self-attention only, the KV cache = one pass and holding image tokens only, no leak from the future, N = 0 =
the teacher, closed start = baseline, padded text ignored, the cross-attention silent, the 1024 models'
size conditions passed through, save / load."""
from pathlib import Path

import pytest
import torch

from ard.backbones.pixart import PixArt
from ard.backbones.text import TextCondition
from ard.schedules import alpha_bar, ddim_jump, make_scheduler
from ard.student import ARDStudent, sample
from test_backbones import diffusers_log, open_gates_and_vary_heads, text_condition, tiny

B, S = 3, 4
TIMESTEPS = torch.tensor([999, 749, 499, 249, -1]).expand(B, -1)


@pytest.fixture(scope="module")
def teacher():
    return tiny("pixart")[0]


def states(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, 1, 8, 8, generator=torch.Generator().manual_seed(seed))  # (B, S, C, H, W)


def cached(student, x, condition):
    cache = student.new_cache(B)
    out = torch.stack([student.step(x[:, s], s, TIMESTEPS[:, s], TIMESTEPS[:, s + 1], condition, cache)
                       for s in range(S)], dim=1)  # (B, S, C, H, W)
    return out, cache


@pytest.mark.parametrize("heads", ["shared", "per_step"])
@pytest.mark.parametrize("start", ["plain", "closed"])
def test_cached_steps_equal_one_pass_and_cache_only_image_tokens(teacher, heads, start):
    student = ARDStudent(teacher, S, history_blocks=2, heads=heads, history_start=start, output="next_state").eval()
    with torch.no_grad():
        open_gates_and_vary_heads(student)
        x, condition = states(), text_condition(B)
        one_pass = student(x, TIMESTEPS, condition)
        steps, cache = cached(student, x, condition)
    assert (one_pass - steps).abs().max() <= 1e-5
    image_tokens = (8 // 2) ** 2
    assert all(k.shape[2] == S * image_tokens for k in cache.keys)  # (B, H, S*L_img, d): no text tokens


def test_each_step_sees_only_itself_and_earlier_steps(teacher):
    student = ARDStudent(teacher, S, history_blocks=1)
    x = states().requires_grad_(True)
    out = student(x, TIMESTEPS, text_condition(B))
    for s in range(S):
        (grad,) = torch.autograd.grad(out[:, s].sum(), x, retain_graph=True)
        assert {j for j in range(S) if grad[:, j].abs().sum() > 0} == set(range(s + 1)), f"step {s}"


def test_baseline_is_the_teacher_and_closed_start_equals_it(teacher):
    """N = 0: every step is the teacher's own DDIM jump (eps from its learned-sigma output); the closed history
    start reproduces the baseline exactly."""
    x, condition = states(), text_condition(B)
    rows, t_from, t_to = x.flatten(0, 1), TIMESTEPS[:, :-1].flatten(), TIMESTEPS[:, 1:].flatten()
    sched = make_scheduler()
    with torch.no_grad():
        eps = PixArt().predict(teacher, rows, t_from, condition.repeat_interleave(S))
        expected = ddim_jump(rows, eps, alpha_bar(sched, t_from), alpha_bar(sched, t_to)).view_as(x)
        baseline = ARDStudent(teacher, S, history_blocks=0).eval()
        assert (baseline(x, TIMESTEPS, condition) - expected).abs().max() <= 1e-5
        closed = ARDStudent(teacher, S, history_blocks=2, history_start="closed").eval()
        torch.testing.assert_close(closed(x, TIMESTEPS, condition), baseline(x, TIMESTEPS, condition),
                                   rtol=0, atol=1e-5)


def test_padded_text_tokens_are_ignored(teacher):
    condition = text_condition(B)
    g = torch.Generator().manual_seed(5)
    padded = TextCondition(torch.cat([condition.embeddings, torch.randn(B, 3, 32, generator=g)], dim=1),
                           torch.cat([condition.mask, torch.zeros(B, 3, dtype=torch.bool)], dim=1))
    student = ARDStudent(teacher, S, history_blocks=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(states(), TIMESTEPS, padded), student(states(), TIMESTEPS, condition),
                                   rtol=0, atol=1e-5)


def test_the_text_cross_attention_takes_the_history_context_silently(teacher):
    """diffusers hands attn2 the same kwargs as attn1 and warns of a key its processor does not take: the
    student's pass-through processor takes it (without it, the warning is there)."""
    with diffusers_log() as records, torch.no_grad():
        student = ARDStudent(teacher, S, history_blocks=2).eval()
        student(states(), TIMESTEPS, text_condition(B))
        assert not [r for r in records if "history" in r.getMessage()]
        attn2 = student.transformer.transformer_blocks[0].attn2
        attn2.set_processor(attn2.processor.processor)  # the cross-attention's own processor
        student(states(), TIMESTEPS, text_condition(B))
    assert [r for r in records if "history" in r.getMessage()]


def test_resolution_and_aspect_ratio_conditions_pass_through():
    """A 1024-style PixArt (use_additional_conditions) embeds the condition's sizes: the student's step is the
    teacher's forward with them, and other sizes change it."""
    torch.manual_seed(0)
    teacher = PixArt().build("tiny", num_attention_heads=3, cross_attention_dim=24, use_additional_conditions=True)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    teacher.eval()
    base = text_condition(B)
    sized = TextCondition(base.embeddings, base.mask, torch.tensor([[1024.0, 1024.0]]).expand(B, -1),
                          torch.ones(B, 1))
    other = TextCondition(base.embeddings, base.mask, torch.tensor([[768.0, 1344.0]]).expand(B, -1),
                          torch.full((B, 1), 768 / 1344))
    student = ARDStudent(teacher, 1, history_blocks=0, output="next_state").eval()
    x, t = states()[:, :1], TIMESTEPS[:, [0, -1]]
    with torch.no_grad():
        own = PixArt().predict(teacher, x[:, 0], t[:, 0], sized)
        assert torch.equal(student(x, t, sized)[:, 0], own)
        assert not torch.allclose(student(x, t, other), student(x, t, sized))
        with pytest.raises(ValueError, match="takes resolution and aspect-ratio conditions"):
            student(x, t, base)


def test_sampling_guidance_and_save_load_round_trip(teacher, tmp_path):
    student = ARDStudent(teacher, 2, history_blocks=1, heads="per_step").eval()
    student.save_pretrained(tmp_path / "student")
    loaded = ARDStudent.from_pretrained(tmp_path / "student")
    noise, condition = torch.randn(B, 1, 8, 8), text_condition(B)
    with torch.no_grad():
        a = sample(student, noise, condition, torch.tensor([999, 499, -1]))
        assert torch.equal(a, sample(loaded, noise, condition, torch.tensor([999, 499, -1])))
    with pytest.raises(ValueError, match="reads 32 \\(caption_channels\\)"):
        sample(student, noise, TextCondition(torch.randn(B, 5, 8), condition.mask), torch.tensor([999, 499, -1]))


@pytest.mark.parametrize("mask", ["block_causal", "window", "noise_and_current"])
def test_historys_counted_flops_are_its_extra_keys(mask):
    """scripts/bench_history_cost.py's count on a tiny PixArt (meta device): the extra FLOPs of history are
    exactly 2 (scores, values) multiply-adds per extra key, query and channel in each history block."""
    import runpy

    from ard.student.attention import visible_steps

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_history_cost.py"))
    with torch.device("meta"):
        teacher = PixArt().build("tiny", num_layers=3)
    extra = (script["sample_flops"](teacher, S, 2, mask, 1, 5) - script["sample_flops"](teacher, S, 0, mask, 1, 5))
    earlier = sum(len(visible_steps(mask, s, 1)) - 1 for s in range(S))
    assert extra == 2 * 2 * 2 * 16 ** 2 * 16 * earlier  # FLOPs = 2 x MACs; N = 2 blocks, L = 16 tokens, D = 16
