"""`ard-store verify|info`, `ard predict` on the digits and ImageNet-256 presets, and (slow) DDP and SIGKILL runs."""
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ard.store import format as fmt
from ard.store.cli import main as store_main
from test_store import SAVE, shard_files, store, teacher, tiny_teacher  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def run_store_cli(args, capsys) -> tuple[int, str, str]:
    try:
        store_main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_describes_the_manifest(store, capsys):
    code, out, _ = run_store_cli(["info", str(store)], capsys)
    assert code == 0
    assert "complete: 40 of 40 trajectories in 3 of 3 shards" in out
    assert "K = 24 steps, leading spacing, guidance scale 2.0, clip_sample on" in out
    assert "timesteps [943, 697, 451, 205, 'clean']" in out
    assert "students with S = 1, 2, 4 steps" in out
    assert "float32 (1, 8, 8)" in out


def test_verify_passes_a_sound_store_and_names_each_bad_shard(tmp_path, store, capsys):
    assert run_store_cli(["verify", str(store)], capsys)[0] == 0
    out = tmp_path / "s"
    shutil.copytree(store, out)
    corrupt = out / "shards/shard-000001/states.npy"
    data = bytearray(corrupt.read_bytes())
    data[-7] ^= 0xFF  # one flipped byte
    corrupt.write_bytes(bytes(data))
    nan = out / "shards/shard-000002/states.npy"  # NaN with checksums made consistent: only the values are bad
    states = np.load(nan, mmap_mode="r+")
    states[5, 1, 0, 3, 3] = np.nan
    states.flush()
    side = json.loads((nan.parent / "shard.json").read_text())
    side["files"]["states.npy"]["sha256"] = fmt.sha256_file(nan)
    (nan.parent / "shard.json").write_text(json.dumps(side))
    fmt.consolidate(out)
    code, _, err = run_store_cli(["verify", str(out)], capsys)
    bad = [line for line in err.splitlines() if line.startswith("ard-store: bad:")]
    assert code == 1 and len(bad) == 2, err
    assert "shard-000001/states.npy: sha256 does not match shard.json (corrupt)" in bad[0]
    assert "shard-000002: states of trajectory 37 holds NaN or inf" in bad[1]


