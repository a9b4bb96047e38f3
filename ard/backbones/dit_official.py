"""Official facebookresearch/DiT state dict (models.py) <-> diffusers `DiTTransformer2DModel` state dict.

Key mapping (i = block index; every Linear maps its .weight and .bias):
  x_embedder.proj                  -> pos_embed.proj                      (patchify conv)
  t_embedder.mlp.{0,2}             -> transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2}
  y_embedder.embedding_table       -> transformer_blocks.i.norm1.emb.class_embedder.embedding_table
                                      (DiT shares one timestep/label embedder; diffusers has one per
                                      block: the shared tensors are copied into every block's keys, and
                                      `ard.teacher.load_teacher` ties the blocks to one module again)
  blocks.i.attn.qkv                -> transformer_blocks.i.attn1.to_{q,k,v}  (split in thirds along
                                      the output dim: timm's qkv reshape is (3, heads, head_dim))
  blocks.i.attn.proj               -> transformer_blocks.i.attn1.to_out.0
  blocks.i.mlp.fc1 / fc2           -> transformer_blocks.i.ff.net.0.proj / ff.net.2
  blocks.i.adaLN_modulation.1      -> transformer_blocks.i.norm1.linear   (same chunk order: shift,
                                      scale, gate for attention then for the MLP)
  final_layer.adaLN_modulation.1   -> proj_out_1                          (same chunk order: shift, scale)
  final_layer.linear               -> proj_out_2
  pos_embed                        -> (dropped) diffusers computes the same fixed 2D sin-cos table as a
                                      non-persistent buffer; it is checked against that table here, so a
                                      learned or resized pos_embed is refused instead of silently lost.

The weights alone do not make diffusers compute like DiT: the timestep frequencies and one LayerNorm
eps differ (`ard.backbones.dit.set_numerics(model, "dit")`, which `load_teacher` applies to official files).

The reverse, `to_official_state_dict`, takes block 0's embedder as the one t_embedder / y_embedder (refusing
weights whose per-block copies differ: the official DiT cannot hold them), concatenates q/k/v into qkv and
writes pos_embed as the official code computes it, so official -> diffusers -> official is the identity.
Official code runs its weights with the "dit" numerics: weights trained with "diffusers" numerics (ard's own
teachers) compute slightly differently there.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ard.backbones.dit_embedders import first_differing_embedder

POS_EMBED_ATOL = 1e-4  # float32 sin/cos of arguments up to the grid size: both tables agree to ~1e-6


def _linear(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{p}", f"{dst}.{p}") for p in ("weight", "bias")]


# (official key, diffusers key) renames; per-block ones are relative to blocks.i / transformer_blocks.i.
_TOP = [*_linear("x_embedder.proj", "pos_embed.proj"), *_linear("final_layer.adaLN_modulation.1", "proj_out_1"),
        *_linear("final_layer.linear", "proj_out_2")]
_SHARED = [*_linear("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
           *_linear("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
           ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight")]
_BLOCK = [*_linear("attn.proj", "attn1.to_out.0"), *_linear("mlp.fc1", "ff.net.0.proj"),
          *_linear("mlp.fc2", "ff.net.2"), *_linear("adaLN_modulation.1", "norm1.linear")]
_QKV = ("weight", "bias")  # blocks.i.attn.qkv.{p} -> transformer_blocks.i.attn1.to_{q,k,v}.{p}


def _check_keys(state: dict, expected: set[str], layout: str) -> None:
    """One-line ValueError naming the first missing or unexpected key of `state` against `layout`'s keys."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected) for {layout}")


def official_keys(num_layers: int) -> set[str]:
    """Every key of an official DiT state dict with `num_layers` blocks."""
    per_block = [src for src, _ in _BLOCK] + [f"attn.qkv.{p}" for p in _QKV]
    return ({"pos_embed"} | {src for src, _ in _TOP + _SHARED}
            | {f"blocks.{i}.{k}" for i in range(num_layers) for k in per_block})


def is_official_state_dict(state: dict) -> bool:
    """True when `state` uses facebookresearch/DiT's key names (complete or not; conversion checks)."""
    return any(k.split(".", 1)[0] in ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")
               for k in state)


