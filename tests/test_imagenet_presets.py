"""The ImageNet-256 presets (configs/imagenet256/*.yaml) on CPU with a tiny DiT of DiT-XL/2's structure (patch 2,
4 latent channels with learned sigma, 1000 classes, 32x32 latents; 7 blocks of width 16 instead of 28 of 1152)
and a tiny random VAE of sd-vae-ft-ema's structure (8x upsampling to 256x256): every preset resolves, precompute
writes a store with the preset's grid, ARD and the baseline train two steps on it in the preset's bf16-mixed and
export their students, and gradient checkpointing (the presets' memory knob) leaves loss and gradients unchanged."""
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from ard.cli import main as ard_main
from ard.diffusion import ddim_grid, teacher_path
from ard.schedules import VPSchedule
from ard.evaluate import main as eval_main
from ard.modules.distill import ARDDistillation
from ard.store import format as fmt
from test_store import tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "imagenet256"
TINY_XL = dict(num_layers=7, num_attention_heads=2, attention_head_dim=8)  # N = 6 history blocks of 7
PRINTED = {  # every preset, with the command that resolves it
    "trajectories.yaml": ["predict", "-c", "trajectories.yaml"],
    "ard.yaml": ["fit", "-c", "ard.yaml"],
    "baseline.yaml": ["fit", "-c", "ard.yaml", "-c", "baseline.yaml"],
    "ard_gan.yaml": ["fit", "-c", "ard.yaml", "-c", "ard_gan.yaml"],
    "eval.yaml": ["--config", "eval.yaml"],
    "paper_trajectories.yaml": ["predict", "-c", "trajectories.yaml", "-c", "paper_trajectories.yaml"],
    "paper.yaml": ["fit", "-c", "ard.yaml", "-c", "paper.yaml"],
    "paper_baseline.yaml": ["fit", "-c", "ard.yaml", "-c", "paper.yaml", "-c", "paper_baseline.yaml"],
    "paper_gan.yaml": ["fit", "-c", "ard.yaml", "-c", "paper.yaml", "-c", "ard_gan.yaml", "-c", "paper_gan.yaml"],
}


def tiny_vae(path: Path, latent_channels: int = 4) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4,) * 4, layers_per_block=1,
                  norm_num_groups=2, sample_size=256).save_pretrained(path)
    return path


