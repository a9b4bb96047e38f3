"""The PixArt family (PixArt-alpha / Sigma): diffusers' `PixArtTransformer2DModel`, text-conditioned.

The same block class, noise schedule, learned-sigma output and 28 x 1152 geometry as DiT-XL/2; what differs:
- the condition is text: T5 tokens (R, T, 4096) with a validity mask, projected once per forward
  (`caption_projection`) and read by a separate cross-attention (`attn2`) in every block; history attention
  goes on the image self-attention (`attn1`) only, and the cross-attention of those blocks gets a processor that
  accepts and ignores the history context (diffusers hands both attentions the same kwargs and warns on every
  call about a key a processor does not take);
- adaLN-single: one 6D modulation per row from the timestep (`adaln_single`), per-block `scale_shift_table`s;
  the 1024 px alpha models add resolution and aspect-ratio embeddings to it (`use_additional_conditions`), which
  pass through from the condition (`TextCondition.resolution`, `.aspect_ratio`);
- the head: the model's `scale_shift_table` + the embedded timestep modulate `norm_out`, then `proj_out`;
- the null condition of CFG is the null prompt's encoding, carried by the condition (`TextCondition.null`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import PixArtTransformer2DModel

from ard.backbones.base import Backbone, Prepared
from ard.backbones.files import CONFIG_NAME, check_weights_present, model_directory, read_config
from ard.backbones.text import TextCondition
from ard.checks import check_finite_weights

_XL2 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, in_channels=4,
            out_channels=8, cross_attention_dim=1152, caption_channels=4096)
# Named sizes (the PixArt-alpha transformer configs; Sigma's have the same geometry), and a tiny one for tests.
PIXART_SIZES: dict[str, dict] = {
    "PixArt-XL/2-256": dict(_XL2, sample_size=32, use_additional_conditions=False),
    "PixArt-XL/2-512": dict(_XL2, sample_size=64, use_additional_conditions=False),
    "PixArt-XL/2-1024": dict(_XL2, sample_size=128, use_additional_conditions=True),
    # the text-to-image default's teacher: the digits DiT's geometry (6 blocks, width 128, patch 2, 8x8x1, epsilon
    # only), reading 32-wide text tokens (the hash encoder's)
    "digits": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, patch_size=2, in_channels=1,
                   out_channels=1, cross_attention_dim=128, caption_channels=32, sample_size=8, norm_num_groups=1,
                   use_additional_conditions=False),
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2, in_channels=1,
                 out_channels=2, cross_attention_dim=16, caption_channels=32, sample_size=8, norm_num_groups=1,
                 use_additional_conditions=False),
}
PIXART_INT_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size",
                     "in_channels", "caption_channels")
MASKED_BIAS = -10000.0  # diffusers' additive bias of an invalid text token (exp(-1e4) is 0 in float32)


def check_pixart_config(config: dict, where: Path) -> None:
    """Refuse (one line naming `where` and the field) a PixArt config.json ard would misread: a size field that is
    not an integer >= 1 (caption_channels included: ard feeds encoded text, which the model projects),
    out_channels other than in_channels or 2 * in_channels, a norm_type other than ada_norm_single."""
    for name in PIXART_INT_FIELDS:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: field {name!r} is {value!r}; must be an integer >= 1")
    channels, out = config["in_channels"], config.get("out_channels")
    if out is not None and (isinstance(out, bool) or out not in (channels, 2 * channels)):
        raise ValueError(f"{where}: field 'out_channels' is {out!r}; must be in_channels ({channels}), "
                         f"2 * in_channels ({2 * channels}, learned sigma) or null")
    if config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise ValueError(f"{where}: field 'norm_type' is {config['norm_type']!r}; must be 'ada_norm_single'")


@dataclass
class PixArtPrepared(Prepared):
    """A PixArt forward's per-row inputs of the blocks: besides t and the head's conditioning (the embedded
    timestep, (R, D)), the blocks' 6D modulation, the projected text tokens and their additive mask."""
    modulation: torch.Tensor  # (R, 6D) adaLN-single
    text: torch.Tensor  # (R, T, D) projected caption tokens
    text_bias: torch.Tensor  # (R, 1, T): 0 for valid tokens, MASKED_BIAS for padding


