"""History attention: a diffusers attention processor for the lowest N blocks of the ARD student.

The student folds its S steps into the batch, so every transformer block sees tokens (B*S, L, D) and
runs the teacher's own code. Only the self-attention of the lowest N blocks is replaced: there the
queries of step s also attend to the keys of earlier steps chosen by the mask (ARD, Kim et al. 2025,
sec. 3.2 and fig. 3):

    block_causal       M4: steps 0..s (the ARD default)
    noise_and_current  M3: step 0 (the initial noise x_T) and step s
    window             M2: steps s-w..s
    block_diagonal     M1: step s only (= step distillation, the same as N = 0)

Two ways to run it, chosen by the `HistoryContext` passed through `cross_attention_kwargs["history"]`:
- one pass over all S steps (training, teacher-forced history): per query step, one attention over
  the visible steps' keys only (no compute spent on masked-out blocks; see scripts/bench_student.py
  for the measurement against one masked attention over all S*L keys);
- one step with an explicit `KVCache` (inference): the step's keys/values are written into the cache
  and the queries attend to the cached keys of the visible steps; nothing is recomputed.

History gate ("closed" history start): per block and head a gate g >= 0, initialised at 0, multiplies
the unnormalised softmax weights of every earlier step's keys (equivalently log g is added to their
logits):

    out = (sum_cur e^l v + g sum_hist e^l v) / (sum_cur e^l + g sum_hist e^l)              (G1)

At g = 0 this is exactly the per-step attention, so the untrained ARD student equals the baseline,
and d out / d g = (Z_hist / Z_cur) (out_hist - out_cur) != 0, so the gate can open. Training computes
(G1) from two fused attentions: the per-step one (out_cur, the baseline's own call) and one over all
visible keys with an extra value channel that is 1 on history keys, which returns the history's share
pi = Z_hist / (Z_cur + Z_hist) of the plain softmax alongside out_plain:

    out = out_cur + g / ((1 - pi) + g pi) * (out_plain - out_cur)                             (G2)

Inference adds log g to the history logits of one attention (the same cost as plain history).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F

MaskKind = Literal["block_causal", "noise_and_current", "window", "block_diagonal"]  # M4, M3, M2, M1


def check_choice(name: str, value: str, kind) -> str:
    """Raise a one-line error naming the knob when `value` is not one of the Literal `kind`'s choices."""
    if value not in get_args(kind):
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, get_args(kind)))}")
    return value


def visible_steps(mask: MaskKind, s: int, window: int = 1) -> list[int]:
    """Steps whose tokens the queries of step s attend to, ascending; the last one is s itself."""
    if mask == "block_causal":
        return list(range(s + 1))
    if mask == "noise_and_current":
        return [0, s] if s > 0 else [0]
    if mask == "window":
        return list(range(max(0, s - window), s + 1))
    return [s]  # block_diagonal


def _step_blocks(x: torch.Tensor, steps: list[int], tokens: int) -> torch.Tensor:
    """Tokens of the given steps from x (B, H, n*L, d) laid out step after step: a view when contiguous."""
    if steps == list(range(steps[0], steps[-1] + 1)):
        return x[:, :, steps[0] * tokens:(steps[-1] + 1) * tokens]  # (B, H, len(steps)*L, d)
    return torch.cat([x[:, :, j * tokens:(j + 1) * tokens] for j in steps], dim=2)  # (B, H, len(steps)*L, d)


@lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, H, Lq, d), k (B, H, Lk, d), v (B, H, Lk, dv).

    xformers' memory-efficient attention when it is installed and the tensors are on CUDA, torch's
    scaled_dot_product_attention otherwise. bias broadcasts to (B, H, Lq, Lk).
    """
    xops = _xformers_ops() if q.is_cuda else None
    if xops is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, H, Lq, dv)
    if bias is not None:
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # (B, H, Lq, Lk)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale)  # (B, Lq, H, dv)
    return out.transpose(1, 2)  # (B, H, Lq, dv)


@dataclass
class KVCache:
    """Keys and values of the steps run so far, for each history block: the explicit inference state.

    Created by the caller (`ARDStudent.new_cache`) and passed to every `ARDStudent.step`; the student
    keeps no hidden state. Buffers are allocated on the first write, one per history block, laid out
    (B, H, num_steps * L, d) step after step so that a contiguous range of steps is a view.
    """
    batch_size: int
    num_steps: int
    num_layers: int  # number of history blocks N
    steps: int = 0  # steps written so far (advanced by ARDStudent.step)
    keys: list[torch.Tensor | None] = field(default_factory=list)  # per history block: (B, H, S*L, d)
    values: list[torch.Tensor | None] = field(default_factory=list)  # per history block: (B, H, S*L, d)

    def __post_init__(self):
        self.keys = self.keys or [None] * self.num_layers
        self.values = self.values or [None] * self.num_layers

    def write(self, layer: int, s: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store step s's k, v (B, H, L, d) of one history block; return that block's full buffers."""
        b, h, tokens, d = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(b, h, self.num_steps * tokens, d)  # (B, H, S*L, d)
            self.values[layer] = v.new_empty(b, h, self.num_steps * tokens, v.shape[-1])  # (B, H, S*L, d)
        self.keys[layer][:, :, s * tokens:(s + 1) * tokens] = k
        self.values[layer][:, :, s * tokens:(s + 1) * tokens] = v
        return self.keys[layer], self.values[layer]


@dataclass
class HistoryContext:
    """What the history processors need to know about one call; passed as cross_attention_kwargs["history"].

    One pass over all steps (training): cache None, the batch holds B*S rows ordered (b, s).
    One step with a cache (inference): step = s, the batch holds B rows of step s.
    """
    num_steps: int  # S: steps folded into the batch (one pass) or the trajectory length (cached step)
    step: int | None = None  # the step of a cached call
    cache: KVCache | None = None
    gate: torch.Tensor | None = None  # (N, H) history gates g >= 0 of the closed start; None: plain


def gate_values(gate: torch.Tensor) -> torch.Tensor:
    """g = max(p, 0) with a straight-through gradient below 0, so a gate pushed shut can open again."""
    return gate + (gate.clamp(min=0) - gate).detach()


