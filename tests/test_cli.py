"""The `ard` command: teacher training steps on CPU, per-run configs, resume, one-line errors."""
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_teacher_fit_saves_config_per_run_and_resumes(tmp_path, monkeypatch):
    import wandb

    from ard.cli import main

    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["fit", "-c", str(ROOT / "configs/digits/teacher.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    main([*common, "--trainer.max_steps=2"])  # in this process: the command's own code, without its import time
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    wandb.finish()  # what the end of the first command's process does
    main([*common, "--trainer.max_steps=4"])  # the same command again: a new run that resumes from last.ckpt
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    configs = sorted(tmp_path.glob("ard-digits/*/config.yaml"))
    assert len(configs) == 2  # one per run, in each run's own directory
    saved = yaml.safe_load(configs[0].read_text())
    assert saved["model"]["class_path"] == "ard.modules.teacher_training.TeacherTraining"
    assert saved["trainer"]["callbacks"][1]["init_args"]["dirpath"] == str(tmp_path / "checkpoints")
    assert (tmp_path / "teacher_ema" / "config.json").exists()
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # W&B ran offline


@pytest.mark.parametrize("args, needle", [
    (["--model.init_args.sise=digits"], "Option 'sise' is not accepted"),
    (["-c", "no/such/file.yaml"], "no/such/file.yaml"),
    (["--model.init_args.size=DiT-Q/9"], "unknown DiT size 'DiT-Q/9'"),
])
def test_bad_input_gives_one_line_error(args, needle, capsys):
    from ard.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs/digits/teacher.yaml"), *args, "--trainer.logger=false"])
    assert exit_info.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert len(lines) == 1 and needle in lines[0], lines
