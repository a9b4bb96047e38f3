"""Students load without the Lightning modules: `ard-eval` and scripts/sample_student.py read exported students,
and sample_student.py reads checkpoints, through ard.student.export alone (checked in fresh interpreters)."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ard.student import ARDStudent
from ard.student.export import (SAMPLING_CONFIG, export_student, exported_noise_correction, load_checkpoint_student,
                                load_exported)
from ard.teacher import load_teacher
from test_store import tiny_teacher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sample_student.py"
TIMESTEPS = [943, 451, -1]
RECIPE = {"inputs": "rollout", "rollout_prob": 0.5, "rollout_ramp_steps": 0, "targets": "trajectory",
          "target_substeps": None, "srl_shift": 1.0}
NO_MODULES = ('loaded = sorted(m for m in sys.modules if m.startswith("ard.modules"))\n'
              'assert not loaded, f"imported {loaded}"\n')


def in_fresh_interpreter(code: str) -> None:
    """Run `code`, then the check that no ard.modules module was imported, in a new Python process."""
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code + NO_MODULES], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def sample_student_main(*argv: str) -> str:
    """Code that runs scripts/sample_student.py's main with `argv`."""
    return f"import runpy\nrunpy.run_path({str(SCRIPT)!r})['main']({list(argv)!r})\n"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "digits", num_layers=1)


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(0)
    student = ARDStudent(load_teacher(str(teacher)), num_steps=2, history_blocks=1)
    for p in student.parameters():  # weights unlike the teacher's, so that loading the wrong ones shows
        p.data.add_(0.01 * torch.randn_like(p))
    return student.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student):
    return export_student(student, TIMESTEPS, tmp_path_factory.mktemp("export") / "student", RECIPE)


def checkpoint(path: Path, teacher: Path, student: ARDStudent, flat: bool, noise_correction: bool = False) -> Path:
    """An `ard fit` checkpoint's fields that a student is read from; the recipe nested (today) or flat (before)."""
    hparams = {"teacher": str(teacher), "num_steps": 2, "history_blocks": 1}
    hparams |= RECIPE if flat else {"recipe": RECIPE}
    hparams |= {"noise_correction": True} if noise_correction else {}
    torch.save({"boundary_timesteps": TIMESTEPS, "hyper_parameters": hparams,
                "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}}, path)
    return path


def test_evaluation_loads_an_exported_student_without_the_lightning_modules(tmp_path, teacher, exported):
    argv = ["--students", json.dumps({"ard": str(exported)}), "--teacher", str(teacher), "--teacher_steps", "2",
            "--num_samples", "4", "--batch_size", "4", "--bootstrap", "2", "--grid_samples", "2", "--wandb", "false",
            "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    in_fresh_interpreter(f"from ard.evaluate import main\nmain({argv!r})\n")
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert [(r["model"], r["timesteps"]) for r in rows[1:]] == [("ard", TIMESTEPS)]


def test_sampling_loads_students_without_the_lightning_modules(tmp_path, teacher, student, exported):
    ckpt = checkpoint(tmp_path / "last.ckpt", teacher, student, flat=False)
    common = ["--labels", "1", "2", "--per-label", "1", "--seed", "3", "--npz"]
    sources = {"a": ["--student", str(exported)], "b": ["--checkpoint", str(ckpt)]}
    in_fresh_interpreter("".join(sample_student_main("sample", *source, *common, "--out", str(tmp_path / out))
                                 for out, source in sources.items()))
    a, b = (np.load(next((tmp_path / d).glob("samples_*.npz")))["arr_0"] for d in ("a", "b"))
    assert len(a) == 2 and (a == b).all()  # the same student either way


@pytest.mark.parametrize("flat", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["recipe", "flat_recipe"])
# (flat_recipe is slow: the upgrade of the earlier flat layout also runs in test_distill's resume test)
def test_export_writes_the_checkpoints_student_and_recipe(tmp_path, teacher, student, flat):
    ckpt = checkpoint(tmp_path / "last.ckpt", teacher, student, flat)
    _, timesteps, recipe, corrected = load_checkpoint_student(ckpt)
    assert timesteps == TIMESTEPS and recipe == RECIPE and not corrected
    in_fresh_interpreter(sample_student_main("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")))
    sampling = json.loads((tmp_path / "export" / SAMPLING_CONFIG).read_text())
    assert sampling == {"timesteps": TIMESTEPS, "recipe": RECIPE}
    exported, _ = load_exported(tmp_path / "export")
    for key, value in student.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key


def test_export_keeps_a_checkpoints_noise_correction(tmp_path, teacher, student):
    """A student trained with noise correction is exported as one (and is then sampled and evaluated with it)."""
    ckpt = checkpoint(tmp_path / "last.ckpt", teacher, student, flat=False, noise_correction=True)
    assert load_checkpoint_student(ckpt).noise_correction
    runpy.run_path(str(SCRIPT))["main"](["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    assert exported_noise_correction(tmp_path / "export")
