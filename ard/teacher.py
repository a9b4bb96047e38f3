"""The teacher: a diffusers `DiTTransformer2DModel`, its named sizes, and its quirks handled once.

Every place in ard that needs a DiT goes through `build_dit` / `load_teacher` and `eps_from_output`;
nothing else touches the diffusers quirks listed below. `load_teacher` checks a directory's config.json (the
family, the fields ard reads: `check_dit_config`) and that its safetensors weights exist (`check_weights_present`)
before anything is built, so a teacher that cannot be served stops in one line; `teacher_family` names the family
of any teacher path ("dit", "pixart", "sd3", ...) from its config.json alone.

Quirks of diffusers' DiT (docs/method.md, "diffusers DiT quirks"), handled here and only here:
- every block owns a label embedder that drops labels with p = 0.1 in train() mode, independently per
  block: `disable_label_dropout` sets it to 0 (CFG dropout is ours, done once per sample);
- learned sigma: `out_channels == 2 * in_channels`; epsilon is the first `in_channels` channels
  (`eps_from_output`);
- the null (unconditional) class is index `num_embeds_ada_norm` (`null_class`);
- there is no `set_attn_processor` on this class: processors are set per block (`attn1.set_processor`);
- its numerics differ from the official DiT in two places (`set_numerics`): the timestep frequencies
  (diffusers exp(-ln(1e4) i / 127), DiT exp(-ln(1e4) i / 128)) and the LayerNorm eps before the MLP
  (diffusers 1e-5, DiT 1e-6). Weights trained by facebookresearch/DiT need "dit", ours "diffusers";
- every block owns a copy of the timestep and label embedder (`norm1.emb`), where the official DiT has one
  `t_embedder` and one `y_embedder`: `tie_block_embedders` makes every block use block 0's module, as
  `build_dit` and `load_teacher` do by default (`load_teacher`: where the checkpoint's copies are equal).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from diffusers import DiTTransformer2DModel
from diffusers.utils import logging as diffusers_logging

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
}

ASSETS = Path(__file__).parent / "assets"
DIGITS_TEACHER = ASSETS / "digits_teacher"  # shipped EMA weights of the embedded default's teacher

# A diffusers model directory: config.json and the weights, one safetensors file or shards listed by an index
# (the layout save_pretrained writes; .bin weights are pickles and are not read).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"

# Teacher families by the diffusers class a config.json names (`_class_name`); others are named by their class.
FAMILIES = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3"}
SERVED_FAMILIES = ("dit",)  # what load_teacher builds: class-conditional DiTs
# diffusers' older generic class, whose family its norm_type tells (diffusers remaps it the same way when loading);
# facebook/DiT-XL-2-256's transformer/config.json still names it
LEGACY_CLASS = "Transformer2DModel"
LEGACY_FAMILIES = {"ada_norm_zero": "dit", "ada_norm_single": "pixart"}

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


def teacher_identity(model: DiTTransformer2DModel) -> dict[str, str]:
    """What a teacher computes, whatever it was loaded from (a pipeline snapshot, its transformer/ subfolder,
    an official .pt): sha256 of its weights (state dict: names, dtypes, shapes, bytes, in name order), of its
    config (the diffusers config without private keys: the path it came from, versions, the numerics flag),
    and its numerics. The store's manifest records it, and distillation and evaluation compare against it."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        weights.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config_bytes = json.dumps(config, sort_keys=True, default=str).encode()
    return {"weights_sha256": weights.hexdigest(), "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
            "numerics": numerics_of(model)}


