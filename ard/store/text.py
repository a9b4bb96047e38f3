"""A text store's conditioning sidecars: each prompt encoded once (ard/text_encoders.py), its valid tokens only.

    DIR/conditioning/prompts.jsonl               the prompts, {"id": ..., "text": ...} per line; a trajectory's label
                                                 is its prompt's line index
    DIR/conditioning/embeddings/shard-J.npy      (tokens of prompts J*P .. (J+1)*P - 1, D): those prompts' tokens one
                                                 after the other (P = `chunk_size`, the manifest's prompts_per_shard)
    DIR/conditioning/lengths.npy                 (prompts + 1,) int64 valid tokens per prompt; the last is the null
                                                 prompt's
    DIR/conditioning/pooled.npy                  (prompts + 1, P) each prompt's pooled embedding, the null prompt's
                                                 last (only for an encoder that makes one: SD3's CLIP-L + CLIP-G)
The null (negative) prompt of CFG is encoded after the prompts: label `count` is the null label, as a DiT's null
class is `num_classes`, and it is the last row of the last shard. A masked encoder's valid tokens do not depend on
padding, so only they are stored; an encoder without a mask (SD3's T5) stores every token up to its maximum. The
reader (`TextSidecar`) gives every prompt its pooled embedding (`TextCondition.pooled`) where the store holds them.

Encoding is resumable, shard by shard: each shard of `chunk_size` prompts is written atomically, then its token
counts, pooled embeddings and seconds into DIR/conditioning/partial/ (the shard's marker: a shard without one is
encoded again); partial/settings.json pins the prompts' sha256, the encoder's identity, the dtype and the chunk size,
and a rerun with other settings is refused. When every shard is there, lengths.npy, pooled.npy and prompts.jsonl are
written (atomically) and partial/ is removed; encoded.json then records the settings and the manifest section, which
a rerun with the same settings returns (other settings: refused), and the encoder's seconds per prompt (the
evaluation reports it apart from the transformer's sampling time). The shards are never copied: a T5-XXL encoding of
a large caption set is written once. `encode_prompts` returns the manifest's `conditioning` section
(ard.store.schema.TextConditioning), whose sha256s `ard-store verify` checks (ard.store.format.check_conditioning_file).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ard.atomic import write_atomic, write_npz_atomic, write_text_atomic
from ard.backbones.text import TextCondition
from ard.conditioning import Prompt
from ard.store.format import CONDITIONING_FOLDER as FOLDER
from ard.store.format import check_conditioning_files, sha256_file
from ard.store.schema import NUMPY_DTYPE
from ard.text_encoders import TextEncoder

PROMPTS, EMBEDDINGS, LENGTHS = "prompts.jsonl", "embeddings", "lengths.npy"  # EMBEDDINGS: the shards' folder
POOLED = "pooled.npy"  # (prompts + 1, P) pooled embeddings, for encoders that make them
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
                      unit="shard"):
        tokens, lengths, pooled, clock = [], [], [], time.perf_counter()
        for first in range(start, min(start + chunk_size, len(texts)), batch_size):
            batch = texts[first:min(first + batch_size, start + chunk_size, len(texts))]
            with torch.no_grad():
                encoded = encoder.encode(batch)  # (b, T, D), (b, T), (b, P) or None
            keep = encoded.mask if encoder.masked else torch.ones_like(encoded.mask)  # (b, T)
            tokens += [encoded.embeddings[i][keep[i]] for i in range(len(batch))]  # (n_i, D) each
            lengths += [int(keep[i].sum()) for i in range(len(batch))]
            if encoder.pooled_dim is not None:
                pooled.append(encoded.pooled)  # (b, P)
        shard = to_numpy(torch.cat(tokens), dtype)  # (tokens of the shard's prompts, D)
        write_atomic(folder / shard_file(start // chunk_size), lambda f: np.save(f, shard))
        kept = ({} if encoder.pooled_dim is None
                else {"pooled": to_numpy(torch.cat(pooled), dtype)})  # (the shard's prompts, P)
        write_npz_atomic(partial / f"{start:09d}.npz", lengths=np.array(lengths, dtype=np.int64),
                         seconds=np.array(time.perf_counter() - clock), **kept)  # the shard's marker, written after it
    markers = [partial / f"{c:09d}.npz" for c in chunks]
    seconds = sum(float(np.load(f)["seconds"]) for f in markers)  # the encoder's time, whatever run encoded a shard
    lengths = np.concatenate([np.load(f)["lengths"] for f in markers])  # (prompts + 1,)
    pooled = (None if encoder.pooled_dim is None
              else np.concatenate([np.load(f)["pooled"] for f in markers]))  # (prompts + 1, P)
    section = _finish(folder, len(chunks), chunk_size, lengths, pooled, lines, encoder, dtype, len(prompts),
                      null_prompt)
    write_text_atomic(folder / DONE, json.dumps({"settings": settings, "section": section,
                                                 "seconds_per_prompt": seconds / len(texts)}, indent=1) + "\n")
    shutil.rmtree(partial)
    return section


def shard_file(index: int) -> str:
    """A shard's path inside the conditioning folder."""
    return f"{EMBEDDINGS}/shard-{index:06d}.npy"


