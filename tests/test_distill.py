"""ARD distillation through the `ard` CLI on a tiny store made here: a short fit lowers every step's loss,
a crash (or SIGKILL) after a checkpoint and a resume give the same losses as an uninterrupted run, a checkpoint
of the earlier flat-knob layout resumes, 2-process DDP (gloo, CPU) equals 1 process at the same global batch, a
store that does not fit fails in one line, and sample_student.py gives the same samples from the checkpoint, the
exported and the final EMA student."""
import csv
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ard.cli import main as ard_main
from ard.diffusion import ddim_grid
from ard.modules.distill import ARDDistillation
from ard.student.export import load_exported
from test_store import precompute, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
S = 4  # student steps
TRAIN, VAL = 48, 16  # trajectories: 3 batches of 16 per epoch, so a checkpoint at step 4 is mid-epoch


class CrashAt(L.Callback):
    """Stop the process abruptly before optimizer step `step` (after the checkpoint of step - 1 was written):
    SIGKILL in a subprocess, an exception in-process (what a crash leaves: only what was written to disk)."""

    def __init__(self, step: int, kill: bool = False):
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"crash before step {self.step}")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "digits", num_layers=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher_dir):
    path = tmp_path_factory.mktemp("store") / "store"
    precompute(teacher_dir, path, n=TRAIN + VAL, shard_size=32)  # K = 24, states saved at 0, 6, 12, 18, 24
    return path


def args_for(root, teacher_dir, store, *extra, preset="configs/digits/ard.yaml"):
    """`ard fit` on the preset with the tiny teacher and store; CSV logs of every step in <root>/csv."""
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s", "name": "csv"}}'
    return ["fit", "-c", str(ROOT / preset),
            f"--model.init_args.teacher={teacher_dir}", "--model.init_args.history_blocks=2",
            "--model.init_args.lr=1e-3", "--model.init_args.samples.per_class=2",
            f"--data.init_args.path={store}", f"--data.init_args.val_count={VAL}", "--data.init_args.batch_size=16",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=12", "--trainer.val_check_interval=6",
            "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger={logger % root}",
            "--trainer.callbacks.init_args.every_n_train_steps=4",  # the last callback: ModelCheckpoint
            *extra]


def crash_args(step, kill=False):
    return ['--trainer.callbacks+={"class_path": "test_distill.CrashAt", "init_args": {"step": %d, "kill": %s}}'
            % (step, str(kill).lower())]


def step_losses(root) -> dict[int, dict[str, float]]:
    """{global step: {"train/loss_step0": ..., ...}} from every run's metrics.csv under root (later runs win)."""
    out = {}
    for path in sorted((Path(root) / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith("train/loss") and v != ""}
                if values:
                    out.setdefault(int(row["step"]), {}).update(values)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir, store):
    root = tmp_path_factory.mktemp("run")
    ard_main(args_for(root, teacher_dir, store))
    return root


def test_fit_lowers_the_loss_of_every_step(uninterrupted):
    losses = step_losses(uninterrupted)
    assert sorted(losses) == list(range(12))  # Lightning's CSV rows are numbered from step 0
    per_epoch = 3  # batches per epoch: each epoch sees all training trajectories once
    for s in range(S):
        first = np.mean([losses[i][f"train/loss_step{s}"] for i in range(per_epoch)])
        last = np.mean([losses[i][f"train/loss_step{s}"] for i in range(12 - per_epoch, 12)])
        assert last < 0.8 * first, (s, first, last)
    weights = [1 / S] * S
    for row in losses.values():  # the logged loss is the weighted sum of the logged step losses
        assert row["train/loss"] == pytest.approx(sum(w * row[f"train/loss_step{s}"] for s, w in enumerate(weights)))
    assert len(list((uninterrupted / "samples").glob("step*.png"))) == 2  # EMA grids at steps 6 and 12
    assert (uninterrupted / "student_ema" / "ard_sampling.json").exists()


