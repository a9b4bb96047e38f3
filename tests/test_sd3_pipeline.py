"""SD3 end to end on a tiny SD3 pipeline snapshot (tests/tiny_sd3.py: a tiny SD3 transformer, tiny CLIP-L, CLIP-G
and T5 with their tokenizers): the SD3 text encoder gives what diffusers' StableDiffusion3Pipeline.encode_prompt
gives; flow precompute writes a text store whose conditioning sidecar holds every prompt's pooled embedding (checked
on open and by `ard-store verify`) and whose trajectories the teacher reproduces from the stored condition; ARD
distils a velocity student from it, the GAN stage trains on it, and evaluation compares the student with the teacher;
one-line refusals: SD3 without a prompt file, with an encoder that gives no pooled embeddings or on another schedule
than flow, a missing or damaged pooled sidecar, a store without pooled embeddings. SD3's VAE shift in decoding."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from ard.cli import main as ard_main
from ard.diffusion import flow_sample, trajectory_inputs
from ard.evaluate import evaluate
from ard.evaluate import main as eval_main
from ard.latents import decode_latents
from ard.store import format as fmt
from ard.store.cli import main as store_main
from ard.store.text import TextSidecar
from ard.student import ARDStudent
from ard.teacher import load_teacher
from ard.text_encoders import load_text_encoder
from test_bad_inputs import ROOT, copy, expect_one_line, fit_args, version_2
from test_text_pipeline import CAPTIONS, prompt_file, text_predict_args  # noqa: F401
from tiny_sd3 import make_tiny_sd3

T5_TOKENS = 8  # the tiny snapshot's CLIPs read 8 tokens (SD3's: 77) and its T5 8 (SD3's pipeline: 256)
SD3_STORE = ["--model.init_args.schedule=flow", "--model.init_args.shift=3.0", "--model.init_args.guidance_scale=7.0",
             "--model.init_args.text_encoder=sd3", f"--model.init_args.text_max_tokens={T5_TOKENS}"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("sd3") / "snapshot", CAPTIONS)


def sd3_predict_args(snapshot, out, prompts, *extra, n=16):
    """Flow precompute (K = 4, every state saved, CFG 7, shift 3) of the snapshot's teacher with its SD3 encoder."""
    return text_predict_args(snapshot, out, prompts, *SD3_STORE, f"--model.init_args.text_encoder_path={snapshot}",
                             *extra, n=n)


@pytest.fixture(scope="module")
def store(tmp_path_factory, snapshot, prompt_file):
    path = tmp_path_factory.mktemp("store") / "store"
    ard_main(sd3_predict_args(snapshot, path, prompt_file))
    return path


