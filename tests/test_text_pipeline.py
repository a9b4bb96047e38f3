"""A text teacher (a tiny PixArt, the hash encoder) through precompute and distillation: prompts encoded once into
the store, trajectories labelled by prompt index and reproducible from the stored condition, a version-2 manifest
that `ard-store verify` accepts, resuming without encoding again, one-line refusals of a missing or unneeded prompt
file; students distilled from the text store with teacher forcing and with the teacher's own targets on rollouts."""
import json
import runpy

import numpy as np
import pytest
import torch

from ard.backbones.pixart import PixArt
from ard.cli import main as ard_main
from ard.diffusion import ddim_sample, trajectory_inputs
from ard.store import format as fmt
from ard.store.cli import main as store_main
from ard.store.text import TextSidecar
from ard.evaluate import evaluate
from ard.evaluate import main as eval_main
from ard.student import ARDStudent
from tiny_clip import make_tiny_clip
from test_bad_inputs import ROOT, expect_one_line, fit_args, predict_args, teacher  # noqa: F401

CAPTIONS = ["a handwritten zero", "a handwritten one", "a thin seven", "a bold three", "two", "a tilted nine"]


@pytest.fixture(scope="module")
def pixart_teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = PixArt().build("tiny")
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("pixart") / "teacher"
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "captions.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(CAPTIONS)))
    return path


def text_predict_args(teacher, out, prompts, *extra, n=12):
    return [*predict_args(teacher, out, f"--model.init_args.prompts={prompts}", "--model.init_args.num_steps=4",
                          "--model.init_args.save_indices=null", "--model.init_args.clip_sample=false", n=n),
            "--data.init_args.shard_size=8", *extra]


def test_a_text_store_holds_prompt_indices_and_reproduces(tmp_path, capsys, pixart_teacher, prompt_file):
    out = tmp_path / "store"
    ard_main(text_predict_args(pixart_teacher, out, prompt_file))
    store_main(["verify", str(out)])
    assert "ok" in capsys.readouterr().out
    store = fmt.TrajectoryStore(out)
    m = store.manifest
    assert (m["version"], m["teacher"]["family"], m["num_classes"]) == (2, "pixart", len(CAPTIONS))
    cond = m["conditioning"]
    assert cond["kind"] == "text" and cond["prompts"]["count"] == len(CAPTIONS) and cond["encoder"]["name"] == "hash"
    noise, label = trajectory_inputs(m["seed"], [5], (1, 8, 8), len(CAPTIONS))
    assert int(store.labels[5]) == int(label[0]) and set(store.labels.tolist()) <= set(range(len(CAPTIONS)))
    teacher = PixArt().load(pixart_teacher)
    condition = TextSidecar(out, cond).condition(label)
    with torch.no_grad():
        again = ddim_sample(teacher, noise, condition, 4, 2.0, "leading").states[0]  # (G, C, H, W)
    stored = fmt.to_float32(store.read(np.array([5])), m["state"]["dtype"])[0]  # (G, C, H, W)
    torch.testing.assert_close(stored, again, rtol=1e-5, atol=1e-5)  # (batch composition: float rounding)
    encoded = (out / "conditioning" / "encoded.json").stat().st_mtime_ns
    ard_main(text_predict_args(pixart_teacher, out, prompt_file))  # complete: resumes nothing, encodes nothing
    assert (out / "conditioning" / "encoded.json").stat().st_mtime_ns == encoded


def test_prompts_are_needed_by_text_teachers_only(tmp_path, capsys, pixart_teacher, prompt_file, teacher):
    args = [a for a in text_predict_args(pixart_teacher, tmp_path / "a", prompt_file) if "prompts=" not in a]
    expect_one_line(capsys, lambda: ard_main(args), "a 'pixart' teacher is conditioned on text and needs a prompt",
                    [pixart_teacher])
    expect_one_line(capsys, lambda: ard_main(predict_args(teacher, tmp_path / "b",
                                                          f"--model.init_args.prompts={prompt_file}")),
                    "a 'dit' teacher is conditioned on class labels and takes no prompts", [teacher])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("recipe", [[], ["--model.init_args.recipe.inputs=rollout",
                                         "--model.init_args.recipe.targets=teacher_from_state"]],
                         ids=["teacher_forcing", "rollout_teacher_targets"])
