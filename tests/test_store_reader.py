"""TrajectoryDataModule: the batch contract, S-step subsets of one store, splits, DDP sharding, bad stores."""
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from ard.data.trajectories import BatchIndexSampler, TrajectoryDataModule
from ard.store import format as fmt
from test_store import scratch
from test_store import N, SAVE, store, teacher  # noqa: F401 (fixtures)


def test_batches_follow_the_contract_and_hold_the_stored_values(store):
    data = TrajectoryDataModule(str(store), student_steps=4, batch_size=8, val_count=8, with_x0=True)
    assert data.boundaries == SAVE and data.timesteps == [943, 697, 451, 205, -1]
    assert data.manifest["num_trajectories"] == N and data.student_steps == 4
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == (N - 8) // 8
    batch = batches[0]
    assert batch["states"].shape == (8, 5, 1, 8, 8) and batch["states"].dtype == torch.float32
    assert batch["x0"].shape == (8, 5, 1, 8, 8)
    assert batch["timesteps"].dtype == torch.int64 and batch["timesteps"].tolist() == [[943, 697, 451, 205, -1]] * 8
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.int64
    idx = batch["index"]
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)  # sorted within a batch
    m = data.manifest
    for i in idx.tolist():
        shard = fmt.load_shard(store, m, i // m["shard_size"])
        row = batch["index"].tolist().index(i)
        assert np.array_equal(batch["states"][row].numpy(), shard["states"][i % m["shard_size"]])
        assert int(batch["labels"][row]) == int(shard["labels"][i % m["shard_size"]])
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen) and seen.max() < N - 8  # training never sees validation
    val = torch.cat([b["index"] for b in data.val_dataloader()])
    assert val.tolist() == list(range(N - 8, N))


def test_one_store_serves_students_whose_boundaries_it_saved(store):
    two = TrajectoryDataModule(str(store), student_steps=2, batch_size=4, val_count=4)
    assert two.boundaries == [0, 12, 24] and two.timesteps == [943, 451, -1]
    two.setup("fit")
    batch = next(iter(two.train_dataloader()))
    four = TrajectoryDataModule(str(store), student_steps=4, batch_size=4, val_count=4)
    four.setup("fit")
    same = four.dataset[batch["index"].numpy()]
    assert torch.equal(batch["states"], same["states"][:, [0, 2, 4]])
    with pytest.raises(fmt.StoreError, match=r"field 'grid.indices' \[0, 6, 12, 18, 24\] lacks \[8, 16\]"):
        TrajectoryDataModule(str(store), student_steps=3, batch_size=4, val_count=4)
    with pytest.raises(fmt.StoreError, match="K=24; student_steps=5 must divide it"):
        TrajectoryDataModule(str(store), student_steps=5, batch_size=4, val_count=4)


