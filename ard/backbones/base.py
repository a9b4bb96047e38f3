"""The interface every teacher family's adapter implements: what ard needs of a diffusers transformer.

An adapter holds no network and no state: every method takes the model (a diffusers transformer of its family)
as its first argument, as diffusers' schedulers take the sample. The student (ard/student/model.py) folds the S
steps of a trajectory into the batch, rows ordered (b, s), and runs the family's own blocks on tokens (R, L, D)
through `prepare` (once per forward: timestep and condition embeddings) -> `embed` -> `run_block` (per block) ->
`head` -> `unpatchify`, with history attention installed on the `history_attention` of the lowest N blocks.
`condition` is the family's conditioning of the rows: a class label (R,) for DiT.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from einops import rearrange


@dataclass
class Prepared:
    """What one forward computes once from the rows' timesteps and conditions, before the blocks; a family's
    adapter may return a subclass with more (e.g. projected text tokens and their mask, or SD3's text stream, which
    its blocks advance)."""
    t: torch.Tensor  # (R,) timesteps
    condition: Any  # the rows' conditions
    conditioning: torch.Tensor  # (R, D): the vector the output head (and the GAN's heads) modulate with


class Backbone(ABC):
    family: ClassVar[str]  # the manifest's `teacher.family` ("dit", ...)
    model_class: ClassVar[type[nn.Module]]  # the diffusers class it adapts
    sizes: ClassVar[dict[str, dict]]  # named sizes: name -> config fields
    # What `history_attention` is, which picks the student's history processor (ard.student.attention,
    # HISTORY_PROCESSORS): "self", over the image tokens (diffusers' AttnProcessor2_0 layout), or "joint", over a
    # step's image and text tokens together (JointAttnProcessor2_0's: SD3's MMDiT blocks).
    history_kind: ClassVar[Literal["self", "joint"]] = "self"
    # The schedules (ard.schedules.ScheduleKind) its teachers are sampled on: a flow-matching family (SD3) only "flow"
    schedules: ClassVar[tuple[str, ...]] = ("vp", "flow")

    # ------------------------------------------------------------------ building, loading, identity
    @abstractmethod
    def build(self, size: str, tie_embedders: bool = True, **overrides) -> nn.Module:
        """A randomly initialised model of a named size; `overrides` change single config fields."""

    @abstractmethod
    def load(self, path: Path, size: str | None, numerics: str | None, tie_embedders: bool | None) -> nn.Module:
        """The teacher at `path` (a diffusers directory or a single-file checkpoint of the family), checked, in
        eval mode, ready for distillation (no condition dropout of its own)."""

    @abstractmethod
    def load_saved(self, directory: Path, tie_embedders: bool | None) -> nn.Module:
        """The transformer that `save_pretrained` wrote to `directory` (a student's), as it was saved."""

    @abstractmethod
    def numerics(self, model: nn.Module) -> str:
        """Which implementation's numerics the model computes with (part of the teacher's identity)."""

    @abstractmethod
    def disable_condition_dropout(self, model: nn.Module) -> nn.Module:
        """Turn off whatever the model does at random in train() mode besides dropout layers (CFG condition
        dropout is ard's, done once per sample); returns the model."""

    # ------------------------------------------------------------------ where history goes
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks, lowest first."""
        return model.transformer_blocks

    @abstractmethod
    def history_attention(self, block: nn.Module) -> nn.Module:
        """The block's attention over image tokens (with its text tokens: `history_kind` "joint"), whose processor
        history attention replaces."""

    @abstractmethod
    def passthrough_attentions(self, block: nn.Module) -> list[nn.Module]:
        """The block's other attentions that are handed the history context and must ignore it."""

    # ------------------------------------------------------------------ one forward
    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input states (R, C, H, W) -> tokens (R, L, D): diffusers' patch embedding with its positions."""
        return model.pos_embed(x)  # (R, L, D)

    @abstractmethod
    def prepare(self, model: nn.Module, t: torch.Tensor, condition: Any, dtype: torch.dtype) -> Prepared:
        """One forward's timestep and condition embeddings for rows at timesteps t (R,) with `condition`."""

    @abstractmethod
    def repeat(self, condition: Any, steps: int) -> Any:
        """Each row's condition repeated `steps` times, rows ordered (b, s) (the student's step layout)."""

    @abstractmethod
    def run_block(self, model: nn.Module, block: nn.Module, hidden: torch.Tensor, prepared: Prepared,
                  attention_kwargs: dict | None) -> torch.Tensor:
        """One block on image tokens (R, L, D); `attention_kwargs` go to its attention processors (None: their
        own). Returns (R, L, D). A family whose blocks carry a second stream (SD3's text tokens) keeps it in its
        Prepared and advances it here: one Prepared serves one pass over the blocks, lowest first."""

    @abstractmethod
    def head_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The output head's trainable layers (what a per-step head copies)."""

    @abstractmethod
    def head(self, model: nn.Module, layers: nn.Module, hidden: torch.Tensor, conditioning: torch.Tensor
             ) -> torch.Tensor:
        """The output head with `layers` (the model's own or a per-step copy, a module holding `head_layers`'
        names): tokens (R, L, D) and `Prepared.conditioning` (R, D) -> patch outputs (R, L, p*p*C')."""

    @abstractmethod
    def output_weight(self, layers: nn.Module) -> torch.Tensor:
        """The weight of the head's last layer (the GAN's adaptive weight is computed on its gradient)."""

    def unpatchify(self, model: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Patch outputs (R, L, p*p*C') of a square token grid -> the raw output (R, C', H, W)."""
        patch, side = model.config.patch_size, int(out.shape[1] ** 0.5)
        return rearrange(out, "r (h w) (p q c) -> r c (h p) (w q)", h=side, p=patch, q=patch)  # (R, C', H, W)

    def prediction(self, model: nn.Module, raw: torch.Tensor) -> torch.Tensor:
        """The prediction (R, C, H, W) in the raw output (R, C', H, W): with learned sigma (C' = 2C) the first C."""
        return raw[:, : model.config.in_channels]  # (R, C, H, W)

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The model's plain forward read as its prediction: x (R, C, H, W), t (R,) -> (R, C, H, W)."""
        return self.prediction(model, self.forward(model, x, t, condition))

    @abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The model's own forward: the raw output (R, C', H, W)."""

    # ------------------------------------------------------------------ conditions
    @abstractmethod
    def null_condition(self, model: nn.Module, condition: torch.Tensor) -> torch.Tensor:
        """The unconditional (CFG) condition, shaped like `condition`."""

    @abstractmethod
    def cat(self, conditions: list[Any]) -> Any:
        """The rows of several conditions, in order (CFG's [cond; uncond] batch)."""

    @abstractmethod
    def check_condition(self, model: nn.Module, condition: torch.Tensor, allow_null: bool = False) -> None:
        """One-line ValueError when a condition cannot be served by this model."""

    def text_dims(self, model: nn.Module) -> tuple[int, int | None]:
        """A text family's widths: of the text tokens the model reads and of its pooled text embedding (None: it
        reads none), what its prompts' encoder must make (ard.text_encoders.load_text_encoder)."""
        raise ValueError(f"a {self.family!r} model is conditioned on class labels, not on text")
