"""Bad input to evaluation and teacher loading: each case must stop before any expensive work with exit status != 0
and exactly one line naming the file, field or option, the value and what is allowed (no traceback), and leave
what was already there as it was.

Cases: a teacher directory without its weights, a teacher config.json with a field of the wrong type or range, a
teacher of a family ard does not serve, ard-eval's numeric options out of range, an evaluation reference that is
not an .npz of images, malformed JSON and non-boolean values on ard-eval's command line. The checks follow
tests/test_bad_inputs.py's conventions and use its `expect_one_line`.
"""
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from ard.cli import main as ard_main
from ard.evaluate import evaluate
from ard.evaluate import main as eval_main
from ard.backbones.dit import build_dit
from ard.backbones.files import teacher_family
from ard.teacher import load_teacher
from test_bad_inputs import Crafted, eval_args, expect_one_line, fit_args, predict_args, teacher  # noqa: F401

WEIGHTS = "diffusion_pytorch_model.safetensors"


def nothing_written(tmp_path: Path) -> bool:
    """No output or cache directory of `eval_args`, no run or store directory of `fit_args` / `predict_args`."""
    return not any((tmp_path / name).exists() for name in ("out", "cache", "run", "store", "store.runs"))


def edited_teacher(teacher: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the tiny teacher with config.json's `fields` replaced."""
    copy = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **fields}))
    return copy


# ---------------------------------------------------------------------------------------------- teacher weights
@pytest.mark.parametrize("layout", ["model", "pipeline"])
@pytest.mark.parametrize("command", ["ard-eval", "ard fit", "ard predict"])
def test_teacher_directory_without_its_weights(tmp_path, capsys, teacher, layout, command):
    root = tmp_path / "snapshot"
    directory = root / "transformer" if layout == "pipeline" else root
    shutil.copytree(teacher, directory)
    (directory / WEIGHTS).unlink()
    args = {"ard-eval": lambda: eval_main(eval_args(tmp_path, root)),
            "ard fit": lambda: ard_main(fit_args(tmp_path / "run", root, tmp_path / "no-store")),
            "ard predict": lambda: ard_main(predict_args(root, tmp_path / "store"))}[command]
    line = expect_one_line(capsys, args, [f"{directory}: {WEIGHTS} not found", "config.json"], [root])
    assert ".bin" not in line
    assert nothing_written(tmp_path)


def test_sharded_teacher_with_a_missing_shard(tmp_path, capsys, teacher):
    directory = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    (directory / WEIGHTS).rename(directory / "diffusion_pytorch_model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"pos_embed.proj.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "proj_out_2.bias": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (directory / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, directory)),
                    ["diffusion_pytorch_model-00002-of-00002.safetensors not found", "1 of 2 shards"], [directory])
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("damage, needles", [
    ("truncated", ["weights not readable or not those of config.json's model", WEIGHTS]),
    ("fewer_layers", ["missing key 'transformer_blocks.1.", "not those of the model config.json describes"]),
])
def test_teacher_weights_that_do_not_fit_its_config(tmp_path, capsys, teacher, damage, needles):
    directory = edited_teacher(teacher, tmp_path, num_layers=2 if damage == "fewer_layers" else 1)
    if damage == "truncated":
        (directory / WEIGHTS).write_bytes((directory / WEIGHTS).read_bytes()[:3000])
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, directory)), needles, [directory])
    assert nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- teacher config
@pytest.mark.parametrize("field, value, allowed", [
    ("num_layers", "six", "must be an integer >= 1"),
    ("num_attention_heads", 0, "must be an integer >= 1"),
    ("attention_head_dim", 2.5, "must be an integer >= 1"),
    ("patch_size", True, "must be an integer >= 1"),
    ("sample_size", 9, "must be a multiple of patch_size (2)"),
    ("in_channels", -1, "must be an integer >= 1"),
    ("out_channels", 3, "must be in_channels (1), 2 * in_channels (2, learned sigma) or null"),
    ("num_embeds_ada_norm", None, "must be an integer >= 1"),
    ("norm_type", "layer_norm", "must be 'ada_norm_zero'"),
    ("_ard_numerics", "fast", "must be one of 'diffusers', 'dit' or absent"),
])
def test_teacher_config_field_of_the_wrong_type_or_range(tmp_path, capsys, teacher, field, value, allowed):
    directory = edited_teacher(teacher, tmp_path, **{field: value})
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, directory)),
                    [f"{directory / 'config.json'}: field '{field}' is {value!r}", allowed], [directory])
    assert nothing_written(tmp_path)


def test_teacher_config_that_is_not_a_json_object(tmp_path, capsys, teacher):
    directory = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    (directory / "config.json").write_text('{"num_layers": 1,')
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, directory)),
                    [f"{directory / 'config.json'}: not readable JSON", "line 1 column"], [directory])
    assert nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- teacher family
