"""Checks of input that every stage shares, each a one-line ValueError naming the file, field or value and
what would be accepted: the knobs' ranges, finite numbers, writable output locations, step counts and boundary
timesteps.

Ranges: a numeric knob declares its range once, in its annotation (`lr: Positive = 1e-4`), with the range types
below. `check_knobs` checks those annotations first thing when a knob group (a dataclass) or a module is made,
from the command line (right after parsing, before any teacher, store or data is loaded) or from Python alike.

Stages call them before their expensive work (writability, counts, timesteps) and on what they are about to
train on, write or report (finite values), so nothing is trained, exported, sampled or reported on NaN / inf.
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import torch
from pydantic import Field, TypeAdapter, ValidationError

CLEAN = -1  # timestep label of the final (clean) state, alpha_bar = 1 (the one definition; ard.diffusion re-exports it)
NUM_TRAIN_TIMESTEPS = 1000  # the DiT schedule's timesteps: a state's timestep lies in [0, 1000)


# Range types of numeric knobs (pydantic constraints, which jsonargparse checks at parse time)
Finite = Annotated[float, Field(allow_inf_nan=False)]  # any finite number
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # finite, >= 0 (loss weights, decay)
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # finite, > 0 (learning rates, scales, shifts)
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # in [0, 1]
Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam moment decay, in [0, 1)
AtLeastOne = Annotated[int, Field(ge=1)]  # counts of steps, sub-steps, samples per batch
AtLeastTwo = Annotated[int, Field(ge=2)]  # sample counts of statistics (a covariance needs two)
NonNegativeInt = Annotated[int, Field(ge=0)]  # iterations, indices, counts that may be 0
Indices = Annotated[list[NonNegativeInt], Field(min_length=1)]  # a non-empty list of indices (blocks, classes)
Weights = Annotated[list[NonNegative], Field(min_length=1)]  # a non-empty list of weights (per-step loss weights)


def _ranged(hint: Any) -> bool:
    """Whether a type hint carries a range (an Annotated type, alone, in a union or in a container)."""
    return get_origin(hint) is Annotated or any(_ranged(a) for a in get_args(hint))


def check_knobs(owner: type | Callable, values: Mapping[str, Any], prefix: str = "") -> None:
    """Check `values` against the ranges declared in `owner`'s annotations (a dataclass's fields or a function's
    parameters); one-line ValueError naming the knob (`prefix` + name), its value and the allowed range."""
    hints = get_type_hints(owner, include_extras=True)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None or not _ranged(hint):
            continue
        if isinstance(value, list) and get_origin(hint) is tuple:
            value = tuple(value)  # YAML has no tuples
        try:
            TypeAdapter(hint).validate_python(value, strict=True)  # no "2" for 2, no 2.5 for an integer
        except ValidationError as e:
            errors = e.errors(include_url=False)  # a union gives one per member: the deepest names the bad part
            reason = max(errors, key=lambda err: len(err["loc"]))["msg"].replace("Input should", "must")
            raise ValueError(f"{prefix}{name}={value!r}: {reason}") from None


def check_fields(instance: Any, prefix: str) -> None:
    """`check_knobs` for a dataclass instance (called from its __post_init__), e.g. prefix "recipe."."""
    check_knobs(type(instance), {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}, prefix)


def check_choice(name: str, value: str, kind) -> str:
    """Raise a one-line error naming the knob when `value` is not one of the Literal `kind`'s choices."""
    if value not in get_args(kind):
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, get_args(kind)))}")
    return value


def first_non_finite(tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf (None when all are finite); one device sync."""
    floats = {name: t for name, t in tensors.items() if t is not None and t.is_floating_point()}
    if not floats:
        return None
    flags = torch.stack([torch.isfinite(t).all().to(next(iter(floats.values())).device) for t in floats.values()])
    return None if bool(flags.all()) else list(floats)[int((~flags).nonzero()[0])]


def check_finite_weights(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights (a state dict) holding NaN or inf: nothing is written, sampled or trained from them."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{where}: weight {bad!r} holds NaN or inf (diverged training or a damaged file); "
                         "finite weights are required")


def check_finite_samples(samples: torch.Tensor, where: str) -> None:
    """Refuse model outputs (N, ...) holding NaN or inf, naming the first bad sample."""
    finite = torch.isfinite(samples.flatten(1)).all(dim=1)  # (N,)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise ValueError(f"{where}: sample {first} (and {int((~finite).sum()) - 1} more of {len(finite)}) holds "
                         "NaN or inf: the model's outputs must be finite (diverged or damaged weights?)")


def can_write(directory: Path) -> bool:
    """Whether a file can be created in the existing `directory`, by trying (permission bits do not bind root;
    read-only mounts do)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def check_writable(path: str | Path, what: str) -> None:
    """`path` is (or can be created as) a writable directory; checked before any work that would write there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}={path}: exists and is not a directory; a directory (new or writable) is needed")
    probe = next(p for p in (path, *path.parents) if p.exists())
    if not probe.is_dir() or not can_write(probe):
        raise ValueError(f"{what}={path}: cannot write there ({probe} is not a writable directory)")


def check_at_least(minimum: int, **values: int | None) -> None:
    """Each named count (None: not given) is an integer >= minimum."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def check_step_counts(name: str, steps: Iterable[int] | None) -> None:
    """A list of DDIM step counts: each an integer in [1, NUM_TRAIN_TIMESTEPS]."""
    for s in steps or []:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"{name}: step count {s!r} must be an integer in [1, {NUM_TRAIN_TIMESTEPS}]")


def check_timesteps(timesteps: list, where: str, kind: str = "vp") -> list:
    """Boundary time labels tau_0 > ... > tau_S (ard.schedules), strictly decreasing, the last CLEAN (-1): integers
    in [0, 1000) on a variance-preserving schedule (kind "vp"), numbers 1000 sigma in (0, 1000] on a flow one."""
    flow = kind == "flow"
    accepted = ("expected strictly decreasing " + (f"numbers 1000 sigma in (0, {NUM_TRAIN_TIMESTEPS}]" if flow else
                f"integers in [0, {NUM_TRAIN_TIMESTEPS})") + f" ending with {CLEAN} (clean), e.g. "
                + ("[1000.0, 500.0, -1]" if flow else "[943, 451, -1]"))
    number = (int, float) if flow else int
    if (not isinstance(timesteps, list) or len(timesteps) < 2
            or not all(isinstance(t, number) and not isinstance(t, bool) for t in timesteps)):
        raise ValueError(f"{where}: timesteps {timesteps!r}: {accepted}")
    bad = [t for t in timesteps[:-1] if not (0 < t <= NUM_TRAIN_TIMESTEPS if flow else 0 <= t < NUM_TRAIN_TIMESTEPS)]
    if bad or timesteps[-1] != CLEAN:
        raise ValueError(f"{where}: timestep {bad[0] if bad else timesteps[-1]} in {timesteps}: {accepted}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"{where}: timesteps {timesteps} are not strictly decreasing: {accepted}")
    return timesteps


def stop_on_non_finite(trainer, what: str, values: Mapping[str, torch.Tensor]) -> None:
    """Stop training (every process: a rank that stops alone would leave the others waiting) when some
    process's named values (losses, gradients) hold NaN or inf; one line naming the step and the value."""
    bad = first_non_finite(values)
    if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
        raise ValueError(f"step {trainer.global_step}: {what} {bad or '(on another process)'} is not finite (NaN or "
                         "inf): training stopped before this update, nothing of it was saved; lower model.lr, "
                         "check the store (ard-store verify), or resume from an earlier checkpoint")