def test_a_student_distils_from_a_text_store(tmp_path, capsys, pixart_teacher, prompt_file, recipe):
    store = tmp_path / "store"
    ard_main(text_predict_args(pixart_teacher, store, prompt_file, n=16))
    run = tmp_path / "run"
    ard_main(fit_args(run, pixart_teacher, store, "--model.init_args.clip_x0=false", *recipe))
    student = ARDStudent.from_pretrained(run / "student_ema")
    assert student.backbone.family == "pixart" and student.history_blocks == 1
    if recipe:
        return
    clip = make_tiny_clip(tmp_path / "clip", CAPTIONS)
    rows = evaluate(students={"ard": str(run / "student_ema")}, teacher=str(pixart_teacher), store=str(store),
                    undistilled_steps=[4], num_samples=8, batch_size=8, bootstrap=2, out=str(tmp_path / "eval"),
                    cache_dir=str(tmp_path / "cache"), grid_samples=2, wandb=False, clip=str(clip))
    assert all(0 <= r["clip_score"] <= 100 for r in rows)  # every row against its prompts (ard/metrics/clip.py)
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher (DDIM, w=2)", 4), ("teacher (DDIM, w=2)", 4),
                                                         ("ard", 4)]
    assert rows[1]["mse_vs_teacher"] < 1e-8  # the undistilled teacher on the full grid: the teacher itself
    assert "prompt_adherence" not in rows[0]  # these captions name no digits
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["conditioning"] == "text"
    assert report["settings"]["text_encoder_sec_per_prompt"] > 0 and all(r["decode_sec_per_image"] >= 0 for r in rows)
    assert "each prompt encoded once, into the store" in (tmp_path / "eval" / "report.md").read_text()
    script = runpy.run_path(str(ROOT / "scripts" / "sample_student.py"))["main"]
    script(["sample", "--student", str(run / "student_ema"), "--store", str(store), "--labels", "0", "5",
            "--per-label", "2", "--npz", "--out", str(tmp_path / "samples")])
    assert np.load(next((tmp_path / "samples").glob("samples_*.npz")))["arr_1"].tolist() == [0, 0, 5, 5]
    with pytest.raises(SystemExit):
        script(["sample", "--student", str(run / "student_ema"), "--labels", "0", "--out", str(tmp_path / "s2")])
    assert "is conditioned on text: pass --store" in capsys.readouterr().err


