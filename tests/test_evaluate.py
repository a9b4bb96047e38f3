"""The evaluate command on a tiny run writes a report with every key, consistent with its own inputs."""
import json
import math

import torch

import numpy as np
import pytest
from diffusers import AutoencoderKL

from ard.data.digits import to_uint8
from ard.diffusion import ddim_grid, sample_at
from ard.schedules import VPSchedule
from ard.evaluate import REPORT_KEYS, evaluate, gflops_per_image, make_decoder, student_sampler, undistilled_timesteps
from ard.metrics import (DigitFeatures, compute_metrics, digits_images, extract, fid_from_features, load_npz_images,
                         reference_from_images)
from ard.student import ARDStudent
from ard.backbones.dit import build_dit


def tiny_teacher_and_student(tmp_path, perturb: bool = False):
    """A 2-block random digits teacher in <tmp>/teacher and a 2-step ARD student of it in <tmp>/student.
    perturb: non-trivial epsilons (adaLN-zero alone gives eps = 0 everywhere)."""
    torch.manual_seed(0)
    teacher = build_dit("digits", num_layers=2).eval()
    for p in teacher.parameters() if perturb else ():
        p.data.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "teacher")
    student_dir = tmp_path / "student"
    ARDStudent(teacher, num_steps=2, history_blocks=1).save_pretrained(student_dir)
    (student_dir / "ard_sampling.json").write_text(json.dumps({"timesteps": [943, 451, -1]}))
    return teacher, student_dir


def test_evaluate_tiny_run_writes_full_report(tmp_path):
    teacher, student_dir = tiny_teacher_and_student(tmp_path)

    rows = evaluate(students={"ard": str(student_dir)}, teacher=str(tmp_path / "teacher"), teacher_steps=4,
                    undistilled_steps=[2], num_samples=40, bootstrap=3, batch_size=20, out=str(tmp_path / "out"),
                    cache_dir=str(tmp_path / "cache"), grid_samples=4, wandb=False, export_npz=True)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher (DDIM, w=2)"] * 2 + ["ard"]
    assert report["settings"]["conditioning"] == "class"
    for row in report["rows"]:
        assert set(REPORT_KEYS) <= set(row)
        assert row["num_samples"] == 40
    teacher_row, two_step, student = rows
    assert teacher_row["mse_vs_teacher"] == 0 and abs(teacher_row["fid_vs_teacher"]) < 1e-3
    assert two_step["mse_vs_teacher"] > 0 and two_step["nfe"] == 4 and teacher_row["nfe"] == 8
    assert student["steps"] == 2 and student["nfe"] == 2
    assert math.isfinite(student["mse_vs_teacher"]) and student["mse_vs_teacher"] > 0
    assert 0 < student["gflops_per_image"] < two_step["gflops_per_image"]  # 2 passes against 2 x 2 (CFG)
    table = (tmp_path / "out" / "report.md").read_text()
    assert table.count("\n| ") == 3
    from PIL import Image

    with Image.open(tmp_path / "out" / "samples.png") as picture:  # 3 rows of 4 upscaled 8x8 samples + labels
        grid = np.asarray(picture)
    assert grid.shape[0] == 3 * 33 and grid.shape[1] > 4 * 33  # the left margin holds the row names
    assert (grid[:, : grid.shape[1] - 4 * 33] < 128).any()  # some label text is drawn there
    cache = next((tmp_path / "cache").glob("eval_set-*"))  # the teacher's samples are cached, memory-mappable
    cached, labels, noise = (np.load(cache / f"{k}.npy", allow_pickle=False) for k in ("teacher", "labels", "noise"))
    # ADM batches of exactly the evaluated samples: the teacher's are its cached samples, with their labels
    exported = sorted(p.name for p in (tmp_path / "out" / "npz").iterdir())
    assert exported == ["ard-2steps.npz", "teacher_DDIM_w_2-2steps.npz", "teacher_DDIM_w_2-4steps.npz"]
    npz = {name: load_npz_images(tmp_path / "out" / "npz" / name)[:, :1] for name in exported}
    assert torch.equal(npz["teacher_DDIM_w_2-4steps.npz"], to_uint8(torch.from_numpy(cached)))
    with np.load(tmp_path / "out" / "npz" / "teacher_DDIM_w_2-4steps.npz", allow_pickle=False) as z:
        assert np.array_equal(z["arr_1"], labels)

    # The undistilled 2-step teacher samples at exactly the 2-step student's boundaries (943, 451), not at the
    # 2-step DDIM grid (500, 0): its samples are the teacher's DDIM jumps over those timesteps.
    assert two_step["timesteps"] == student["timesteps"] == [943, 451, -1]
    assert teacher_row["timesteps"] == ddim_grid(4)
    expected = sample_at(teacher, VPSchedule(), torch.from_numpy(noise), torch.from_numpy(labels), [943, 451, -1], 2.0, True)
    assert torch.equal(npz["teacher_DDIM_w_2-2steps.npz"], to_uint8(expected))
    assert "samples at the students' boundary timesteps 943, 451" in table

    # Streaming (features once per row, batch by batch) gives what the whole-set metric functions give.
    extractor = DigitFeatures()
    real = reference_from_images(digits_images("all"), extractor)
    teacher_features, _ = extract(npz["teacher_DDIM_w_2-4steps.npz"], extractor)
    for row, name in zip(rows, ["teacher_DDIM_w_2-4steps.npz", "teacher_DDIM_w_2-2steps.npz", "ard-2steps.npz"]):
        whole = compute_metrics(npz[name], real, extractor, bootstrap=3)
        for key in ("fid", "fid_sd", "is", "precision", "recall"):
            assert row[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-6), (name, key)
        features, _ = extract(npz[name], extractor)
        assert row["fid_vs_teacher"] == pytest.approx(fid_from_features(features, teacher_features), rel=1e-6, abs=1e-6)

    # The FID-vs-teacher floor: the teacher's N samples against N more from independent noises, N vs N.
    floor = np.load(cache / "floor_teacher.npy", allow_pickle=False)
    assert floor.shape == cached.shape and not np.allclose(floor, cached)
    floor_features, _ = extract(to_uint8(torch.from_numpy(floor)), extractor)
    assert report["noise_floor"]["teacher"] == pytest.approx(fid_from_features(floor_features, teacher_features),
                                                             rel=1e-6)
    assert "N vs N" in report["noise_floor_method"]["teacher"]