def _finish(folder: Path, shards: int, chunk_size: int, lengths: np.ndarray, pooled: np.ndarray | None, lines: str,
            encoder: TextEncoder, dtype: str, count: int, null_prompt: str) -> dict:
    """Write lengths.npy, pooled.npy (an encoder's pooled embeddings) and prompts.jsonl (each atomic); the
    manifest's section over every sidecar."""
    write_atomic(folder / LENGTHS, lambda f: np.save(f, lengths))
    if pooled is not None:
        write_atomic(folder / POOLED, lambda f: np.save(f, pooled))
    write_text_atomic(folder / PROMPTS, lines)
    entry = lambda name: {"file": f"{FOLDER}/{name}", "sha256": sha256_file(folder / name),  # noqa: E731
                          "bytes": (folder / name).stat().st_size}
    kept = {} if pooled is None else {"pooled": {**entry(POOLED), "shape": list(pooled.shape)}}
    return {"kind": "text",
            "encoder": {"name": encoder.name, "path": encoder.path, "weights_sha256": encoder.identity(),
                        "max_tokens": encoder.max_tokens, "dim": encoder.dim, "masked": encoder.masked},
            "prompts": {**entry(PROMPTS), "count": count},
            "embeddings": {"shape": [int(lengths.sum()), encoder.dim], "dtype": dtype, "prompts_per_shard": chunk_size,
                           "shards": [entry(shard_file(j)) for j in range(shards)]},
            "lengths": entry(LENGTHS), **kept, "null_prompt": null_prompt}


