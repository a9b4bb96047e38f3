"""A text store's conditioning sidecars: each prompt encoded once (ard/text_encoders.py), its valid tokens only.

    DIR/conditioning/prompts.jsonl    the prompts, {"id": ..., "text": ...} per line; a trajectory's label is its
                                      prompt's line index
    DIR/conditioning/embeddings.npy   (total tokens, D): prompt i's tokens are rows offsets[i]:offsets[i + 1]
    DIR/conditioning/lengths.npy      (prompts + 1,) int64 valid tokens per prompt; the last is the null prompt's
The null (negative) prompt of CFG is encoded after the prompts: label `count` is the null label, as a DiT's null
class is `num_classes`. A masked encoder's valid tokens do not depend on padding, so only they are stored; an
encoder without a mask (SD3's T5) stores every token up to its maximum.

Encoding is resumable: chunks of `chunk_size` prompts are encoded into DIR/conditioning/partial/ (each file written
atomically, named by its first prompt; partial/settings.json pins the prompts' sha256, the encoder's identity, the
dtype and the chunk size, and a rerun with other settings is refused), a rerun encodes only the chunks missing, then
the chunks are streamed into embeddings.npy and lengths.npy (atomically) and partial/ is removed; encoded.json then
records the settings and the manifest section, which a rerun with the same settings returns (other settings: refused),
and the encoder's seconds per prompt (the evaluation reports it apart from the transformer's sampling time).
`encode_prompts` returns the manifest's `conditioning` section (ard.store.schema.TextConditioning), whose sha256s
`ard-store verify` checks (ard.store.format.check_conditioning_file).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ard.atomic import atomic_file, write_atomic, write_npz_atomic, write_text_atomic
from ard.backbones.text import TextCondition
from ard.conditioning import Prompt
from ard.store.format import CONDITIONING_FOLDER as FOLDER
from ard.store.format import sha256_file
from ard.store.schema import NUMPY_DTYPE
from ard.text_encoders import TextEncoder

PROMPTS, EMBEDDINGS, LENGTHS = "prompts.jsonl", "embeddings.npy", "lengths.npy"
PARTIAL = "partial"
DONE = "encoded.json"  # the finished encoding's settings and manifest section: a rerun returns it


def to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Embeddings in the store's dtype, as the .npy holds them (bfloat16 as its uint16 bits)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def from_numpy(x: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def encode_prompts(root: str | Path, prompts: list[Prompt], encoder: TextEncoder, dtype: str = "float16",
                   chunk_size: int = 1024, null_prompt: str = "", batch_size: int = 64) -> dict:
    """Encode `prompts` and the null prompt into root/conditioning/ (see the module docstring); returns the
    manifest's `conditioning` section."""
    if dtype not in NUMPY_DTYPE:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(NUMPY_DTYPE)}")
    folder = Path(root) / FOLDER
    partial = folder / PARTIAL
    lines = "".join(json.dumps({"id": p.id, "text": p.text}, ensure_ascii=False) + "\n" for p in prompts)
    settings = {"prompts_sha256": hashlib.sha256(lines.encode()).hexdigest(), "encoder": encoder.identity(),
                "dtype": dtype, "chunk_size": chunk_size, "null_prompt": null_prompt}
    if (folder / DONE).exists():
        done = json.loads((folder / DONE).read_text())
        if done["settings"] != settings:
            raise ValueError(f"{folder / DONE}: the store's prompts were encoded with other settings (prompts, "
                             "encoder, dtype or null prompt); use another store directory")
        return done["section"]
    partial.mkdir(parents=True, exist_ok=True)
    pinned = partial / "settings.json"
    if pinned.exists() and json.loads(pinned.read_text()) != settings:
        raise ValueError(f"{pinned}: an unfinished encoding with other settings (prompts, encoder, dtype or chunk "
                         "size); remove that folder to start again")
    write_text_atomic(pinned, json.dumps(settings, indent=1) + "\n")
    texts = [p.text for p in prompts] + [null_prompt]
    chunks = range(0, len(texts), chunk_size)
    for start in tqdm([c for c in chunks if not (partial / f"{c:09d}.npz").exists()], desc="encoding prompts",
                      unit="chunk"):
        tokens, lengths, clock = [], [], time.perf_counter()
        for first in range(start, min(start + chunk_size, len(texts)), batch_size):
            batch = texts[first:min(first + batch_size, start + chunk_size, len(texts))]
            with torch.no_grad():
                emb, mask = encoder.encode(batch)  # (b, T, D), (b, T)
            keep = mask if encoder.masked else torch.ones_like(mask)
            tokens += [emb[i][keep[i]] for i in range(len(batch))]  # (n_i, D) each
            lengths += [int(keep[i].sum()) for i in range(len(batch))]
        write_npz_atomic(partial / f"{start:09d}.npz", tokens=to_numpy(torch.cat(tokens), dtype),
                         lengths=np.array(lengths, dtype=np.int64), seconds=np.array(time.perf_counter() - clock))
    files = [partial / f"{c:09d}.npz" for c in chunks]
    seconds = sum(float(np.load(f)["seconds"]) for f in files)  # the encoder's time, whatever run encoded a chunk
    section = _finish(folder, files, lines, encoder, dtype, len(prompts), null_prompt)
    write_text_atomic(folder / DONE, json.dumps({"settings": settings, "section": section,
                                                 "seconds_per_prompt": seconds / len(texts)}, indent=1) + "\n")
    shutil.rmtree(partial)
    return section


