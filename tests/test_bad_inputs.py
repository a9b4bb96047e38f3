"""Bad input and faults against every stage: each case must stop with exit status != 0 and exactly one line
naming the file, field or value (no traceback), and leave everything already written as it was.

Stages: precompute (`ard predict`), the store and its reader, training (`ard fit`, resume), sampling
(scripts/sample_student.py), evaluation (`ard-eval`) and the converter (scripts/convert_dit_checkpoint.py).
Every case goes through `expect_one_line`, whose failure messages start with TRACEBACK, SILENT or DAMAGE, so
that `scripts/bench_bad_inputs.py` can count the outcomes.
"""
import json
import os
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ard.checks
from ard.cli import main as ard_main
from ard.evaluate import main as eval_main
from ard.store import format as fmt
from ard.store.cli import main as store_main
from test_store import file_digests, precompute, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
convert_dit_checkpoint = SimpleNamespace(**runpy.run_path(str(ROOT / "scripts/convert_dit_checkpoint.py")))
sample_student = SimpleNamespace(**runpy.run_path(str(ROOT / "scripts/sample_student.py")))
UNWRITABLE = Path("/sys/ard-bad-inputs")  # sysfs refuses new files even to root (permission bits do not bind it)
N, VAL = 32, 8


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "digits", num_layers=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("store") / "store"
    precompute(teacher, path, n=N, shard_size=16)  # K = 24, states saved at 0, 6, 12, 18, 24
    return path


