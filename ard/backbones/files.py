"""Diffusers model directories, whatever the family: config.json, the safetensors weights, the family a config names.

A directory holds config.json and the weights, one safetensors file or shards listed by an index (the layout
`save_pretrained` writes; .bin weights are pickles and are not read); a pipeline snapshot holds it under
transformer/. Everything here reads files only: nothing is built.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"

# Families by the diffusers class a config.json names (`_class_name`); others are named by their class.
FAMILIES = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3"}
# diffusers' older generic class, whose family its norm_type tells (diffusers remaps it the same way when loading);
# facebook/DiT-XL-2-256's transformer/config.json still names it
LEGACY_CLASS = "Transformer2DModel"
LEGACY_FAMILIES = {"ada_norm_zero": "dit", "ada_norm_single": "pixart"}


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
