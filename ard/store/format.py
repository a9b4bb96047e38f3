"""The trajectory store on disk: manifest, shards, atomic shard writes, consolidation, verification, reading.

Layout (format "ard-trajectory-store", version 1; docs/store.md is the full description):

    DIR/manifest.json                       what the store holds and how it was made (JSON)
    DIR/shards/shard-000000/states.npy      (n, G, C, H, W) the teacher's states at the G saved grid indices
    DIR/shards/shard-000000/x0.npy          (n, G, C, H, W) its x0-predictions (only when state.x0 is true)
    DIR/shards/shard-000000/labels.npy      (n,) int64 class labels
    DIR/shards/shard-000000/index.npy       (n,) int64 trajectory indices (start .. start + n - 1)
    DIR/shards/shard-000000/shard.json      the shard's sidecar: store_id, start, count, per-file sha256/bytes

Shard k holds the consecutive trajectories [k * shard_size, min((k + 1) * shard_size, num_trajectories)).
A shard directory is written under a temporary name and renamed into place once all its files (and the
sidecar) are fsynced, so a shard directory that exists is complete. The shard directories are the source
of truth; the manifest's `shards` list is a consolidated copy that the writer's rank 0 refreshes at the
end of every run (`consolidate`). bfloat16 states are stored as their raw bits ('<u2'; numpy has no
bfloat16), every other dtype as itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence, get_args

import numpy as np
import torch

from ard.atomic import write_text_atomic
from ard.checks import can_write
from ard.schedules import FlowSchedule
from ard.store.mapping import MappedFiles
from ard.store.schema import FORMAT, NUMPY_DTYPE, VERSIONS, StoreDtype, check_manifest

VERSION = 1  # what this writer writes for class-conditional DDIM stores (ard.store.schema: the versions read)
TEXT_VERSION = 2  # ... and for text stores (a `conditioning` section, the teacher's family) and flow stores
CONDITIONING_FOLDER = "conditioning"  # a text store's encoded prompts (ard/store/text.py), written before the manifest
MANIFEST = "manifest.json"
SIDECAR = "shard.json"
TORCH_DTYPE: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINITE_CHUNK = 1024  # trajectories converted at a time when checking for NaN / inf
STATE_FIELDS = ("states", "x0")  # (n, G, C, H, W) arrays of a shard; x0 only when the store has it
MAX_ABS = "max_abs"  # sidecar field: {state field: max |value| in the shard}, recorded when it is written
# Manifest fields that do not decide the store's contents (everything else does, and is hashed into store_id).
INFO_FIELDS = ("store_id", "created", "config", "shards", "complete")
INFO_SUBFIELDS = {"teacher": ("path",)}


class StoreError(ValueError):
    """A one-line error naming the store file and field at fault."""


# ---------------------------------------------------------------------------------------------- small helpers
def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def shard_dir(root: str | Path, shard: int) -> Path:
    return Path(root) / "shards" / shard_name(shard)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside `path`, fsync, rename over `path`, fsync the directory."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
    fsync_dir(path.parent)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def identity(manifest: dict) -> dict:
    """The manifest fields that decide the store's contents (two runs may fill one store iff these agree)."""
    out = {k: v for k, v in manifest.items() if k not in INFO_FIELDS}
    for key, drop in INFO_SUBFIELDS.items():
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in drop}
    return out


def store_id(manifest: dict) -> str:
    return hashlib.sha256(_canonical(identity(manifest))).hexdigest()


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The dotted name of the first field where two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


