"""One timestep + label embedder for every DiT block, as the official DiT has (docs/method.md, "diffusers DiT quirks").

diffusers' DiT gives every block its own copy of the embedder (`transformer_blocks.<i>.norm1.emb`, a
CombinedTimestepLabelEmbeddings), where facebookresearch/DiT has one `t_embedder` and one `y_embedder`.
`tie_block_embedders` makes every block use block 0's module; the state dict keeps the diffusers layout.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# The per-block embedder and its state-dict keys, "transformer_blocks.<i>.norm1.emb.<rest>".
EMBEDDER = "norm1.emb"
_EMBEDDER_KEY = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")


def embedders_tied(model) -> bool:
    """Whether every block's `norm1.emb` is block 0's module (one embedder, as in the official DiT)."""
    first = model.transformer_blocks[0].norm1.emb
    return all(block.norm1.emb is first for block in model.transformer_blocks)


def first_differing_embedder(state: Mapping[str, torch.Tensor], prefix: str = "") -> str | None:
    """The first key (in block order) of a per-block embedder copy in `state` (a DiT state dict, its keys under
    `prefix`) whose tensor differs from the lowest block's of the same name; None when every copy is equal."""
    copies: dict[str, list[tuple[int, str]]] = {}  # rest of the key -> [(block, key)]
    for key in state:
        match = _EMBEDDER_KEY.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if match:
            copies.setdefault(match[2], []).append((int(match[1]), key))
    differing = []  # (block, key)
    for keys in copies.values():
        (_, first), *others = sorted(keys)
        differing += [(block, key) for block, key in others if not _equal(state[first], state[key])]
    return min(differing)[1] if differing else None


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))


def _separate_copies(module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of a tied DiT: every block's embedder keys stay listed (the diffusers layout; the weights'
    hash, `teacher_identity`, is the untied one's), blocks above 0 as copies of block 0's tensors, because
    safetensors refuses to save tensors that share memory. Kept as they are when asked for the parameters
    themselves (state_dict(keep_vars=True))."""
    for key, value in state.items():
        match = _EMBEDDER_KEY.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if match and match[1] != "0" and not isinstance(value, torch.nn.Parameter):
            state[key] = value.clone()


def _refuse_differing_copies(module, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of a tied DiT: refuse weights whose per-block embedders differ (loading them would
    silently keep the last block's): one line naming the block."""
    key = first_differing_embedder(state, prefix)
    if key is not None:
        raise ValueError(f"{key} differs from block 0's embedder: these weights have one embedder per block and "
                         "do not fit a DiT with one shared embedder (load it with tie_embedders=False)")


def tie_block_embedders(model, where: str = "", check: bool = True):
    """Make every block's timestep + label embedder (`norm1.emb`) block 0's module, as the official DiT has one
    `t_embedder` and one `y_embedder` feeding every block: its parameters are then held, counted, trained and
    averaged once (`model.parameters()` yields them once; DiT-XL/2 has 674,834,720 parameters, not 749,826,464).

    check: first refuse (one-line ValueError naming `where` and the first differing key) a model whose copies
    differ, which tying would change: e.g. a DiT trained with one embedder per block. Pass False only for a
    freshly initialised model. The state dict still lists every block's keys (`_separate_copies`) and a
    load_state_dict refuses weights whose copies differ (`_refuse_differing_copies`)."""
    if embedders_tied(model):
        return model
    if check:
        key = first_differing_embedder({f"transformer_blocks.{i}.{EMBEDDER}.{name}": tensor
                                        for i, block in enumerate(model.transformer_blocks)
                                        for name, tensor in block.norm1.emb.state_dict().items()})
        if key is not None:
            raise ValueError(f"{where + ': ' if where else ''}{key} differs from block 0's embedder: a DiT with one "
                             "embedder per block cannot be tied without changing it (load it with tie_embedders=False)")
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = first
    model.register_state_dict_post_hook(_separate_copies)
    model.register_load_state_dict_pre_hook(_refuse_differing_copies)
    return model


def apply_tying(model, tie_embedders: bool | None, where: str):
    """The `tie_embedders` knob on loaded weights: True ties (refusing copies that differ, naming `where`), False
    keeps one embedder per block, None ties when every block's copy equals block 0's (official DiT weights,
    converted or a diffusers snapshot of them, anything saved tied) and keeps a DiT trained with one embedder
    per block (such as the shipped digits teacher) as it is."""
    if tie_embedders is False:
        return model
    try:
        return tie_block_embedders(model, where)
    except ValueError:
        if tie_embedders:
            raise
        return model