def test_crash_after_checkpoint_then_resume_gives_the_same_losses(tmp_path, teacher_dir, store, uninterrupted):
    args = args_for(tmp_path, teacher_dir, store)
    with pytest.raises(RuntimeError, match="crash before step 6"):
        ard_main(args + crash_args(6))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # mid-epoch (3 batches per epoch)
    ard_main(args)  # the same command again resumes from last.ckpt
    resumed, reference = step_losses(tmp_path), step_losses(uninterrupted)
    assert sorted(resumed) == list(range(12))
    for step in range(4, 12):
        assert resumed[step] == reference[step], step  # exact
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(uninterrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        for name, value in ref[key].items():
            assert torch.equal(final[key][name], value), (key, name)


def ard_subprocess(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ard.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_gives_the_same_losses(tmp_path, teacher_dir, store):
    """The same through separate `ard` processes, the first one killed with SIGKILL before step 6."""
    reference = tmp_path / "reference"
    proc = ard_subprocess(*args_for(reference, teacher_dir, store))
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = args_for(tmp_path / "run", teacher_dir, store)
    proc = ard_subprocess(*args, *crash_args(6, kill=True))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = ard_subprocess(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = step_losses(tmp_path / "run"), step_losses(reference)
    for step in range(4, 12):
        assert resumed[step] == reference[step], step


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path, teacher_dir, store):
    """2 gloo processes x 8 trajectories = 1 process x 16: the same weights after 4 steps (the store's
    sampler gives rank r every W-th batch of one seeded permutation, so the global batches agree). Float
    sums differ in order, and Adam's first steps (update ~ lr * sign(g)) amplify that for tiny gradients, so
    the check is relative to the size of the update: a wrong batch or a wrong reduction is off by ~100%."""
    common = ["--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--model.init_args.samples.per_class=0"]
    ard_main(args_for(tmp_path / "ddp1", teacher_dir, store, *common))
    proc = ard_subprocess(*args_for(tmp_path / "ddp2", teacher_dir, store, *common, "--trainer.accelerator=cpu",
                                    "--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.batch_size=8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = [tmp_path / f"ddp{d}" / "checkpoints" / "last.ckpt" for d in (1, 2)]
    one, two = (torch.load(path, map_location="cpu", weights_only=True) for path in ckpts)
    assert one["global_step"] == two["global_step"] == 4
    init = ARDDistillation(teacher=str(teacher_dir), history_blocks=2, samples=dict(per_class=0)).state_dict()
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert set(one[key]) == set(two[key]) == set(init)
        gap = torch.cat([(two[key][n] - one[key][n]).flatten() for n in init]).norm()
        update = torch.cat([(one[key][n] - init[n]).flatten() for n in init]).norm()
        assert gap < 1e-3 * update, (key, float(gap), float(update))
    first = (step_losses(tmp_path / "ddp1")[0], step_losses(tmp_path / "ddp2")[0])  # before any update
    for name, value in first[0].items():
        assert first[1][name] == pytest.approx(value, rel=1e-5), name


def test_loss_of_a_global_batch_is_the_mean_of_its_shards(teacher_dir, store):
    """What DDP relies on (fast check): the gradient of the loss of 16 trajectories equals the mean of the
    gradients on two halves of 8, as gradient averaging over 2 ranks computes it."""
    from ard.data.trajectories import TrajectoryDataModule

    data = TrajectoryDataModule(str(store), S, batch_size=16, val_count=VAL)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = ARDDistillation(teacher=str(teacher_dir), history_blocks=2, samples=dict(per_class=0),
                             step_weights=[0.1, 0.2, 0.3, 0.4])

    def grads(part):
        module.zero_grad()
        losses = module.loss_fn(module.student, part["states"], part["timesteps"], part["labels"]).mean(dim=0)
        (torch.tensor(module.step_weights) * losses).sum().backward()
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    full = grads(batch)
    halves = [grads({k: v[i:i + 8] for k, v in batch.items()}) for i in (0, 8)]
    assert len(full) > 0
    for g, a, b in zip(full, *halves):
        torch.testing.assert_close(g, (a + b) / 2, rtol=1e-4, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.num_steps=2"], "data.student_steps=4 but model.num_steps=2"),
    (["--data.init_args.student_steps=3", "--model.init_args.num_steps=3"], "lacks [8, 16], needed by a 3-step student"),
    (["--model.init_args.step_weights=[1.0, 2.0]"], "step_weights=[1.0, 2.0]: num_steps=4 needs 4 weights"),
])
def test_a_store_or_config_that_does_not_fit_fails_in_one_line(tmp_path, teacher_dir, store, capsys, extra, needle):
    with pytest.raises(SystemExit) as exit_info:
        ard_main(args_for(tmp_path, teacher_dir, store, *extra))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, needle", [
    (dict(sample_size=16), "field 'state.shape' is [1, 8, 8], the student needs [1, 16, 16]"),
    (dict(num_layers=3), "field 'teacher.weights_sha256' is"),
    # the same weights (same shapes, same seed) as 8 heads of 16 instead of 4 of 32: another teacher
    (dict(num_attention_heads=8, attention_head_dim=16), "field 'teacher.config_sha256' is"),
    (dict(extra=["--model.init_args.numerics=dit"]), "field 'teacher.numerics' is 'diffusers', model.teacher="),
])
def test_store_of_another_teacher_fails_in_one_line(tmp_path, store, capsys, overrides, needle):
    extra = overrides.pop("extra", [])
    other = tiny_teacher(tmp_path / "other", **{"num_layers": 2, **overrides})
    with pytest.raises(SystemExit):
        ard_main(args_for(tmp_path, other, store, *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "checkpoints").exists()


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def test_baseline_preset_only_turns_history_off(capsys):
    import yaml

    printed = {}
    for name, configs in {"ard": ["ard.yaml"], "baseline": ["ard.yaml", "baseline.yaml"]}.items():
        with pytest.raises(SystemExit):
            ard_main(["fit", *[a for c in configs for a in ("-c", str(ROOT / "configs/digits" / c))], "--print_config"])
        printed[name] = flatten(yaml.safe_load(capsys.readouterr().out))
    differ = {k: (printed["ard"][k], printed["baseline"][k]) for k in printed["ard"]
              if printed["ard"][k] != printed["baseline"][k]}
    assert set(printed["ard"]) == set(printed["baseline"])
    assert differ == {"model.init_args.history_blocks": (1, 0),
                      "trainer.default_root_dir": ("runs/digits/ard", "runs/digits/baseline"),
                      "trainer.logger.init_args.name": ("ard", "baseline")}


def test_a_checkpoint_of_the_earlier_flat_layout_resumes(tmp_path, teacher_dir, store, uninterrupted):
    """A checkpoint written before the recipe and sample-grid knobs were grouped (and the GAN knobs moved to their
    own module) resumes: its hyperparameters are read in today's layout, and the run ends as the uninterrupted one."""
    args = args_for(tmp_path, teacher_dir, store)
    with pytest.raises(RuntimeError, match="crash before step 6"):
        ard_main(args + crash_args(6))
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = dict(ckpt["hyper_parameters"])
    recipe, samples = hp.pop("recipe"), hp.pop("samples")
    hp |= recipe | {"samples_per_class": samples["per_class"], "sample_classes": samples["classes"],
                    "sample_seed": samples["seed"], "vae": samples["vae"], "latent_scale": samples["latent_scale"],
                    "gan_weight": 0.0, "gan_warmup": 3000, "gan_fake": "teacher_forced"}
    torch.save({**ckpt, "hyper_parameters": hp}, path)
    ard_main(args)
    resumed, reference = step_losses(tmp_path), step_losses(uninterrupted)
    for step in range(4, 12):
        assert resumed[step] == reference[step], step


def test_sample_script_same_samples_from_checkpoint_export_and_final_student(tmp_path, uninterrupted):
    sample_student = runpy.run_path(str(ROOT / "scripts" / "sample_student.py"), run_name="sample_student")
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    sample_student["main"](["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    common = ["--labels", "3", "1", "--per-label", "3", "--seed", "5", "--npz", "--batch-size", "4"]
    sources = {"checkpoint": ["--checkpoint", str(ckpt)], "export": ["--student", str(tmp_path / "export")],
               "final": ["--student", str(uninterrupted / "student_ema")]}
    arrays = {}
    for name, source in sources.items():
        sample_student["main"](["sample", *source, *common, "--out", str(tmp_path / name)])
        with np.load(tmp_path / name / "samples_6x8x8x3.npz") as z:
            arrays[name] = z["arr_0"]
            assert z["arr_1"].tolist() == [3, 3, 3, 1, 1, 1]  # the labels, for class-conditional evaluators
        assert (tmp_path / name / "grid.png").exists()
    assert arrays["checkpoint"].dtype == np.uint8 and arrays["checkpoint"].shape == (6, 8, 8, 3)
    assert np.array_equal(arrays["checkpoint"], arrays["export"])
    assert np.array_equal(arrays["checkpoint"], arrays["final"])  # the checkpoint's state_dict is the EMA
    student, timesteps = load_exported(tmp_path / "export")
    assert timesteps == [ddim_grid(24)[i] for i in (0, 6, 12, 18, 24)]  # the store's grid at the boundaries
    assert not student.training
    sample_student["main"](["sample", *sources["export"], *common, "--noise-correction", "--out", str(tmp_path / "nc")])
    with np.load(tmp_path / "nc" / "samples_6x8x8x3.npz") as z:
        assert not np.array_equal(z["arr_0"], arrays["export"])  # the first step's direction term changed