# ---------------------------------------------------------------------------------------------- manifest
def new_manifest(*, teacher: dict, solver: dict, grid_indices: Sequence[int], grid_timesteps: Sequence[int],
                 state_shape: Sequence[int], dtype: StoreDtype, with_x0: bool, num_classes: int,
                 num_trajectories: int, shard_size: int, seed: int, micro_batch_size: int,
                 created: dict | None = None, config: dict | None = None, conditioning: dict | None = None,
                 grid_sigmas: Sequence[float] | None = None) -> dict:
    """A fresh manifest (no shards yet); with `conditioning` (a text store's section, ard/store/text.py) or
    `grid_sigmas` (a flow teacher's grid: the sigma of each saved state) of version 2. Raises StoreError for values
    no store can have."""
    if dtype not in get_args(StoreDtype):
        raise StoreError(f"dtype must be one of {get_args(StoreDtype)}, got {dtype!r}")
    for name, value in (("num_trajectories", num_trajectories), ("shard_size", shard_size),
                        ("micro_batch_size", micro_batch_size), ("num_classes", num_classes)):
        if int(value) < 1:
            raise StoreError(f"{name} must be at least 1, got {value}")
    manifest = {
        "format": FORMAT,
        "version": VERSION if conditioning is None and grid_sigmas is None else TEXT_VERSION,
        "teacher": dict(teacher),
        "solver": dict(solver),
        "grid": {"indices": [int(i) for i in grid_indices], "timesteps": [int(t) for t in grid_timesteps]},
        "state": {"shape": [int(s) for s in state_shape], "dtype": dtype, "numpy_dtype": NUMPY_DTYPE[dtype],
                  "x0": bool(with_x0)},
        "num_classes": int(num_classes),
        "num_trajectories": int(num_trajectories),
        "shard_size": int(shard_size),
        "num_shards": math.ceil(int(num_trajectories) / int(shard_size)),
        "micro_batch_size": int(micro_batch_size),
        "seed": int(seed),
        "created": created or {},
        "config": config or {},
        "shards": [],
        "complete": False,
    }
    if conditioning is not None or grid_sigmas is not None:
        manifest["conditioning"] = conditioning or {"kind": "class"}  # version 2 names its conditioning
    if grid_sigmas is not None:
        manifest["grid"]["sigmas"] = [float(s) for s in grid_sigmas]
    manifest["store_id"] = store_id(manifest)
    try:
        check_manifest(manifest, "the new store's manifest")
    except ValueError as e:
        raise StoreError(str(e)) from None
    return manifest


