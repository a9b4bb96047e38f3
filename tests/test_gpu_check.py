"""scripts/gpu_check.py: without CUDA it refuses in one line and writes nothing; --smoke runs every section of it
on a tiny DiT of DiT-XL/2's structure on CPU, so the GPU run does not fail on the code itself, and the CPU-checkable
figures hold: the KV cache reproduces the one-pass forward, bf16 attention is close to fp32 but not equal."""
import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    return SimpleNamespace(**runpy.run_path(str(ROOT / "scripts/gpu_check.py")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_and_writes_nothing(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "no CUDA device" in captured.err and captured.out == ""
    assert not out.exists()


@pytest.mark.slow  # (about 10 s; the script matters where a GPU is lent, and its argument checks stay in the suite)
def test_smoke_runs_every_section(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert all(name in report for name in gpu_check.SECTIONS) and report["smoke"] is True
    att = report["attention"]
    assert att["cached_steps_plain_fp32_sdpa"]["max_abs_error"] < 1e-5  # the cache path equals the one pass
    for path, err in att["sdpa_bf16"].items():
        assert 0 < err["relative_to_max_output"] < 0.05, path  # bf16 rounding: visible, small
    for run in ("plain_fp32", "closed_fp32"):
        cache = report["cache_vs_one_pass"][run]
        assert max(cache["max_abs_error_per_step"]) < 1e-5 * cache["state_abs_max"], run
    flops = report["flops"]
    assert flops["ard_gflops_sdpa"] > flops["baseline_gflops_sdpa"] > 0
    for key in ("ard", "baseline", "ard_checkpointing", "baseline_checkpointing"):
        assert report["training"][key]["step_s"] > 0, key
    assert report["sampling"]["speedup"] > 1  # 4 student steps against 25 guided teacher steps (2 forwards each)
