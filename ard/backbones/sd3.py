"""The SD3 family (Stable Diffusion 3 / 3.5): diffusers' `SD3Transformer2DModel`, an MMDiT conditioned on text.

What differs from DiT and PixArt:
- two token streams: the image tokens and the text tokens (CLIP-L + CLIP-G + T5 tokens, (R, T, 4096), projected
  once per forward by `context_embedder`) each have their own weights in every block, and one joint attention
  (`attn`) attends over [image; text] together (one softmax). History attention goes on that joint attention
  (`history_kind` "joint", ard.student.attention.JointHistoryAttnProcessor): the image and text queries of step
  s see step s's own image and text keys and the image keys of the earlier steps; the text tokens stay each step's
  own, and the KV cache holds image tokens only. The text stream leaves each block changed and enters the next
  (`SD3Prepared.text`, advanced by `run_block`); the last block (`context_pre_only`) updates only the image tokens.
- SD3.5's dual blocks (`dual_attention_layers`) add an image-only self-attention `attn2`, handed the same kwargs
  as `attn`: it gets a processor that accepts and ignores the history context; SD3.5 also normalises q and k
  (`qk_norm` "rms_norm"), which the history processor applies as diffusers does;
- the timestep and the pooled text embeddings (CLIP-L + CLIP-G, (R, 2048): `TextCondition.pooled`) make one
  vector per row (`time_text_embed`) that modulates every block and the head (`norm_out`, then `proj_out`);
- no text mask: every text token, padding included, is attended to (the pipeline encodes prompts to a fixed
  length), so a condition with masked tokens is refused;
- a flow model: it predicts a velocity (out_channels = in_channels, no learned sigma) at model time sigma * 1000
  (a float); the adapter passes the rows' t (R,) to the model as given, and its teachers are sampled on the flow
  schedule only (`schedules`: precompute refuses another);
- positions are cropped from a pos_embed_max_size grid, so one checkpoint serves every latent side up to it:
  `sample_size` (the states' side) is the named size's, not the checkpoint's.
The null condition of CFG is the null prompt's encoding (tokens and pooled), carried by the condition
(`TextCondition.null`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import SD3Transformer2DModel

from ard.backbones.base import Backbone, Prepared
from ard.backbones.files import CONFIG_NAME, check_weights_present, model_directory, read_config
from ard.backbones.text import TextCondition
from ard.checks import check_finite_weights

# stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json (sample_size 128: 1024 px)
_MEDIUM = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, patch_size=2, in_channels=16,
               out_channels=16, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
               pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)
# stabilityai/stable-diffusion-3.5-medium's: dual attention in blocks 0-12, qk-norm, a 384-wide position grid
_MEDIUM_35 = dict(_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
_TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2, in_channels=1, out_channels=1,
             joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8,
             sample_size=8, dual_attention_layers=(), qk_norm=None)
# Named sizes: the medium models at 512 px (latent side 64) and 1024 px (128), and tiny ones for tests (1 x 8 x 8
# states, 32-wide text tokens, 24-wide pooled embeddings; "sd35-tiny" with SD3.5's dual attention and qk-norm).
SD3_SIZES: dict[str, dict] = {
    "SD3-medium-512": dict(_MEDIUM, sample_size=64),
    "SD3-medium-1024": dict(_MEDIUM, sample_size=128),
    "SD3.5-medium-512": dict(_MEDIUM_35, sample_size=64),
    "SD3.5-medium-1024": dict(_MEDIUM_35, sample_size=128),
    "tiny": _TINY,
    "sd35-tiny": dict(_TINY, dual_attention_layers=(0,), qk_norm="rms_norm"),
}
SD3_INT_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size",
                  "in_channels", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                  "pos_embed_max_size")
# diffusers' values of the fields that SD3 (not 3.5) configs leave out
SD3_DEFAULTS = dict(dual_attention_layers=(), qk_norm=None)


def check_sd3_config(config: dict, where: Path) -> None:
    """Refuse (one line naming `where` and the field) an SD3 config.json ard would misread: a size field that is not
    an integer >= 1, a caption_projection_dim other than the blocks' width (heads x head dim: the text stream's
    width), out_channels other than in_channels (a velocity; null means in_channels), a position grid narrower
    than sample_size / patch_size."""
    for name in SD3_INT_FIELDS:
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: field {name!r} is {value!r}; must be an integer >= 1")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if config["caption_projection_dim"] != width:
        raise ValueError(f"{where}: field 'caption_projection_dim' is {config['caption_projection_dim']}; must be "
                         f"num_attention_heads * attention_head_dim ({width}), the text stream's width in the blocks")
    channels, out = config["in_channels"], config.get("out_channels")
    if out is not None and (isinstance(out, bool) or out != channels):
        raise ValueError(f"{where}: field 'out_channels' is {out!r}; must be in_channels ({channels}) or null (SD3 "
                         f"predicts a velocity, no learned sigma)")
    side = config["sample_size"] // config["patch_size"]
    if config["pos_embed_max_size"] < side:
        raise ValueError(f"{where}: field 'pos_embed_max_size' is {config['pos_embed_max_size']}; must be at least "
                         f"sample_size / patch_size ({side}): positions are cropped from that grid")


def architecture(config: dict) -> dict:
    """A config.json's fields as the size table writes them: lists as tuples, diffusers' defaults where absent,
    out_channels null as in_channels."""
    found = {**SD3_DEFAULTS, **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}}
    return {**found, "out_channels": found.get("out_channels") or found.get("in_channels")}


@dataclass
class SD3Prepared(Prepared):
    """An SD3 forward's per-row inputs of the blocks: besides t and the conditioning (timestep + pooled text
    embedding, (R, D): every block's and the head's modulation), the text stream, which each block advances."""
    text: torch.Tensor | None  # (R, T, D) the text tokens entering the next block (None after the last)


class SD3(Backbone):
    """Stable Diffusion 3 / 3.5 (Esser et al. 2024) as diffusers builds it; the condition is a `TextCondition`
    with pooled embeddings."""
    family = "sd3"
    model_class = SD3Transformer2DModel
    sizes = SD3_SIZES
    history_kind = "joint"
    schedules = ("flow",)  # rectified flow: velocity at model time 1000 sigma

    # ------------------------------------------------------------------ building, loading, identity
    def build(self, size: str = "tiny", tie_embedders: bool = True, **overrides) -> SD3Transformer2DModel:
        """A randomly initialised SD3 of a named size (one timestep + text embedder already)."""
        return SD3Transformer2DModel(**{**self.build_config(size), **overrides})

    def load(self, path: Path, size: str | None = None, numerics: str | None = None,
             tie_embedders: bool | None = None) -> SD3Transformer2DModel:
        """An SD3 teacher from a diffusers directory (a pipeline snapshot or its transformer/ folder), its config
        and weights checked first; with `size`, the architecture checked against it and the model's sample_size
        (the states' latent side) set to the size's; numerics are diffusers' (the only ones)."""
        if not path.is_dir():
            raise ValueError(f"{path}: an SD3 teacher is a diffusers directory (config.json + safetensors)")
        if numerics not in (None, "diffusers"):
            raise ValueError(f"numerics={numerics!r}: an SD3 teacher computes with diffusers' numerics only")
        directory = model_directory(path)
        config = read_config(directory)
        check_sd3_config(config, directory / CONFIG_NAME)
        resolution = {}
        if size is not None:
            expected, found = self.build_config(size), architecture(config)
            for key, value in expected.items():
                if key != "sample_size" and found.get(key) != value:
                    raise ValueError(f"{directory / CONFIG_NAME}: {key}={found.get(key)!r} does not match size "
                                     f"{size!r} ({key}={value!r})")
            resolution = dict(sample_size=expected["sample_size"])  # positions are cropped: any side up to the grid
        check_weights_present(directory)
        model = SD3Transformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False, use_safetensors=True,
                                                      **resolution)
        check_finite_weights(model.state_dict(), str(path))
        return model.eval()

    def build_config(self, size: str) -> dict:
        if size not in SD3_SIZES:
            raise ValueError(f"unknown SD3 size {size!r}; known sizes: {', '.join(SD3_SIZES)}")
        return SD3_SIZES[size]

    def load_saved(self, directory: Path, tie_embedders: bool | None = None) -> SD3Transformer2DModel:
        return SD3Transformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False)

    def numerics(self, model: SD3Transformer2DModel) -> str:
        return "diffusers"

    def disable_condition_dropout(self, model: SD3Transformer2DModel) -> SD3Transformer2DModel:
        return model  # no condition dropout inside the model (the pipeline's CFG uses the null prompt)

    # ------------------------------------------------------------------ where history goes
    def history_attention(self, block: nn.Module) -> nn.Module:
        return block.attn  # the joint attention over image and text tokens

    def passthrough_attentions(self, block: nn.Module) -> list[nn.Module]:
        return [] if block.attn2 is None else [block.attn2]  # SD3.5 dual blocks: image-only self-attention

    # ------------------------------------------------------------------ one forward
    def embed(self, model: SD3Transformer2DModel, x: torch.Tensor) -> torch.Tensor:
        """Input states (R, C, H, W) -> tokens (R, L, D), made contiguous as the model's forward does."""
        return model.pos_embed(x).contiguous()  # (R, L, D)

    def prepare(self, model: SD3Transformer2DModel, t: torch.Tensor, condition: TextCondition,
                dtype: torch.dtype) -> SD3Prepared:
        if condition.pooled is None:
            raise ValueError("an SD3 model takes pooled text embeddings (TextCondition.pooled): the text condition "
                             "has none")
        conditioning = model.time_text_embed(t, condition.pooled.to(dtype))  # (R, D) timestep + pooled text
        text = model.context_embedder(condition.embeddings.to(dtype))  # (R, T, D)
        return SD3Prepared(t, condition, conditioning, text)

    def repeat(self, condition: TextCondition, steps: int) -> TextCondition:
        return condition.repeat_interleave(steps)  # rows (b, s)

    def run_block(self, model: SD3Transformer2DModel, block: nn.Module, hidden: torch.Tensor,
                  prepared: SD3Prepared, attention_kwargs: dict | None) -> torch.Tensor:
        """One MMDiT block on image tokens (R, L, D) and the text stream (`prepared.text`, advanced here; the last
        block, context_pre_only, leaves None); `attention_kwargs` reach its joint attention (and attn2)."""
        p = prepared
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            p.text, hidden = model._gradient_checkpointing_func(block, hidden, p.text, p.conditioning,
                                                                attention_kwargs)  # (R, T, D) or None, (R, L, D)
        else:
            p.text, hidden = block(hidden_states=hidden, encoder_hidden_states=p.text, temb=p.conditioning,
                                   joint_attention_kwargs=attention_kwargs)  # (R, T, D) or None, (R, L, D)
        return hidden  # (R, L, D)

    def head_layers(self, model: SD3Transformer2DModel) -> dict[str, nn.Module]:
        return dict(norm_out=model.norm_out, proj_out=model.proj_out)  # norm_out's linear makes shift and scale

    def head(self, model: SD3Transformer2DModel, layers: nn.Module, hidden: torch.Tensor,
             conditioning: torch.Tensor) -> torch.Tensor:
        """SD3's final layer: norm_out modulated by the conditioning (its own linear), then proj_out."""
        hidden = layers.norm_out(hidden, conditioning)  # (R, L, D)
        return layers.proj_out(hidden)  # (R, L, p*p*C)

    def output_weight(self, layers: nn.Module) -> torch.Tensor:
        return layers.proj_out.weight

    def forward(self, model: SD3Transformer2DModel, x: torch.Tensor, t: torch.Tensor,
                condition: TextCondition) -> torch.Tensor:
        return model(x, encoder_hidden_states=condition.embeddings, pooled_projections=condition.pooled,
                     timestep=t).sample  # (R, C, H, W)

    # ------------------------------------------------------------------ conditions
    def null_condition(self, model: SD3Transformer2DModel, condition: TextCondition) -> TextCondition:
        return condition.null_rows()

    def cat(self, conditions: list[TextCondition]) -> TextCondition:
        return TextCondition.cat(conditions)

    def text_dims(self, model: SD3Transformer2DModel) -> tuple[int, int]:
        return model.config.joint_attention_dim, model.config.pooled_projection_dim  # CLIP + T5 tokens, pooled CLIPs

    def check_condition(self, model: SD3Transformer2DModel, condition: TextCondition,
                        allow_null: bool = False) -> None:
        """Text tokens of the model's joint_attention_dim, every one valid (SD3 reads no mask), and pooled
        embeddings of its pooled_projection_dim, one per row."""
        if not isinstance(condition, TextCondition):
            raise ValueError(f"an SD3 teacher is conditioned on encoded text (TextCondition), got "
                             f"{type(condition).__name__}")
        config = model.config
        rows, tokens, width = condition.embeddings.shape
        if width != config.joint_attention_dim:
            raise ValueError(f"text embeddings of width {width}; this SD3 model reads {config.joint_attention_dim} "
                             f"(joint_attention_dim): another text encoder")
        if tuple(condition.mask.shape) != (rows, tokens):
            raise ValueError(f"text mask of shape {tuple(condition.mask.shape)}; expected ({rows}, {tokens})")
        if not bool(condition.mask.all()):
            raise ValueError("a text condition with masked tokens: SD3 attends to every text token (it reads no "
                             "mask), so prompts are encoded to one fixed length, padding included, and not padded "
                             "further")
        pooled = None if condition.pooled is None else tuple(condition.pooled.shape)
        if pooled != (rows, config.pooled_projection_dim):
            raise ValueError(f"pooled text embeddings of shape {pooled}; this SD3 model reads ({rows}, "
                             f"{config.pooled_projection_dim}) (pooled_projection_dim)")
