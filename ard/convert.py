"""Official facebookresearch/DiT state dict (models.py) -> diffusers `DiTTransformer2DModel` state dict.

Key mapping (i = block index; every Linear maps its .weight and .bias):
  x_embedder.proj                  -> pos_embed.proj                      (patchify conv)
  t_embedder.mlp.{0,2}             -> transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2}
  y_embedder.embedding_table       -> transformer_blocks.i.norm1.emb.class_embedder.embedding_table
                                      (DiT shares one timestep/label embedder; diffusers has one per
                                      block: the shared tensors are copied into every block)
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
eps differ (`ard.teacher.set_numerics(model, "dit")`, which `load_teacher` applies to official files).
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

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
    expected = official_keys(num_layers)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected) for an official DiT "
                         f"state dict with {num_layers} blocks")
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