def fit_args(root, teacher, store, *extra):
    """`ard fit` of the ARD preset on the tiny teacher and store, 2 steps, CSV logs, a checkpoint every step."""
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s", "name": "csv"}}'
    return ["fit", "-c", str(ROOT / "configs/digits/ard.yaml"), f"--model.init_args.teacher={teacher}",
            "--model.init_args.history_blocks=1", "--model.init_args.samples.per_class=0",
            f"--data.init_args.path={store}", f"--data.init_args.val_count={VAL}", "--data.init_args.batch_size=8",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.logger={logger % root}", "--trainer.callbacks.init_args.every_n_train_steps=1", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, teacher, store):
    """A finished 2-step run: checkpoints/last.ckpt, csv/version_0/config.yaml, student_ema/."""
    root = tmp_path_factory.mktemp("run")
    ard_main(fit_args(root, teacher, store))
    return root


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


class Crafted:
    """Unpickling this calls open(path, "w"): it would create the file at `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 1, "payload": Crafted(marker)}, path)
    return path


# ---------------------------------------------------------------------------------------------- the check
def expect_one_line(capsys, call, needles, unchanged=(), prefix="error"):
    """Run `call()`: it must raise SystemExit != 0 with exactly one error line containing every needle, and
    every path in `unchanged` must hold the same files with the same bytes afterwards."""
    before = {str(p): file_digests(p) if p.is_dir() else fmt.sha256_file(p) for p in map(Path, unchanged)}
    try:
        call()
    except SystemExit as e:
        code, message = e.code, e.code if isinstance(e.code, str) else None
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"TRACEBACK: {type(e).__name__}: {e}")
    else:
        pytest.fail("SILENT: exited normally")
    err = capsys.readouterr().err
    lines = [message] if message else [line for line in err.splitlines() if f"{prefix}:" in line]
    assert code not in (0, None), f"SILENT: exit status {code}"
    assert len(lines) == 1, f"TRACEBACK: {len(lines)} error lines: {err[-2000:]}"
    assert "Traceback" not in err, f"TRACEBACK: {err[-2000:]}"
    for needle in [needles] if isinstance(needles, str) else needles:
        assert needle in lines[0], f"UNCLEAR: {needle!r} not in {lines[0]!r}"
    for p, digest in before.items():
        after = file_digests(Path(p)) if Path(p).is_dir() else fmt.sha256_file(Path(p))
        assert after == digest, f"DAMAGE: {p} changed"
    return lines[0]


# ---------------------------------------------------------------------------------------------- precompute
def predict_args(teacher, out, *extra, n=N):
    return ["predict", "-c", str(ROOT / "configs/digits/trajectories.yaml"), f"--model.init_args.teacher={teacher}",
            "--model.init_args.save_indices=[0, 6, 12, 18, 24]", "--model.init_args.micro_batch_size=8",
            f"--data.init_args.path={out}", f"--data.init_args.num_trajectories={n}", "--data.init_args.shard_size=16",
            f"--trainer.default_root_dir={out}.runs", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--data.init_args.num_trajectories=0"], "data.num_trajectories=0: must be greater than or equal to 1"),
    (["--model.init_args.micro_batch_size=0"], "model.micro_batch_size=0: must be greater than or equal to 1"),
    (["--model.init_args.save_indices=[0, 6]"], ["save_indices must", "include 0 (the noise) and 24"]),
    (["--model.init_args.timestep_spacing=trailing"], "trailing"),
    (["--data.init_args.dtype=float8"], ['key "data.dtype"', "float8", "float16"]),
    (["--model.init_args.guidance_scale=3.0"], "field 'solver.guidance_scale' is 2.0 in the existing store"),
])
def test_precompute_bad_settings(tmp_path, capsys, teacher, store, extra, needles):
    out = copy(store, tmp_path / "store")
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, out, *extra)), needles, [out])


def test_precompute_into_a_file_or_foreign_directory(tmp_path, capsys, teacher):
    (tmp_path / "file").write_text("x")
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, tmp_path / "file")),
                    "output path exists and is not a directory", [tmp_path / "file"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, tmp_path / "foreign")),
                    "not empty and holds no manifest.json", [tmp_path / "foreign"])


def test_resuming_a_precompute_into_a_read_only_store_computes_nothing(tmp_path, capsys, monkeypatch, teacher, store):
    out = copy(store, tmp_path / "store")
    shutil.rmtree(out / "shards" / "shard-000001")  # one shard left to compute
    real = ard.checks.can_write  # as if the store were on a read-only mount (root ignores permission bits)
    monkeypatch.setattr(fmt, "can_write", lambda d: not str(d).startswith(str(out)) and real(d))
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, out)), ["cannot write the store", str(out)], [out])


@pytest.mark.parametrize("case", ["missing", "nan"])
def test_precompute_bad_teacher(tmp_path, capsys, store, case):
    teacher = tmp_path / "teacher"
    if case == "nan":
        tiny_teacher(teacher, num_layers=1)
        weights = load_file(teacher / "diffusion_pytorch_model.safetensors")
        weights["proj_out_2.weight"][0, 0] = float("nan")
        save_file(weights, teacher / "diffusion_pytorch_model.safetensors")
    needle = "holds NaN or inf" if case == "nan" else "teacher checkpoint not found"
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, tmp_path / "out")), needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the ard CLI
@pytest.mark.parametrize("extra, needles", [
    (["--model.init_args.mask=foo"], ['key "model.mask"', "Got value: foo", "block_causal", "window"]),
    (["--model.init_args.lr=abc"], ['key "model.lr"', "Got value: abc"]),
    (["--model.init_args.lrr=1"], "lrr"),
    (["--trainer.max_steps=x"], ['key "trainer.max_steps"', "Got value: x"]),
    (["--model.init_args.history_blocks=-1"], "model.history_blocks=-1: must be greater than or equal to 0"),
])
def test_cli_parse_errors_keep_the_reason(tmp_path, capsys, teacher, store, extra, needles):
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path, teacher, store, *extra)), needles)
    assert list(tmp_path.iterdir()) == []


def test_invalid_or_missing_yaml_names_the_file(tmp_path, capsys, teacher, store):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: [a\n")
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path, teacher, store, "-c", str(bad))),
                    [str(bad), "invalid YAML at line"], [bad])
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path, teacher, store, "-c", str(tmp_path / "no.yaml"))),
                    str(tmp_path / "no.yaml"))


# ---------------------------------------------------------------------------------------------- store
def rot(out: Path, field: str, value) -> None:
    """Change one stored value in place (what disk rot or a careless edit does; the sha256 no longer fits)."""
    a = np.load(out / "shards/shard-000000" / f"{field}.npy", mmap_mode="r+")
    if field == "labels":
        a[3] = value
    else:
        a[3, 2, 0, 0, 0] = value
    a.flush()


@pytest.mark.parametrize("field, value, needle", [
    ("labels", 10, "label 10 of trajectory 3 outside [0, 10) (10 is the null class"),
    ("labels", -1, "label -1 of trajectory 3 outside [0, 10)"),
    ("states", 3e4, "states of trajectory 3 holds NaN, inf or a value beyond the |value| <="),
    ("states", np.nan, "states of trajectory 3 holds NaN, inf or a value beyond"),
])
def test_training_on_a_rotten_store_stops(tmp_path, capsys, teacher, store, field, value, needle):
    out = copy(store, tmp_path / "store")
    rot(out, field, value)
    root = tmp_path / "run"
    expect_one_line(capsys, lambda: ard_main(fit_args(root, teacher, out, "--data.init_args.val_count=16",
                                                      "--data.init_args.batch_size=16")), needle, [out])
    assert not (root / "student_ema").exists() and not list(root.rglob("*.ckpt"))


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "bytes, shard.json says"),
    ("missing_shard", "missing (store incomplete, 1 of 2 shards"),
    ("edit_manifest", "field 'store_id' does not match"),
    ("bad_bound", "field 'max_abs' must map state fields to finite numbers"),
])
def test_damaged_store_stops_training(tmp_path, capsys, teacher, store, damage, needle):
    out = copy(store, tmp_path / "store")
    shard = out / "shards/shard-000001"
    if damage == "truncate":
        (shard / "states.npy").write_bytes((shard / "states.npy").read_bytes()[:-64])
    elif damage == "missing_shard":
        shutil.rmtree(shard)
    elif damage == "edit_manifest":
        manifest = json.loads((out / "manifest.json").read_text())
        (out / "manifest.json").write_text(json.dumps({**manifest, "seed": 5}))
    else:
        side = json.loads((shard / "shard.json").read_text())
        (shard / "shard.json").write_text(json.dumps({**side, "max_abs": {"states": "big"}}))
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, out)), needle, [out])


def edit_manifest(out: Path, field: str, value=None, delete: bool = False) -> None:
    """Change (or delete) one dotted manifest field and recompute store_id: a careful hand edit, not rot."""
    manifest = json.loads((out / "manifest.json").read_text())
    *parents, key = field.split(".")
    node = manifest
    for name in parents:
        node = node[name]
    if delete:
        del node[key]
    else:
        node[key] = value
    manifest["store_id"] = fmt.store_id(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


MANIFEST_EDITS = [
    ("solver.guidance_scale", "2.0", False, "field 'solver.guidance_scale' is \"2.0\": must be a valid number"),
    ("solver.num_steps", None, True, "field 'solver.num_steps' missing"),
    ("num_classes", 10.0, False, "field 'num_classes' is 10.0: must be a valid integer"),
    ("state.dtype", "float8", False, "field 'state.dtype' is \"float8\""),
    ("grid.timesteps", [943, 697, 1205, 451, -1], False, "grid.timesteps [943, 697, 1205, 451, -1] must decrease"),
    ("grid.indices", [0, 6, 12, 18, 23], False, "grid.indices [0, 6, 12, 18, 23] must ascend strictly from 0"),
    ("teacher.family", "pixart", False, "version 1 holds class-conditional DDIM stores of DiT teachers only"),
]


@pytest.mark.parametrize("field, value, delete, needle", MANIFEST_EDITS)
def test_a_manifest_off_its_schema_is_refused_by_every_reader(tmp_path, capsys, teacher, store, field, value, delete,
                                                              needle):
    """A typed manifest: a string where a number belongs, a missing field, a grid off its solver, checked on open
    by `ard-store info` / `verify`, `ard fit` and `ard-eval --store`, each with the field's dotted path."""
    out = copy(store, tmp_path / "store")
    edit_manifest(out, field, value, delete)
    line = expect_one_line(capsys, lambda: store_main(["info", str(out)]), [str(out / "manifest.json"), needle], [out])
    assert line == expect_one_line(capsys, lambda: store_main(["verify", str(out)]), needle, [out])
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, out)), needle, [out])
    assert not (tmp_path / "run").exists()
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, "--store", str(out))), needle, [out])


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.gan.weight=-1"], "gan.weight=-1.0: must be greater than 0"),
    (["--model.init_args.gan.weight=.nan", "--model.init_args.gan.warmup=0"], "gan.weight=nan: must be a finite"),
    (["--model.init_args.gan.grad_clip=0"], "gan.grad_clip=0.0: must be greater than 0"),
])
def test_gan_knobs_out_of_range_stop_before_training(tmp_path, capsys, teacher, store, run, extra, needle):
    """The GAN stage's knobs are refused when the stage is made (a negative weight would train the student to look
    fake; NaN would pass a comparison); nothing is trained or exported."""
    args = fit_args(tmp_path / "gan", teacher, store, "-c", str(ROOT / "configs/digits/ard_gan.yaml"),
                    f"--model.init_args.init_student={run / 'student_ema'}", *extra)
    expect_one_line(capsys, lambda: ard_main(args), needle, [run])
    assert not (tmp_path / "gan").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.recipe.targets=teacher_from_state", "--model.init_args.recipe.target_substeps=0"],
     "recipe.target_substeps=0: must be greater than or equal to 1"),
    (["--model.init_args.recipe.srl_shift=.inf"], "recipe.srl_shift=inf: must be a finite number"),
    (["--model.init_args.betas=[0.9, 1.0]"], "model.betas=(0.9, 1.0): must be less than 1"),
    (["--model.init_args.step_weights=[0, 0, 0, 0]"], "needs 4 weights >= 0, not all 0"),
    (["--data.init_args.batch_size=0"], "data.batch_size=0: must be greater than or equal to 1"),
])
def test_distillation_knobs_out_of_range_stop_before_training(tmp_path, capsys, teacher, store, extra, needle):
    """Through the command line, one knob of each kind (tests/test_bad_inputs_properties.py draws every knob)."""
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, store, *extra)), needle, [store])
    assert not (tmp_path / "run").exists()


