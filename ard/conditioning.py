"""Text conditioning's inputs, checked before any encoder or teacher runs: prompt files and text encoders.

A prompt file is UTF-8 JSON Lines, one prompt per line: {"id": "<unique id>", "text": "<the prompt>"}, or, named *.txt,
plain text with one prompt per line, whose id is its line number (blank lines are skipped in both). `read_prompts`
refuses, with one line naming the file and line: a file that is missing, not UTF-8 or holds no prompt; a line that is
not such an object; an empty text; an id seen before (both lines named); a prompt longer than the encoder's maximum
(never cut silently: a cut prompt is another prompt). A text store records its encoder's identity (`encoder_identity`:
sha256 of its weights) in the manifest (`conditioning.encoder`, ard.store.schema), and `check_encoder` refuses an
encoder directory that is missing or is not the one the store was made with.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


@dataclass(frozen=True)
class Prompt:
    id: str  # unique within its file
    text: str


def read_prompts(path: str | Path, max_tokens: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> list[Prompt]:
    """The prompts of a prompt file (JSON Lines, or plain text if it is named *.txt), in file order; with
    `max_tokens`, each prompt's token count (`count_tokens`, the encoder's tokenizer) must not exceed it. One-line
    ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompt file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; a prompt file (UTF-8 JSON Lines) is needed") from None
    except UnicodeDecodeError as e:
        line = text_line(path.read_bytes(), e.start)
        raise ValueError(f"{path}: line {line}: not UTF-8 (byte {e.start}: {e.reason}); prompt files are UTF-8 "
                         "JSON Lines") from None
    prompts, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        if path.suffix == ".txt":
            obj = {"id": str(number), "text": line.strip()}
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}); expected "
                                 '{"id": "...", "text": "..."} (or a *.txt file: one prompt per line)') from None
        if not (isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("text"), str)):
            raise ValueError(f"{where}: expected an object with string fields 'id' and 'text', got {line[:60]!r}")
        if not obj["id"] or not obj["text"].strip():
            raise ValueError(f"{where}: field '{'id' if not obj['id'] else 'text'}' is empty")
        if obj["id"] in seen:
            raise ValueError(f"{where}: id {obj['id']!r} already on line {seen[obj['id']]}; ids must be unique")
        seen[obj["id"]] = number
        if max_tokens is not None and count_tokens is not None and (n := count_tokens(obj["text"])) > max_tokens:
            raise ValueError(f"{where}: prompt {obj['id']!r} has {n} tokens, the encoder takes at most {max_tokens} "
                             "(shorten it: prompts are never cut)")
        prompts.append(Prompt(obj["id"], obj["text"]))
    if not prompts:
        raise ValueError(f"{path}: holds no prompt (one per line: a JSON object {{\"id\": ..., \"text\": ...}}, or "
                         "plain text in a *.txt file)")
    return prompts


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line number of byte `offset` in `data`."""
    return data.count(b"\n", 0, offset) + 1


def encoder_identity(path: str | Path) -> str:
    """sha256 of a text encoder's weights (every tensor of its *.safetensors files: names, dtypes, shapes, bytes,
    in name order), whatever file layout they came in; one-line error when the directory holds none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: text encoder directory not found")
    files = sorted(path.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in the text encoder directory")
    digest = hashlib.sha256()
    try:
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(file, "pt")) for file in files]
            owner = {name: f for f in handles for name in f.keys()}  # tensor name -> its file
            for name in sorted(owner):
                t = owner[name].get_tensor(name).contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: text encoder weights not readable ({e})") from None
    return digest.hexdigest()


def check_encoder(path: str | Path, recorded: dict, where: str) -> None:
    """The encoder at `path` is the one a store's manifest recorded (`conditioning.encoder`, read at `where`)."""
    ours = encoder_identity(path)
    if ours != recorded["weights_sha256"]:
        raise ValueError(f"{where}: field 'conditioning.encoder.weights_sha256' is {recorded['weights_sha256'][:16]!r}"
                         f", the encoder at {path} has {ours[:16]!r}: not the encoder the store was made with")
