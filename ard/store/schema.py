"""The store manifest's schema: every field typed, ranged and related to the others, checked on every open.

`check_manifest(manifest, where)` validates a manifest (a JSON object) with pydantic in strict mode (a string
is never a number, a float never an integer) and raises one line naming the file, the field's dotted path, its
value and what is allowed. It returns nothing: the stores keep the plain dictionary (whose sha256 is the store's
identity), and readers fill the defaults of older manifests where they use a field (ard.diffusion.recorded_solver,
ard.teacher.check_teacher). docs/store.md describes every field.

Versions: 1 is the class-conditional store with the DDIM teacher grid of today. Version 2 adds what the
text-to-image and flow-matching teachers need, and only version 2 may hold it:
    conditioning   "class" (labels are classes) or "text": the encoder's identity and the conditioning sidecars
                   (the prompts, one JSON object per line, their embeddings, stored once per prompt, and, for
                   encoders that make them, their pooled embeddings); a trajectory's label is then its prompt's
                   index
    solver         "flow_euler" (velocity prediction, Euler steps on an explicit sigma grid) beside "ddim"
    grid.sigmas    the flow grid: strictly decreasing, in (0, 1], ending at 0 (the clean state)
    teacher.family which diffusers transformer family made the store ("dit", "pixart", "sd3")
"""
from __future__ import annotations

import json
import math
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from ard.checks import CLEAN, AtLeastOne, NonNegative, NonNegativeInt, Positive
from ard.diffusion import AUTOCAST_DTYPE, TRAINER_PRECISION
from ard.schedules import FlowSchedule

FORMAT = "ard-trajectory-store"
VERSIONS = (1, 2)  # 1: class labels, DDIM; 2: adds conditioning, flow solvers, teacher families
NUMPY_DTYPE: dict[str, str] = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4"}  # as written in the .npy
TEACHER_FAMILIES = ("dit", "pixart", "sd3")  # diffusers' DiTTransformer2DModel, PixArtTransformer2DModel, SD3...
# A manifest's solver precision: the teacher's autocast, or Lightning's trainer string that older manifests recorded
PRECISIONS = (*AUTOCAST_DTYPE, *TRAINER_PRECISION)
MAX_TRAIN_TIMESTEPS = 100_000  # no diffusion schedule has more discrete timesteps

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = AtLeastOne
Index = NonNegativeInt
StoreDtype = Literal["float16", "bfloat16", "float32"]


class Strict(BaseModel):
    """Strict types (no string -> number, no float -> int) and no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Teacher(Strict):
    path: str | None = None  # where it was loaded from (informational)
    weights_sha256: Sha256
    config_sha256: Sha256
    numerics: Literal["dit", "diffusers"] = "diffusers"  # absent in stores written before it was recorded
    family: Literal[TEACHER_FAMILIES] = "dit"  # absent in stores written before other families


class DDIMSolver(Strict):
    name: Literal["ddim"]
    eta: Annotated[float, Field(ge=0, le=0)]  # 0, deterministic DDIM: the trajectory is a function of its noise
    num_steps: Annotated[int, Field(ge=1, le=MAX_TRAIN_TIMESTEPS)]
    timestep_spacing: Literal["leading", "trailing", "linspace"]
    guidance_scale: NonNegative
    clip_sample: bool
    cfg_channels: Literal["all", "dit"] = "all"
    prediction_type: Literal["epsilon"]
    num_train_timesteps: Annotated[int, Field(ge=2, le=MAX_TRAIN_TIMESTEPS)]
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    beta_start: Positive
    beta_end: Positive
    precision: Literal[PRECISIONS] = "fp32"

    @model_validator(mode="after")
    def _betas(self):
        if not self.beta_start < self.beta_end < 1:
            raise ValueError(f"beta_start={self.beta_start} < beta_end={self.beta_end} < 1 is required")
        return self


class FlowSolver(Strict):
    name: Literal["flow_euler"]
    num_steps: Annotated[int, Field(ge=1, le=MAX_TRAIN_TIMESTEPS)]
    shift: Positive  # the time shift of the sigma grid (SD3: 3.0)
    guidance_scale: NonNegative
    clip_sample: bool = False  # x0 clamped to [-1, 1] in every step (pixel-space teachers)
    prediction_type: Literal["flow"]  # velocity v = eps - x0
    precision: Literal[PRECISIONS] = "fp32"


class Grid(Strict):
    indices: list[Index] = Field(min_length=2)  # saved grid indices, ascending, 0 .. K
    timesteps: list[int] = Field(min_length=2)  # theirs, strictly decreasing, the last CLEAN (-1)
    sigmas: list[NonNegative] | None = None  # flow stores: the noise level of each saved state, the last 0


class State(Strict):
    shape: Annotated[list[Count], Field(min_length=3, max_length=3)]  # [C, H, W]
    dtype: StoreDtype
    numpy_dtype: Literal[tuple(NUMPY_DTYPE.values())]
    x0: bool

    @model_validator(mode="after")
    def _numpy_dtype(self):
        if self.numpy_dtype != NUMPY_DTYPE[self.dtype]:
            raise ValueError(f"numpy_dtype {self.numpy_dtype!r} is not dtype {self.dtype!r}'s "
                             f"({NUMPY_DTYPE[self.dtype]!r})")
        return self


class FileEntry(Strict):
    sha256: Sha256
    bytes: Index
    shape: list[Index]
    dtype: Literal[(*NUMPY_DTYPE.values(), "<i8")]  # states / x0 in the store's dtype, labels and index int64


class ShardEntry(Strict):
    shard: Index
    start: Index
    count: Count
    files: dict[str, FileEntry]
    max_abs: dict[Literal["states", "x0"], NonNegative] | None = None  # absent before bounds were recorded


def _relative_file(name: str) -> str:
    """A sidecar's file name: a relative path inside the store (no '..', not absolute)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{name!r} must be a relative path inside the store")
    return name


