"""The DiT family: diffusers' `DiTTransformer2DModel` (class-conditional, adaLN-zero), its named sizes and quirks.

Quirks of diffusers' DiT (docs/method.md, "diffusers DiT quirks"), handled here and only here:
- every block owns a label embedder that drops labels with p = 0.1 in train() mode, independently per
  block: `disable_label_dropout` sets it to 0 (CFG dropout is ours, done once per sample);
- learned sigma: `out_channels == 2 * in_channels`; epsilon is the first `in_channels` channels
  (`DiT.prediction`);
- the null (unconditional) class is index `num_embeds_ada_norm` (`null_class`);
- there is no `set_attn_processor` on this class: processors are set per block (`attn1.set_processor`);
- its numerics differ from the official DiT in two places (`set_numerics`): the timestep frequencies
  (diffusers exp(-ln(1e4) i / 127), DiT exp(-ln(1e4) i / 128)) and the LayerNorm eps before the MLP
  (diffusers 1e-5, DiT 1e-6). Weights trained by facebookresearch/DiT need "dit", ours "diffusers";
- every block owns a copy of the timestep and label embedder (`norm1.emb`), where the official DiT has one
  `t_embedder` and one `y_embedder`: ard/backbones/dit_embedders.py ties them, as `build_dit` and `load`
  do by default (`load`: where the checkpoint's copies are equal).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from ard.backbones.base import Backbone, Prepared
from ard.backbones.dit_embedders import apply_tying, tie_block_embedders
from ard.backbones.files import CONFIG_NAME, check_weights_present, family_of, model_directory, read_config
from ard.checks import check_finite_weights

# Named sizes (facebookresearch/DiT models.py; ImageNet-256 latents 4x32x32, learned sigma) and the
# digits teacher of the embedded default (8x8 pixels, 1 channel, epsilon only).
DIT_SIZES: dict[str, dict] = {
    "DiT-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2,
                     in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000),
    "DiT-L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=2,
                    in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000),
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2,
                    in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000),
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2,
                    in_channels=4, out_channels=8, sample_size=32, num_embeds_ada_norm=1000),
    "digits": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, patch_size=2,
                   in_channels=1, out_channels=1, sample_size=8, num_embeds_ada_norm=10),
    # narrower digits teachers of the same depth and heads, for the model-size control (configs/digits_size/)
    "digits-w64": dict(num_layers=6, num_attention_heads=4, attention_head_dim=16, patch_size=2,
                       in_channels=1, out_channels=1, sample_size=8, num_embeds_ada_norm=10),
    "digits-w32": dict(num_layers=6, num_attention_heads=4, attention_head_dim=8, patch_size=2,
                       in_channels=1, out_channels=1, sample_size=8, num_embeds_ada_norm=10),
}

# The DiT config.json fields ard reads (and builds the model from): each an integer >= 1; absent: diffusers' default.
DIT_INT_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size",
                  "in_channels", "num_embeds_ada_norm")
DIT_DEFAULTS = {name: p.default for name, p in inspect.signature(DiTTransformer2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

# Which implementation's numerics a DiT computes with (see the module docstring): per value, the
# timestep embedding's `downscale_freq_shift` (frequencies exp(-ln(1e4) i / (128 - shift))) and the
# MLP-branch LayerNorm eps (`norm_eps`). Recorded in config.json under NUMERICS_KEY (diffusers keeps
# unknown "_" keys through from_pretrained / save_pretrained); no key means "diffusers".
Numerics = Literal["diffusers", "dit"]
NUMERICS: dict[str, tuple[int, float]] = {"diffusers": (1, 1e-5), "dit": (0, 1e-6)}
NUMERICS_KEY = "_ard_numerics"


def set_numerics(model: DiTTransformer2DModel, numerics: Numerics | None = None) -> DiTTransformer2DModel:
    """Compute like diffusers' DiT or like the official DiT; None: as recorded in the model's config.

    Call it after `DiTTransformer2DModel.from_pretrained`: the timestep frequency shift is not a
    constructor argument, so from_pretrained alone always builds diffusers' frequencies.
    """
    numerics = numerics or model.config.get(NUMERICS_KEY)
    if numerics is None:
        return model  # nothing recorded: diffusers' numerics, as built
    if numerics not in get_args(Numerics):
        raise ValueError(f"numerics must be one of {get_args(Numerics)}, got {numerics!r}")
    shift, eps = NUMERICS[numerics]
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
        block.norm3.eps = eps
    model.register_to_config(norm_eps=eps, **{NUMERICS_KEY: numerics})
    return model


def numerics_of(model: DiTTransformer2DModel) -> Numerics:
    """The numerics a loaded DiT computes with (nothing recorded: "diffusers")."""
    return model.config.get(NUMERICS_KEY) or "diffusers"


def disable_label_dropout(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Turn off diffusers' per-block label dropout (CFG dropout is done once per sample, by us)."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def check_size(size: str) -> None:
    """A named DiT size is a key of DIT_SIZES."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; known sizes: {', '.join(DIT_SIZES)}")