def _check_pos_embed(pos_embed: torch.Tensor, patch_size: int, sample_size: int | None) -> None:
    """The official pos_embed (1, L, D) must be diffusers' fixed sin-cos table for a sqrt(L) grid."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"key 'pos_embed' has shape {tuple(pos_embed.shape)}, expected (1, tokens, width)")
    grid = round(pos_embed.shape[1] ** 0.5)
    table = get_2d_sincos_pos_embed(pos_embed.shape[2], grid, base_size=grid, output_type="pt")  # (grid^2, D)
    if grid * grid != pos_embed.shape[1] or not torch.allclose(pos_embed[0].float(), table.float(),
                                                               atol=POS_EMBED_ATOL, rtol=0):
        raise ValueError("key 'pos_embed' is not the fixed 2D sin-cos table of a square grid (a learned or "
                         "interpolated pos_embed cannot be converted to diffusers' DiT)")
    if sample_size is not None and grid * patch_size != sample_size:
        raise ValueError(f"key 'pos_embed' has {grid * grid} tokens, i.e. a {grid * patch_size}x"
                         f"{grid * patch_size} input at patch {patch_size}; the chosen size has sample_size "
                         f"{sample_size}")


def convert_official_state_dict(state: dict, num_layers: int, sample_size: int | None = None) -> dict:
    """Map an official DiT state dict to diffusers `DiTTransformer2DModel` keys (see the module docstring).

    sample_size: the target's input size; when given, the official pos_embed's grid must match it (the
    shapes of the converted weights do not depend on it, so nothing else would notice).
    Raises a one-line ValueError naming the first missing, unexpected or invalid key.
    """
    if not is_official_state_dict(state):
        raise ValueError("not an official facebookresearch/DiT state dict (no key 'x_embedder.proj.weight')")
    _check_keys(state, official_keys(num_layers), f"an official DiT state dict with {num_layers} blocks")
    _check_pos_embed(state["pos_embed"], state["x_embedder.proj.weight"].shape[-1], sample_size)
    out = {dst: state[src] for src, dst in _TOP}
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        out.update({block + dst: state[src] for src, dst in _SHARED})  # one shared embedder, copied per block
        out.update({block + dst: state[f"blocks.{i}.{src}"] for src, dst in _BLOCK})
        for p in _QKV:
            qkv = state[f"blocks.{i}.attn.qkv.{p}"]  # (3*D, D) or (3*D,)
            if qkv.shape[0] % 3:
                raise ValueError(f"key 'blocks.{i}.attn.qkv.{p}' has shape {tuple(qkv.shape)}: "
                                 "first dim not 3 * width")
            for name, part in zip("qkv", qkv.chunk(3, dim=0)):  # each (D, D) or (D,)
                out[f"{block}attn1.to_{name}.{p}"] = part
    return out


def diffusers_keys(num_layers: int) -> set[str]:
    """Every key of a diffusers DiT state dict with `num_layers` blocks (the converted official layout)."""
    per_block = ([dst for _, dst in _SHARED + _BLOCK]
                 + [f"attn1.to_{name}.{p}" for name in "qkv" for p in _QKV])
    return {dst for _, dst in _TOP} | {f"transformer_blocks.{i}.{k}" for i in range(num_layers) for k in per_block}


def official_pos_embed(width: int, grid: int) -> torch.Tensor:
    """facebookresearch/DiT's fixed positional table (1, grid^2, width), computed as its models.py does (numpy,
    float64, then float32; the grid's w coordinate first) so that a round trip returns the same bits."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:  # (M,) -> (M, dim)
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, dim/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    axis = np.arange(grid, dtype=np.float32)
    coords = np.stack(np.meshgrid(axis, axis), axis=0).reshape(2, 1, grid, grid)  # w first, as DiT
    table = np.concatenate([one_d(width // 2, coords[0]), one_d(width // 2, coords[1])], axis=1)  # (grid^2, width)
    return torch.from_numpy(table).float()[None]  # (1, grid^2, width)


def to_official_state_dict(state: dict, num_layers: int, sample_size: int) -> dict:
    """Map a diffusers `DiTTransformer2DModel` state dict (every block's keys, e.g. `model.state_dict()` of a tied
    or untied model) to facebookresearch/DiT's keys: one t_embedder / y_embedder from block 0, qkv from q/k/v,
    pos_embed the fixed table of a (sample_size / patch)^2 grid (diffusers does not store it).

    Raises a one-line ValueError naming the first missing or unexpected key, or the first block whose embedder
    copy differs from block 0's (a DiT trained with one embedder per block has no official form)."""
    _check_keys(state, diffusers_keys(num_layers), f"a diffusers DiT state dict with {num_layers} blocks")
    differing = first_differing_embedder(state)
    if differing is not None:
        raise ValueError(f"key {differing!r} differs from block 0's embedder: the official DiT has one t_embedder "
                         "and y_embedder, these weights one per block")
    patch = state["pos_embed.proj.weight"].shape[-1]
    if sample_size % patch:
        raise ValueError(f"sample_size {sample_size} is not a multiple of the patch size {patch}")
    out = {"pos_embed": official_pos_embed(state["pos_embed.proj.weight"].shape[0], sample_size // patch)}
    out.update({src: state[dst] for src, dst in _TOP})
    out.update({src: state[f"transformer_blocks.0.{dst}"] for src, dst in _SHARED})
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        out.update({f"blocks.{i}.{src}": state[block + dst] for src, dst in _BLOCK})
        for p in _QKV:
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([state[f"{block}attn1.to_{name}.{p}"] for name in "qkv"])
    return out
