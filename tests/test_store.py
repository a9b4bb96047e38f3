"""The trajectory store: precompute = the sampler, manifest, atomic shards, resume after a crash, bad input.

Helpers here (`tiny_teacher`, `precompute`, `file_digests`) are imported by the other test_store_* files.
"""
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ard.diffusion import ddim_sample, solver_identity, trajectory_inputs
from ard.modules.precompute import PrecomputeTrajectories
from ard.store import format as fmt
from ard.store.jobs import StoreShards
from ard.store.writer import TrajectoryStoreWriter
from ard.backbones.dit import build_dit

SAVE = [0, 6, 12, 18, 24]  # the boundaries of a 4-step student on the K = 24 grid (and of S = 2)
N, SHARD, MICRO = 40, 16, 8  # three shards: 16, 16, 8 trajectories


def scratch(num_steps: int) -> dict:
    """The teacher and solver fields of a scratch store (random states written directly): valid, made up."""
    return dict(teacher={"weights_sha256": "0" * 64, "config_sha256": "0" * 64},
                solver=solver_identity(num_steps, "leading", 1.0, False, "all", "fp32"))


def tiny_teacher(path: Path, size: str = "digits", **overrides) -> Path:
    """A random-weight DiT with non-trivial outputs (adaLN-zero would make every epsilon 0), saved to `path`."""
    torch.manual_seed(0)
    model = build_dit(size, **overrides)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def precompute(teacher: Path, out: Path, n: int = N, shard_size: int = SHARD, dtype: str = "float32",
               callbacks: tuple = (), **model_kw) -> None:
    """One in-process precompute run (what `ard predict -c configs/digits/trajectories.yaml` does)."""
    kw = dict(guidance_scale=2.0, clip_sample=True, save_indices=SAVE, micro_batch_size=MICRO) | model_kw
    module = PrecomputeTrajectories(teacher=str(teacher), **kw)
    data = StoreShards(str(out), num_trajectories=n, shard_size=shard_size, dtype=dtype)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TrajectoryStoreWriter(progress_bar=False), *callbacks])
    trainer.predict(module, datamodule=data)


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (what "nothing changed" compares)."""
    return {str(p.relative_to(root)): fmt.sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def shard_files(root: Path) -> dict[str, str]:
    """sha256 of the shard data files only (the manifest's `created` time differs between runs)."""
    return {k: v for k, v in file_digests(root).items() if k.startswith("shards/")}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "digits", num_layers=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("store") / "store"
    precompute(teacher, out, with_x0=True)
    return out


def test_store_holds_the_samplers_trajectories_bit_for_bit(store, teacher):
    m = fmt.read_manifest(store)
    assert m["complete"] and m["num_shards"] == 3 and [s["count"] for s in m["shards"]] == [16, 16, 8]
    assert m["grid"] == {"indices": SAVE, "timesteps": [943, 697, 451, 205, -1]}
    assert m["solver"]["num_steps"] == 24 and m["solver"]["timestep_spacing"] == "leading"
    assert m["solver"]["guidance_scale"] == 2.0 and m["solver"]["clip_sample"] is True
    assert m["state"] == {"shape": [1, 8, 8], "dtype": "float32", "numpy_dtype": "<f4", "x0": True}
    assert m["teacher"]["path"] == str(teacher) and len(m["teacher"]["weights_sha256"]) == 64
    assert m["teacher"]["numerics"] == "diffusers"  # the teacher's identity: ard.teacher.teacher_identity
    assert m["solver"]["cfg_channels"] == "all" and m["solver"]["precision"] == "fp32"  # the trainer's 32-true
    assert m["store_id"] == fmt.store_id(m)
    # Trajectories 24..31 are one micro-batch of shard 1: the same batch through the sampler gives the same bits.
    from ard.teacher import load_teacher

    idx = range(24, 32)
    noise, labels = trajectory_inputs(0, idx, (1, 8, 8), 10)
    ref = ddim_sample(load_teacher(teacher), noise, labels, 24, 2.0, "leading", SAVE, return_x0=True, clip_sample=True)
    shard = fmt.load_shard(store, m, 1)
    assert np.array_equal(shard["states"][8:16], ref.states.numpy())
    assert np.array_equal(shard["x0"][8:16], ref.x0.numpy())
    assert np.array_equal(shard["labels"][8:16], labels.numpy())
    assert np.array_equal(shard["index"], np.arange(16, 32))
    assert np.array_equal(shard["states"][8:16, 0], noise.numpy())  # state 0 is the noise x_T
    assert np.abs(shard["states"][:, -1]).max() <= 1.0  # clip_sample: the final state is a clipped x0
    _, problems = fmt.verify(store)
    assert problems == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtypes_round_trip(tmp_path, dtype):
    m = fmt.new_manifest(**scratch(2), grid_indices=[0, 1, 2], grid_timesteps=[500, 0, -1],
                         state_shape=(2, 4, 4), dtype=dtype, with_x0=False, num_classes=3, num_trajectories=5,
                         shard_size=3, seed=0, micro_batch_size=2)
    fmt.create_store(tmp_path / "s", m)
    x = torch.randn(5, 3, 2, 4, 4)
    for k, (a, b) in enumerate([(0, 3), (3, 5)]):
        fmt.write_shard(tmp_path / "s", m, k, {"states": fmt.to_numpy(x[a:b], dtype), "labels": np.arange(a, b) % 3,
                                               "index": np.arange(a, b)})
    fmt.consolidate(tmp_path / "s")
    store = fmt.TrajectoryStore(tmp_path / "s")
    got = fmt.to_float32(store.read(np.array([1, 2, 4]), [0, 2]), dtype)  # (3, 2, 2, 4, 4), across both shards
    assert torch.equal(got, x[[1, 2, 4]][:, [0, 2]].to(fmt.TORCH_DTYPE[dtype]).float())
    assert np.load(tmp_path / "s/shards/shard-000000/states.npy").dtype.str == fmt.NUMPY_DTYPE[dtype]
    assert list(store.labels) == [0, 1, 2, 0, 1]
    assert fmt.verify(tmp_path / "s")[1] == []
    unsorted = fmt.to_float32(store.read(np.array([4, 0, 3, 1])), dtype)  # any order works (sorted is faster)
    assert torch.equal(unsorted, x[[4, 0, 3, 1]].to(fmt.TORCH_DTYPE[dtype]).float())
    for bad in ([5], [-1], [2, 5]):  # 5 is row 2 of the last shard (3 rows per shard, 2 written)
        with pytest.raises(IndexError, match="out of range"):
            store.read(np.array(bad))
    with pytest.raises(IndexError, match="positions"):
        store.read(np.array([0]), [3])


class CrashAfter(L.Callback):
    """Raise after `shards` shards were written (what a crash leaves behind: only what reached the disk)."""

    def __init__(self, shards: int):
        self.shards = shards

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.shards:
            raise RuntimeError("crash")


def test_resume_after_a_crash_gives_the_uninterrupted_store(tmp_path, teacher, store):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="crash"):
        precompute(teacher, out, with_x0=True, callbacks=(CrashAfter(1),))
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000"]
    junk = out / "shards" / ".shard-000001.tmp"  # a half-written shard of a killed run
    junk.mkdir()
    (junk / "states.npy").write_bytes(b"half")
    before = fmt.sha256_file(out / "shards/shard-000000/states.npy")
    precompute(teacher, out, with_x0=True)  # the same command again
    assert fmt.sha256_file(out / "shards/shard-000000/states.npy") == before
    assert shard_files(out) == shard_files(store)  # bit-identical to the uninterrupted run
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000", "shard-000001", "shard-000002"]
    assert fmt.read_manifest(out)["complete"]