class PixArt(Backbone):
    """PixArt-alpha / Sigma (Chen et al. 2023, 2024) as diffusers builds it; the condition is a `TextCondition`."""
    family = "pixart"
    model_class = PixArtTransformer2DModel
    sizes = PIXART_SIZES

    # ------------------------------------------------------------------ building, loading, identity
    def build(self, size: str = "tiny", tie_embedders: bool = True, **overrides) -> PixArtTransformer2DModel:
        """A randomly initialised PixArt of a named size (one timestep embedder already: adaLN-single)."""
        return PixArtTransformer2DModel(**{**self.build_config(size), **overrides})

    def load(self, path: Path, size: str | None = None, numerics: str | None = None,
             tie_embedders: bool | None = None) -> PixArtTransformer2DModel:
        """A PixArt teacher from a diffusers directory (a pipeline snapshot or its transformer/ folder), its config
        and weights checked first; `size` checked against the config; numerics are diffusers' (the only ones)."""
        if not path.is_dir():
            raise ValueError(f"{path}: a PixArt teacher is a diffusers directory (config.json + safetensors)")
        if numerics not in (None, "diffusers"):
            raise ValueError(f"numerics={numerics!r}: a PixArt teacher computes with diffusers' numerics only")
        directory = model_directory(path)
        config = read_config(directory)
        check_pixart_config(config, directory / CONFIG_NAME)
        if size is not None:
            for key, value in self.build_config(size).items():
                if config.get(key) is not None and config[key] != value:
                    raise ValueError(f"{directory / CONFIG_NAME}: {key}={config[key]} does not match size {size!r} "
                                     f"({key}={value})")
        check_weights_present(directory)
        model = PixArtTransformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False, use_safetensors=True)
        check_finite_weights(model.state_dict(), str(path))
        return model.eval()

    def build_config(self, size: str) -> dict:
        if size not in PIXART_SIZES:
            raise ValueError(f"unknown PixArt size {size!r}; known sizes: {', '.join(PIXART_SIZES)}")
        return PIXART_SIZES[size]

    def load_saved(self, directory: Path, tie_embedders: bool | None = None) -> PixArtTransformer2DModel:
        return PixArtTransformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False)

    def numerics(self, model: PixArtTransformer2DModel) -> str:
        return "diffusers"

    def disable_condition_dropout(self, model: PixArtTransformer2DModel) -> PixArtTransformer2DModel:
        return model  # no condition dropout inside the model (the pipeline's CFG uses the null prompt)

    # ------------------------------------------------------------------ where history goes
    def history_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1  # self-attention over image tokens

    def passthrough_attentions(self, block: nn.Module) -> list[nn.Module]:
        return [block.attn2]  # cross-attention to the text: unchanged

    # ------------------------------------------------------------------ one forward
    def prepare(self, model: PixArtTransformer2DModel, t: torch.Tensor, condition: TextCondition,
                dtype: torch.dtype) -> PixArtPrepared:
        rows = len(condition)
        sizes = dict(resolution=condition.resolution, aspect_ratio=condition.aspect_ratio)
        if model.use_additional_conditions and (condition.resolution is None or condition.aspect_ratio is None):
            raise ValueError("this PixArt model takes resolution and aspect-ratio conditions "
                             "(use_additional_conditions): the text condition has none")
        modulation, embedded = model.adaln_single(t, sizes, batch_size=rows, hidden_dtype=dtype)  # (R, 6D), (R, D)
        text = model.caption_projection(condition.embeddings.to(dtype))  # (R, T, D)
        bias = ((1 - condition.mask.to(dtype)) * MASKED_BIAS)[:, None]  # (R, 1, T)
        return PixArtPrepared(t, condition, embedded, modulation, text, bias)

    def repeat(self, condition: TextCondition, steps: int) -> TextCondition:
        return condition.repeat_interleave(steps)  # rows (b, s)

    def run_block(self, model: PixArtTransformer2DModel, block: nn.Module, hidden: torch.Tensor,
                  prepared: PixArtPrepared, attention_kwargs: dict | None) -> torch.Tensor:
        p = prepared
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            return model._gradient_checkpointing_func(block, hidden, None, p.text, p.text_bias, p.modulation,
                                                      attention_kwargs, None)  # (R, L, D)
        return block(hidden, attention_mask=None, encoder_hidden_states=p.text, encoder_attention_mask=p.text_bias,
                     timestep=p.modulation, cross_attention_kwargs=attention_kwargs)  # (R, L, D)

    def head_layers(self, model: PixArtTransformer2DModel) -> dict[str, nn.Module | nn.Parameter]:
        return dict(scale_shift_table=model.scale_shift_table, proj_out=model.proj_out)

    def head(self, model: PixArtTransformer2DModel, layers: nn.Module, hidden: torch.Tensor,
             conditioning: torch.Tensor) -> torch.Tensor:
        """PixArt's final layer: (table + embedded t) -> shift, scale of norm_out, then proj_out."""
        shift, scale = (layers.scale_shift_table[None] + conditioning[:, None]).chunk(2, dim=1)  # (R, 1, D) each
        hidden = model.norm_out(hidden) * (1 + scale) + shift  # (R, L, D)
        return layers.proj_out(hidden)  # (R, L, p*p*C')

    def output_weight(self, layers: nn.Module) -> torch.Tensor:
        return layers.proj_out.weight

    def forward(self, model: PixArtTransformer2DModel, x: torch.Tensor, t: torch.Tensor,
                condition: TextCondition) -> torch.Tensor:
        sizes = dict(resolution=condition.resolution, aspect_ratio=condition.aspect_ratio)
        return model(x, encoder_hidden_states=condition.embeddings, timestep=t, added_cond_kwargs=sizes,
                     encoder_attention_mask=condition.mask).sample  # (R, C', H, W)

    # ------------------------------------------------------------------ conditions
    def null_condition(self, model: PixArtTransformer2DModel, condition: TextCondition) -> TextCondition:
        return condition.null_rows()

    def cat(self, conditions: list[TextCondition]) -> TextCondition:
        return TextCondition.cat(conditions)

    def text_dims(self, model: PixArtTransformer2DModel) -> tuple[int, None]:
        return model.config.caption_channels, None  # T5 tokens, no pooled embedding

    def check_condition(self, model: PixArtTransformer2DModel, condition: TextCondition,
                        allow_null: bool = False) -> None:
        """Text tokens of the model's caption width, one validity mask per token, a valid token in every row."""
        if not isinstance(condition, TextCondition):
            raise ValueError(f"a PixArt teacher is conditioned on encoded text (TextCondition), got "
                             f"{type(condition).__name__}")
        rows, tokens, width = condition.embeddings.shape
        if width != model.config.caption_channels:
            raise ValueError(f"text embeddings of width {width}; this PixArt model reads "
                             f"{model.config.caption_channels} (caption_channels): another text encoder")
        if tuple(condition.mask.shape) != (rows, tokens):
            raise ValueError(f"text mask of shape {tuple(condition.mask.shape)}; expected ({rows}, {tokens})")
        if not bool(condition.mask.any(dim=1).all()):
            raise ValueError("a text condition with no valid token in some row (an empty prompt is still encoded "
                             "to at least its end token)")