@pytest.mark.slow  # (about 25 s: every preset of the text-to-image default, end to end)
def test_the_caption_digits_presets_run_teacher_trajectories_and_students(tmp_path, monkeypatch):
    """configs/digits_t2i/ over the digits presets: two steps of the captioned PixArt teacher, exported as a diffusers
    PixArt; its trajectories on the caption file; two steps of the ARD student and of the baseline on them; the
    teacher's sample grid has one row per digit, as the DiT teacher's."""
    import wandb

    from ard.modules.teacher_training import TeacherTraining

    monkeypatch.setenv("WANDB_SILENT", "true")
    ard_main(["fit", "-c", str(ROOT / "configs/digits/teacher.yaml"), "-c", str(ROOT / "configs/digits_t2i/teacher.yaml"),
              f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0", "--trainer.max_steps=2",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    wandb.finish()
    teacher = PixArt().load(tmp_path / "teacher_ema")
    assert teacher.config.caption_channels == 32 and len(teacher.transformer_blocks) == 6
    store = tmp_path / "store"
    ard_main(["predict", "-c", str(ROOT / "configs/digits/trajectories.yaml"), "-c",
              str(ROOT / "configs/digits_t2i/trajectories.yaml"), f"--model.init_args.teacher={tmp_path / 'teacher_ema'}",
              f"--model.init_args.prompts={ROOT / 'configs/digits_t2i/captions.jsonl'}",
              f"--data.init_args.path={store}", "--data.init_args.num_trajectories=80", "--data.init_args.shard_size=40",
              f"--trainer.default_root_dir={tmp_path / 'precompute'}"])
    assert fmt.TrajectoryStore(store).manifest["num_classes"] == 40
    for preset in ([], ["-c", str(ROOT / "configs/digits_t2i/baseline.yaml")]):
        run = tmp_path / f"run{len(preset)}"
        ard_main(["fit", "-c", str(ROOT / "configs/digits/ard.yaml"), "-c", str(ROOT / "configs/digits_t2i/ard.yaml"),
                  *preset, f"--model.init_args.teacher={tmp_path / 'teacher_ema'}", f"--data.init_args.path={store}",
                  "--data.init_args.val_count=16", f"--trainer.default_root_dir={run}", "--trainer.max_steps=2",
                  "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
        assert ARDStudent.from_pretrained(run / "student_ema").history_blocks == (0 if preset else 1)
    students = {"baseline": str(tmp_path / "run2" / "student_ema"), "ard": str(tmp_path / "run0" / "student_ema")}
    eval_main(["--config", str(ROOT / "configs/digits_t2i/eval.yaml"), f"--students={json.dumps(students)}",
               f"--teacher={tmp_path / 'teacher_ema'}", f"--store={store}", "--num_samples=20", "--batch_size=20",
               "--bootstrap=2", f"--out={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}", "--grid_samples=2",
               "--wandb=false"])
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert [r["model"] for r in rows[2:]] == ["baseline", "ard"]
    assert all(0 <= r["prompt_adherence"] <= 1 for r in rows)  # the digit captions: the classifier checks the digit
    assert "prompt adherence" in (tmp_path / "eval" / "report.md").read_text()
    module = TeacherTraining(family="pixart", samples_per_class=2, sample_steps=2)
    grid = module.sample_grid()  # 10 rows (one per digit's first caption) of 2 samples: as the DiT teacher's grid
    assert grid.shape == TeacherTraining(samples_per_class=2, sample_steps=2).sample_grid().shape == (330, 66, 3)
    rows = module.condition(torch.tensor([7, 7]), drop=torch.tensor([False, True]), templates=torch.tensor([0, 0]))
    assert rows.mask.sum(1).tolist() == [4, 1]  # "a handwritten seven" + end token; dropped: the null prompt ""


def test_the_shipped_caption_teacher_draws_the_digit_its_caption_names():
    """ard/assets/digits_t2i_teacher (configs/digits_t2i/teacher.yaml; docs/results/teacher_t2i_agreement.json:
    98.3% of 1000 samples at guidance 2): a PixArt of the digits size whose samples of the presets' captions the
    digit classifier assigns to the captions' digits."""
    from ard.data.captions import TEMPLATES, CaptionConditions
    from ard.data.digits import to_uint8
    from ard.metrics.classifier import load_digit_classifier
    from ard.teacher import load_teacher
    from ard.text_encoders import load_text_encoder

    teacher = load_teacher(ROOT / "ard/assets/digits_t2i_teacher", families=("pixart",))
    assert teacher.config.caption_channels == 32 and len(teacher.transformer_blocks) == 6
    digits = torch.arange(40) % 10
    captions = CaptionConditions(load_text_encoder("hash", 32))(digits, torch.arange(40) // 10 % len(TEMPLATES))
    noise, _ = trajectory_inputs(7, range(40), (1, 8, 8), 10)
    with torch.no_grad():
        images = ddim_sample(teacher, noise, captions, 24, 2.0, save_indices=[24], clip_sample=True).states[:, -1]
        predicted = load_digit_classifier()[0](to_uint8(images)).argmax(dim=1)
    assert (predicted == digits).float().mean() >= 0.9


def test_the_clip_score_needs_a_text_store_and_a_clip_directory(tmp_path):
    with pytest.raises(ValueError, match="the CLIP score compares samples with their prompts: evaluate a text store"):
        evaluate(clip=str(make_tiny_clip(tmp_path / "clip", CAPTIONS)), num_samples=4, out=str(tmp_path / "o"),
                 cache_dir=str(tmp_path / "c"), wandb=False)
    from ard.metrics.clip import clip_score_metric

    with pytest.raises(FileNotFoundError, match="clip=.*nothing: not a directory"):
        clip_score_metric(tmp_path / "nothing")
