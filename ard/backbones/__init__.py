"""Teacher families, each behind one adapter (base.Backbone): how a diffusers transformer of the family is built,
loaded and identified, where history attention goes, how one student step's forward is prepared, its output head
and its null condition for CFG. Nothing outside this package names a diffusers model class.

    base.py           the interface
    dit.py            class-conditional DiT (DiTTransformer2DModel): the embedded default and ImageNet
    dit_embedders.py  one timestep + label embedder for every DiT block, as the official DiT
    dit_official.py   facebookresearch/DiT checkpoints <-> diffusers' DiT layout
    pixart.py         PixArt-alpha / Sigma (PixArtTransformer2DModel): text-conditioned, history on attn1 only
    sd3.py            Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): MMDiT, history on the joint image-text
                      attention (image keys only from earlier steps), a flow model conditioned on text tokens and
                      pooled text embeddings
    text.py           the condition of text-to-image families: encoded prompts (TextCondition)
    files.py          diffusers model directories: config.json, weights, the family a config names
"""
from __future__ import annotations

from typing import Literal

import torch.nn as nn

from ard.backbones.base import Backbone
from ard.backbones.dit import DiT
from ard.backbones.pixart import PixArt
from ard.backbones.sd3 import SD3

BACKBONES: dict[str, Backbone] = {adapter.family: adapter for adapter in (DiT(), PixArt(), SD3())}
# The families that the store, distillation and evaluation serve end to end (load_teacher's default), and those
# conditioned on text, which precompute, distillation, the GAN stage and evaluation serve on stores of encoded
# prompts (ard/store/text.py; SD3's with their pooled embeddings): a text family's teacher is loaded where a stage
# works on a text store.
SERVED = ("dit",)
TEXT = ("pixart", "sd3")  # families conditioned on text: stores of encoded prompts (ard/store/text.py)
Family = Literal["dit", "pixart"]  # the families a teacher can be trained in (ard.modules.teacher_training)


def backbone(family: str) -> Backbone:
    """The adapter of a family (a manifest's `teacher.family`); one line naming the known ones."""
    if family not in BACKBONES:
        raise ValueError(f"teacher family {family!r} has no adapter; known: {', '.join(map(repr, BACKBONES))}")
    return BACKBONES[family]


def backbone_of(model: nn.Module) -> Backbone:
    """The adapter of a built or loaded model, by its diffusers class."""
    for adapter in BACKBONES.values():
        if isinstance(model, adapter.model_class):
            return adapter
    raise TypeError(f"{type(model).__name__} is not of a known teacher family ({', '.join(BACKBONES)})")