def test_the_sd3_encoder_gives_what_the_pipelines_encode_prompt_gives(tmp_path, snapshot):
    """Prompts and the null prompt "" through ard's encoder and through StableDiffusion3Pipeline.encode_prompt (its
    negative prompt ""): the same tokens (CLIP-L + CLIP-G penultimate states padded to T5's width, then T5's) and
    pooled embeddings; a snapshot or three directories, the same encoder; what it cannot encode, refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    encoder = load_text_encoder("sd3", 32, str(snapshot), max_tokens=T5_TOKENS, pooled_dim=24)
    assert (encoder.max_tokens, encoder.dim, encoder.pooled_dim, encoder.masked) == (8 + T5_TOKENS, 32, 24, False)
    assert encoder.count_tokens("a thin seven") == 8 + 4  # the CLIPs' 8, then T5's words and end token
    got = encoder.encode(CAPTIONS[:3] + [""])
    assert got.embeddings.shape == (4, 8 + T5_TOKENS, 32) and got.pooled.shape == (4, 24) and bool(got.mask.all())
    clips = {f"text_encoder{s}": CLIPTextModelWithProjection.from_pretrained(snapshot / f"text_encoder{s}")
             for s in ("", "_2")}
    tokenizers = {f"tokenizer{s}": AutoTokenizer.from_pretrained(snapshot / f"tokenizer{s}") for s in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder_3=T5EncoderModel.from_pretrained(snapshot / "text_encoder_3"),
                                    **clips, **tokenizers)
    with torch.no_grad():
        tokens, null, pooled, null_pooled = pipe.encode_prompt(CAPTIONS[:3], None, None, device=torch.device("cpu"),
                                                               negative_prompt="", max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(got.embeddings, torch.cat([tokens, null[:1]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, torch.cat([pooled, null_pooled[:1]]), rtol=1e-5, atol=1e-5)
    parts = []
    for model, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                             ("text_encoder_3", "tokenizer_3")):  # three directories, each model + tokenizer
        parts.append(shutil.copytree(snapshot / model, tmp_path / model))
        shutil.copytree(snapshot / tokenizer, tmp_path / model, dirs_exist_ok=True)
    three = load_text_encoder("sd3", 32, [str(p) for p in parts], max_tokens=T5_TOKENS, pooled_dim=24)
    assert three.identity() == encoder.identity()
    torch.testing.assert_close(three.encode(CAPTIONS[:3] + [""]).pooled, got.pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"a prompt of {T5_TOKENS + 1} tokens; the t5 encoder takes at most 8"):
        encoder.encode(["a " * T5_TOKENS])
    for call, needle in [
        (lambda: load_text_encoder("sd3", 16, str(snapshot), T5_TOKENS, 24), "32-wide text tokens; the teacher reads "
                                                                             "16-wide ones"),
        (lambda: load_text_encoder("sd3", 32, str(snapshot), T5_TOKENS, 12), "24-wide pooled embeddings (CLIP-L + "
                                                                             "CLIP-G projections); the teacher reads "
                                                                             "12-wide ones"),
        (lambda: load_text_encoder("sd3", 32, None, T5_TOKENS, 24), "text_encoder='sd3' needs text_encoder_path"),
        (lambda: load_text_encoder("sd3", 32, str(snapshot), T5_TOKENS), "this teacher reads none"),
        (lambda: load_text_encoder("sd3", 32, [str(p) for p in parts[:2]], T5_TOKENS, 24), "2 directories"),
        (lambda: load_text_encoder("t5", 32, [str(p) for p in parts], T5_TOKENS), "'t5' takes one directory"),
    ]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            call()
    with pytest.raises(FileNotFoundError, match="tokenizer: not found; text_encoder='sd3' takes an SD3 pipeline"):
        load_text_encoder("sd3", 32, str(tmp_path), T5_TOKENS, 24)  # (it holds the three models, not the tokenizers)


def test_an_sd3_store_holds_pooled_embeddings_and_reproduces(capsys, snapshot, store):
    store_main(["verify", str(store)])
    assert "ok" in capsys.readouterr().out
    m = fmt.read_manifest(store)
    cond = m["conditioning"]
    assert (m["teacher"]["family"], m["solver"]["name"], m["solver"]["shift"], m["solver"]["guidance_scale"]) == (
        "sd3", "flow_euler", 3.0, 7.0)
    assert (cond["encoder"]["name"], cond["encoder"]["masked"], cond["encoder"]["dim"]) == ("sd3", False, 32)
    assert cond["pooled"]["file"] == "conditioning/pooled.npy" and cond["pooled"]["shape"] == [len(CAPTIONS) + 1, 24]
    assert np.load(store / "conditioning" / "lengths.npy").tolist() == [8 + T5_TOKENS] * (len(CAPTIONS) + 1)
    encoded = load_text_encoder("sd3", 32, str(snapshot), T5_TOKENS, 24).encode(CAPTIONS + [""])
    sidecar = TextSidecar(store, cond)
    read = sidecar.condition(torch.arange(len(CAPTIONS) + 1))  # every prompt and the null prompt
    torch.testing.assert_close(read.pooled, encoded.pooled, rtol=1e-3, atol=1e-3)  # (stored in float16)
    torch.testing.assert_close(read.embeddings, encoded.embeddings, rtol=1e-3, atol=1e-3)
    assert torch.equal(read.null.pooled, read.pooled[-1:])  # CFG's null prompt: the last row
    noise, label = trajectory_inputs(m["seed"], [5], (1, 8, 8), len(CAPTIONS))
    teacher = load_teacher(snapshot, families=("sd3",))
    with torch.no_grad():
        again = flow_sample(teacher, noise, sidecar.condition(label), 4, 7.0, 3.0).states[0]  # (G, C, H, W)
    stored = fmt.to_float32(fmt.TrajectoryStore(store).read(np.array([5])), m["state"]["dtype"])[0]  # (G, C, H, W)
    torch.testing.assert_close(stored, again, rtol=1e-5, atol=1e-5)  # (batch composition: float rounding)


def test_a_velocity_student_distils_from_an_sd3_store_and_is_evaluated(tmp_path, snapshot, store):
    run = tmp_path / "run"
    ard_main(fit_args(run, snapshot, store, "--model.init_args.output=velocity",
                      '--model.init_args.recipe={"inputs": "rollout"}'))
    student = ARDStudent.from_pretrained(run / "student_ema")
    assert student.backbone.family == "sd3" and student.output == "velocity" and student.history_blocks == 1
    assert student.schedule.settings() == {"kind": "flow", "shift": 3.0}
    rows = evaluate(students={"ard": str(run / "student_ema")}, teacher=str(snapshot), store=str(store),
                    undistilled_steps=[4], num_samples=8, batch_size=8, bootstrap=2, out=str(tmp_path / "eval"),
                    cache_dir=str(tmp_path / "cache"), grid_samples=2, wandb=False)
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher (Euler, w=7)", 4)] * 2 + [("ard", 4)]
    assert rows[1]["mse_vs_teacher"] < 1e-8  # the undistilled teacher on the full grid: the teacher itself
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["settings"]["conditioning"] == "text"


def test_the_gan_stage_trains_on_an_sd3_store(tmp_path, snapshot, store):
    """Real samples labelled with the store's prompt indices (here its own final states) meet the discriminator on
    the frozen SD3 teacher conditioned on their prompts' stored encodings, adversarial from the first iteration."""
    data = fmt.TrajectoryStore(store)
    real = tmp_path / "real"
    real.mkdir()
    final = fmt.to_float32(data.read(np.arange(16), [len(data.grid_indices) - 1]), data.dtype)[:, 0]  # (N, C, H, W)
    np.save(real / "latents.npy", final.numpy())
    np.save(real / "labels.npy", np.asarray(data.labels[:16], dtype=np.int64))  # (N,) their prompts
    args = fit_args(tmp_path / "run", snapshot, store, "--model.init_args.output=velocity",
                    "--model.init_args.init_student=null", "--model.init_args.gan.warmup=0",
                    f"--model.init_args.gan.real={real}", f"--model.init_args.gan.holdout={real}",
                    "--trainer.log_every_n_steps=1")
    ard_main(args[:3] + ["-c", str(ROOT / "configs/digits/ard_gan.yaml")] + args[3:])
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text()
    assert all(name in metrics for name in ("gan/g_loss", "gan/d_loss", "gan/logits_holdout"))
    assert ARDStudent.from_pretrained(tmp_path / "run" / "student_ema").backbone.family == "sd3"


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.text_encoder=hash"], "text_encoder='hash' gives no pooled text embeddings; the teacher reads "
                                              "24-wide ones (pooled_projection_dim): text_encoder='sd3'"),
    (["--model.init_args.text_encoder=t5"], "text_encoder='t5' gives no pooled text embeddings"),
    (["--model.init_args.prompts=null"], "a 'sd3' teacher is conditioned on text and needs a prompt file"),
    (["--model.init_args.schedule=vp"], "model.schedule='vp': a 'sd3' teacher is sampled on the 'flow' schedule only"),
])
def test_what_an_sd3_store_cannot_be_made_with_is_refused_in_one_line(tmp_path, capsys, snapshot, prompt_file, extra,
                                                                      needle):
    out = tmp_path / "store"
    expect_one_line(capsys, lambda: ard_main(sd3_predict_args(snapshot, out, prompt_file, *extra)), needle, [snapshot])
    assert not out.exists()