def test_store_records_the_bound_of_its_values(store):
    manifest = fmt.read_manifest(store)
    for k, entry in enumerate(manifest["shards"]):
        states = fmt.load_shard(store, manifest, k)["states"]
        assert entry["max_abs"] == {"states": float(np.abs(states).max())}  # recorded exactly, at write time


def test_store_cli_bad_directory(tmp_path, capsys):
    expect_one_line(capsys, lambda: store_main(["verify", str(tmp_path / "none")]), "not a directory")


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("extra, needles", [
    (["--model.init_args.num_steps=2"], "data.student_steps=4 but model.num_steps=2"),
    (["--data.init_args.batch_size=64"], "make no full batch of 64"),
    (["--data.init_args.val_count=32"], "val_count=32 must be smaller"),
    (["--model.init_args.step_weights=[1.0]"], "step_weights=[1.0]: num_steps=4 needs 4 weights"),
])
def test_fit_bad_settings(tmp_path, capsys, teacher, store, extra, needles):
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, store, *extra)), needles, [store])
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_fit_on_another_teachers_store(tmp_path, capsys, store):
    other = tiny_teacher(tmp_path / "other", num_layers=2)
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", other, store)),
                    ["field 'teacher.weights_sha256' is", "not the teacher the store was made with"], [store])