def test_check_compatible_names_store_and_field(store):
    data = TrajectoryDataModule(str(store), student_steps=4, batch_size=4, val_count=4)
    data.check_compatible((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"manifest.json: field 'state.shape' is \[1, 8, 8\], the student needs \[4, 32, 32\]"):
        data.check_compatible((4, 32, 32), 10)
    with pytest.raises(ValueError, match="manifest.json: field 'num_classes' is 10, the student needs 1000"):
        data.check_compatible((1, 8, 8), 1000)


def test_ranks_get_disjoint_equal_batches_reshuffled_each_epoch():
    indices = np.arange(100, 150)
    ranks = [BatchIndexSampler(indices, 4, shuffle=True, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    epochs = []
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert [len(b) for b in batches] == [6, 6] == [len(s) for s in ranks]  # 50 // (4 * 2) full batches each
        flat = np.concatenate([np.concatenate(b) for b in batches])
        assert len(np.unique(flat)) == 48 and set(flat) <= set(indices)  # no duplicates, only the tail of 2 left out
        assert all(np.array_equal(b, np.sort(b)) for rank in batches for b in rank)
        epochs.append(flat)
    assert not np.array_equal(epochs[0], epochs[1])
    again = BatchIndexSampler(indices, 4, shuffle=True, seed=3, num_replicas=2, rank=0)
    again.set_epoch(1)
    assert np.array_equal(np.concatenate(list(again)), epochs[1][:24])  # seeded: reproducible
    val = [list(BatchIndexSampler(indices[:9], 4, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [np.concatenate(v).tolist() for v in val] == [[100, 101, 102, 103], [104, 105, 106, 107]]


def test_workers_read_whole_batches(store):
    data = TrajectoryDataModule(str(store), student_steps=4, batch_size=8, val_count=8, num_workers=2)
    data.setup("fit")
    one = TrajectoryDataModule(str(store), student_steps=4, batch_size=8, val_count=8)
    one.setup("fit")
    for a, b in zip(data.train_dataloader(), one.train_dataloader()):
        assert torch.equal(a["states"], b["states"]) and torch.equal(a["index"], b["index"])


def test_bad_stores_fail_in_one_line(tmp_path, store):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    with pytest.raises(fmt.StoreError, match="val_count=40 must be smaller"):
        TrajectoryDataModule(str(out), student_steps=4, batch_size=4, val_count=40)
    small = TrajectoryDataModule(str(out), student_steps=4, batch_size=33, val_count=8)
    small.setup("fit")
    with pytest.raises(fmt.StoreError, match="32 training trajectories make no full batch of 33 x 1"):
        small.train_dataloader()
    states = np.load(out / "shards/shard-000000/states.npy", mmap_mode="r+")
    states[3, 2, 0, 0, 0] = np.nan
    states.flush()
    data = TrajectoryDataModule(str(out), student_steps=4, batch_size=16, val_count=8)
    data.setup("fit")
    with pytest.raises(fmt.StoreError, match="states of trajectory 3 holds NaN, inf or a value beyond"):
        data.dataset[np.arange(0, 8)]
    shutil.rmtree(out / "shards/shard-000001")
    with pytest.raises(fmt.StoreError, match="shard-000001: missing .*re-run the precompute"):
        TrajectoryDataModule(str(out), student_steps=4, batch_size=4, val_count=4)


MANY_SHARDS, PER_SHARD = 300, 2  # more shards than the 256 file descriptors of the ulimit test


@pytest.fixture(scope="module")
def many_shard_store(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A store of random fp16 states (600 trajectories x 3 states of 1x2x2) in 300 shards, and its states."""
    root = tmp_path_factory.mktemp("many") / "store"
    m = fmt.new_manifest(**scratch(2), grid_indices=[0, 1, 2], grid_timesteps=[999, 499, -1],
                         state_shape=(1, 2, 2), dtype="float16", with_x0=False, num_classes=10,
                         num_trajectories=MANY_SHARDS * PER_SHARD, shard_size=PER_SHARD, seed=0, micro_batch_size=1)
    states = np.random.default_rng(0).standard_normal((MANY_SHARDS * PER_SHARD, 3, 1, 2, 2)).astype(np.float16)
    with mock.patch("os.fsync"):  # a scratch store: durability is not what this tests (saves seconds)
        fmt.create_store(root, m)
        for k in range(MANY_SHARDS):
            rows = np.arange(k * PER_SHARD, (k + 1) * PER_SHARD)
            fmt.write_shard(root, m, k, {"states": states[rows], "labels": rows % 10, "index": rows})
        fmt.consolidate(root)
    return str(root), states


READ_UNDER_ULIMIT = """
import resource, sys
import numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from ard.data.trajectories import TrajectoryDataModule
from ard.store import format as fmt
root, out = sys.argv[1], sys.argv[2]
m = fmt.read_manifest(root)
try:  # the limit bites: one np.memmap per shard (the earlier reader's way) runs out of descriptors
    maps = [fmt.load_shard(root, m, k)["states"] for k in range(m["num_shards"])]
    sys.exit("np.load(mmap_mode='r') of every shard did not exceed the descriptor limit")
except fmt.StoreError as e:
    assert "Too many open files" in str(e), e
data = TrajectoryDataModule(root, student_steps=2, batch_size=50, val_count=100, num_workers=2, max_open_shards=64)
data.setup("fit")
batches = list(data.train_dataloader()) + list(data.val_dataloader())
np.save(out + "_index.npy", np.concatenate([b["index"].numpy() for b in batches]))
np.save(out + "_states.npy", np.concatenate([b["states"].numpy() for b in batches]))
"""


def test_a_many_shard_store_reads_under_ulimit_256(tmp_path, many_shard_store):
    root, states = many_shard_store
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", READ_UNDER_ULIMIT, root, str(tmp_path / "read")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = np.load(tmp_path / "read_index.npy")
    assert sorted(index.tolist()) == list(range(len(states)))  # 500 training + 100 validation: every trajectory
    assert np.array_equal(np.load(tmp_path / "read_states.npy"), states[index].astype(np.float32))


def test_at_most_max_open_shards_stay_mapped(many_shard_store):
    root, states = many_shard_store
    store = fmt.TrajectoryStore(root, max_open_shards=4)
    rng = np.random.default_rng(0)
    for size in (1, 3, 40, 2, 7, 1):  # reads touching fewer and more shards than the bound
        for _ in range(5):
            idx = rng.choice(len(states), size, replace=False)  # unsorted
            assert np.array_equal(store.read(idx, [2, 0]), states[idx][:, [2, 0]])
            touched = len(np.unique(idx // PER_SHARD))
            assert store.open_shards() <= max(4, touched)  # a read maps all it touches, then trims to the bound
    assert store.open_shards() == 4
    with pytest.raises(fmt.StoreError, match="max_open_shards=0 must be at least 1"):
        fmt.TrajectoryStore(root, max_open_shards=0)


def test_a_shard_file_changed_after_opening_fails_in_one_line(tmp_path, store):
    out = tmp_path / "s"
    shutil.copytree(store, out)
    reader = fmt.TrajectoryStore(out)
    np.save(out / "shards/shard-000001/states.npy", np.zeros((16, 5, 1, 8, 4), np.float32))  # rows half as wide
    assert reader.read(np.arange(0, 4)).shape == (4, 5, 1, 8, 8)  # shard 0 is untouched
    with pytest.raises(fmt.StoreError, match=r"shard-000001/states.npy: float32 \(16, 5, 1, 8, 4\) .*expected 80 rows"):
        reader.read(np.arange(14, 18))