class CountTrajectories(L.Callback):
    """Records the module's per-micro-batch progress calls (what the writer's progress bar receives)."""

    def __init__(self):
        self.calls: list[int] = []

    def on_trajectories_done(self, count: int) -> None:
        self.calls.append(count)


def test_progress_moves_once_per_micro_batch(tmp_path, teacher):
    counter = CountTrajectories()
    precompute(teacher, tmp_path / "s", callbacks=(counter,))
    assert counter.calls == [MICRO] * (N // MICRO)  # 5 micro-batches of 8 over 3 shards, not 3 shard steps


def test_rerunning_a_complete_store_writes_nothing(tmp_path, teacher, store, capsys):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    precompute(teacher, out, with_x0=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert "wrote 0 trajectories (0 shards" in capsys.readouterr().err


@pytest.mark.parametrize("change, field", [
    (dict(guidance_scale=1.5), "solver.guidance_scale"),
    (dict(micro_batch_size=4), "micro_batch_size"),
    (dict(seed=1), "seed"),
    (dict(n=41), "num_trajectories"),
    (dict(dtype="float16"), "state.dtype"),
    (dict(cfg_channels="dit"), "solver.cfg_channels"),
    (dict(numerics="dit"), "teacher.config_sha256"),  # official numerics: LayerNorm eps 1e-6 in the config
])
def test_a_different_store_in_the_output_directory_is_refused(tmp_path, teacher, store, change, field):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    before = file_digests(out)
    with pytest.raises(fmt.StoreError) as e:
        precompute(teacher, out, **{"with_x0": True, **change})
    assert f"{out / 'manifest.json'}: field '{field}'" in str(e.value) and "\n" not in str(e.value)
    assert file_digests(out) == before


def test_resume_refuses_a_shard_of_another_store(tmp_path, teacher, store):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    sidecar = out / "shards/shard-000001/shard.json"
    sidecar.write_text(sidecar.read_text().replace(fmt.read_manifest(out)["store_id"], "0" * 64))
    before = file_digests(out)
    with pytest.raises(fmt.StoreError, match="shard-000001/shard.json: field 'store_id' .* belongs to another store"):
        precompute(teacher, out, with_x0=True)
    assert file_digests(out) == before


def test_other_teacher_weights_are_a_different_store(tmp_path, teacher, store):
    other = tiny_teacher(tmp_path / "t2", num_layers=1, attention_head_dim=16)
    out = tmp_path / "s"
    shutil.copytree(store, out)
    with pytest.raises(fmt.StoreError, match=r"field 'teacher\.(config|weights)_sha256'"):
        precompute(other, out, with_x0=True)


def test_foreign_or_unwritable_output_is_refused(tmp_path, teacher):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(fmt.StoreError, match="not empty and holds no manifest.json"):
        precompute(teacher, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file/store: cannot write there"):  # the store's lock, before any work
        precompute(teacher, tmp_path / "file" / "store")


def test_writer_refuses_non_finite_states_and_leaves_no_shard(tmp_path):
    m = fmt.new_manifest(**scratch(1), grid_indices=[0, 1], grid_timesteps=[0, -1], state_shape=(1, 2, 2),
                         dtype="float16", with_x0=False, num_classes=2, num_trajectories=4, shard_size=4, seed=0,
                         micro_batch_size=4)
    fmt.create_store(tmp_path, m)
    states = torch.zeros(4, 2, 1, 2, 2)
    states[2, 1, 0, 0, 0] = 1e6  # overflows float16 to inf
    with pytest.raises(fmt.StoreError, match="states of trajectory 2 holds NaN or inf"):
        fmt.write_shard(tmp_path, m, 0, {"states": fmt.to_numpy(states, "float16"), "labels": np.zeros(4, np.int64),
                                         "index": np.arange(4)})
    assert list((tmp_path / "shards").iterdir()) == []


def test_opening_checks_manifest_and_shards(tmp_path, store):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    states = out / "shards/shard-000001/states.npy"
    states.write_bytes(states.read_bytes()[:-100])  # truncated
    with pytest.raises(fmt.StoreError, match="shard-000001/states.npy: .* bytes, shard.json says"):
        fmt.TrajectoryStore(out)
    shutil.rmtree(out / "shards/shard-000002")
    with pytest.raises(fmt.StoreError, match=r"shard-000002: missing \(store incomplete, 2 of 3 shards"):
        fmt.TrajectoryStore(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["seed"] = 7  # edited by hand: no longer the store its shards belong to
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fmt.StoreError, match="field 'store_id' does not match"):
        fmt.TrajectoryStore(out)
    manifest["store_id"] = fmt.store_id(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fmt.StoreError, match="shard-000000/shard.json: field 'store_id' .* another store"):
        fmt.TrajectoryStore(out)
    with pytest.raises(fmt.StoreError, match="not a directory"):
        fmt.TrajectoryStore(tmp_path / "nothing")