def build_dit(size: str = "digits", tie_embedders: bool = True, **overrides) -> DiTTransformer2DModel:
    """A randomly initialised DiT of a named size; `overrides` change single config fields.

    tie_embedders: one timestep + label embedder shared by every block (block 0's initialisation), as in the
    official DiT (`tie_block_embedders`); False: one per block, as diffusers builds it."""
    check_size(size)
    model = disable_label_dropout(DiTTransformer2DModel(**{**DIT_SIZES[size], **overrides}))
    return tie_block_embedders(model, check=False) if tie_embedders else model


def null_class(model: DiTTransformer2DModel) -> int:
    """Index of the unconditional (null) label: diffusers puts it at num_classes."""
    return int(model.config.num_embeds_ada_norm)


def num_classes(model: DiTTransformer2DModel) -> int:
    return int(model.config.num_embeds_ada_norm)


def check_dit_config(config: dict, where: Path) -> None:
    """Refuse (one line naming `where`, the field, its value and what is allowed) a DiT config.json that the model
    cannot be built from or that ard would misread, before anything is built: a field of DIT_INT_FIELDS that is
    not an integer >= 1, out_channels other than in_channels or 2 * in_channels (learned sigma; null means
    in_channels), a sample_size that patch_size does not divide, a norm_type other than ada_norm_zero (the only one
    diffusers' DiT implements), recorded numerics other than NUMERICS'."""
    fields = {**DIT_DEFAULTS, **config}
    for name in DIT_INT_FIELDS:
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: field {name!r} is {value!r}; must be an integer >= 1")
    channels, out = fields["in_channels"], fields["out_channels"]
    if out is not None and (isinstance(out, bool) or out not in (channels, 2 * channels)):
        raise ValueError(f"{where}: field 'out_channels' is {out!r}; must be in_channels ({channels}), "
                         f"2 * in_channels ({2 * channels}, learned sigma) or null")
    if fields["sample_size"] % fields["patch_size"]:
        raise ValueError(f"{where}: field 'sample_size' is {fields['sample_size']}; must be a multiple of "
                         f"patch_size ({fields['patch_size']})")
    if fields["norm_type"] != "ada_norm_zero":
        raise ValueError(f"{where}: field 'norm_type' is {fields['norm_type']!r}; must be 'ada_norm_zero'")
    if config.get(NUMERICS_KEY) not in (None, *get_args(Numerics)):
        raise ValueError(f"{where}: field {NUMERICS_KEY!r} is {config[NUMERICS_KEY]!r}; must be one of "
                         f"{', '.join(map(repr, get_args(Numerics)))} or absent")


def _check_state_dict(state: dict[str, torch.Tensor], model: DiTTransformer2DModel, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected) "
                         "for the chosen DiT size")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: key {k!r} has shape {tuple(state[k].shape)}, the chosen DiT size "
                             f"expects {tuple(v.shape)}")


