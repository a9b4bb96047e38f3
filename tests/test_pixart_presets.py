"""The PixArt presets (configs/pixart/*.yaml, overlays of the ImageNet-256 presets) on CPU with a tiny PixArt of
the same structure (28 -> 7 blocks, width 1152 -> 16, 4 latent channels with learned sigma, the preset's latent
side), a tiny T5 made on the spot and a tiny VAE: each resolves, precompute writes a text store from the prompt
file with the preset's grid and encoder, and ARD trains two steps on it in the preset's bf16-mixed, with gradient
checkpointing and a VAE-decoded sample grid, and exports its student."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from ard.backbones.pixart import PixArt
from ard.cli import main as ard_main
from ard.store import format as fmt
from test_imagenet_presets import tiny_vae
from test_text_store import make_tiny_t5

ROOT = Path(__file__).resolve().parents[1]
IMAGENET, PIXART = ROOT / "configs" / "imagenet256", ROOT / "configs" / "pixart"
PROMPTS = ["a red cube on a table", "two cats asleep", "a city at night", "an old map", "a glass of water",
           "a mountain lake", "a wooden boat", "a lamp"]
CSV_LOGGER = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}'
PRESETS = {"alpha512": ("PixArt-XL/2-512", 64, 120), "sigma256": ("PixArt-XL/2-256", 32, 300)}


def resolved(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        ard_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def test_every_pixart_preset_resolves_and_its_pair_agrees(capsys):
    assert sorted(p.name for p in PIXART.glob("*.yaml")) == sorted(f"{n}{s}.yaml" for n in PRESETS
                                                                    for s in ("", "_trajectories"))
    for name, (size, _, tokens) in PRESETS.items():
        traj = resolved(["predict", "-c", str(IMAGENET / "trajectories.yaml"), "-c",
                         str(PIXART / f"{name}_trajectories.yaml")], capsys)
        ard = resolved(["fit", "-c", str(IMAGENET / "ard.yaml"), "-c", str(PIXART / f"{name}.yaml")], capsys)
        t, a = traj["model"]["init_args"], ard["model"]["init_args"]
        assert t["teacher"] == a["teacher"] and t["teacher_size"] == a["teacher_size"] == size
        assert t["text_encoder"] == "t5" and t["text_max_tokens"] == tokens and t["numerics"] is a["numerics"] is None
        assert ard["data"]["init_args"]["path"] == traj["data"]["init_args"]["path"]
        assert a["history_blocks"] == 6 and a["num_steps"] == 4  # the ImageNet recipe's


def precompute_preset(trajectories: Path, teacher: Path, encoder: Path, store: Path, root: Path, *extra) -> None:
    """`ard predict` of a text preset (an overlay of the ImageNet-256 trajectories preset) on a tiny teacher and text
    encoder (`teacher` with no named size, `encoder` as text_encoder_path): 8 trajectories of PROMPTS (written to
    root/prompts.jsonl), in shards of 4, on the CPU in fp32."""
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    ard_main(["predict", "-c", str(IMAGENET / "trajectories.yaml"), "-c", str(trajectories),
              f"--model.init_args.teacher={teacher}", "--model.init_args.teacher_size=null",
              f"--model.init_args.text_encoder_path={encoder}",
              f"--model.init_args.prompts={prompts}", "--model.init_args.micro_batch_size=4",
              f"--data.init_args.path={store}", "--data.init_args.num_trajectories=8", "--data.init_args.shard_size=4",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32-true", f"--trainer.default_root_dir={root / 'pre'}", *extra])


def train_preset(ard: Path, teacher: Path, vae: Path, store: Path, run: Path) -> None:
    """`ard fit` of a text preset (an overlay of the ImageNet-256 ARD preset) on the tiny teacher and its store: two
    steps of batch 2 on the CPU in the preset's precision, then a validation whose sample grid (prompts 0 and 1) `vae`
    decodes, and the export of the student."""
    ard_main(["fit", "-c", str(IMAGENET / "ard.yaml"), "-c", str(ard),
              f"--model.init_args.teacher={teacher}", "--model.init_args.teacher_size=null",
              f"--model.init_args.samples.vae={vae}",
              "--model.init_args.samples.per_class=1", "--model.init_args.samples.classes=[0, 1]",
              f"--data.init_args.path={store}", "--data.init_args.batch_size=2", "--data.init_args.val_count=4",
              "--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=auto", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              f"--trainer.logger={CSV_LOGGER % run}", f"--trainer.default_root_dir={run}"])


@pytest.mark.slow  # (about 40 s: two presets, each precompute + two training steps at 32x32 and 64x64 latents)
@pytest.mark.parametrize("name", list(PRESETS))
def test_pixart_presets_precompute_and_train_two_steps(name, tmp_path):
    size, side, _ = PRESETS[name]
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    PixArt().build(size, num_layers=7, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                   caption_channels=16).save_pretrained(teacher / "transformer", safe_serialization=True)
    t5 = make_tiny_t5(tmp_path / "t5", PROMPTS)
    store = tmp_path / "store"
    precompute_preset(PIXART / f"{name}_trajectories.yaml", teacher, t5, store, tmp_path)
    m = fmt.read_manifest(store)
    assert m["state"]["shape"] == [4, side, side] and m["conditioning"]["encoder"]["name"] == "t5"
    assert m["teacher"]["family"] == "pixart" and m["num_classes"] == len(PROMPTS)
    run = tmp_path / "run"
    train_preset(PIXART / f"{name}.yaml", teacher, tiny_vae(tmp_path / "vae"), store, run)
    settings = json.loads((run / "student_ema" / "ard_student.json").read_text())
    assert settings["history_blocks"] == 6 and settings["num_steps"] == 4
    assert len(list((run / "samples").glob("step*.png"))) == 1  # the grid of prompts 0 and 1, decoded