def test_undistilled_timesteps_are_the_students_boundaries():
    solver = dict(num_steps=24, timestep_spacing="leading")
    assert undistilled_timesteps(2, {}, solver) == [943, 451, -1]  # grid indices 0, 12, 24 of K = 24
    assert undistilled_timesteps(4, {}, solver) == [943, 697, 451, 205, -1]
    assert undistilled_timesteps(2, {"a": [900, 400, -1], "b": [943, 697, 451, 205, -1]}, solver) == [900, 400, -1]
    with pytest.raises(ValueError, match="different boundary timesteps"):
        undistilled_timesteps(2, {"a": [900, 400, -1], "b": [943, 451, -1]}, solver)
    with pytest.raises(ValueError, match="undistilled_steps 5: student_steps=5 must divide the teacher's K=24"):
        undistilled_timesteps(5, {}, solver)


def tiny_vae(path):
    """A 2-level AutoencoderKL (4-channel latents at half the resolution), saved like a diffusers VAE."""
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(path)
    return path


def test_latent_samples_are_decoded_by_the_vae(tmp_path):
    decode = make_decoder(str(tiny_vae(tmp_path / "vae")), latent_scale=0.5, batch_size=3,
                          device=torch.device("cpu"))
    latents = torch.randn(5, 4, 4, 4)  # (n, C, h, w)
    images = decode(latents)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 8, 8)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        expected = vae.decode(latents / 0.5).sample.clamp(-1, 1)  # DiT: vae.decode(x / scale)
    assert torch.equal(images, to_uint8(expected))


def test_latent_teacher_without_vae_is_a_one_line_error(tmp_path):
    build_dit("digits", num_layers=1, in_channels=4, out_channels=4).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="4-channel latents: pass vae"):
        evaluate(teacher=str(tmp_path / "teacher"), num_samples=4, out=str(tmp_path / "out"), wandb=False,
                 cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "out").exists()


