"""The ARD student on a tiny SD3 and a tiny SD3.5-style model (ard/backbones/sd3.py): joint history attention
against explicit logits, N = 0 = the teacher, closed start = baseline, the KV cache = one pass and holding image
tokens only, no leak from the future, SD3.5's attn2 silent, per-step heads, gradient checkpointing, save / load,
the condition and config checks, and the FLOP count of history."""
import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from ard.backbones.sd3 import SD3
from ard.backbones.text import TextCondition
from ard.student import ARDStudent, sample
from ard.student.attention import HistoryContext, JointHistoryAttnProcessor, KVCache, visible_steps
from test_backbones import diffusers_log, open_gates_and_vary_heads, sd3_condition, tiny

B, S = 3, 4
SIZES = ["tiny", "sd35-tiny"]  # SD3; SD3.5-style (dual attention in block 0, qk rms-norm)
TIMESTEPS = torch.tensor([1000.0, 750.0, 500.0, 250.0, 0.0]).expand(B, -1)  # model time sigma * 1000
IMAGE_TOKENS = (8 // 2) ** 2


@pytest.fixture(scope="module", params=SIZES)
def teacher(request):
    return tiny("sd3", request.param)[0]


def states(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, 1, 8, 8, generator=torch.Generator().manual_seed(seed))  # (B, S, C, H, W)


def student_of(teacher, **knobs) -> ARDStudent:
    """A student of the velocity model read as its own next state (the flow schedule is not the adapter's)."""
    return ARDStudent(teacher, S, output="next_state", **{"history_blocks": 2, **knobs}).eval()


def cached(student, x, condition):
    cache = student.new_cache(B)
    out = torch.stack([student.step(x[:, s], s, TIMESTEPS[:, s], TIMESTEPS[:, s + 1], condition, cache)
                       for s in range(S)], dim=1)  # (B, S, C, H, W)
    return out, cache


def reference(attn, x, text, mask, gate):
    """Joint history attention by explicit logits: rows (b, s) of image tokens x (B*S, L, D) and text (B*S, T, D);
    a query of step s (image or text) sees the image keys of its visible steps and its own step's text keys, log g
    added to earlier steps' logits (G1). Returns the image and the text outputs."""
    heads, length, tokens = attn.heads, x.shape[1], x.shape[1] + text.shape[1]

    def project(image_layer, text_layer, image_norm=None, text_norm=None):  # -> (B, H, S*(L+T), d)
        y = [layer(z).unflatten(-1, (heads, -1)) for layer, z in ((image_layer, x), (text_layer, text))]
        y = [z if norm is None else norm(z) for z, norm in zip(y, (image_norm, text_norm))]  # (B*S, L | T, H, d)
        return torch.cat(y, dim=1).reshape(B, S * tokens, heads, -1).transpose(1, 2)  # (B, H, S*(L+T), d)

    q = project(attn.to_q, attn.add_q_proj, attn.norm_q, attn.norm_added_q)  # (B, H, S*(L+T), d)
    k = project(attn.to_k, attn.add_k_proj, attn.norm_k, attn.norm_added_k)  # (B, H, S*(L+T), d)
    v = project(attn.to_v, attn.add_v_proj)  # (B, H, S*(L+T), d)
    step = torch.arange(S).repeat_interleave(tokens)  # (S*(L+T),) each token's step
    image = (torch.arange(S * tokens) % tokens) < length  # (S*(L+T),) image tokens
    seen = torch.zeros(S * tokens, S * tokens, dtype=torch.bool)
    for s in range(S):
        visible = torch.isin(step, torch.tensor(visible_steps(mask, s, 1)))
        seen[step == s] = (image & visible) | (step == s)
    bias = torch.where(seen, 0.0, float("-inf"))  # (S*(L+T), S*(L+T))
    if gate is not None:
        bias = bias + torch.where(step[:, None] != step[None], gate.log().view(-1, 1, 1), torch.zeros(()))
    out = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1) @ v  # (B, H, S*(L+T), d)
    out = out.transpose(1, 2).reshape(B * S, tokens, -1)  # (B*S, L+T, D)
    return attn.to_out[0](out[:, :length]), attn.to_add_out(out[:, length:])