def resolved(name: str, capsys) -> dict:
    args = [a if not a.endswith(".yaml") else str(PRESETS / a) for a in PRINTED[name]]
    with pytest.raises(SystemExit) as exit_info:
        (eval_main if name == "eval.yaml" else ard_main)([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def test_every_preset_resolves_and_they_agree(capsys):
    assert sorted(p.name for p in PRESETS.glob("*.yaml")) == sorted(PRINTED)  # a new preset needs a test here
    config = {name: resolved(name, capsys) for name in PRINTED}
    traj, ard, base, ev = (config[n] for n in ("trajectories.yaml", "ard.yaml", "baseline.yaml", "eval.yaml"))
    t, a, b = traj["model"]["init_args"], ard["model"]["init_args"], base["model"]["init_args"]
    assert t["num_steps"] == 24 and t["timestep_spacing"] == "leading" and t["cfg_channels"] == "dit"
    # the evaluation takes the store's sampling settings (a differing one is refused): it names that store
    assert ev["store"] == traj["data"]["init_args"]["path"] and ev["teacher_steps"] in (None, 24)
    assert t["guidance_scale"] == ev["guidance_scale"] == 1.5
    assert t["teacher"] == a["teacher"] == ev["teacher"] and a["samples"]["vae"] == ev["vae"]
    assert ard["data"]["init_args"]["path"] == traj["data"]["init_args"]["path"]
    saved = t["save_indices"]
    assert all(s * 24 // a["num_steps"] in saved for s in range(a["num_steps"] + 1))  # the store serves S = 4
    # the paper's ARD and its baseline differ in N only
    assert (a["history_blocks"], b["history_blocks"]) == (6, 0) and a["history_start"] == "plain"
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ == {"history_blocks"}
    assert {"ard": f"{ard['trainer']['default_root_dir']}/student_ema",
            "baseline": f"{base['trainer']['default_root_dir']}/student_ema"} == ev["students"]
    store = traj["data"]["init_args"]
    assert ard["data"]["init_args"]["max_open_shards"] >= -(-store["num_trajectories"] // store["shard_size"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DiT-XL/2-shaped teacher, a tiny VAE, and a 12-trajectory store from the trajectories preset."""
    root = tmp_path_factory.mktemp("imagenet")
    teacher = tiny_teacher(root / "dit", "DiT-XL/2", **TINY_XL)
    ard_main(["predict", "-c", str(PRESETS / "trajectories.yaml"), f"--model.init_args.teacher={teacher}",
              "--model.init_args.teacher_size=null", "--model.init_args.micro_batch_size=4",
              f"--data.init_args.path={root / 'store'}", "--data.init_args.num_trajectories=12",
              "--data.init_args.shard_size=4", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={root / 'pre'}"])
    return root, teacher, tiny_vae(root / "vae")


@pytest.mark.parametrize("overlay", [[], pytest.param(["-c", str(PRESETS / "baseline.yaml")], marks=pytest.mark.slow)],
                         ids=["ard", "baseline"])  # (the baseline differs in N only: checked when the presets resolve)
def test_distillation_presets_train_two_steps(tiny, overlay, tmp_path):
    root, teacher, vae = tiny
    m = fmt.read_manifest(root / "store")
    assert m["complete"] and m["grid"]["indices"] == [0, 4, 6, 8, 12, 16, 18, 20, 24]
    assert m["state"] == {"shape": [4, 32, 32], "dtype": "float16", "numpy_dtype": "<f2", "x0": False}
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}' % tmp_path
    ard_main(["fit", "-c", str(PRESETS / "ard.yaml"), *overlay, f"--model.init_args.teacher={teacher}",
              "--model.init_args.teacher_size=null", f"--model.init_args.samples.vae={vae}",
              "--model.init_args.samples.per_class=1", "--model.init_args.samples.classes=[207, 360]",
              "--model.init_args.gradient_checkpointing=true",
              f"--data.init_args.path={root / 'store'}", "--data.init_args.batch_size=2",
              "--data.init_args.val_count=4", "--data.init_args.num_workers=1", "--trainer.accelerator=cpu",
              "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.max_steps=2",
              "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              f"--trainer.logger={logger}", f"--trainer.default_root_dir={tmp_path}"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["boundary_timesteps"] == [943, 697, 451, 205, -1]
    settings = yaml.safe_load((tmp_path / "student_ema" / "ard_student.json").read_text())
    assert settings["history_blocks"] == (0 if overlay else 6) and settings["num_steps"] == 4
    assert settings["history_start"] == "plain" and settings["output"] == "eps"
    assert len(list((tmp_path / "samples").glob("step*.png"))) == 1  # the grid, decoded by the VAE


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    _, teacher, _ = tiny
    torch.manual_seed(1)
    steps = 4
    batch = {"states": torch.randn(2, steps + 1, 4, 32, 32), "labels": torch.tensor([3, 999]),
             "timesteps": torch.tensor(ddim_grid(24)[:: 24 // steps]).expand(2, -1)}
    grads, losses = [], []
    for checkpointing in (False, True):
        module = ARDDistillation(str(teacher), num_steps=steps, history_blocks=6, history_start="closed",
                                 samples=dict(per_class=0), gradient_checkpointing=checkpointing)
        with mock.patch("torch.utils.checkpoint.checkpoint", wraps=torch.utils.checkpoint.checkpoint) as ckpt:
            loss = module.loss_fn(module.student, batch["states"], batch["timesteps"], batch["labels"]).mean(0)  # (S,)
            loss.sum().backward()
        assert ckpt.call_count == (TINY_XL["num_layers"] if checkpointing else 0)  # every block recomputed
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in module.student.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and "history_gate" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_paper_preset_is_the_papers_setting(capsys):
    """paper.yaml restates every key of the paper's experiment (a change to ard.yaml cannot move it): DiT's 25-step
    grid, boundaries 999 / 749 / 500 / 250 on it, teacher forcing, the direct next-state output with per-step heads,
    global batch 64, fp32, 300k iterations, EMA 0.9999; its baseline differs in N only; its GAN stage starts from
    its student and weighs the GAN loss at the last step's head."""
    traj, paper, base, gan = (resolved(n, capsys) for n in ("paper_trajectories.yaml", "paper.yaml",
                                                              "paper_baseline.yaml", "paper_gan.yaml"))
    t, p, d = traj["model"]["init_args"], paper["model"]["init_args"], paper["data"]["init_args"]
    grid = ddim_grid(t["num_steps"], t["timestep_spacing"])
    assert (t["num_steps"], t["guidance_scale"], t["cfg_channels"], t["clip_sample"]) == (25, 1.5, "dit", False)
    assert grid[:2] == [999, 957] and grid[-3:] == [42, 0, -1]  # facebookresearch/DiT's space_timesteps(1000, "25")
    assert [grid[b] for b in d["boundaries"]] == [999, 749, 500, 250, -1]  # the boundaries lie on the grid
    assert set(d["boundaries"]) <= set(t["save_indices"]) and d["path"] == traj["data"]["init_args"]["path"]
    assert (p["num_steps"], p["history_blocks"], p["mask"], p["output"], p["heads"]) == (
        4, 6, "block_causal", "next_state", "per_step")
    assert (p["recipe"]["inputs"], p["recipe"]["targets"], p["step_weights"]) == ("teacher", "trajectory", "uniform")
    assert (p["lr"], p["weight_decay"]) == (1e-4, 0.0)
    trainer = paper["trainer"]
    assert d["batch_size"] * trainer["devices"] == 64 and trainer["precision"] == "32-true"
    assert (trainer["max_steps"], trainer["gradient_clip_val"]) == (300000, 1.0)
    assert trainer["callbacks"][0]["init_args"]["decay"] == 0.9999
    b = base["model"]["init_args"]
    assert {k for k in p.keys() | b.keys() if p.get(k) != b.get(k)} == {"history_blocks"}
    g = gan["model"]["init_args"]
    assert g["init_student"] == f"{trainer['default_root_dir']}/student_ema" and g["gan"]["adaptive_grad"] == "last_step"


def test_paper_preset_trains_on_its_grid_whose_states_the_teacher_reproduces(tmp_path):
    """A tiny DiT-XL/2-shaped teacher: the paper's store (K = 25, DiT's respacing), the teacher's own DDIM from each
    stored boundary state along the grid reproduces the next stored one, and paper.yaml trains two steps on it."""
    teacher = tiny_teacher(tmp_path / "dit", "DiT-XL/2", **TINY_XL)
    ard_main(["predict", "-c", str(PRESETS / "trajectories.yaml"), "-c", str(PRESETS / "paper_trajectories.yaml"),
              f"--model.init_args.teacher={teacher}", "--model.init_args.teacher_size=null",
              "--model.init_args.micro_batch_size=4", f"--data.init_args.path={tmp_path / 'store'}",
              "--data.init_args.num_trajectories=8", "--data.init_args.shard_size=4", "--trainer.accelerator=cpu",
              "--trainer.devices=1", "--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path / 'pre'}"])
    store = fmt.TrajectoryStore(tmp_path / "store")
    assert store.grid_indices == [0, 6, 12, 18, 25] and store.grid_timesteps == [999, 749, 500, 250, -1]
    states = torch.from_numpy(store.read(range(4))).float()  # (4, 5, C, H, W)
    labels = torch.from_numpy(store.labels[:4])
    grid = ddim_grid(25, "linspace")
    from ard.teacher import load_teacher

    model = load_teacher(str(teacher), numerics="dit")
    for s, (a, b) in enumerate(zip(store.grid_indices, store.grid_indices[1:])):
        path = torch.tensor(grid[a:b + 1]).expand(4, -1)  # (4, b - a + 1) the teacher's own grid steps
        x = teacher_path(model, VPSchedule(), states[:, s], labels, path, 1.5, False, "dit")  # (4, C, H, W)
        torch.testing.assert_close(x, states[:, s + 1], rtol=1e-4, atol=1e-5)
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}' % tmp_path
    ard_main(["fit", "-c", str(PRESETS / "ard.yaml"), "-c", str(PRESETS / "paper.yaml"),
              f"--model.init_args.teacher={teacher}", "--model.init_args.teacher_size=null",
              "--model.init_args.samples.per_class=0", f"--data.init_args.path={tmp_path / 'store'}",
              "--data.init_args.batch_size=2", "--data.init_args.val_count=2", "--data.init_args.num_workers=0",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.max_steps=2",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--trainer.logger={logger}",
              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["boundary_timesteps"] == [999, 749, 500, 250, -1]
    settings = yaml.safe_load((tmp_path / "run" / "student_ema" / "ard_student.json").read_text())
    assert (settings["output"], settings["heads"], settings["history_blocks"]) == ("next_state", "per_step", 6)