def _finish(folder: Path, chunks: list[Path], lines: str, encoder: TextEncoder, dtype: str, count: int,
            null_prompt: str) -> dict:
    """Stream the chunks into embeddings.npy and lengths.npy (each atomic), write prompts.jsonl, drop partial/."""
    lengths = np.concatenate([np.load(c)["lengths"] for c in chunks])  # (prompts + 1,)
    total = int(lengths.sum())
    with atomic_file(folder / EMBEDDINGS) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": NUMPY_DTYPE[dtype], "fortran_order": False,
                                                 "shape": (total, encoder.dim)})
        for c in chunks:
            f.write(np.ascontiguousarray(np.load(c)["tokens"]).tobytes())
    write_atomic(folder / LENGTHS, lambda f: np.save(f, lengths))
    write_text_atomic(folder / PROMPTS, lines)
    entry = lambda name: {"file": f"{FOLDER}/{name}", "sha256": sha256_file(folder / name),  # noqa: E731
                          "bytes": (folder / name).stat().st_size}
    return {"kind": "text",
            "encoder": {"name": encoder.name, "path": encoder.path, "weights_sha256": encoder.identity(),
                        "max_tokens": encoder.max_tokens, "dim": encoder.dim, "masked": encoder.masked},
            "prompts": {**entry(PROMPTS), "count": count},
            "embeddings": {**entry(EMBEDDINGS), "shape": [total, encoder.dim], "dtype": dtype},
            "lengths": entry(LENGTHS), "null_prompt": null_prompt}


class TextSidecar:
    """Reads a text store's encoded prompts: `condition(labels)` is the TextCondition of those prompts (padded to
    the batch's longest, with the null prompt attached for CFG); the embeddings are memory-mapped."""

    def __init__(self, root: str | Path, conditioning: dict):
        root = Path(root)
        self.dtype = conditioning["embeddings"]["dtype"]
        self.count = conditioning["prompts"]["count"]  # label `count` is the null prompt
        self.embeddings = np.load(root / conditioning["embeddings"]["file"], mmap_mode="r")  # (total, D)
        self.lengths = np.load(root / conditioning["lengths"]["file"])  # (count + 1,)
        if self.lengths.shape != (self.count + 1,) or int(self.lengths.sum()) != self.embeddings.shape[0]:
            raise ValueError(f"{root / conditioning['lengths']['file']}: {self.lengths.shape[0]} token counts summing "
                             f"to {int(self.lengths.sum())}; the manifest needs {self.count + 1} (the prompts and the "
                             f"null prompt) summing to the embeddings' {self.embeddings.shape[0]} tokens")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # (count + 2,)

    def rows(self, labels: list[int]) -> TextCondition:
        longest = int(max(self.lengths[i] for i in labels))
        emb = torch.zeros(len(labels), longest, self.embeddings.shape[1])  # (B, T, D)
        mask = torch.zeros(len(labels), longest, dtype=torch.bool)  # (B, T)
        for row, i in enumerate(labels):
            n = int(self.lengths[i])
            emb[row, :n] = from_numpy(self.embeddings[self.offsets[i]:self.offsets[i] + n], self.dtype)
            mask[row, :n] = True
        return TextCondition(emb, mask)

    def condition(self, labels: torch.Tensor) -> TextCondition:
        """The prompts of `labels` (B,) (the null label `count` allowed), with the null prompt as `null`."""
        labels = [int(i) for i in labels]
        if any(not 0 <= i <= self.count for i in labels):
            raise ValueError(f"prompt label {next(i for i in labels if not 0 <= i <= self.count)} out of range "
                             f"[0, {self.count}] ({self.count}: the null prompt)")
        batch = self.rows(labels)
        return TextCondition(batch.embeddings, batch.mask, null=self.rows([self.count]))


def encoding_seconds(root: str | Path) -> float | None:
    """The text encoder's seconds per prompt when the store's prompts were encoded (None: not recorded)."""
    done = Path(root) / FOLDER / DONE
    return json.loads(done.read_text()).get("seconds_per_prompt") if done.exists() else None


def store_conditioner(root: str | Path, manifest: dict) -> Callable[[torch.Tensor], TextCondition] | None:
    """A text store's labels (B,) -> their prompts' stored encodings (with the null prompt), on the labels' device;
    None for a store of class labels, whose labels are the condition itself."""
    conditioning = manifest.get("conditioning") or {}
    if conditioning.get("kind") != "text":
        return None
    sidecar = TextSidecar(root, conditioning)
    return lambda labels: sidecar.condition(labels).to(labels.device)