def test_fit_with_the_same_weights_in_another_config(tmp_path, capsys, teacher, store):
    """Same weights, other attention heads (4 x 32 -> 8 x 16: the same tensors, another function)."""
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    heads, dim = config["num_attention_heads"], config["attention_head_dim"]
    config.update(num_attention_heads=heads * 2, attention_head_dim=dim // 2)
    (other / "config.json").write_text(json.dumps(config))
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", other, store)),
                    ["field 'teacher.config_sha256' is", "not the teacher the store was made with"], [store])


def test_default_root_dir_that_is_a_file(tmp_path, capsys, teacher, store):
    (tmp_path / "root").write_text("x")
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "root", teacher, store)),
                    ["trainer.default_root_dir=", "exists and is not a directory"], [tmp_path / "root"])


def test_diverging_training_stops_and_exports_nothing(tmp_path, capsys, teacher, store):
    root = tmp_path / "run"
    line = expect_one_line(capsys, lambda: ard_main(fit_args(root, teacher, store, "--model.init_args.lr=1e6",
                                                             "--trainer.max_steps=6")), ["step ", "is not finite"])
    assert "loss train/loss_step" in line or "gradient of" in line, line
    assert not (root / "student_ema").exists()
    for ckpt in root.rglob("*.ckpt"):  # what was saved before it diverged holds finite weights
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("extra, needles", [
    (["--model.init_args.lr=5e-4"], ["last.ckpt: model.lr is 0.0002 in the checkpoint but 0.0005", "--resume.override"]),
    (["--model.init_args.history_blocks=0"], "model.history_blocks is 1 in the checkpoint but 0"),
    (["--model.init_args.mask=window"], "model.mask is 'block_causal' in the checkpoint but 'window'"),
    (["--data.init_args.batch_size=4"], "data.batch_size is 8 in the checkpoint but 4"),
    (["--model.init_args.heads=per_step", "--resume.override=true"], "the checkpoint's weights do not fit this model"),
])
def test_resume_with_other_hyperparameters_is_refused_and_changes_nothing(tmp_path, capsys, teacher, store, run,
                                                                          extra, needles):
    root = copy(run, tmp_path / "run")
    expect_one_line(capsys, lambda: ard_main(fit_args(root, teacher, store, "--trainer.max_steps=3", *extra)),
                    needles, [root])