def _load_directory(directory: Path, size: str | None) -> DiTTransformer2DModel:
    """The DiT of a diffusers model directory, its config and weights checked first (check_dit_config,
    check_weights_present), every weight loaded from the file (none left at its initial value)."""
    config_path = directory / CONFIG_NAME
    config = read_config(directory)
    check_dit_config(config, config_path)
    if size is not None:
        for key, value in DIT_SIZES[size].items():
            if key in config and config[key] != value and not (key == "out_channels" and config[key] is None):
                raise ValueError(f"{config_path}: {key}={config[key]} does not match size {size!r} ({key}={value})")
    check_weights_present(directory)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its multi-line warning of missing keys: refused below in one line
    try:
        model, info = DiTTransformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False, use_safetensors=True,
                                                            output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300] or type(e).__name__
        raise ValueError(f"{directory}: weights not readable or not those of {CONFIG_NAME}'s model ({reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{directory}: {what} ({len(missing)} missing, {len(unexpected)} unexpected): the weights "
                         f"are not those of the model {CONFIG_NAME} describes")
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # a DiT training checkpoint: use its EMA weights
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_single_file(path: Path, size: str | None, numerics: Numerics | None) -> DiTTransformer2DModel:
    """An official facebookresearch/DiT checkpoint (converted: ard/backbones/dit_official.py) or a diffusers
    state dict, as one .pt / .safetensors file of a named size."""
    from ard.backbones.dit_official import convert_official_state_dict, is_official_state_dict

    if size is None:
        raise ValueError(f"{path}: a single-file checkpoint needs `size` (one of {', '.join(DIT_SIZES)})")
    model = build_dit(size, tie_embedders=False)  # tied by the caller, once the weights are known
    state = _read_state_dict(path)
    official = is_official_state_dict(state)
    if official:
        try:
            state = convert_official_state_dict(state, model.config.num_layers, model.config.sample_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    _check_state_dict(state, model, str(path))
    model.load_state_dict(state)
    return set_numerics(model, numerics or ("dit" if official else None))


class DiT(Backbone):
    """Class-conditional DiT (Peebles & Xie 2023) as diffusers builds it; the condition is a class label (R,)."""
    family = "dit"
    model_class = DiTTransformer2DModel
    sizes = DIT_SIZES

    # ------------------------------------------------------------------ building, loading, identity
    def build(self, size: str = "digits", tie_embedders: bool = True, **overrides) -> DiTTransformer2DModel:
        return build_dit(size, tie_embedders, **overrides)

    def load(self, path: Path, size: str | None = None, numerics: Numerics | None = None,
             tie_embedders: bool | None = None) -> DiTTransformer2DModel:
        """A DiT teacher from a diffusers directory (config.json and weights checked before anything is built:
        `check_dit_config`, `check_weights_present`) or a single .pt / .safetensors file (official or diffusers
        keys; needs `size`); `numerics` None: the checkpoint's own; `tie_embedders` as `apply_tying`."""
        if size is not None:
            check_size(size)
        if path.is_dir():
            model = set_numerics(_load_directory(model_directory(path), size), numerics)
        else:
            model = _load_single_file(path, size, numerics)
        check_finite_weights(model.state_dict(), str(path))
        return disable_label_dropout(apply_tying(model, tie_embedders, str(path))).eval()

    def load_saved(self, directory: Path, tie_embedders: bool | None = None) -> DiTTransformer2DModel:
        model = set_numerics(DiTTransformer2DModel.from_pretrained(directory, low_cpu_mem_usage=False))
        return apply_tying(model, tie_embedders, str(directory))

    def numerics(self, model: DiTTransformer2DModel) -> str:
        return numerics_of(model)

    def disable_condition_dropout(self, model: DiTTransformer2DModel) -> DiTTransformer2DModel:
        return disable_label_dropout(model)

    # ------------------------------------------------------------------ where history goes
    def history_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1  # the only attention of a DiT block: self-attention over image tokens

    def passthrough_attentions(self, block: nn.Module) -> list[nn.Module]:
        return []

    # ------------------------------------------------------------------ one forward
    def prepare(self, model: DiTTransformer2DModel, t: torch.Tensor, condition: torch.Tensor,
                dtype: torch.dtype) -> Prepared:
        """Every block embeds (t, label) itself (adaLN-zero); the head modulates with block 0's embedding."""
        return Prepared(t, condition, model.transformer_blocks[0].norm1.emb(t, condition, hidden_dtype=dtype))

    def repeat(self, condition: torch.Tensor, steps: int) -> torch.Tensor:
        return condition.repeat_interleave(steps)  # (B*S,)

    def run_block(self, model: DiTTransformer2DModel, block: nn.Module, hidden: torch.Tensor, prepared: Prepared,
                  attention_kwargs: dict | None) -> torch.Tensor:
        t, y = prepared.t, prepared.condition  # (R,) each
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            return model._gradient_checkpointing_func(block, hidden, None, None, None, t, attention_kwargs, y)
        return block(hidden, timestep=t, class_labels=y, cross_attention_kwargs=attention_kwargs)  # (R, L, D)

    def head_layers(self, model: DiTTransformer2DModel) -> dict[str, nn.Module]:
        return dict(proj_out_1=model.proj_out_1, proj_out_2=model.proj_out_2)  # norm_out has no parameters

    def head(self, model: DiTTransformer2DModel, layers: nn.Module, hidden: torch.Tensor,
             conditioning: torch.Tensor) -> torch.Tensor:
        """DiT's final layer: adaLN modulation (shift, scale) then the linear, (R, L, D) -> (R, L, p*p*C')."""
        shift, scale = layers.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)  # (R, D) each
        hidden = model.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]  # (R, L, D)
        return layers.proj_out_2(hidden)  # (R, L, p*p*C')

    def output_weight(self, layers: nn.Module) -> torch.Tensor:
        return layers.proj_out_2.weight

    def forward(self, model: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor,
                condition: torch.Tensor) -> torch.Tensor:
        return model(x, t, condition).sample  # (R, C', H, W)

    # ------------------------------------------------------------------ conditions
    def null_condition(self, model: DiTTransformer2DModel, condition: torch.Tensor) -> torch.Tensor:
        return torch.full_like(condition, null_class(model))  # (R,)

    def cat(self, conditions: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conditions)  # (sum R,)

    def check_condition(self, model: DiTTransformer2DModel, condition: torch.Tensor, allow_null: bool = False) -> None:
        """A class index out of range: one line naming the label."""
        high = num_classes(model) + (1 if allow_null else 0)
        bad = (condition < 0) | (condition >= high)
        if bool(bad.any()):
            raise ValueError(f"class label {int(condition[bad][0])} out of range [0, {high}) for this teacher "
                             f"(num_classes={num_classes(model)})")