class TextSidecar:
    """Reads a text store's encoded prompts: `condition(labels)` is the TextCondition of those prompts (padded to
    the batch's longest, with their pooled embeddings where the store holds them, and the null prompt attached for
    CFG); the embeddings are memory-mapped."""

    def __init__(self, root: str | Path, conditioning: dict):
        root = Path(root)
        embeddings = conditioning["embeddings"]
        self.dtype = embeddings["dtype"]
        self.count = conditioning["prompts"]["count"]  # label `count` is the null prompt
        self.per_shard = embeddings["prompts_per_shard"]
        self.shards = [np.load(root / s["file"], mmap_mode="r") for s in embeddings["shards"]]  # (tokens_j, D) each
        self.lengths = np.load(root / conditioning["lengths"]["file"])  # (count + 1,)
        if self.lengths.shape != (self.count + 1,):
            raise ValueError(f"{root / conditioning['lengths']['file']}: {self.lengths.shape[0]} token counts; the "
                             f"manifest needs {self.count + 1} (the prompts and the null prompt)")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # (count + 2,)
        pooled = conditioning.get("pooled")
        self.pooled = None if pooled is None else np.load(root / pooled["file"], mmap_mode="r")  # (count + 1, P)
        if self.pooled is not None and list(self.pooled.shape) != pooled["shape"]:
            raise ValueError(f"{root / pooled['file']}: shape {list(self.pooled.shape)}; the manifest's "
                             f"conditioning.pooled.shape is {pooled['shape']}")
        for j, (shard, entry) in enumerate(zip(self.shards, embeddings["shards"])):
            first, end = j * self.per_shard, min((j + 1) * self.per_shard, self.count + 1)
            if shard.shape[0] != self.offsets[end] - self.offsets[first]:
                raise ValueError(f"{root / entry['file']}: {shard.shape[0]} tokens; lengths.npy gives its prompts "
                                 f"{first}..{end - 1} {self.offsets[end] - self.offsets[first]}")

    def tokens(self, i: int) -> np.ndarray:
        """Prompt i's stored tokens (n_i, D), from its shard."""
        j = i // self.per_shard
        start = self.offsets[i] - self.offsets[j * self.per_shard]
        return self.shards[j][start:start + self.lengths[i]]

    def rows(self, labels: list[int]) -> TextCondition:
        longest = int(max(self.lengths[i] for i in labels))
        emb = torch.zeros(len(labels), longest, self.shards[0].shape[1])  # (B, T, D)
        mask = torch.zeros(len(labels), longest, dtype=torch.bool)  # (B, T)
        for row, i in enumerate(labels):
            n = int(self.lengths[i])
            emb[row, :n] = from_numpy(self.tokens(i), self.dtype)
            mask[row, :n] = True
        pooled = None if self.pooled is None else from_numpy(self.pooled[labels], self.dtype)  # (B, P)
        return TextCondition(emb, mask, pooled=pooled)

    def condition(self, labels: torch.Tensor) -> TextCondition:
        """The prompts of `labels` (B,) (the null label `count` allowed), with the null prompt as `null`."""
        labels = [int(i) for i in labels]
        if any(not 0 <= i <= self.count for i in labels):
            raise ValueError(f"prompt label {next(i for i in labels if not 0 <= i <= self.count)} out of range "
                             f"[0, {self.count}] ({self.count}: the null prompt)")
        return replace(self.rows(labels), null=self.rows([self.count]))


def encoding_seconds(root: str | Path) -> float | None:
    """The text encoder's seconds per prompt when the store's prompts were encoded (None: not recorded)."""
    done = Path(root) / FOLDER / DONE
    return json.loads(done.read_text()).get("seconds_per_prompt") if done.exists() else None


def check_pooled(conditioning: dict, pooled_dim: int | None, where: str) -> None:
    """A text store (its manifest's `conditioning`, read at `where`) holds the pooled embeddings its teacher reads,
    `pooled_dim` wide (None: the teacher reads none, and any the store holds go unused)."""
    if pooled_dim is None:
        return
    pooled = conditioning.get("pooled")
    if pooled is None:
        raise ValueError(f"{where}: field 'conditioning.pooled' missing: the teacher reads {pooled_dim}-wide pooled "
                         "text embeddings (SD3), and the store holds none: encode its prompts with text_encoder 'sd3'")
    if pooled["shape"][1] != pooled_dim:
        raise ValueError(f"{where}: field 'conditioning.pooled.shape' is {pooled['shape']}; the teacher reads "
                         f"{pooled_dim}-wide pooled text embeddings (pooled_projection_dim)")


def store_conditioner(root: str | Path, manifest: dict) -> Callable[[torch.Tensor], TextCondition] | None:
    """A text store's labels (B,) -> their prompts' stored encodings (with the null prompt), on the labels' device;
    None for a store of class labels, whose labels are the condition itself. Its sidecars' sizes are checked first
    (one line naming a missing or truncated file)."""
    conditioning = manifest.get("conditioning") or {}
    if conditioning.get("kind") != "text":
        return None
    check_conditioning_files(root, manifest)
    sidecar = TextSidecar(root, conditioning)
    return lambda labels: sidecar.condition(labels).to(labels.device)