def test_resume_override_takes_the_new_value(tmp_path, teacher, store, run):
    root = copy(run, tmp_path / "run")
    ard_main(fit_args(root, teacher, store, "--trainer.max_steps=3", "--model.init_args.lr=5e-4",
                      "--resume.override=true"))
    newest = max((root / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)  # (copied run: last-v1)
    ckpt = torch.load(newest, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["lr"] == 5e-4


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "last.ckpt: not a readable checkpoint, truncated or corrupt"),
    ("crafted", "last.ckpt: refused: holds objects other than tensors and plain containers"),
    ("crafted_forced", "last.ckpt: refused: holds objects other than tensors and plain containers"),
])
def test_resume_from_a_bad_last_ckpt(tmp_path, capsys, monkeypatch, teacher, store, run, damage, needle):
    root = copy(run, tmp_path / "run")
    ckpt, marker = root / "checkpoints" / "last.ckpt", tmp_path / "pwned"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        crafted_checkpoint(ckpt, marker)
    if damage == "crafted_forced":  # the torch setting that restores the old unsafe default
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    expect_one_line(capsys, lambda: ard_main(fit_args(root, teacher, store, "--trainer.max_steps=3")), needle, [root])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- sampling
def student_copy(run, tmp_path, edit=None) -> Path:
    student = copy(run / "student_ema", tmp_path / "student")
    if edit == "no_weights":
        (student / "diffusion_pytorch_model.safetensors").unlink()
    elif edit in ("nan", "huge"):
        path = student / "diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        weights["proj_out_2.bias"][:] = float("nan") if edit == "nan" else 3e38
        weights["proj_out_2.weight"][:] = 0 if edit == "nan" else 3e38
        save_file(weights, path)
    elif edit is not None:
        (student / "ard_sampling.json").write_text(json.dumps({"timesteps": edit}))
    return student


SAMPLE = ["--labels", "1", "2", "--per-label", "2"]


@pytest.mark.parametrize("edit, needles", [
    ("no_weights", "student weights missing or unreadable"),
    ("nan", ["weight 'transformer.proj_out_2.bias' holds NaN or inf"]),
    ("huge", ["sample 0", "holds NaN or inf", "nothing written"]),
    ([-1, 205, 451, 697, 943], ["ard_sampling.json: field 'timesteps'", "strictly decreasing"]),
    ([5000, 697, 451, 205, -1], ["timestep 5000", "in [0, 1000)"]),
    ([943, 697, 451, 205, 0], ["timestep 0", "ending with -1"]),
])
def test_sampling_a_bad_student(tmp_path, capsys, run, edit, needles):
    student = student_copy(run, tmp_path, edit)
    out = tmp_path / "samples"
    expect_one_line(capsys, lambda: sample_student.main(["sample", "--student", str(student), *SAMPLE,
                                                         "--out", str(out)]), needles, [student])
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--student", "{missing}", *SAMPLE], "student directory not found"),
    (["--student", "{student}", "--labels", "10"], "--labels: class 10 out of range [0, 10)"),
    (["--student", "{student}", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--student", "{student}", *SAMPLE, "--out", str(UNWRITABLE / "x")], "--out=/sys/ard-bad-inputs/x: cannot write"),
])
def test_sample_script_bad_arguments(tmp_path, capsys, run, args, needle):
    args = [a.format(missing=tmp_path / "none", student=run / "student_ema") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "samples")]
    expect_one_line(capsys, lambda: sample_student.main(["sample", *args]), needle, [run / "student_ema"])
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "not a readable checkpoint, truncated or corrupt"),
    ("crafted", "refused: holds objects other than tensors"),
    ("nan", "export to"),
])
def test_export_or_sample_from_a_bad_checkpoint(tmp_path, capsys, run, damage, needle):
    ckpt, marker = tmp_path / "last.ckpt", tmp_path / "pwned"
    if damage == "truncate":
        ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    elif damage == "crafted":
        crafted_checkpoint(ckpt, marker)
    else:
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        next(iter(state["state_dict"].values()))[:] = float("nan")
        torch.save(state, ckpt)
    export = copy(run / "student_ema", tmp_path / "export")  # an earlier export: must survive a failed one
    expect_one_line(capsys, lambda: sample_student.main(["export", "--checkpoint", str(ckpt), "--out", str(export)]),
                    [needle], [export, ckpt])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- evaluation