def test_flops_count_the_history_attention(tmp_path):
    """ARD's extra cost is attention only: N L^2 D S(S-1) multiply-adds per sample with the KV cache
    (step s attends to s earlier steps' L keys, QK^T and AV). The fused CPU SDPA kernel counts 0 FLOPs,
    so this fails unless attention is counted."""
    torch.manual_seed(0)
    teacher = build_dit("digits", num_layers=3).eval()
    steps, history_blocks = 3, 2
    flops = {}
    for n in (0, history_blocks):
        directory = tmp_path / f"N{n}"
        ARDStudent(teacher, num_steps=steps, history_blocks=n).save_pretrained(directory)
        (directory / "ard_sampling.json").write_text(json.dumps({"timesteps": [943, 631, 311, -1]}))
        sampler, _ = student_sampler(str(directory))
        flops[n] = gflops_per_image(sampler, torch.randn(1, 1, 8, 8), torch.tensor([3])) * 1e9
    config = teacher.config
    tokens = (config.sample_size // config.patch_size) ** 2  # L
    width = config.num_attention_heads * config.attention_head_dim  # D
    assert flops[history_blocks] - flops[0] == 2 * history_blocks * tokens ** 2 * width * steps * (steps - 1)


def store_manifest(path, teacher_model, **solver):
    """A store's manifest (no shards needed: the evaluation reads only the teacher and solver fields)."""
    from ard.diffusion import solver_identity
    from ard.schedules import VPSchedule
    from ard.store import format as fmt
    from ard.teacher import teacher_identity

    settings = dict(num_steps=4, timestep_spacing="leading", guidance_scale=1.5, clip_sample=True,
                    cfg_channels="all", precision="fp32") | solver
    manifest = fmt.new_manifest(teacher={"path": "made-elsewhere", **teacher_identity(teacher_model)},
                                solver=solver_identity(**settings), grid_indices=[0, 2, 4],
                                grid_timesteps=[750, 250, -1], state_shape=(1, 8, 8), dtype="float32", with_x0=False,
                                num_classes=10, num_trajectories=8, shard_size=8, seed=0, micro_batch_size=8)
    fmt.create_store(path, manifest)
    return path


def test_evaluation_takes_the_stores_teacher_settings_and_refuses_others(tmp_path, capsys):
    from ard.evaluate import main

    torch.manual_seed(0)
    teacher = build_dit("digits", num_layers=1).eval()
    teacher.save_pretrained(tmp_path / "snapshot" / "transformer")  # a pipeline snapshot (it used to fail here)
    store = store_manifest(tmp_path / "store", teacher)
    common = dict(teacher=str(tmp_path / "snapshot"), store=str(store), num_samples=8, bootstrap=2, batch_size=8,
                  cache_dir=str(tmp_path / "cache"), grid_samples=2, wandb=False)
    evaluate(out=str(tmp_path / "out"), **common)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["solver"]["guidance_scale"] == 1.5 and report["settings"]["teacher_steps"] == 4
    assert report["rows"][0]["model"] == "teacher (DDIM, w=1.5)"
    # the same teacher through its transformer/ subfolder is the same evaluation set (one cache entry)
    evaluate(out=str(tmp_path / "out2"), **{**common, "teacher": str(tmp_path / "snapshot" / "transformer")})
    assert len(list((tmp_path / "cache").glob("eval_set-*"))) == 1

    heads = build_dit("digits", num_layers=1, num_attention_heads=8, attention_head_dim=16)
    heads.load_state_dict(teacher.state_dict())  # the same weights, another config
    heads.save_pretrained(tmp_path / "heads")
    for args, needle in (
            (["--guidance_scale", "2.0"], "field 'solver.guidance_scale' is 1.5, the evaluation has 2.0"),
            (["--cfg_channels", "dit"], "field 'solver.cfg_channels' is 'all', the evaluation has 'dit'"),
            (["--teacher", str(tmp_path / "heads")], "field 'teacher.config_sha256' is")):
        with pytest.raises(SystemExit) as e:
            main(["--teacher", common["teacher"], "--store", str(store), "--num_samples", "8", "--wandb", "false",
                  "--out", str(tmp_path / "refused"), "--cache_dir", str(tmp_path / "cache"), *args])
        assert str(e.value).startswith(f"ard-eval: error: {store / 'manifest.json'}: ") and needle in str(e.value)
        assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()
    evaluate(out=str(tmp_path / "out3"), **{**common, "guidance_scale": 2.0, "allow_store_mismatch": True})
    assert json.loads((tmp_path / "out3" / "report.json").read_text())["settings"]["guidance_scale"] == 2.0


def test_noise_correction_rows(tmp_path):
    """noise_correction samples the students and the undistilled teacher with the corrected first step (and says
    so per row); the K-step teacher row, the reference, is the same with and without it."""
    _, student_dir = tiny_teacher_and_student(tmp_path, perturb=True)  # eps = 0 would leave nothing to correct
    common = dict(students={"ard": str(student_dir)}, teacher=str(tmp_path / "teacher"), teacher_steps=4,
                  undistilled_steps=[2], num_samples=20, bootstrap=2, batch_size=20, cache_dir=str(tmp_path / "cache"),
                  grid_samples=2, wandb=False)
    plain = evaluate(out=str(tmp_path / "plain"), **common)
    corrected = evaluate(out=str(tmp_path / "nc"), noise_correction=True, **common)
    assert [r["noise_correction"] for r in corrected] == [False, True, True]
    assert not any(r["noise_correction"] for r in plain)
    assert corrected[0]["fid"] == plain[0]["fid"]
    for a, b in zip(plain[1:], corrected[1:]):
        assert a["mse_vs_teacher"] != b["mse_vs_teacher"]


def test_undistilled_noise_correction_replaces_the_first_direction_only():
    from ard.diffusion import guided_prediction, teacher_path
    from ard.schedules import VPSchedule, alpha_bar, make_scheduler

    torch.manual_seed(0)
    teacher = build_dit("digits", num_layers=2).eval()
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        path = torch.tensor([943, 451]).expand(3, -1)
        plain = teacher_path(teacher, VPSchedule(), noise, labels, path, 2.0)
        corrected = teacher_path(teacher, VPSchedule(), noise, labels, path, 2.0, noise_correction=True)
        eps = guided_prediction(teacher, noise, path[:, 0], labels, 2.0)
    b = alpha_bar(make_scheduler(), torch.tensor([451])).float()
    torch.testing.assert_close(corrected - plain, (1 - b).sqrt() * (noise - eps), atol=1e-5, rtol=1e-5)


def test_metrics_table_renders_registry_and_custom_columns():
    from dataclasses import replace

    from ard.metrics.table import COLUMNS, metrics_table

    row = {"model": "ard", "steps": 2, "nfe": 2, "fid": 36.624, "fid_sd": 6.891, "mse_vs_teacher": 0.05712,
           "mse_vs_teacher_se": 0.00123, "sec_per_image": 0.000123, "seeds": 3, "fid_spread": 1.5,
           "fid_bootstrap_sd": 6.0}
    assert metrics_table([row], ["model", "steps", "nfe", "fid", "mse_vs_teacher", "sec_per_image"]) == (
        "| model | steps | NFE | FID vs real | same-noise MSE | s / image |\n|---|---|---|---|---|---|\n"
        "| ard | 2 | 2 | 36.62 ± 6.89 | 0.0571 ± 0.0012 | 1.23e-04 |")
    spread = replace(COLUMNS["fid"], pm="fid_spread", bracket="fid_bootstrap_sd")  # mean ± seed sd [bootstrap sd]
    no_pm = replace(COLUMNS["mse_vs_teacher"], pm=None)
    assert metrics_table([row, {"model": "x", "fid": 1.0, "fid_spread": None}], ["seeds", spread, no_pm]) == (
        "| seeds | FID vs real | same-noise MSE |\n|---|---|---|\n"
        "| 3 | 36.62 ± 1.50 [6.00] | 0.0571 |\n| - | 1.00 | - |")


@pytest.mark.parametrize("vae", [None, "pretrained/vae"])
def test_report_shows_the_vaes_decoding_time_apart_for_latent_rows(vae):
    from ard.evaluate import report_markdown

    row = {"model": "teacher", "steps": 2, "num_samples": 4, "timesteps": [999, -1], "sec_per_image": 0.25,
           "decode_sec_per_image": 0.125}
    table = report_markdown([row], {"teacher": 1.0, "real": 2.0}, {"vae": vae})
    assert ("VAE s / image" in table and "1.25e-01" in table) == (vae is not None) and "2.50e-01" in table