def test_verify_flags_missing_and_unconsolidated_shards(tmp_path, store, capsys):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False  # as after a kill before the end
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_store_cli(["verify", str(out)], capsys)
    assert code == 1 and "field 'shards' lists 2 of 3 shards though all are on disk" in err
    shutil.rmtree(out / "shards/shard-000000")
    code, _, err = run_store_cli(["verify", str(out)], capsys)
    assert code == 1 and "shard-000000: shard missing (store incomplete" in err
    code, _, err = run_store_cli(["info", str(out)], capsys)
    assert code == 0
    code, _, err = run_store_cli(["verify", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a directory" in err


def ard(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ard_predict_on_the_digits_preset(tmp_path, teacher, store, capsys):
    """The preset with the tiny teacher and the test store's geometry writes the same store (and says so)."""
    from ard.cli import main as ard_main

    ard_main(["predict", "-c", str(ROOT / "configs/digits/trajectories.yaml"), f"--model.init_args.teacher={teacher}",
              f"--model.init_args.save_indices={SAVE}", "--model.init_args.micro_batch_size=8",
              "--model.init_args.with_x0=true", f"--data.init_args.path={tmp_path / 'store'}", "--data.init_args.num_trajectories=40",
              "--data.init_args.shard_size=16", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert shard_files(tmp_path / "store") == shard_files(store)
    assert "traj/s" in err  # the progress bar
    summary = [line for line in err.splitlines() if line.startswith("ard-store: wrote")]
    assert len(summary) == 1 and "wrote 40 trajectories (3 shards" in summary[0] and "complete" in summary[0]
    assert (tmp_path / "run" / "config.yaml").exists()
    manifest = fmt.read_manifest(tmp_path / "store")
    assert manifest["config"]["data"]["init_args"]["shard_size"] == 16


def test_script_is_a_thin_wrapper_over_ard_predict():
    predict_args = runpy.run_path(str(ROOT / "scripts/precompute_trajectories.py"))["predict_args"]
    assert predict_args(["-c", "C.yaml", "--out", "D", "--num-trajectories", "7", "--devices", "2", "--batch-size",
                         "5", "--trainer.max_epochs=1"]) == [
        "predict", "-c", "C.yaml", "--data.init_args.path=D", "--data.init_args.num_trajectories=7",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--model.init_args.micro_batch_size=5", "--trainer.max_epochs=1"]


def test_bad_preset_values_fail_in_one_line(tmp_path, teacher, capsys):
    from ard.cli import main as ard_main

    with pytest.raises(SystemExit) as e:
        ard_main(["predict", "-c", str(ROOT / "configs/digits/trajectories.yaml"), f"--model.init_args.teacher={teacher}",
                  "--model.init_args.save_indices=[6, 24]", f"--data.init_args.path={tmp_path / 'store'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert e.value.code == 2 and len(err) == 1 and "include 0 (the noise)" in err[0], err
    assert not (tmp_path / "store").exists()


def test_imagenet_preset_with_a_tiny_dit_of_the_same_family(tmp_path, capsys):
    from ard.cli import main as ard_main

    teacher = tiny_teacher(tmp_path / "dit", "DiT-S/2", num_layers=1, num_attention_heads=2, attention_head_dim=16)
    ard_main(["predict", "-c", str(ROOT / "configs/imagenet256/trajectories.yaml"), f"--model.init_args.teacher={teacher}",
              "--model.init_args.teacher_size=null", "--model.init_args.micro_batch_size=2",
              f"--data.init_args.path={tmp_path / 'store'}", "--data.init_args.num_trajectories=3",
              "--data.init_args.shard_size=2", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    m = fmt.read_manifest(tmp_path / "store")
    assert m["complete"] and m["state"]["shape"] == [4, 32, 32] and m["state"]["dtype"] == "float16"
    assert m["grid"]["indices"] == [0, 4, 6, 8, 12, 16, 18, 20, 24] and m["solver"]["guidance_scale"] == 1.5
    assert m["num_classes"] == 1000
    states = np.load(tmp_path / "store/shards/shard-000000/states.npy")
    assert states.shape == (2, 9, 4, 32, 32) and states.dtype == np.float16 and np.isfinite(states).all()
    assert "wrote 3 trajectories (2 shards" in capsys.readouterr().err


def script(out: Path, teacher: Path, *extra, run=None) -> list[str]:
    return ["scripts/precompute_trajectories.py", "-c", "configs/digits/trajectories.yaml", "--out", str(out),
            "--num-trajectories", "96", "--batch-size", "8", f"--model.init_args.teacher={teacher}",
            f"--model.init_args.save_indices={SAVE}", "--data.init_args.shard_size=16",
            f"--trainer.default_root_dir={run or out.parent / 'run'}", *extra]


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one(tmp_path, teacher):
    """DDP on CPU (gloo): shards, not samples, go to ranks, so the store is bit-identical (about 40 s)."""
    one, two = ard(*script(tmp_path / "one", teacher)), ard(*script(tmp_path / "two", teacher, "--devices", "2"))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    assert len(shard_files(tmp_path / "two")) == 6 * 4  # 6 shards x (3 arrays + sidecar)
    assert fmt.verify(tmp_path / "two")[1] == []


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_store(tmp_path, teacher):
    """Kill the precompute twice at random moments (after start-up), re-run the same command each time."""
    reference = ard(*script(tmp_path / "ref", teacher))
    assert reference.returncode == 0, reference.stderr[-2000:]
    rng = random.Random(0)
    out = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(2):
        log = tmp_path / f"kill{i}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, *script(out, teacher)], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
            while "traj/s" not in log.read_text() and proc.poll() is None:  # its progress bar: precomputing
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    final = ard(*script(out, teacher))
    assert final.returncode == 0, final.stderr[-2000:]
    assert shard_files(out) == shard_files(tmp_path / "ref")
    assert fmt.verify(out)[1] == []