def eval_args(tmp_path, teacher, *extra):
    return ["--teacher", str(teacher), "--teacher_steps", "2", "--num_samples", "8", "--batch_size", "8",
            "--bootstrap", "2", "--grid_samples", "2", "--wandb", "false", "--out", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--out", str(UNWRITABLE / "eval")], "out=/sys/ard-bad-inputs/eval: cannot write there"),
    (["--cache_dir", str(UNWRITABLE / "cache")], "cache_dir=/sys/ard-bad-inputs/cache: cannot write there"),
    (["--undistilled_steps", "[0]"], "--undistilled_steps=[0]: must be greater than or equal to 1"),
    (["--teacher_steps", "5000"], "--teacher_steps=5000: must be less than or equal to 1000"),
    (["--num_samples", "0"], "--num_samples=0: must be greater than or equal to 4"),
    (["--batch_size", "0"], "--batch_size=0: must be greater than or equal to 1"),
    (["--students", '{"ard": "{missing}"}'], "student directory not found"),
])
def test_evaluate_bad_arguments_stop_before_any_work(tmp_path, capsys, teacher, extra, needle):
    extra = [a.replace("{missing}", str(tmp_path / "none")) for a in extra]
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, *extra)), needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("edit, needle", [
    ("huge", ["ard (4 steps): nothing reported", "sample 0"]),
    ([943, 451, 697, 205, -1], "strictly decreasing"),
])
def test_evaluate_refuses_a_bad_student(tmp_path, capsys, teacher, run, edit, needle):
    student = student_copy(run, tmp_path, edit)
    args = eval_args(tmp_path, teacher, "--students", json.dumps({"ard": str(student)}))
    expect_one_line(capsys, lambda: eval_main(args), needle)
    assert not (tmp_path / "out" / "report.json").exists()


def test_evaluate_truncated_cache(tmp_path, capsys, teacher):
    eval_main(eval_args(tmp_path, teacher))
    report = tmp_path / "out" / "report.json"
    cache = next((tmp_path / "cache").glob("eval_set-*"))  # a directory of memory-mappable .npy files
    (cache / "teacher.npy").write_bytes((cache / "teacher.npy").read_bytes()[:200])
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher)),
                    [cache.name, "unreadable evaluation cache", "delete it to recompute"], [report])


@pytest.mark.parametrize("shape, needle", [
    ((4, 16, 16, 3), "arr_0 holds 16x16 images; the evaluated models make 8x8 images"),
    ((4, 8, 8, 2), "arr_0 must be uint8 (N, H, W, 1|3)"),
])
def test_evaluate_reference_of_the_wrong_size(tmp_path, capsys, teacher, shape, needle):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros(shape, np.uint8))
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, "--reference", str(ref))),
                    [str(ref), needle], [ref])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- converter