class HistoryAttnProcessor:
    """Self-attention of one history block (layer < N) over the visible steps (see module docstring).

    Without a HistoryContext it is the plain per-row attention of diffusers' AttnProcessor2_0.
    """

    def __init__(self, layer: int, mask: MaskKind = "block_causal", window: int = 1):
        self.layer = layer  # index among the history blocks (row of the gate, slot in the cache)
        self.mask = check_choice("mask", mask, MaskKind)
        self.window = window  # M2: previous steps visible to each step

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 history: HistoryContext | None = None) -> torch.Tensor:
        rows, tokens, _ = hidden_states.shape
        heads = attn.heads
        # Same layout as diffusers' AttnProcessor2_0, so per-step attention is bit-identical to the teacher's.
        q = attn.to_q(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        k = attn.to_k(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        v = attn.to_v(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        gate = None if history is None or history.gate is None else gate_values(history.gate[self.layer])  # (H,)
        if history is None:
            out = attention(q, k, v)  # (R, H, L, d)
        elif history.cache is None:
            out = self._one_pass(q, k, v, history.num_steps, gate)  # (B*S, H, L, d)
        else:
            out = self._cached_step(q, k, v, history.step, history.cache, gate)  # (B, H, L, d)
        out = out.transpose(1, 2).reshape(rows, tokens, -1).to(q.dtype)  # (R, L, D)
        return attn.to_out[1](attn.to_out[0](out))  # (R, L, D)

    def _one_pass(self, q, k, v, num_steps: int, gate: torch.Tensor | None) -> torch.Tensor:
        """All steps at once (teacher-forced history); q, k, v (B*S, H, L, d) with rows ordered (b, s)."""
        rows, heads, tokens, d = q.shape
        batch = rows // num_steps
        fold = lambda x: x.reshape(batch, num_steps, heads, tokens, -1).transpose(1, 2).reshape(  # noqa: E731
            batch, heads, num_steps * tokens, x.shape[-1])  # (B*S, H, L, d) -> (B, H, S*L, d)
        local = attention(q, k, v) if gate is not None else None  # (B*S, H, L, d) per-step attention
        local_steps = None if local is None else local.view(batch, num_steps, heads, tokens, d)  # (B, S, H, L, d)
        qf, kf, vf = fold(q), fold(k), fold(v)  # (B, H, S*L, d) each
        outs = []
        for s in range(num_steps):
            steps = visible_steps(self.mask, s, self.window)
            q_s = qf[:, :, s * tokens:(s + 1) * tokens]  # (B, H, L, d)
            k_s, v_s = _step_blocks(kf, steps, tokens), _step_blocks(vf, steps, tokens)  # (B, H, n*L, d)
            if gate is None:
                outs.append(attention(q_s, k_s, v_s))  # (B, H, L, d)
            elif len(steps) == 1:
                outs.append(local_steps[:, s])  # (B, H, L, d)
            else:
                outs.append(_gated(q_s, k_s, v_s, local_steps[:, s], gate, tokens))  # (B, H, L, d)
        out = torch.stack(outs, dim=1)  # (B, S, H, L, d)
        return out.reshape(rows, heads, tokens, d)  # (B*S, H, L, d)

    def _cached_step(self, q, k, v, s: int, cache: KVCache, gate: torch.Tensor | None) -> torch.Tensor:
        """One step s; q, k, v (B, H, L, d). Writes k, v into the cache, attends to the visible steps."""
        tokens = q.shape[2]
        steps = visible_steps(self.mask, s, self.window)
        if len(steps) == 1:
            if self.mask != "block_diagonal":  # later steps may read this one
                cache.write(self.layer, s, k, v)
            return attention(q, k, v)  # (B, H, L, d)
        keys, values = cache.write(self.layer, s, k, v)  # (B, H, S*L, d) each
        k_s, v_s = _step_blocks(keys, steps, tokens), _step_blocks(values, steps, tokens)  # (B, H, n*L, d)
        bias = None
        if gate is not None:  # (G1) as one attention: log g added to the logits of history keys
            hist = torch.zeros(k_s.shape[2], dtype=torch.bool, device=q.device)  # (n*L,)
            hist[:-tokens] = True
            bias = torch.where(hist, gate.detach().log().view(-1, 1, 1).to(q.dtype),
                               q.new_zeros(()))[None, :, :, :]  # (1, H, 1, n*L)
        return attention(q, k_s, v_s, bias)  # (B, H, L, d)


def _gated(q, k, v, local, gate, tokens: int) -> torch.Tensor:
    """Gated history attention (G2). q (B, H, L, d); k, v (B, H, n*L, d) whose last L keys are the query's
    own step; local (B, H, L, d) the per-step attention; gate (H,). Returns (B, H, L, d)."""
    d = q.shape[-1]
    pad = 8 - d % 8  # room for the history indicator, keeping the head size a multiple of 8 (fused kernels)
    indicator = torch.zeros(*v.shape[:-1], pad, dtype=v.dtype, device=v.device)  # (B, H, n*L, pad)
    indicator[:, :, :-tokens, 0] = 1  # 1 on history keys
    out = attention(F.pad(q, (0, pad)), F.pad(k, (0, pad)), torch.cat([v, indicator], dim=-1),
                    scale=1 / math.sqrt(d))  # (B, H, L, d + pad); zero padding leaves the logits unchanged
    plain, share = out[..., :d].float(), out[..., d:d + 1].float()  # (B, H, L, d), (B, H, L, 1) = pi
    g = gate.float().view(1, -1, 1, 1)  # (1, H, 1, 1)
    weight = g / ((1 - share) + g * share).clamp_min(torch.finfo(torch.float32).tiny)  # (B, H, L, 1)
    return (local.float() + weight * (plain - local.float())).to(q.dtype)  # (B, H, L, d), (G2)
