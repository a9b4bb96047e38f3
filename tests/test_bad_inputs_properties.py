"""Property-based bad input (hypothesis): wrong types and out-of-range values drawn for every field of the store
manifest and for the numeric knobs of each stage. Every draw must either be a valid value (accepted) or be refused
with one line naming the field or knob: never a traceback, never silently accepted when it is out of range.
"""
import copy
import json
import math
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ard.checks import check_knobs
from ard.data.digits import DigitsDataModule
from ard.data.trajectories import TrajectoryDataModule
from ard.modules.distill import ARDDistillation, SampleGrid
from ard.modules.distill_gan import GanStage
from ard.modules.precompute import PrecomputeTrajectories
from ard.modules.teacher_training import TeacherTraining
from ard.store import format as fmt
from ard.store.cli import main as store_main
from ard.store.jobs import StoreShards
from ard.student.recipe import Recipe
from test_store import precompute, tiny_teacher

# derandomize: the same draws on every run (a CI failure reproduces); print_blob names the failing draw
PROFILE = settings(max_examples=150, deadline=None, derandomize=True, print_blob=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values of the wrong type or out of every knob's range: strings that look like numbers, NaN / inf, negatives,
# floats where integers belong, booleans, containers, None.
WRONG = st.one_of(
    st.sampled_from(["2.0", "1", "", "six", "nan", "-1"]),
    st.sampled_from([math.nan, math.inf, -math.inf, -1e300, 1e300]),
    st.integers(-10**6, 0), st.floats(-1e6, -1e-12), st.floats(0.01, 0.99), st.booleans(), st.none(),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    precompute(tiny_teacher(root / "teacher", num_layers=1), root / "store", n=8, shard_size=4)
    return root / "store", json.loads((root / "store" / "manifest.json").read_text())


def leaves(obj, path=()):
    """Every (path, value) of a JSON value, containers included (so that whole sections get replaced too)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from leaves(v, (*path, i))


@settings(PROFILE)
@given(data=st.data())
def test_manifest_fields_of_the_wrong_type_or_range(tmp_path, capsys, manifest, data):
    """Replace one manifest field (store_id recomputed: a deliberate edit, not rot) and open the store."""
    store, original = manifest
    paths = [p for p, _ in leaves(original) if p and p[0] not in ("store_id", "created", "config")]
    path = data.draw(st.sampled_from(paths), label="field")
    value = data.draw(WRONG, label="value")
    edited = copy.deepcopy(original)
    node = edited
    for key in path[:-1]:
        node = node[key]
    before, node[path[-1]] = node[path[-1]], value
    edited["store_id"] = fmt.store_id(edited)
    out = Path(tempfile.mkdtemp(dir=tmp_path))  # one store directory per draw
    (out / "manifest.json").write_text(json.dumps(edited))
    try:
        fmt.read_manifest(out)
    except fmt.StoreError as e:
        line = str(e)
        assert "\n" not in line and line.startswith(str(out / "manifest.json")), line
        assert str(path[0]) in line or "version 1 holds" in line, f"{path}: the line does not name the field: {line}"
        with pytest.raises(SystemExit) as stop:  # the command line: the same line, exit status 2, no traceback
            store_main(["info", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.strip() == f"ard-store: error: {line}", err
    else:  # accepted: only a value of the field's own type and range can be (e.g. another float guidance scale)
        assert not (isinstance(value, float) and not math.isfinite(value)), f"{path}={value} accepted"
        assert not isinstance(value, str) or isinstance(before, str), f"{path}={value!r} accepted for {before!r}"
        integer = isinstance(before, int) and not isinstance(before, bool)
        assert not integer or (isinstance(value, int) and not isinstance(value, bool)), f"{path}={value!r} accepted"


# Every numeric knob of distillation, the recipe, the sample grid, the GAN stage, the store's data, the
# precompute and the teacher's training: (owner whose annotations declare the range, knob name, prefix of the error line)
KNOBS = [
    *[(ARDDistillation.__init__, n, "model.") for n in ("num_steps", "history_blocks", "window", "lr",
                                                        "history_gate_lr", "weight_decay", "betas", "step_weights")],
    *[(Recipe, f.name, "recipe.") for f in fields(Recipe) if f.name not in ("inputs", "targets")],
    *[(SampleGrid, n, "samples.") for n in ("per_class", "classes", "latent_scale")],
    *[(GanStage, n, "gan.") for n in ("weight", "warmup", "blocks", "lr", "grad_clip")],
    *[(TrajectoryDataModule.__init__, n, "data.") for n in ("student_steps", "batch_size", "val_count", "seed",
                                                            "num_workers", "max_open_shards")],
    *[(StoreShards.__init__, n, "data.") for n in ("num_trajectories", "shard_size")],
    *[(PrecomputeTrajectories.__init__, n, "model.") for n in ("num_steps", "guidance_scale", "save_indices",
                                                               "seed", "micro_batch_size", "text_max_tokens")],
    *[(TeacherTraining.__init__, n, "model.") for n in ("lr", "weight_decay", "warmup_steps", "label_dropout",
                                                        "num_train_timesteps", "sample_steps", "samples_per_class")],
    *[(DigitsDataModule.__init__, n, "data.") for n in ("batch_size", "split_seed", "num_workers")],
]


def in_range(value) -> bool:
    """Whether a drawn value could be valid for some knob: finite numbers >= 0 and non-empty lists of them."""
    if isinstance(value, bool) or isinstance(value, (str, dict)):
        return False
    if isinstance(value, list):
        return bool(value) and all(in_range(v) for v in value)
    return value is None or (math.isfinite(value) and value >= 0)


@settings(PROFILE)
@given(knob=st.sampled_from(KNOBS), value=WRONG)
def test_knobs_of_every_stage_refuse_wrong_values_in_one_named_line(knob, value):
    owner, name, prefix = knob
    try:
        check_knobs(owner, {name: value}, prefix)
    except ValueError as e:
        line = str(e)
        assert "\n" not in line and line.startswith(f"{prefix}{name}="), line
    else:
        assert in_range(value), f"{prefix}{name}={value!r} accepted"


@settings(PROFILE)
@given(knob=st.sampled_from([k for k in KNOBS if k[0] in (Recipe, SampleGrid, GanStage)]), value=WRONG)
def test_knob_groups_refuse_when_made(knob, value):
    """The dataclass knob groups check themselves when made (from the command line or from Python alike)."""
    owner, name, prefix = knob
    try:
        owner(**{name: value})
    except ValueError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{prefix}{name}="), str(e)
