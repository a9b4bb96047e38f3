"""History attention processor on a bare diffusers Attention: the gated formula (G1) against explicit
logits, KV-cache steps against the one-pass layout, the gate's gradient, and the plain fallback."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ard.student.attention import HistoryAttnProcessor, HistoryContext, KVCache, visible_steps

B, S, L, HEADS, DIM = 2, 4, 5, 2, 8  # odd token count on purpose


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=HEADS * DIM, heads=HEADS, dim_head=DIM, bias=True)


def reference(attn, x, mask, window, gate):
    """Explicit logits over all S*L keys with the step mask and log g on earlier steps' keys (G1)."""
    q, k, v = (f(x).view(B, S * L, HEADS, DIM).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    logits = q @ k.transpose(-1, -2) / DIM ** 0.5  # (B, H, S*L, S*L)
    step = torch.arange(S).repeat_interleave(L)  # step of each token
    seen = torch.zeros(S * L, S * L, dtype=torch.bool)
    for s in range(S):
        for j in visible_steps(mask, s, window):
            seen[step == s, j * L:(j + 1) * L] = True
    history = step[:, None] != step[None, :]  # (S*L, S*L) key from another step
    bias = torch.where(seen, 0.0, float("-inf"))
    if gate is not None:
        bias = bias + torch.where(history, gate.log().view(-1, 1, 1), torch.zeros(()))  # (H, S*L, S*L)
    out = torch.softmax(logits + bias, dim=-1) @ v  # (B, H, S*L, DIM)
    return attn.to_out[0](out.transpose(1, 2).reshape(B * S, L, HEADS * DIM))


@pytest.mark.parametrize("mask,window", [("block_causal", 1), ("noise_and_current", 1), ("window", 1),
                                         ("window", 2), ("block_diagonal", 1)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("one_mask_below", [0, 10 ** 9])  # per-step calls / one masked call
def test_one_pass_and_cached_steps_match_explicit_attention(attn, mask, window, gated, one_mask_below):
    x = torch.randn(B * S, L, HEADS * DIM)  # rows ordered (b, s)
    gate = torch.tensor([[0.3, 2.0]]) if gated else None  # (N=1, H)
    proc = HistoryAttnProcessor(0, mask, window, one_mask_below_tokens=one_mask_below)
    ref = reference(attn, x.view(B, S * L, -1), mask, window, None if gate is None else gate[0])
    one_pass = proc(attn, x, history=HistoryContext(num_steps=S, gate=gate))
    torch.testing.assert_close(one_pass, ref, atol=1e-6, rtol=1e-5)
    cache = KVCache(batch_size=B, num_steps=S, num_layers=1)
    rows = x.view(B, S, L, -1)
    for s in range(S):
        step = proc(attn, rows[:, s], history=HistoryContext(num_steps=S, step=s, cache=cache, gate=gate))
        torch.testing.assert_close(step, ref.view(B, S, L, -1)[:, s], atol=1e-6, rtol=1e-5)


def test_visible_steps_of_each_mask():
    assert [visible_steps("block_causal", s) for s in range(4)] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert [visible_steps("noise_and_current", s) for s in range(4)] == [[0], [0, 1], [0, 2], [0, 3]]
    assert [visible_steps("window", s, 2) for s in range(4)] == [[0], [0, 1], [0, 1, 2], [1, 2, 3]]
    assert [visible_steps("block_diagonal", s) for s in range(4)] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("one_mask_below", [0, 10 ** 9])
def test_closed_gate_is_exactly_per_step_attention_and_gets_a_gradient(attn, one_mask_below):
    x = torch.randn(B * S, L, HEADS * DIM)
    gate = torch.zeros(1, HEADS, requires_grad=True)
    proc = HistoryAttnProcessor(0, one_mask_below_tokens=one_mask_below)
    out = proc(attn, x, history=HistoryContext(num_steps=S, gate=gate))
    assert torch.equal(out, AttnProcessor2_0()(attn, x))  # bit-identical to diffusers' per-row attention
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert (gate.grad.abs() > 0).all()
    # the gradient at g = 0 is the one-sided derivative: check it by a finite difference
    h = 1e-3
    with torch.no_grad():
        bumped = proc(attn, x, history=HistoryContext(num_steps=S, gate=gate + h))
    fd = ((bumped - out) * weights).sum() / h
    torch.testing.assert_close(gate.grad.sum(), fd, rtol=2e-2, atol=1e-3)


def test_without_context_it_is_diffusers_attention(attn):
    x = torch.randn(3, L, HEADS * DIM)
    assert torch.equal(HistoryAttnProcessor(0)(attn, x), AttnProcessor2_0()(attn, x))