def read_manifest(root: str | Path) -> dict:
    """Parse and check DIR/manifest.json against the schema (ard.store.schema: types, ranges, relations) and its
    store_id; StoreError naming the file and field when it is not a valid one."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise StoreError(f"{root}: not a directory (no trajectory store here)")
    m = _read_json(path, "not a trajectory store, or the precompute never started")
    if m.get("format") != FORMAT:
        raise StoreError(f"{path}: field 'format' is {m.get('format')!r}, expected {FORMAT!r}")
    if isinstance(m.get("version"), bool) or m.get("version") not in VERSIONS:
        raise StoreError(f"{path}: field 'version' is {m.get('version')!r}; this ard reads versions {list(VERSIONS)}")
    try:
        check_manifest(m, str(path))
    except ValueError as e:
        raise StoreError(str(e)) from None
    if m["store_id"] != store_id(m):
        raise StoreError(f"{path}: field 'store_id' does not match the manifest's contents (edited by hand?)")
    return m


def shard_span(manifest: dict, shard: int) -> tuple[int, int]:
    """(start, count) of a shard: consecutive trajectory indices, the last shard possibly shorter."""
    start = shard * manifest["shard_size"]
    return start, min(manifest["shard_size"], manifest["num_trajectories"] - start)


def check_output(root: str | Path, manifest: dict) -> dict | None:
    """Check that DIR can receive `manifest`'s store, touching nothing: returns the existing manifest (the same
    store: resume) or None (DIR missing or empty, and writable); StoreError naming the file and field when DIR
    holds another store, other files, or cannot be written. Every process calls it, so all raise alike."""
    root = Path(root)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: output path exists and is not a directory")
    existing = None
    if path.exists():
        existing = read_manifest(root)
        diff = _first_difference(identity(existing), identity(manifest))
        if diff:
            field, old, new = diff
            raise StoreError(f"{path}: field {field!r} is {json.dumps(old)} in the existing store but this run "
                             f"has {json.dumps(new)}: a different store; choose another output directory")
    elif root.exists():
        others = [p.name for p in root.iterdir() if not p.name.startswith(f".{MANIFEST}.tmp")
                  and p.name not in (".ard.lock", CONDITIONING_FOLDER)]
        if others:
            raise StoreError(f"{root}: output directory is not empty and holds no {MANIFEST} (found "
                             f"{sorted(others)[0]!r}); refusing to write a store into it")
    # a store being resumed needs DIR (manifest) and DIR/shards (new shards) writable, before any shard is computed
    for probe in [p for p in (root, root / "shards") if p.exists()] or [next(p for p in root.parents if p.exists())]:
        if not probe.is_dir() or not can_write(probe):
            raise StoreError(f"{root}: cannot write the store ({probe} is not a writable directory)")
    return existing


def create_store(root: str | Path, manifest: dict) -> None:
    """Make DIR and DIR/shards and write the manifest atomically (after `check_output` returned None)."""
    root = Path(root)
    try:
        (root / "shards").mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / MANIFEST, manifest)
    except OSError as e:
        raise StoreError(f"{root}: cannot write the store ({e.strerror or type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------- shards
def read_sidecar(root: str | Path, manifest: dict, shard: int) -> dict | None:
    """The sidecar of a complete shard (None when the shard is not there); StoreError when it belongs to
    another store or disagrees with the manifest's geometry."""
    path = shard_dir(root, shard) / SIDECAR
    if not path.exists():
        return None
    side = _read_json(path, "shard sidecar")
    if side.get("store_id") != manifest["store_id"]:
        raise StoreError(f"{path}: field 'store_id' is {side.get('store_id')!r}, the manifest's is "
                         f"{manifest['store_id']!r}: the shard belongs to another store")
    start, count = shard_span(manifest, shard)
    for key, want in (("shard", shard), ("start", start), ("count", count)):
        if side.get(key) != want:
            raise StoreError(f"{path}: field {key!r} is {side.get(key)!r}, the manifest needs {want}")
    if not isinstance(side.get("files"), dict) or not {"states.npy", "labels.npy", "index.npy"} <= set(side["files"]):
        raise StoreError(f"{path}: field 'files' must list states.npy, labels.npy and index.npy")
    bounds = side.get(MAX_ABS, {})  # absent in stores written before bounds were recorded
    if not isinstance(bounds, dict) or not all(isinstance(v, (int, float)) and 0 <= v < math.inf for v in bounds.values()):
        raise StoreError(f"{path}: field {MAX_ABS!r} must map state fields to finite numbers >= 0, got {bounds!r}")
    return side


def completed_shards(root: str | Path, manifest: dict) -> dict[int, dict]:
    """{shard: sidecar} of the shards complete on disk (the source of truth for resuming and reading)."""
    out = {}
    for k in range(manifest["num_shards"]):
        side = read_sidecar(root, manifest, k)
        if side is not None:
            out[k] = side
    return out


class _HashingFile:
    """A write-only file wrapper that hashes what passes through (np.save writes through it)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        return self.f.write(data)


def to_numpy(tensor: torch.Tensor, dtype: StoreDtype) -> np.ndarray:
    """A tensor as the store writes it: cast to `dtype`; bfloat16 as its raw bits ('<u2')."""
    t = tensor.detach().to("cpu", TORCH_DTYPE[dtype]).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def to_float32(array: np.ndarray, dtype: StoreDtype) -> torch.Tensor:
    """Stored states (a numpy array in the store's numpy dtype) as a float32 tensor."""
    array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)  # memmaps are read-only
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array).float()