class Sidecar(Strict):
    file: str  # relative to the store directory
    sha256: Sha256
    bytes: Index

    @field_validator("file")
    @classmethod
    def _inside(cls, name: str) -> str:
        return _relative_file(name)


class Embeddings(Strict):
    shape: Annotated[list[Count], Field(min_length=2, max_length=2)]  # [valid tokens of every prompt, dim]
    dtype: StoreDtype
    prompts_per_shard: Count  # shard j holds prompts j * P .. (j + 1) * P - 1 (the null prompt last, in the last)
    shards: Annotated[list[Sidecar], Field(min_length=1)]  # (tokens of the shard's prompts, dim) .npy each


class Prompts(Sidecar):
    count: Count  # prompts (lines); labels index them


class Pooled(Sidecar):
    shape: Annotated[list[Count], Field(min_length=2, max_length=2)]  # [prompts + 1, P], in embeddings.dtype


class Encoder(Strict):
    name: str = Field(min_length=1)  # e.g. "t5-v1_1-xxl"
    path: str | None = None  # where it was loaded from (informational)
    weights_sha256: Sha256
    max_tokens: Count  # the tokenizer's maximum (longer prompts are refused, never cut silently)
    dim: Count
    masked: bool  # valid tokens only are stored (a masked encoder); False: every token


class ClassConditioning(Strict):
    kind: Literal["class"]


class TextConditioning(Strict):
    kind: Literal["text"]
    encoder: Encoder
    prompts: Prompts
    embeddings: Embeddings  # the prompts' tokens one after the other, in shards (ard/store/text.py)
    lengths: Sidecar  # (prompts + 1,) int64 tokens of each prompt, the null prompt's last
    pooled: Pooled | None = None  # (prompts + 1, P) pooled embeddings (SD3's), the null prompt's last; None: none
    null_prompt: str = ""  # the null (negative) prompt of CFG, encoded after the prompts (label prompts.count)

    @model_validator(mode="after")
    def _fits(self):
        tokens, dim = self.embeddings.shape
        shards = math.ceil((self.prompts.count + 1) / self.embeddings.prompts_per_shard)
        if len(self.embeddings.shards) != shards:
            raise ValueError(f"embeddings.shards lists {len(self.embeddings.shards)} files; {self.prompts.count} "
                             f"prompts and the null prompt at prompts_per_shard={self.embeddings.prompts_per_shard} "
                             f"need {shards}")
        if dim != self.encoder.dim:
            raise ValueError(f"embeddings.shape={self.embeddings.shape} needs dim = encoder.dim={self.encoder.dim}")
        if tokens > (self.prompts.count + 1) * self.encoder.max_tokens:
            raise ValueError(f"embeddings.shape={self.embeddings.shape}: more tokens than {self.prompts.count} "
                             f"prompts and the null prompt of at most encoder.max_tokens={self.encoder.max_tokens}")
        if self.pooled is not None and self.pooled.shape[0] != self.prompts.count + 1:
            raise ValueError(f"pooled.shape={self.pooled.shape}: {self.prompts.count} prompts and the null prompt "
                             f"need {self.prompts.count + 1} rows")
        return self