def check_teacher(recorded: dict, ours: dict, where: str, what: str) -> None:
    """One-line ValueError unless the `teacher_identity` `ours` is the one `recorded` (a manifest's `teacher`
    field, read at `where`; `what` names our teacher in the message). A manifest written before `numerics`
    was recorded separately counts as "diffusers" numerics (its config hash then only matches a teacher
    loaded without recorded numerics), one without `family` as a DiT's; `ours` (a DiT) is of family "dit"."""
    recorded = {"numerics": "diffusers", "family": "dit", **recorded}
    if recorded["family"] != ours.get("family", "dit"):
        raise ValueError(f"{where}: field 'teacher.family' is {recorded['family']!r}, {what} is a "
                         f"{ours.get('family', 'dit')!r} teacher: a store of another teacher family")
    for field in ("weights_sha256", "numerics", "config_sha256"):  # numerics first: they change the config too
        if recorded.get(field) != ours[field]:
            source = f" ({recorded['path']})" if recorded.get("path") else ""
            hint = f"; load it with numerics={recorded['numerics']!r}" if field == "numerics" else ""
            raise ValueError(f"{where}: field 'teacher.{field}' is {str(recorded.get(field))[:16]!r}, {what} has "
                             f"{ours[field][:16]!r}: not the teacher the store was made with{source}{hint}")


def disable_label_dropout(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Turn off diffusers' per-block label dropout (CFG dropout is done once per sample, by us)."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


# The per-block timestep + label embedder (a CombinedTimestepLabelEmbeddings: timestep_embedder, class_embedder)
# and its state-dict keys, "transformer_blocks.<i>.norm1.emb.<rest>".
EMBEDDER = "norm1.emb"
_EMBEDDER_KEY = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")


def embedders_tied(model: DiTTransformer2DModel) -> bool:
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


def tie_block_embedders(model: DiTTransformer2DModel, where: str = "", check: bool = True) -> DiTTransformer2DModel:
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


def apply_tying(model: DiTTransformer2DModel, tie_embedders: bool | None, where: str) -> DiTTransformer2DModel:
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


def eps_from_output(model: DiTTransformer2DModel, output: torch.Tensor) -> torch.Tensor:
    """Epsilon from a DiT output: with learned sigma the output has 2C channels and eps is the first C."""
    return output[:, : model.config.in_channels]


def check_labels(model: DiTTransformer2DModel, labels: torch.Tensor, allow_null: bool = False) -> None:
    """Raise a one-line error naming the label when a class index is out of range."""
    high = num_classes(model) + (1 if allow_null else 0)
    bad = (labels < 0) | (labels >= high)
    if bool(bad.any()):
        raise ValueError(f"class label {int(labels[bad][0])} out of range [0, {high}) for this teacher "
                         f"(num_classes={num_classes(model)})")


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


def model_directory(path: Path) -> Path:
    """The diffusers model directory of a teacher directory: a pipeline snapshot's transformer/ subfolder, else the
    directory itself."""
    return path / "transformer" if (path / "transformer" / CONFIG_NAME).exists() else path


def read_config(directory: Path) -> dict:
    """config.json of a diffusers model directory as a dict; one-line errors when it is missing or not a JSON object."""
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a diffusers model directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); a diffusers model config is a JSON object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {type(config).__name__}; a diffusers model config is a JSON object")
    return config


def family_of(config: dict, where: Path) -> str:
    """The family of the model a config.json (read at `where`) describes, from its `_class_name` (FAMILIES; the
    legacy Transformer2DModel by its norm_type, LEGACY_FAMILIES)."""
    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: field '_class_name' is {name!r}; a diffusers model config names its class "
                         "(e.g. 'DiTTransformer2DModel')")
    if name == LEGACY_CLASS:
        return LEGACY_FAMILIES.get(config.get("norm_type"), name)
    return FAMILIES.get(name, name)