def sd3_eval_args(tmp_path, snapshot, store):
    return ["--teacher", str(snapshot), "--store", str(store), "--num_samples", "8", "--batch_size", "8",
            "--bootstrap", "2", "--grid_samples", "2", "--wandb", "false", "--out", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache")]


def without_pooled(manifest):
    del manifest["conditioning"]["pooled"]


@pytest.mark.parametrize("damage, needle", [
    (lambda out: (out / "conditioning" / "pooled.npy").unlink(),
     "conditioning/pooled.npy: missing (the manifest's conditioning.pooled.file)"),
    (lambda out: version_2(out, without_pooled),
     "field 'conditioning.pooled' missing: the teacher reads 24-wide pooled text embeddings (SD3)"),
], ids=["pooled_file_missing", "no_pooled_in_the_manifest"])
def test_an_sd3_store_without_its_pooled_embeddings_is_refused_in_one_line(tmp_path, capsys, snapshot, store, damage,
                                                                           needle):
    out = copy(store, tmp_path / "store")
    damage(out)
    expect_one_line(capsys, lambda: ard_main(fit_args(tmp_path / "run", snapshot, out,
                                                      "--model.init_args.output=velocity")), needle, [out])
    expect_one_line(capsys, lambda: eval_main(sd3_eval_args(tmp_path, snapshot, out)), needle, [out])


def test_verify_checks_the_pooled_sidecar(tmp_path, capsys, store):
    out = copy(store, tmp_path / "store")
    pooled = np.load(out / "conditioning" / "pooled.npy")
    np.save(out / "conditioning" / "pooled.npy", pooled[::-1])  # the same size, other rows
    with pytest.raises(SystemExit):
        store_main(["verify", str(out)])
    assert "sha256 does not match manifest.json field 'conditioning.pooled.sha256'" in capsys.readouterr().err


def test_decoding_shifts_sd3_latents():
    """SD3's latents are scale * (z - shift) (its VAE's scaling_factor and shift_factor): decoding hands the VAE
    latents / scale + shift, as StableDiffusion3Pipeline does."""
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def decode(self, z):
            self.seen = z
            return type("Out", (), {"sample": torch.zeros(len(z), 3, 8, 8)})

    vae, latents = Recorder(), torch.randn(2, 16, 1, 1)
    decode_latents(vae, latents, 1.5305, shift=0.0609)
    torch.testing.assert_close(vae.seen, latents / 1.5305 + 0.0609)