@pytest.mark.parametrize("mask", ["block_causal", "noise_and_current", "window", "block_diagonal"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("one_mask_below", [0, 10 ** 9])  # per-step calls / one masked call
def test_joint_history_attention_matches_explicit_logits(mask, gated, one_mask_below):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, added_kv_proj_dim=16, dim_head=8, heads=2, out_dim=16, context_pre_only=False,
                     bias=True, qk_norm="rms_norm", eps=1e-6, processor=JointAttnProcessor2_0())  # as SD3.5 builds it
    x, text = torch.randn(B * S, 5, 16), torch.randn(B * S, 3, 16)  # rows (b, s): 5 image, 3 text tokens
    gate = torch.tensor([[0.3, 2.0]]) if gated else None  # (N=1, H)
    proc = JointHistoryAttnProcessor(0, mask, one_mask_below_tokens=one_mask_below)
    ref = reference(attn, x, text, mask, None if gate is None else gate[0])
    for got, want in zip(proc(attn, x, text, history=HistoryContext(num_steps=S, gate=gate)), ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    cache = KVCache(batch_size=B, num_steps=S, num_layers=1)
    rows = lambda y: y.view(B, S, *y.shape[1:])  # noqa: E731 (B*S, ...) -> (B, S, ...)
    for s in range(S):
        step = proc(attn, rows(x)[:, s], rows(text)[:, s], history=HistoryContext(S, step=s, cache=cache, gate=gate))
        for got, want in zip(step, ref):
            torch.testing.assert_close(got, rows(want)[:, s], atol=1e-6, rtol=1e-5)
    for got, want in zip(proc(attn, x, text), JointAttnProcessor2_0()(attn, x, text)):  # no context: diffusers'
        assert torch.equal(got, want)


def test_baseline_is_the_teacher_and_closed_start_equals_it(teacher):
    """N = 0: every step is the teacher's own forward (its velocity); the closed history start reproduces it."""
    x, condition = states(), sd3_condition(B)
    with torch.no_grad():
        own = SD3().predict(teacher, x.flatten(0, 1), TIMESTEPS[:, :-1].flatten(), condition.repeat_interleave(S))
        baseline = student_of(teacher, history_blocks=0)
        assert torch.equal(baseline(x, TIMESTEPS, condition), own.view_as(x))
        closed = student_of(teacher, history_start="closed")
        torch.testing.assert_close(closed(x, TIMESTEPS, condition), own.view_as(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads", ["shared", "per_step"])
@pytest.mark.parametrize("start", ["plain", "closed"])
def test_cached_steps_equal_one_pass_and_cache_only_image_tokens(teacher, heads, start):
    student = student_of(teacher, heads=heads, history_start=start)
    with torch.no_grad():
        open_gates_and_vary_heads(student)
        x, condition = states(), sd3_condition(B)
        one_pass = student(x, TIMESTEPS, condition)
        steps, cache = cached(student, x, condition)
        assert not torch.allclose(one_pass, student_of(teacher, history_blocks=0)(x, TIMESTEPS, condition))
    assert (one_pass - steps).abs().max() <= 1e-5
    assert all(k.shape == (B, 2, S * IMAGE_TOKENS, 8) for k in cache.keys + cache.values)  # no text tokens


def test_each_step_sees_only_itself_and_earlier_steps(teacher):
    student = student_of(teacher, history_blocks=1)
    x = states().requires_grad_(True)
    out = student(x, TIMESTEPS, sd3_condition(B))
    for s in range(S):
        (grad,) = torch.autograd.grad(out[:, s].sum(), x, retain_graph=True)
        assert {j for j in range(S) if grad[:, j].abs().sum() > 0} == set(range(s + 1)), f"step {s}"


def test_history_blocks_log_nothing():
    """diffusers hands SD3.5's attn2 the same kwargs as attn and warns of a key its processor does not take: the
    student's pass-through processor takes it (without it, the warning is there); nothing else is logged."""
    student = student_of(tiny("sd3", "sd35-tiny")[0])
    with diffusers_log() as records, torch.no_grad():
        student(states(), TIMESTEPS, sd3_condition(B))
        cached(student, states(), sd3_condition(B))
        assert not records
        attn2 = student.transformer.transformer_blocks[0].attn2
        attn2.set_processor(attn2.processor.processor)  # the image self-attention's own processor
        student(states(), TIMESTEPS, sd3_condition(B))
    assert [r for r in records if "history" in r.getMessage()]


def test_gradient_checkpointing_gives_the_same_gradients(teacher):
    """The text stream goes through checkpointed blocks as through plain ones."""
    student = student_of(teacher, history_start="closed").train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            student.transformer.enable_gradient_checkpointing()
        student.zero_grad()
        student(states(), TIMESTEPS, sd3_condition(B)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    student.transformer.disable_gradient_checkpointing()
    assert grads[0].keys() == grads[1].keys() and "history_gate" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_sampling_and_save_load_round_trip(tmp_path):
    teacher = tiny("sd3", "sd35-tiny")[0]
    student = ARDStudent(teacher, 2, history_blocks=1, heads="per_step", output="next_state").eval()
    student.save_pretrained(tmp_path / "student")
    loaded = ARDStudent.from_pretrained(tmp_path / "student")
    noise, condition, timesteps = torch.randn(B, 1, 8, 8), sd3_condition(B), torch.tensor([1000.0, 500.0, 0.0])
    with torch.no_grad():
        assert torch.equal(sample(student, noise, condition, timesteps), sample(loaded, noise, condition, timesteps))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: TextCondition(c.embeddings[..., :8], c.mask, pooled=c.pooled), "reads 32 \\(joint_attention_dim\\)"),
    (lambda c: TextCondition(c.embeddings, c.mask), "pooled text embeddings of shape None"),
    (lambda c: TextCondition(c.embeddings, c.mask, pooled=c.pooled[:, :8]), "reads \\(3, 24\\)"),
    (lambda c: TextCondition.cat([c, sd3_condition(1, tokens=7)]), "SD3 attends to every text token"),
])
def test_a_condition_the_model_cannot_read_is_refused(edit, needle):
    teacher, condition = tiny("sd3")
    with pytest.raises(ValueError, match=needle):
        SD3().check_condition(teacher, edit(condition))


def test_load_checks_the_config_and_sets_the_sizes_resolution(tmp_path):
    """One checkpoint serves every latent side up to its position grid: loaded with a size, the model takes the
    size's sample_size and keeps the checkpoint's positions; a config ard would misread stops in one line."""
    torch.manual_seed(0)
    teacher = SD3().build("tiny", sample_size=4)  # a checkpoint made for 4 x 4 latents
    teacher.save_pretrained(tmp_path / "transformer")
    loaded = SD3().load(tmp_path, "tiny")
    assert loaded.config.sample_size == 8 and SD3().load(tmp_path, None).config.sample_size == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    with pytest.raises(ValueError, match="dual_attention_layers=\\(\\) does not match size 'sd35-tiny'"):
        SD3().load(tmp_path, "sd35-tiny")
    config = tmp_path / "transformer" / "config.json"
    original = json.loads(config.read_text())
    for field, value, needle in [("out_channels", 2, "must be in_channels \\(1\\) or null"),
                                 ("caption_projection_dim", 24, "must be num_attention_heads \\* attention_head_dim"),
                                 ("pos_embed_max_size", 1, "must be at least sample_size / patch_size \\(2\\)")]:
        config.write_text(json.dumps({**original, field: value}))
        with pytest.raises(ValueError, match=f"config.json: field '{field}' is {value}; {needle}"):
            SD3().load(tmp_path, None)


@pytest.mark.parametrize("mask", ["block_causal", "window", "noise_and_current"])
def test_historys_counted_flops_are_its_extra_image_keys(mask):
    """scripts/bench_history_cost.py's count on a tiny SD3 (meta device): the extra FLOPs of history are exactly
    2 (scores, values) multiply-adds per extra image key, per image and text query and channel in each history
    block."""
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_history_cost.py"))
    with torch.device("meta"):
        teacher = SD3().build("tiny", num_layers=3)
    text = 5
    extra = script["sample_flops"](teacher, S, 2, mask, 1, text) - script["sample_flops"](teacher, S, 0, mask, 1, text)
    earlier = sum(len(visible_steps(mask, s, 1)) - 1 for s in range(S))
    assert extra == 2 * 2 * 2 * (IMAGE_TOKENS + text) * IMAGE_TOKENS * 16 * earlier  # FLOPs = 2 x MACs; N = 2, D = 16