def official(path: Path) -> Path:
    """An official-DiT-style state dict of 1 block (the key names; the shapes are not reached)."""
    from ard.backbones.dit_official import official_keys

    torch.save({key: torch.zeros(4) for key in official_keys(1)}, path)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "teacher checkpoint not found"),
    ("truncate", "not a readable weights-only torch checkpoint"),
    ("crafted", "not a readable weights-only torch checkpoint"),
    ("wrong_size", "missing key"),
])
def test_converter_bad_checkpoints(tmp_path, capsys, case, needle):
    ckpt, out, marker = tmp_path / "DiT.pt", tmp_path / "out", tmp_path / "pwned"
    if case == "truncate":
        official(ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif case == "crafted":
        crafted_checkpoint(ckpt, marker)
    elif case == "wrong_size":
        official(ckpt)
    size = "DiT-S/2" if case == "wrong_size" else "digits"
    expect_one_line(capsys, lambda: convert_dit_checkpoint.main([str(ckpt), "--size", size, "--out", str(out)]), needle)
    assert not out.exists() and not marker.exists()


def test_converter_refuses_nan_weights(tmp_path, capsys):
    """A NaN in otherwise convertible weights: the check runs on the loaded model, before anything is written."""
    from ard.backbones.dit import build_dit

    model = build_dit("digits")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["proj_out_2.bias"][0] = float("nan")
    save_file(state, tmp_path / "teacher.safetensors")
    out = tmp_path / "out"
    expect_one_line(capsys, lambda: convert_dit_checkpoint.main([str(tmp_path / "teacher.safetensors"), "--size",
                                                                 "digits", "--out", str(out)]),
                    "weight 'proj_out_2.bias' holds NaN or inf")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- new stages
def version_2(out: Path, edit) -> None:
    """Turn the copied store into a version-2 store (its sidecars follow the new store_id), `edit`ing the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 2
    manifest.setdefault("conditioning", {"kind": "class"})
    edit(manifest)
    manifest["store_id"] = fmt.store_id(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for sidecar in out.glob("shards/*/shard.json"):
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "store_id": manifest["store_id"]}))


def text_store(out: Path, encoder: Path) -> Path:
    """A version-2 text store: the tiny store's 10 labels index 10 prompts, whose embeddings are stored once."""
    from ard.conditioning import encoder_identity

    save_file({"embed.weight": torch.ones(16, 8)}, encoder.mkdir(parents=True) or encoder / "model.safetensors")
    (out / "conditioning").mkdir()
    (out / "conditioning/embeddings").mkdir()
    files = {"prompts": out / "conditioning/prompts.jsonl", "lengths": out / "conditioning/lengths.npy",
             "shard0": out / "conditioning/embeddings/shard-000000.npy",
             "shard1": out / "conditioning/embeddings/shard-000001.npy"}
    files["prompts"].write_text("".join(json.dumps({"id": str(i), "text": f"a digit {i}"}) + "\n" for i in range(10)))
    np.save(files["shard0"], np.zeros((18, 8), np.float32))  # 3 tokens of each prompt and of the null prompt:
    np.save(files["shard1"], np.zeros((15, 8), np.float32))  # 6 prompts per shard
    np.save(files["lengths"], np.full(11, 3, np.int64))
    entries = {k: {"file": str(p.relative_to(out)), "sha256": fmt.sha256_file(p), "bytes": p.stat().st_size}
               for k, p in files.items()}
    entries["prompts"]["count"] = 10
    entries["embeddings"] = {"shape": [33, 8], "dtype": "float32", "prompts_per_shard": 6,
                             "shards": [entries.pop("shard0"), entries.pop("shard1")]}
    encoder_entry = {"name": "tiny", "weights_sha256": encoder_identity(encoder), "max_tokens": 8, "dim": 8,
                     "masked": True}
    version_2(out, lambda m: m.update(conditioning={"kind": "text", "encoder": encoder_entry, **entries}))
    return out


def test_a_text_store_is_read_and_verified(tmp_path, capsys, store):
    out = text_store(copy(store, tmp_path / "store"), tmp_path / "encoder")
    store_main(["verify", str(out)])
    assert "ok" in capsys.readouterr().out
    assert fmt.TrajectoryStore(out).manifest["conditioning"]["kind"] == "text"


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "shard-000001.npy: 80 bytes, manifest.json field 'conditioning.embeddings.shards[1].bytes' says"),
    ("flip", "prompts.jsonl: sha256 does not match manifest.json field 'conditioning.prompts.sha256'"),
    ("missing", "lengths.npy: missing (the manifest's conditioning.lengths.file)"),
])
def test_a_damaged_conditioning_sidecar_is_found(tmp_path, capsys, store, damage, needle):
    out = text_store(copy(store, tmp_path / "store"), tmp_path / "encoder")
    if damage == "truncate":
        shard = out / "conditioning/embeddings/shard-000001.npy"
        shard.write_bytes(shard.read_bytes()[:80])
    elif damage == "flip":
        (out / "conditioning/prompts.jsonl").write_text((out / "conditioning/prompts.jsonl").read_text().replace("7", "8"))
    else:
        (out / "conditioning/lengths.npy").unlink()
    expect_one_line(capsys, lambda: store_main(["verify", str(out)]), needle, [out], prefix="bad")
    if damage != "flip":  # the reader checks sizes on open (verify reads every byte)
        with pytest.raises(fmt.StoreError, match=needle.split(":")[0]):
            fmt.TrajectoryStore(out)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["embeddings"].update(shape=[33, 12]), "needs dim = encoder.dim=8"),
    (lambda c: c["embeddings"].update(shape=[89, 8]), "more tokens than 10 prompts and the null prompt of at most"),
    (lambda c: c["embeddings"]["shards"].pop(), "embeddings.shards lists 1 files; 10 prompts and the null prompt at "
                                                "prompts_per_shard=6 need 2"),
    (lambda c: c["prompts"].update(file="../elsewhere.jsonl"), "must be a relative path inside the store"),
    (lambda c: c["encoder"].update(max_tokens="77"), "field 'conditioning.encoder.max_tokens' is \"77\""),
    (lambda c: c.pop("encoder"), "field 'conditioning.encoder' missing"),
])
def test_a_text_manifest_off_its_schema(tmp_path, capsys, store, edit, needle):
    out = text_store(copy(store, tmp_path / "store"), tmp_path / "encoder")
    version_2(out, lambda m: edit(m["conditioning"]))
    expect_one_line(capsys, lambda: store_main(["info", str(out)]), needle, [out])