def pixart_config(directory: Path) -> Path:
    """A tiny PixArt transformer's config.json and nothing else: the family check must come before the weights."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.42.1", "num_layers": 1,
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "sample_size": 8,
        "patch_size": 2, "cross_attention_dim": 16, "caption_channels": 32, "norm_type": "ada_norm_single"}))
    return directory


def test_teacher_family(tmp_path, teacher):
    assert teacher_family(teacher) == "dit"
    assert teacher_family(pixart_config(tmp_path / "pixart" / "transformer")) == "pixart"
    assert teacher_family(tmp_path / "pixart") == "pixart"  # a pipeline snapshot: its transformer/
    for name, family in (("SD3Transformer2DModel", "sd3"), ("FluxTransformer2DModel", "FluxTransformer2DModel")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"_class_name": name}))
        assert teacher_family(tmp_path / name) == family
    save_file({k: v.contiguous() for k, v in build_dit("digits", num_layers=1).state_dict().items()},
              tmp_path / "single.safetensors")
    assert teacher_family(tmp_path / "single.safetensors") == "dit"  # single files are read as DiTs only
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        teacher_family(tmp_path / "none")


@pytest.mark.parametrize("norm_type, family", [("ada_norm_zero", "dit"), ("ada_norm_single", "pixart")])
def test_legacy_transformer2d_config_by_its_norm_type(tmp_path, teacher, norm_type, family):
    """facebook/DiT-XL-2-256's transformer/config.json names diffusers' older Transformer2DModel: a DiT by its norm."""
    directory = edited_teacher(teacher, tmp_path, _class_name="Transformer2DModel", norm_type=norm_type)
    assert teacher_family(directory) == family
    if family == "dit":
        assert load_teacher(directory).config.num_layers == 1


@pytest.mark.parametrize("command", ["ard-eval", "load_teacher"])
def test_teacher_of_a_family_not_served(tmp_path, capsys, command):
    """A PixArt teacher: precompute and distillation serve it (tests/test_text_pipeline.py), evaluation not yet."""
    root = pixart_config(tmp_path / "pixart" / "transformer").parent
    needles = [f"{root / 'transformer' / 'config.json'}: field '_class_name' is 'PixArtTransformer2DModel'",
               "family 'pixart'", "serves the 'dit' family only"]
    if command == "load_teacher":
        with pytest.raises(ValueError) as e:
            load_teacher(root)
        assert all(needle in str(e.value) for needle in needles) and "\n" not in str(e.value)
        return
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, root)), needles, [root])
    assert nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- ard-eval options
@pytest.mark.parametrize("option, value, allowed", [
    ("num_samples", "1", "greater than or equal to 4"),
    ("num_samples", "3", "greater than or equal to 4"),
    ("batch_size", "0", "greater than or equal to 1"),
    ("bootstrap", "1", "greater than or equal to 2"),
    ("grid_samples", "0", "greater than or equal to 1"),
    ("seed", "-1", "greater than or equal to 0"),
    ("teacher_steps", "0", "greater than or equal to 1"),
    ("teacher_steps", "5000", "less than or equal to 1000"),
    ("undistilled_steps", "[2, 0]", "greater than or equal to 1"),
    ("guidance_scale", "-1", "greater than or equal to 0"),
    ("guidance_scale", "1e400", "finite number"),
    ("latent_scale", "0", "greater than 0"),
    ("latent_shift", "1e400", "finite number"),
])
def test_evaluate_numeric_option_out_of_range(tmp_path, capsys, teacher, option, value, allowed):
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, f"--{option}", value)),
                    [f"--{option}=", allowed], [teacher])
    assert nothing_written(tmp_path)


def test_evaluate_in_python_checks_the_same_ranges(tmp_path, teacher):
    with pytest.raises(ValueError, match=r"^num_samples=1: must be greater than or equal to 4$"):
        evaluate(teacher=str(teacher), num_samples=1, out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("extra, needles", [
    (["--students", '{"ard": "runs/x/student_ema",'], ['--students={"ard": "runs/x/student_ema",: not valid JSON',
                                                       "Expecting property name enclosed in double quotes",
                                                       "line 1 column 30 (char 29)"]),
    (["--undistilled_steps", "[1, 2"], ["--undistilled_steps=[1, 2: not valid JSON", "line 1 column 6"]),
    (["--noise_correction", "maybe"], ['key "noise_correction"', "bool", "Got value: maybe"]),
    (["--guidance_scale", "strong"], ['key "guidance_scale"', "float", "got strong"]),
])
def test_evaluate_unparsable_option(tmp_path, capsys, teacher, extra, needles):
    expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, *extra)), needles, [teacher])
    assert nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- reference
def write_reference(path: Path, kind: str, marker: Path) -> Path:
    """A file that is not an .npz of uint8 images (N, H, W, 1|3), N >= 4; unpickling any of it would create `marker`."""
    with path.open("wb") as f:
        if kind == "text":
            f.write(b"not images\n")
        elif kind == "pickle":
            pickle.dump(Crafted(marker), f)
        elif kind == "npy":
            np.save(f, np.zeros((8, 8, 8, 1), np.uint8))
        elif kind == "object_npz":
            np.savez(f, arr_0=np.array([Crafted(marker)], dtype=object))
        elif kind == "other_zip":
            with zipfile.ZipFile(f, "w") as z:
                z.writestr("notes.txt", "hello")
        else:
            np.savez(f, arr_0=np.zeros((3, 8, 8, 1), np.uint8))
    return path


@pytest.mark.parametrize("kind, needle", [
    ("text", "not an .npz archive"),
    ("pickle", "not an .npz archive"),
    ("npy", "not an .npz archive"),
    ("object_npz", "arr_0 must be uint8 (N, H, W, 1|3), got object"),
    ("other_zip", "no arr_0"),
    ("few_images", "arr_0 holds 3 images, at least 4 are needed"),
])
def test_evaluate_reference_that_is_not_an_npz_of_images(tmp_path, capsys, teacher, kind, needle):
    marker = tmp_path / "pwned"
    ref = write_reference(tmp_path / "reference.dat", kind, marker)
    line = expect_one_line(capsys, lambda: eval_main(eval_args(tmp_path, teacher, "--reference", str(ref))),
                           [f"{ref}: {needle}", "expected an .npz archive", "arr_0 holds uint8 images (N, H, W, 1|3)"],
                           [ref])
    assert "allow_pickle" not in line and "unsafely" not in line
    assert nothing_written(tmp_path) and not marker.exists()
