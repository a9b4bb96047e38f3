"""The SD3 presets (configs/sd3/*.yaml, overlays of the ImageNet-256 presets) on CPU with a tiny SD3 pipeline snapshot
of the same structure (tests/tiny_sd3.py: 24 -> 7 MMDiT blocks, width 1536 -> 16, 16 latent channels at the preset's
latent side, joint attention, pooled projections; tiny CLIP-L, CLIP-G and T5 with the real token counts, 77 + 256;
a tiny 16-channel VAE): each resolves, precompute writes a flow text store with pooled embeddings from the prompt file
with the preset's grid (at 1024 px a 4-step one: SHORT_GRID), shift, guidance and encoder, and ARD trains two steps on
it in the preset's bf16-mixed, with gradient checkpointing, velocity output and a VAE-decoded sample grid, and exports
its student."""
import json
from pathlib import Path

import pytest

from ard.store import format as fmt
from test_pixart_presets import PROMPTS, precompute_preset, resolved, train_preset
from tiny_sd3 import make_tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
IMAGENET, SD3 = ROOT / "configs" / "imagenet256", ROOT / "configs" / "sd3"
SNAPSHOT = "checkpoints/stable-diffusion-3-medium-diffusers"  # the presets' local diffusers snapshot
PRESETS = {"medium512": ("SD3-medium-512", 64), "medium1024": ("SD3-medium-1024", 128)}
# At 1024 px a tiny SD3's forward on the CPU is attention over 4096 + 333 tokens (seconds per call), so its store is
# made on a 4-step grid (the students' S = 4 boundaries) instead of the preset's 24 steps; the 512 px run keeps them
SHORT_GRID = {"medium1024": ["--model.init_args.num_steps=4", "--model.init_args.save_indices=null"]}


def test_every_sd3_preset_resolves_and_its_pair_agrees(capsys):
    assert sorted(p.name for p in SD3.glob("*.yaml")) == sorted(f"{n}{s}.yaml" for n in PRESETS
                                                                 for s in ("", "_trajectories"))
    for name, (size, _) in PRESETS.items():
        traj = resolved(["predict", "-c", str(IMAGENET / "trajectories.yaml"), "-c",
                         str(SD3 / f"{name}_trajectories.yaml")], capsys)
        ard = resolved(["fit", "-c", str(IMAGENET / "ard.yaml"), "-c", str(SD3 / f"{name}.yaml")], capsys)
        t, a = traj["model"]["init_args"], ard["model"]["init_args"]
        assert t["teacher"] == a["teacher"] == t["text_encoder_path"] == SNAPSHOT
        assert t["teacher_size"] == a["teacher_size"] == size and t["numerics"] is a["numerics"] is None
        assert (t["schedule"], t["shift"], t["guidance_scale"], t["cfg_channels"]) == ("flow", 3.0, 7.0, "all")
        assert (t["text_encoder"], t["text_max_tokens"]) == ("sd3", 256)
        assert a["output"] == "velocity" and a["gradient_checkpointing"] is True
        samples = a["samples"]
        assert (samples["vae"], samples["latent_scale"], samples["latent_shift"]) == (
            f"{SNAPSHOT}/vae", 1.5305, 0.0609)
        assert ard["data"]["init_args"]["path"] == traj["data"]["init_args"]["path"]
        assert a["history_blocks"] == 6 and a["num_steps"] == 4  # the ImageNet recipe's


@pytest.mark.slow  # (minutes on 2 busy CPU cores: precompute + two training steps at 64x64 (1.5-3 min) and 128x128
# latents (8 min, its attention over 4429 tokens a step dominating))
@pytest.mark.parametrize("name", list(PRESETS))
def test_sd3_presets_precompute_and_train_two_steps(name, tmp_path):
    side = PRESETS[name][1]
    snapshot = make_tiny_sd3(tmp_path / "snapshot", PROMPTS, channels=16, side=side, clip_tokens=77, vae=True,
                             num_layers=7)
    store = tmp_path / "store"
    precompute_preset(SD3 / f"{name}_trajectories.yaml", snapshot, snapshot, store, tmp_path, *SHORT_GRID.get(name, []))
    m = fmt.read_manifest(store)
    assert m["state"]["shape"] == [16, side, side] and m["teacher"]["family"] == "sd3"
    assert (m["solver"]["name"], m["solver"]["shift"], m["solver"]["guidance_scale"]) == ("flow_euler", 3.0, 7.0)
    cond = m["conditioning"]
    assert cond["encoder"]["name"] == "sd3" and cond["embeddings"]["shape"] == [(len(PROMPTS) + 1) * 333, 32]
    assert cond["pooled"]["shape"] == [len(PROMPTS) + 1, 24] and m["num_classes"] == len(PROMPTS)
    run = tmp_path / "run"
    train_preset(SD3 / f"{name}.yaml", snapshot, snapshot / "vae", store, run)
    settings = json.loads((run / "student_ema" / "ard_student.json").read_text())
    assert settings["history_blocks"] == 6 and settings["num_steps"] == 4 and settings["output"] == "velocity"
    assert len(list((run / "samples").glob("step*.png"))) == 1  # the grid of prompts 0 and 1, decoded