def flow(sigmas):
    def edit(m):
        m["solver"] = {"name": "flow_euler", "num_steps": 24, "shift": 3.0, "guidance_scale": 2.0,
                       "prediction_type": "flow", "precision": "fp32"}
        m["grid"]["sigmas"] = sigmas
        m["teacher"]["family"] = "sd3"
    return edit


@pytest.mark.parametrize("sigmas, needle", [
    ([1.0, 0.9, 0.95, 0.3, 0.0], "grid.sigmas [1.0, 0.9, 0.95, 0.3, 0.0] must decrease strictly"),
    ([1.0, 0.9, 0.6, 0.3, 0.1], "end at 0 (the clean state)"),
    ([1.5, 0.9, 0.6, 0.3, 0.0], "from at most 1"),
    ([1.0, 0.6, 0.3, 0.0], "one per saved state (5)"),
])
def test_a_flow_grid_that_is_not_monotone_or_does_not_end_clean(tmp_path, capsys, store, sigmas, needle):
    out = copy(store, tmp_path / "store")
    version_2(out, flow(sigmas))
    expect_one_line(capsys, lambda: store_main(["info", str(out)]), needle, [out])


def test_a_store_of_another_teacher_family_is_refused(tmp_path, capsys, teacher, store):
    out = copy(store, tmp_path / "store")
    version_2(out, lambda m: m["teacher"].update(family="pixart"))
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", teacher, out)),
                    ["field 'teacher.family' is 'pixart'", "'dit'"], [out])
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, "--store", str(out))),
                    "field 'teacher.family' is 'pixart'", [out])


def test_encoder_paths_missing_or_not_the_stores(tmp_path, store):
    from ard.conditioning import check_encoder

    out = text_store(copy(store, tmp_path / "store"), tmp_path / "encoder")
    recorded = fmt.read_manifest(out)["conditioning"]["encoder"]
    check_encoder(tmp_path / "encoder", recorded, "manifest.json")  # the store's own encoder passes
    with pytest.raises(FileNotFoundError, match="none: text encoder directory not found"):
        check_encoder(tmp_path / "none", recorded, "manifest.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        check_encoder(tmp_path / "empty", recorded, "manifest.json")
    save_file({"embed.weight": torch.zeros(16, 8)}, (tmp_path / "other").mkdir() or tmp_path / "other/m.safetensors")
    with pytest.raises(ValueError, match="field 'conditioning.encoder.weights_sha256' .* not the encoder the store"):
        check_encoder(tmp_path / "other", recorded, "manifest.json")


def test_a_plain_text_prompt_file(tmp_path):
    """*.txt: one prompt per line, its line number its id; the same checks as JSON Lines."""
    from ard.conditioning import Prompt, read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten seven\n\n  a slanted one  \n")
    assert read_prompts(path) == [Prompt("1", "a handwritten seven"), Prompt("3", "a slanted one")]
    path.write_text('{"id": "a", "text": "one two three four five"}\n')  # a JSON line in a .txt is a prompt
    with pytest.raises(ValueError, match=r"prompts.txt: line 1: prompt '1' has 8 tokens, the encoder takes at most 4"):
        read_prompts(path, max_tokens=4, count_tokens=lambda text: len(text.split()))


@pytest.mark.parametrize("content, needle", [
    (b"", "holds no prompt"),
    (b"\n  \n", "holds no prompt"),
    (b'{"id": "a", "text": "caf\xe9"}\n', "line 1: not UTF-8 (byte"),
    (b'{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n{"id": "a", "text": "three"}\n',
     "line 3: id 'a' already on line 1"),
    (b'{"id": "a", "text": "one two three four five six"}\n', "prompt 'a' has 6 tokens, the encoder takes at most 4"),
    (b'{"id": "a", "text": "one"\n', "line 1: not JSON"),
    (b'["a", "one"]\n', "line 1: expected an object with string fields 'id' and 'text'"),
    (b'{"id": "a", "text": "  "}\n', "line 1: field 'text' is empty"),
    (b'{"id": 3, "text": "one"}\n', "expected an object with string fields"),
])
def test_bad_prompt_files(tmp_path, content, needle):
    from ard.conditioning import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_prompts(path, max_tokens=4, count_tokens=lambda text: len(text.split()))
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