def teacher_family(path: str | Path) -> str:
    """The family of the teacher at `path` ("dit", "pixart", "sd3", else its diffusers class name), read from its
    config.json's `_class_name` without loading weights; a single-file checkpoint is a DiT (load_teacher reads
    single files as DiTs only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if not path.is_dir():
        return "dit"
    directory = model_directory(path)
    return family_of(read_config(directory), directory / CONFIG_NAME)


def check_dit_config(config: dict, where: Path) -> None:
    """Refuse (one line naming `where`, the field, its value and what is allowed) a DiT config.json that the model
    cannot be built from or that ard would misread, before anything is built: a family other than SERVED_FAMILIES,
    a field of DIT_INT_FIELDS that is not an integer >= 1, out_channels other than in_channels or 2 * in_channels
    (learned sigma; null means in_channels), a sample_size that patch_size does not divide, a norm_type other than
    ada_norm_zero (the only one diffusers' DiT implements), recorded numerics other than NUMERICS'."""
    family = family_of(config, where)
    if family not in SERVED_FAMILIES:
        raise ValueError(f"{where}: field '_class_name' is {config['_class_name']!r} (family {family!r}); ard serves "
                         f"the {', '.join(map(repr, SERVED_FAMILIES))} family only (DiTTransformer2DModel)")
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


def check_weights_present(directory: Path) -> None:
    """The safetensors weights of a diffusers model directory exist: WEIGHTS_NAME, or WEIGHTS_INDEX_NAME and every
    shard it lists (one-line FileNotFoundError naming the missing file), before diffusers looks for them."""
    if (directory / WEIGHTS_NAME).is_file():
        return
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS_NAME} not found (a diffusers model directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}, or its shards and {WEIGHTS_INDEX_NAME})")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {e!r}") from None
    missing = [shard for shard in shards if not (directory / str(shard)).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: {missing[0]} not found ({len(missing)} of {len(shards)} shards listed "
                                f"by {WEIGHTS_INDEX_NAME} missing)")


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


def load_teacher(path: str | Path = DIGITS_TEACHER, size: str | None = None,
                 numerics: Numerics | None = None, tie_embedders: bool | None = None) -> DiTTransformer2DModel:
    """Load a DiT teacher in eval mode with label dropout disabled.

    path: a diffusers-format directory (config.json + safetensors, e.g. a snapshot of
          facebook/DiT-XL-2-256, its `transformer/` subfolder or the directory itself), or an official
          facebookresearch/DiT checkpoint (`DiT-XL-2-256x256.pt`, converted on the fly by
          `ard.convert`), or a `.safetensors` file of either layout. `size` (a key of DIT_SIZES) is
          required for single files and, for directories, checked against the directory's config.
          A directory's config.json and weights are checked before anything is built (check_dit_config,
          check_weights_present): a teacher that cannot be served stops in one line, not inside diffusers.
    numerics: None uses the checkpoint's own: "dit" for an official checkpoint, the recorded value for
          a directory (none recorded: "diffusers"). Pass "dit" for a diffusers snapshot of official
          weights (e.g. facebook/DiT-XL-2-256) to compute exactly like the official DiT.
    tie_embedders: share block 0's timestep + label embedder with every block, as the official DiT does
          (`tie_block_embedders`; outputs and `teacher_identity` unchanged). None: tie when every block's copy
          equals block 0's (official weights, converted or a diffusers snapshot of them, anything saved tied),
          else keep one per block (a DiT trained so, such as the shipped digits teacher); True: tie, and refuse
          (one line naming the file and the key) weights whose copies differ; False: one embedder per block.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if size is not None:
        check_size(size)
    if path.is_dir():
        model = set_numerics(_load_directory(model_directory(path), size), numerics)
    else:
        if size is None:
            raise ValueError(f"{path}: a single-file checkpoint needs `size` (one of {', '.join(DIT_SIZES)})")
        model = build_dit(size, tie_embedders=False)  # tied below, once the weights are known
        state = _read_state_dict(path)
        from ard.convert import convert_official_state_dict, is_official_state_dict

        official = is_official_state_dict(state)
        if official:
            try:
                state = convert_official_state_dict(state, model.config.num_layers, model.config.sample_size)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        _check_state_dict(state, model, str(path))
        model.load_state_dict(state)
        set_numerics(model, numerics or ("dit" if official else None))
    check_finite_weights(model.state_dict(), str(path))
    model = apply_tying(model, tie_embedders, str(path))
    return disable_label_dropout(model).eval()


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
