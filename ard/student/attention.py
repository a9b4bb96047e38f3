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
  the visible steps' keys only (no compute spent on masked-out blocks), or, for few tokens per step,
  one attention over all S*L keys with the step mask (fewer, larger calls; measured in
  scripts/bench_student.py);
- one step with an explicit `KVCache` (inference): the step's keys/values are written into the cache
  and the queries attend to the cached keys of the visible steps; nothing is recomputed.

History gate ("closed" history start): per block and head a gate g >= 0, initialised at 0, multiplies
the unnormalised softmax weights of every earlier step's keys (equivalently log g is added to their
logits):

    out = (sum_cur e^l v + g sum_hist e^l v) / (sum_cur e^l + g sum_hist e^l)              (G1)

At g = 0 this is exactly the per-step attention, so the untrained ARD student equals the baseline,
and d out / d g = (Z_hist / Z_cur) (out_hist - out_cur) != 0, so the gate can open. Training computes
(G1) from fused attentions only: the per-step one (out_cur, the baseline's own call) and, per step with
history, one over its visible keys whose values carry S extra one-hot "step of this key" channels, so
that besides out_plain it returns the own step's share 1 - pi = Z_cur / (Z_cur + Z_hist) of the mass:

    out = out_cur + g / ((1 - pi) + g pi) * (out_plain - out_cur)                             (G2)

Inference adds log g to the history logits of one attention (the same cost as plain history).

Joint attention (SD3's MMDiT blocks: one softmax over a step's image and text tokens), `JointHistoryAttnProcessor`:
the image and text queries of step s attend to step s's image and text keys and to the image keys of the earlier
steps the mask shows it; text keys are seen by their own step only, so the cache holds image tokens only. The
masks, layouts and gate above are the same, with the text keys appended to each step's visible keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from ard.checks import check_choice

MaskKind = Literal["block_causal", "noise_and_current", "window", "block_diagonal"]  # M4, M3, M2, M1
# One-pass (training) layout: below this many tokens per step, one attention over all S*L keys with the
# step mask beats one call per query step over its visible keys (CPU, forward + backward, S = 4:
# L = 16 1.7x faster, L = 64 even, L = 256 1.5x slower; scripts/bench_student.py, training_attention).
ONE_MASK_BELOW_TOKENS = 64


def visible_steps(mask: MaskKind, s: int, window: int = 1) -> list[int]:
    """Steps whose tokens the queries of step s attend to, ascending; the last one is s itself."""
    if mask == "block_causal":
        return list(range(s + 1))
    if mask == "noise_and_current":
        return [0, s] if s > 0 else [0]
    if mask == "window":
        return list(range(max(0, s - window), s + 1))
    return [s]  # block_diagonal


def _step_blocks(x: torch.Tensor | None, steps: list[int], tokens: int) -> torch.Tensor | None:
    """Tokens of the given steps from x (B, H, n*L, d) laid out step after step: a view when contiguous (None:
    None)."""
    if x is None:
        return None
    if steps == list(range(steps[0], steps[-1] + 1)):
        return x[:, :, steps[0] * tokens:(steps[-1] + 1) * tokens]  # (B, H, len(steps)*L, d)
    return torch.cat([x[:, :, j * tokens:(j + 1) * tokens] for j in steps], dim=2)  # (B, H, len(steps)*L, d)


def _joined(x: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """Keys or values x (B, H, n, d) followed by own-step ones (B, H, T, d) when there are any."""
    return x if own is None else torch.cat([x, own], dim=2)  # (B, H, n [+ T], d)


def _step_onehot(num_steps: int, tokens: int, width: int, device) -> torch.Tensor:
    """The one-hot (S*L, width) of each token's step, for S steps of L tokens laid out step after step."""
    return F.one_hot(torch.arange(num_steps, device=device).repeat_interleave(tokens), width)  # (S*L, width)


def _mark_steps(x: torch.Tensor, num_steps: int, width: int) -> torch.Tensor:
    """Values x (B, H, S*L, d), laid out step after step, followed by `width` channels: each token's step one-hot."""
    onehot = _step_onehot(num_steps, x.shape[2] // num_steps, width, x.device)  # (S*L, width)
    return torch.cat([x, onehot.to(x.dtype).expand(*x.shape[:2], -1, -1)], dim=-1)  # (B, H, S*L, d + width)


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
    if bias is not None:  # xformers wants an additive bias whose rows start 8-aligned: slice a wider buffer
        keys = k.shape[2]
        full = q.new_zeros(*q.shape[:3], -(-keys // 8) * 8)[..., :keys]  # (B, H, Lq, Lk)
        bias = full.masked_fill_(~bias, float("-inf")) if bias.dtype == torch.bool else full.copy_(bias)
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
    keys: list[torch.Tensor | None] = field(init=False)  # per history block: (B, H, S*L, d)
    values: list[torch.Tensor | None] = field(init=False)  # per history block: (B, H, S*L, d)

    def __post_init__(self):
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

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

    def __init__(self, layer: int, mask: MaskKind = "block_causal", window: int = 1,
                 one_mask_below_tokens: int = ONE_MASK_BELOW_TOKENS):
        self.layer = layer  # index among the history blocks (row of the gate, slot in the cache)
        self.mask = check_choice("mask", mask, MaskKind)
        self.window = window  # M2: previous steps visible to each step
        self.one_mask_below_tokens = one_mask_below_tokens  # one-pass layout switch (see _groups)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 history: HistoryContext | None = None) -> torch.Tensor:
        rows, tokens, _ = hidden_states.shape
        heads = attn.heads
        # Same layout as diffusers' AttnProcessor2_0, so per-step attention is bit-identical to the teacher's.
        q = attn.to_q(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        k = attn.to_k(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        v = attn.to_v(hidden_states).view(rows, tokens, heads, -1).transpose(1, 2)  # (R, H, L, d)
        out = self._attend(q, k, v, history)  # (R, H, L, d)
        out = out.transpose(1, 2).reshape(rows, tokens, -1).to(q.dtype)  # (R, L, D)
        return attn.to_out[1](attn.to_out[0](out))  # (R, L, D)

    def _attend(self, q, k, v, history: HistoryContext | None, own_k=None, own_v=None) -> torch.Tensor:
        """The attention of queries q (R, H, Lq, d) to keys and values k, v (R, H, L, d), which later steps see
        (image tokens), and own_k, own_v (R, H, T, d) or None, which only their own step sees (SD3's text tokens),
        by the history context: per row (None), one pass over all steps, or one cached step. Returns (R, H, Lq, d)."""
        gate = None if history is None or history.gate is None else gate_values(history.gate[self.layer])  # (H,)
        if history is None:
            return attention(q, _joined(k, own_k), _joined(v, own_v))  # (R, H, Lq, d)
        if history.cache is None:
            return self._one_pass(q, k, v, history.num_steps, gate, own_k, own_v)  # (B*S, H, Lq, d)
        return self._cached_step(q, k, v, history.step, history.cache, gate, own_k, own_v)  # (B, H, Lq, d)

    def _one_pass(self, q, k, v, num_steps: int, gate: torch.Tensor | None, own_k=None, own_v=None) -> torch.Tensor:
        """All steps at once (teacher-forced history); q (B*S, H, Lq, d), k, v (B*S, H, L, d), own_k, own_v
        (B*S, H, T, d) or None (see `_attend`), rows ordered (b, s)."""
        q_tokens, tokens, d = q.shape[2], k.shape[2], q.shape[3]
        own_tokens = 0 if own_k is None else own_k.shape[2]
        fold = lambda x: None if x is None else rearrange(x, "(b s) h l d -> b h (s l) d", s=num_steps)  # noqa: E731
        qf, kf, vf, of_k, of_v = fold(q), fold(k), fold(v), fold(own_k), fold(own_v)  # (B, H, S*L', d) each
        if gate is not None:  # closed start (G2)
            local = fold(attention(q, _joined(k, own_k), _joined(v, own_v)))  # (B, H, S*Lq, d): the baseline's call
            # Extra value channels: one-hot of each key's step, so that the output also holds each step's
            # share of the softmax mass; q and k get zeros there (logits unchanged); width a multiple of 8.
            extra = num_steps + (-(d + num_steps)) % 8
            qf, kf, of_k = (None if x is None else F.pad(x, (0, extra)) for x in (qf, kf, of_k))  # (B, H, S*L', d+E)
            vf, of_v = (None if x is None else _mark_steps(x, num_steps, extra) for x in (vf, of_v))  # (.., d+E)
        out = torch.cat([attention(_step_blocks(qf, q_steps, q_tokens),
                                   _joined(_step_blocks(kf, k_steps, tokens), _step_blocks(of_k, q_steps, own_tokens)),
                                   _joined(_step_blocks(vf, k_steps, tokens), _step_blocks(of_v, q_steps, own_tokens)),
                                   mask, scale=1 / math.sqrt(d))
                         for q_steps, k_steps, mask in self._groups(num_steps, q_tokens, tokens, own_tokens,
                                                                    gate is not None, q.device)],
                        dim=2)  # (B, H, n*Lq, d [+ E]): the last n steps' queries
        if gate is not None:
            first = local.shape[2] - out.shape[2]  # tokens of the leading steps left out (no history)
            plain = out[..., :d].float()  # (B, H, n*Lq, d) plain softmax attention over the visible steps
            onehot = _step_onehot(num_steps, q_tokens, extra, q.device)[first:]  # (n*Lq, E) each query's step
            own = (out[..., d:].float() * onehot).sum(-1, keepdim=True)  # (B, H, n*Lq, 1) = 1 - pi
            g = gate.float().view(1, -1, 1, 1)  # (1, H, 1, 1)
            weight = g / (own + g * (1 - own)).clamp_min(torch.finfo(torch.float32).tiny)  # (B, H, n*Lq, 1)
            merged = torch.lerp(local[:, :, first:].float(), plain, weight).to(q.dtype)  # (G2); = local at g = 0
            out = torch.cat([local[:, :, :first], merged], dim=2)  # (B, H, S*Lq, d)
        return rearrange(out, "b h (s l) d -> (b s) h l d", s=num_steps)  # (B*S, H, Lq, d)

    def _groups(self, num_steps: int, q_tokens: int, tokens: int, own_tokens: int, skip_first: bool, device) -> list:
        """(query steps, key steps, boolean mask or None) of each attention call of a one-pass forward; each call
        also sees the own-step keys (`_attend`'s own_k: own_tokens a step) of its query steps, after the others.

        Below `one_mask_below_tokens` tokens a step: one call over all S*L keys with the step mask (per-call
        overhead dominates); else one call per query step over its visible keys only (no compute on masked
        blocks). skip_first: leave out step 0, which sees only itself (the closed start takes it from the
        per-step attention).
        """
        if tokens < self.one_mask_below_tokens:
            seen = torch.zeros(num_steps, num_steps, dtype=torch.bool, device=device)  # (S, S)
            for s in range(num_steps):
                seen[s, visible_steps(self.mask, s, self.window)] = True
            own = torch.eye(num_steps, dtype=torch.bool, device=device)  # (S, S) a step's own-step keys
            columns = torch.tensor([tokens] * num_steps + [own_tokens] * num_steps, device=device)  # (2S,)
            mask = torch.cat([seen, own], dim=1).repeat_interleave(q_tokens, 0).repeat_interleave(
                columns, 1)  # (S*Lq, S*L + S*T)
            return [(list(range(num_steps)), list(range(num_steps)), mask)]
        return [([s], visible_steps(self.mask, s, self.window), None) for s in range(int(skip_first), num_steps)]

    def _cached_step(self, q, k, v, s: int, cache: KVCache, gate: torch.Tensor | None, own_k=None,
                     own_v=None) -> torch.Tensor:
        """One step s; q (B, H, Lq, d), k, v (B, H, L, d), own_k, own_v (B, H, T, d) or None (see `_attend`).
        Writes k, v (not own_k, own_v) into the cache, attends to the visible steps."""
        tokens = k.shape[2]
        steps = visible_steps(self.mask, s, self.window)
        if len(steps) == 1:
            if self.mask != "block_diagonal":  # later steps may read this one
                cache.write(self.layer, s, k, v)
            return attention(q, _joined(k, own_k), _joined(v, own_v))  # (B, H, Lq, d)
        keys, values = cache.write(self.layer, s, k, v)  # (B, H, S*L, d) each
        k_s = _joined(_step_blocks(keys, steps, tokens), own_k)  # (B, H, n*L [+ T], d)
        v_s = _joined(_step_blocks(values, steps, tokens), own_v)  # (B, H, n*L [+ T], d)
        bias = None
        if gate is not None:  # (G1) as one attention: log g added to the logits of history keys
            earlier = (len(steps) - 1) * tokens  # the earlier steps' keys come first
            log_g = gate.detach().log().to(q.dtype).view(1, -1, 1, 1)  # (1, H, 1, 1)
            bias = F.pad(log_g.expand(-1, -1, -1, earlier), (0, k_s.shape[2] - earlier))  # (1, H, 1, n*L [+ T])
        return attention(q, k_s, v_s, bias)  # (B, H, Lq, d)


class JointHistoryAttnProcessor(HistoryAttnProcessor):
    """History attention on a joint image-text attention (SD3's MMDiT blocks; diffusers' JointAttnProcessor2_0):
    one softmax over [image; text] tokens, with separate projections of the text stream (`add_q_proj`, ...,
    `to_add_out`). In history blocks the image and text queries of step s attend to step s's own image and text
    keys and to the image keys of the earlier steps that the mask shows it (the same masks, window and gate as
    HistoryAttnProcessor): a step's text stays its own, and the KV cache holds image keys and values only.

    Without a HistoryContext it is JointAttnProcessor2_0. Returns the image and the text outputs, as it does (in
    the last block, `context_pre_only`, the text output is left unprojected: the block discards it).
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 history: HistoryContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, tokens, _ = hidden_states.shape
        heads = attn.heads
        split = lambda x: x.view(rows, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731 (R, L', D) -> (R, H, L', d)
        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))  # (R, H, L, d) each
        text_q, text_k, text_v = (split(f(encoder_hidden_states)) for f in (
            attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # (R, H, T, d) each
        if attn.norm_q is not None:  # qk-norm (SD3.5), as diffusers applies it
            q, k = attn.norm_q(q), attn.norm_k(k)  # (R, H, L, d) each
        if attn.norm_added_q is not None:
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)  # (R, H, T, d) each
        out = self._attend(torch.cat([q, text_q], dim=2), k, v, history, text_k, text_v)  # (R, H, L+T, d)
        out = out.transpose(1, 2).reshape(rows, out.shape[2], -1).to(q.dtype)  # (R, L+T, D)
        image, text = out[:, :tokens], out[:, tokens:]  # (R, L, D), (R, T, D)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)  # (R, T, D)
        return attn.to_out[1](attn.to_out[0](image)), text  # (R, L, D), (R, T, D)


# The processor of each kind of history attention (`Backbone.history_kind`): an attention over the image tokens
# (DiT, PixArt) or over the image and text tokens together (SD3).
HISTORY_PROCESSORS: dict[str, type[HistoryAttnProcessor]] = dict(self=HistoryAttnProcessor,
                                                                  joint=JointHistoryAttnProcessor)


class IgnoreHistory:
    """The processor of an attention that the history blocks hand the history context to but that does not take
    part in history (a PixArt block's text cross-attention, an SD3.5 dual block's image-only `attn2`: diffusers
    passes the attentions of a block the same kwargs, and warns on every call about a key the processor does not
    accept): it runs the attention's own processor without it."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 history: HistoryContext | None = None, **kwargs) -> torch.Tensor:
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