class Manifest(Strict):
    format: Literal[FORMAT]
    version: Annotated[int, Field(ge=min(VERSIONS), le=max(VERSIONS))]  # (a Literal would take True for 1)
    store_id: Sha256
    teacher: Teacher
    solver: Annotated[Union[DDIMSolver, FlowSolver], Field(discriminator="name")]
    grid: Grid
    state: State
    conditioning: Annotated[Union[ClassConditioning, TextConditioning], Field(discriminator="kind")] | None = None
    num_classes: Count
    num_trajectories: Count
    shard_size: Count
    num_shards: Count
    micro_batch_size: Count
    seed: Index
    created: dict[str, Any]
    config: dict[str, Any]
    shards: list[ShardEntry]
    complete: bool

    @model_validator(mode="after")
    def _relations(self):
        """Relations between fields: version and sections, the grid against the solver, the geometry."""
        if self.version == 1 and (self.conditioning is not None or self.solver.name != "ddim"
                                  or self.teacher.family != "dit" or self.grid.sigmas is not None):
            raise ValueError("version 1 holds class-conditional DDIM stores of DiT teachers only (conditioning, "
                             "flow solvers, sigmas and other teacher families need version 2)")
        if self.version == 2 and self.conditioning is None:
            raise ValueError("version 2 needs a 'conditioning' section")
        _check_grid(self.grid, self.solver)
        if self.num_shards != math.ceil(self.num_trajectories / self.shard_size):
            raise ValueError(f"num_shards={self.num_shards}, but num_trajectories={self.num_trajectories} / "
                             f"shard_size={self.shard_size} needs {math.ceil(self.num_trajectories / self.shard_size)}")
        if isinstance(self.conditioning, TextConditioning) and self.num_classes != self.conditioning.prompts.count:
            raise ValueError(f"num_classes={self.num_classes}: a text store's labels index its prompts, so it must be "
                             f"conditioning.prompts.count={self.conditioning.prompts.count}")
        saved = [e.shard for e in self.shards]
        if saved != sorted(set(saved)) or (saved and saved[-1] >= self.num_shards):
            raise ValueError(f"shards lists shards {saved[:8]}: they must be distinct, ascending and < num_shards="
                             f"{self.num_shards}")
        if self.complete != (len(saved) == self.num_shards):
            raise ValueError(f"complete={self.complete} but shards lists {len(saved)} of {self.num_shards} shards")
        for e in self.shards:
            count = min(self.shard_size, self.num_trajectories - e.shard * self.shard_size)
            if (e.start, e.count) != (e.shard * self.shard_size, count):
                raise ValueError(f"shards[{e.shard}]: start={e.start}, count={e.count}; the geometry needs "
                                 f"{e.shard * self.shard_size}, {count}")
        return self


def _check_grid(grid: Grid, solver: DDIMSolver | FlowSolver) -> None:
    """Saved grid indices ascend from 0 (the noise) to K (the clean state); their timesteps decrease strictly to
    CLEAN; a flow grid's sigmas decrease strictly from at most 1 to 0."""
    k = solver.num_steps
    if len(grid.indices) != len(grid.timesteps):
        raise ValueError(f"grid has {len(grid.indices)} indices and {len(grid.timesteps)} timesteps (must be equal)")
    if grid.indices[0] != 0 or grid.indices[-1] != k or any(a >= b for a, b in zip(grid.indices, grid.indices[1:])):
        raise ValueError(f"grid.indices {grid.indices} must ascend strictly from 0 (the noise) to solver.num_steps={k}")
    top = solver.num_train_timesteps if isinstance(solver, DDIMSolver) else 1001  # flow: round(1000 sigma)
    t = grid.timesteps
    if t[-1] != CLEAN or any(not 0 <= x < top for x in t[:-1]) or any(a <= b for a, b in zip(t, t[1:])):
        raise ValueError(f"grid.timesteps {t} must decrease strictly within [0, {top}) and end with {CLEAN} (clean)")
    if isinstance(solver, FlowSolver):
        s = grid.sigmas
        if s is None or len(s) != len(t):
            raise ValueError(f"a flow store needs grid.sigmas, one per saved state ({len(t)})")
        if not s[0] <= 1 or s[-1] != 0 or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError(f"grid.sigmas {s} must decrease strictly from at most 1 and end at 0 (the clean state)")
        full = FlowSchedule(solver.shift).grid_sigmas(k)
        if any(not math.isclose(s[j], full[i], rel_tol=1e-9, abs_tol=1e-12) for j, i in enumerate(grid.indices)):
            raise ValueError(f"grid.sigmas {s} are not the solver's grid shift(1 - k / K) (shift={solver.shift}, "
                             f"K={k}) at grid.indices")
        if any(round(1000 * sigma) != (x if sigma > 0 else 0) for sigma, x in zip(s, t[:-1] + [0])):
            raise ValueError(f"grid.timesteps {t} must be round(1000 sigma) of grid.sigmas (CLEAN for the last)")
    elif grid.sigmas is not None:
        raise ValueError("grid.sigmas belongs to flow stores (solver.name 'flow_euler'), not to a DDIM store")


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(manifest: Any, where: str) -> None:
    """Raise ValueError with one line naming `where`, the first bad field's dotted path, its value and what is
    allowed, unless `manifest` is a valid store manifest."""
    try:
        Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        tags = ("ddim", "flow_euler", "class", "text")  # discriminated-union branches in pydantic's path
        field = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in tags))
        reason, ctx = err["msg"].removeprefix("Value error, ").replace("Input should", "must"), err.get("ctx", {})
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            key = ctx["discriminator"].strip("'")
            field, value = f"{field}.{key}", ctx.get("tag")
            reason = "expected one of " + ("'ddim', 'flow_euler'" if key == "name" else "'class', 'text'")
            raise ValueError(f"{where}: field {field!r} " + ("missing" if value is None else
                             f"is {_describe(value)}") + f": {reason}") from None
        if err["type"] == "missing":
            raise ValueError(f"{where}: field {field!r} missing (required)") from None
        if err["type"] == "value_error":  # a relation between fields: the reason names them
            raise ValueError(f"{where}: " + (f"field {field!r}: " if field else "") + reason) from None
        raise ValueError(f"{where}: field {field!r} is {_describe(err.get('input'))}: {reason}") from None