def write_shard(root: str | Path, manifest: dict, shard: int, arrays: dict[str, np.ndarray]) -> dict:
    """Write one complete shard atomically and return its sidecar.

    arrays: "states" (n, G, C, H, W) [+ "x0"] in the store's numpy dtype, "labels" (n,), "index" (n,) int64.
    The files go into DIR/shards/.shard-K.tmp (fsynced), which is renamed to DIR/shards/shard-K. A shard that
    is already complete is left as it is (its sidecar is returned), so nothing written is ever replaced.
    """
    root = Path(root)
    final = shard_dir(root, shard)
    start, count = shard_span(manifest, shard)
    bounds = check_shard_arrays(manifest, shard, arrays, f"{final} (to be written)")
    if (final / SIDECAR).exists():
        return read_sidecar(root, manifest, shard)
    tmp = final.with_name(f".{final.name}.tmp")  # one writer per shard: a leftover is a killed run's
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {}
    for name in (*STATE_FIELDS, "labels", "index"):
        if name not in arrays:
            continue
        with open(tmp / f"{name}.npy", "wb") as f:
            hashing = _HashingFile(f)
            np.lib.format.write_array(hashing, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        files[f"{name}.npy"] = {"sha256": hashing.sha.hexdigest(), "bytes": hashing.bytes,
                                "shape": list(arrays[name].shape), "dtype": arrays[name].dtype.str}
    sidecar = {"store_id": manifest["store_id"], "shard": shard, "start": start, "count": count, "files": files,
               MAX_ABS: bounds}
    write_json_atomic(tmp / SIDECAR, sidecar)
    if final.exists():  # a directory without a sidecar cannot come from us; keep it out of the way, not lost
        final.rename(final.with_name(f".{final.name}.stale-{os.getpid()}"))
    tmp.rename(final)
    fsync_dir(final.parent)
    return sidecar


def check_shard_arrays(manifest: dict, shard: int, arrays: dict[str, np.ndarray], where: str,
                       deep: bool = True) -> dict[str, float]:
    """A shard's arrays against the manifest: shapes, dtypes and index range; with `deep` (reads every
    byte) also every index, the label range and finite states. Returns {state field: max |value|} (deep)."""
    bounds: dict[str, float] = {}
    start, count = shard_span(manifest, shard)
    state = manifest["state"]
    want = (count, len(manifest["grid"]["indices"]), *state["shape"])
    fields = STATE_FIELDS if state["x0"] else STATE_FIELDS[:1]
    if "x0" in arrays and not state["x0"]:
        raise StoreError(f"{where}: x0 given but the manifest says state.x0=false")
    for name in fields:
        a = arrays.get(name)
        if a is None:
            raise StoreError(f"{where}: {name} missing (the manifest says state.x0={state['x0']})")
        if tuple(a.shape) != want or a.dtype.str != state["numpy_dtype"]:
            raise StoreError(f"{where}: {name} has shape {tuple(a.shape)} dtype {a.dtype.str}, the manifest "
                             f"needs {want} {state['numpy_dtype']}")
        for a0 in range(0, count, FINITE_CHUNK) if deep else ():
            chunk = to_float32(a[a0:a0 + FINITE_CHUNK], state["dtype"]).flatten(1)  # (m, G*C*H*W)
            finite = torch.isfinite(chunk).all(dim=1).numpy()  # (m,)
            if not finite.all():
                raise StoreError(f"{where}: {name} of trajectory {start + a0 + int(np.flatnonzero(~finite)[0])} "
                                 "holds NaN or inf")
            bounds[name] = max(bounds.get(name, 0.0), float(chunk.abs().max()))
    for name in ("labels", "index"):
        a = arrays.get(name)
        if a is None or a.shape != (count,) or a.dtype.str != "<i8":
            raise StoreError(f"{where}: {name} must be ({count},) int64, got "
                             f"{None if a is None else (tuple(a.shape), a.dtype.str)}")
    index = arrays["index"]
    if count and (int(index[0]) != start or int(index[-1]) != start + count - 1 or
                  (deep and not np.array_equal(index, np.arange(start, start + count)))):
        raise StoreError(f"{where}: index is not {start}..{start + count - 1}")
    labels = arrays["labels"]
    if deep and count:
        check_labels(labels, manifest["num_classes"], start, where)
    return bounds


def check_labels(labels: np.ndarray, num_classes: int, start: int, where: str) -> None:
    """Labels of trajectories start.. lie in [0, num_classes): the null class (= num_classes) is CFG's, not data."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise StoreError(f"{where}: label {int(labels[bad[0]])} of trajectory {start + int(bad[0])} outside "
                         f"[0, {num_classes}) ({num_classes} is the null class of classifier-free guidance)")


def consolidate(root: str | Path) -> dict:
    """Refresh the manifest's `shards` list and `complete` flag from the shard sidecars on disk (one process)."""
    manifest = read_manifest(root)
    done = completed_shards(root, manifest)
    shards = [{k: v for k, v in done[i].items() if k != "store_id"} for i in sorted(done)]
    complete = len(done) == manifest["num_shards"]
    if shards != manifest["shards"] or complete != manifest["complete"]:
        manifest = {**manifest, "shards": shards, "complete": complete}
        write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def stored_bytes(sidecars: dict[int, dict] | list[dict]) -> int:
    values = sidecars.values() if isinstance(sidecars, dict) else sidecars
    return sum(f["bytes"] for side in values for f in side["files"].values())


# ---------------------------------------------------------------------------------------------- verify
def conditioning_files(manifest: dict) -> dict[str, dict]:
    """The conditioning sidecars of a text store ({"prompts" | "lengths" | "pooled" | "embeddings.shards[j]": their
    manifest entry: file, sha256, bytes; "pooled" where the store holds pooled embeddings}); none for a
    class-conditional store."""
    cond = manifest.get("conditioning") or {}
    if cond.get("kind") != "text":
        return {}
    shards = {f"embeddings.shards[{j}]": entry for j, entry in enumerate(cond["embeddings"]["shards"])}
    pooled = {} if cond.get("pooled") is None else {"pooled": cond["pooled"]}
    return {"prompts": cond["prompts"], "lengths": cond["lengths"], **pooled, **shards}


def check_conditioning_file(root: str | Path, name: str, entry: dict, deep: bool) -> None:
    """A conditioning sidecar is there with the size the manifest records (and, `deep`, its sha256)."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise StoreError(f"{path}: missing (the manifest's conditioning.{name}.file)")
    if path.stat().st_size != entry["bytes"]:
        raise StoreError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} field 'conditioning.{name}.bytes' says "
                         f"{entry['bytes']} (truncated or corrupt)")
    if deep and sha256_file(path) != entry["sha256"]:
        raise StoreError(f"{path}: sha256 does not match {MANIFEST} field 'conditioning.{name}.sha256' (corrupt)")


def check_conditioning_files(root: str | Path, manifest: dict) -> None:
    """Every conditioning sidecar of a text store is there with the size the manifest records (opening a store or
    its encoded prompts: O(files); `verify` reads their bytes)."""
    for name, entry in conditioning_files(manifest).items():
        check_conditioning_file(root, name, entry, deep=False)


def verify_shard(root: str | Path, manifest: dict, shard: int) -> None:
    """Check one shard completely (sidecar, manifest entry, sizes, sha256, shapes, dtypes, indices, labels,
    finite values); StoreError naming the file and field of the first problem."""
    side = read_sidecar(root, manifest, shard)
    d = shard_dir(root, shard)
    if side is None:
        raise StoreError(f"{d}: shard missing (store incomplete: re-run the precompute command)")
    listed = {e["shard"]: e for e in manifest["shards"] if isinstance(e, dict) and "shard" in e}
    if shard in listed and listed[shard] != {k: v for k, v in side.items() if k != "store_id"}:
        field = _first_difference(listed[shard], {k: v for k, v in side.items() if k != "store_id"})
        raise StoreError(f"{Path(root) / MANIFEST}: shards[{shard}].{field[0]} disagrees with {d / SIDECAR}")
    for name, meta in side["files"].items():
        path = d / name
        if not path.exists():
            raise StoreError(f"{path}: missing (listed in {SIDECAR})")
        if path.stat().st_size != meta["bytes"]:
            raise StoreError(f"{path}: {path.stat().st_size} bytes, {SIDECAR} says {meta['bytes']} (truncated?)")
        if sha256_file(path) != meta["sha256"]:
            raise StoreError(f"{path}: sha256 does not match {SIDECAR} (corrupt)")
    check_shard_arrays(manifest, shard, load_shard(root, manifest, shard, mmap=True), str(d))


def load_shard(root: str | Path, manifest: dict, shard: int, mmap: bool = True) -> dict[str, np.ndarray]:
    """A shard's arrays (memory-mapped by default); StoreError naming the file when one cannot be opened."""
    d = shard_dir(root, shard)
    names = [*(STATE_FIELDS if manifest["state"]["x0"] else STATE_FIELDS[:1]), "labels", "index"]
    out = {}
    for name in names:
        path = d / f"{name}.npy"
        try:
            out[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise StoreError(f"{path}: missing") from None
        except (ValueError, OSError, EOFError) as e:
            raise StoreError(f"{path}: not a readable .npy ({e}) (truncated or corrupt)") from None
    return out


def verify(root: str | Path, progress: bool = False) -> tuple[dict, list[str]]:
    """Check every shard; returns (manifest, one line per problem). An empty list means the store is sound."""
    manifest = read_manifest(root)
    problems = []
    shards = range(manifest["num_shards"])
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    for k in shards:
        try:
            verify_shard(root, manifest, k)
        except StoreError as e:
            problems.append(str(e))
    for name, entry in conditioning_files(manifest).items():
        try:
            check_conditioning_file(root, name, entry, deep=True)
        except StoreError as e:
            problems.append(str(e))
    listed = sorted(e.get("shard") for e in manifest["shards"] if isinstance(e, dict))
    if not problems and (listed != list(range(manifest["num_shards"])) or not manifest["complete"]):
        problems.append(f"{Path(root) / MANIFEST}: field 'shards' lists {len(listed)} of {manifest['num_shards']} "
                        "shards though all are on disk (not consolidated: re-run the precompute command)")
    return manifest, problems


# ---------------------------------------------------------------------------------------------- reading
MAX_OPEN_SHARDS = 1024  # default of TrajectoryStore.max_open_shards: every shard of a 2.5M-trajectory store


class TrajectoryStore:
    """Read-only access to a complete store: memory-mapped shards, labels in memory, whole-batch gathers.

    Opening checks the manifest and, per shard, the sidecar, the npy headers and file sizes (O(shards), not
    O(bytes): `verify` reads every byte). Shards are mapped on first use; at most `max_open_shards` stay
    mapped per state field and process, the least recently read unmapped first. The maps hold no file
    descriptor and sit side by side in one reserved stretch of address space, so a batch is one `np.take`
    whatever the number of shards it touches, and any store fits under a small `ulimit -n`
    (`ard.store.mapping`). Picklable: DataLoader workers map their own shards.
    """

    def __init__(self, root: str | Path, max_open_shards: int = MAX_OPEN_SHARDS):
        self.root = Path(root)
        if max_open_shards < 1:
            raise StoreError(f"{self.root}: max_open_shards={max_open_shards} must be at least 1")
        self.max_open_shards = max_open_shards
        self.manifest = m = read_manifest(self.root)
        done = completed_shards(self.root, m)
        if len(done) < m["num_shards"]:
            first = min(set(range(m["num_shards"])) - set(done))
            raise StoreError(f"{shard_dir(self.root, first)}: missing (store incomplete, {len(done)} of "
                             f"{m['num_shards']} shards: re-run the precompute command)")
        check_conditioning_files(self.root, m)
        self.dtype: StoreDtype = m["state"]["dtype"]
        self.has_x0 = m["state"]["x0"]
        self.num_trajectories = m["num_trajectories"]
        self.shard_size = m["shard_size"]
        self.grid_indices: list[int] = m["grid"]["indices"]
        self.grid_timesteps: list[int] = m["grid"]["timesteps"]
        self.grid_sigmas: list[float] | None = m["grid"].get("sigmas")  # flow stores
        # the saved states' time labels (ard.schedules): DDIM timesteps, or 1000 sigma of a flow store; CLEAN last
        self.grid_labels: list = (self.grid_timesteps if self.grid_sigmas is None
                                  else FlowSchedule.labels(self.grid_sigmas))
        self.state_shape = tuple(m["state"]["shape"])
        self._maps: dict[str, MappedFiles] = {}  # field -> its shard files, mapped on demand
        self._checked_positions: dict[tuple | None, np.ndarray] = {}
        for k, side in done.items():
            d = shard_dir(self.root, k)
            for name, meta in side["files"].items():
                size = (d / name).stat().st_size if (d / name).exists() else None
                if size != meta["bytes"]:
                    raise StoreError(f"{d / name}: {size} bytes, {SIDECAR} says {meta['bytes']} (truncated or corrupt)")
        for k in range(m["num_shards"]):
            check_shard_arrays(m, k, load_shard(self.root, m, k), str(shard_dir(self.root, k)), deep=False)
        self.labels = np.concatenate([np.load(shard_dir(self.root, k) / "labels.npy")
                                      for k in range(m["num_shards"])])  # (N,) int64
        check_labels(self.labels, m["num_classes"], 0, str(self.root / "shards"))
        # |value| bound per state field over all shards (inf for stores written before bounds were recorded)
        self.max_abs = {name: max(side.get(MAX_ABS, {}).get(name, math.inf) for side in done.values())
                        for name in STATE_FIELDS}

    def _files(self, field: str) -> MappedFiles:
        """The shards' `field` files as rows of C*H*W values (opened on first use in each process)."""
        if field not in self._maps:
            if field not in STATE_FIELDS or (field == "x0" and not self.has_x0):
                raise KeyError(f"{self.root}: no field {field!r} in this store")
            paths = [shard_dir(self.root, k) / f"{field}.npy" for k in range(self.manifest["num_shards"])]
            try:
                rows = [shard_span(self.manifest, k)[1] * len(self.grid_indices) for k in range(len(paths))]
                self._maps[field] = MappedFiles(paths, rows, int(np.prod(self.state_shape)), self.max_open_shards)
            except (OSError, ValueError) as e:
                raise StoreError(f"{paths[0]}: cannot be mapped ({e})") from None
        return self._maps[field]

    def open_shards(self, field: str = "states") -> int:
        """How many shards of `field` this process holds mapped now (at most max_open_shards between reads)."""
        return self._maps[field].num_mapped if field in self._maps else 0

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _positions(self, positions: Sequence[int] | None) -> np.ndarray:
        key = None if positions is None else tuple(int(p) for p in positions)
        if key not in self._checked_positions:
            saved = len(self.grid_indices)
            if key is not None and not all(0 <= p < saved for p in key):
                raise IndexError(f"saved-state positions {list(key)} out of range [0, {saved})")
            self._checked_positions[key] = np.arange(saved) if key is None else np.asarray(key, dtype=np.int64)
        return self._checked_positions[key]

    def read(self, indices: np.ndarray, positions: Sequence[int] | None = None, field: str = "states") -> np.ndarray:
        """Gather (n, len(positions), C, H, W) from `field` for trajectory `indices` (any order), in the stored
        numpy dtype; positions index the saved grid (default: all). One `np.take` over all shards."""
        files = self._files(field)
        idx = np.asarray(indices, dtype=np.int64)
        pos = self._positions(positions)
        n, p = len(idx), len(pos)
        out = np.empty((n, p, *self.state_shape), dtype=NUMPY_DTYPE[self.dtype])
        if n and (idx.min() < 0 or idx.max() >= self.num_trajectories):  # then every shard and row exists
            raise IndexError(f"trajectory index out of range [0, {self.num_trajectories}) of {self.root}")
        shard, row = np.divmod(idx, self.shard_size)  # (n,), (n,)
        rows = (row * len(self.grid_indices))[:, None] + pos  # (n, P) rows of a shard's (count * G, C*H*W) view
        try:
            files.take(shard, rows, out.reshape(n, p, -1))  # (n, P, C*H*W), a view of out
        except (OSError, ValueError) as e:  # a shard file missing, or not fitting the manifest (named in e)
            raise StoreError(f"{self.root}: {e}") from None
        return out
