"""The teacher's trajectories, read from the store, as batches for an S-step student.

A batch is a dict:
    "states":    (B, S+1, C, H, W) float32  the teacher's states at the student's boundaries tau_0..tau_S
                                            (index 0 the noise x_T, index S the final sample)
    "timesteps": (B, S+1)                   their time labels (ard.schedules; the last is CLEAN = -1): the grid
                                            timesteps (int64), or 1000 sigma of a flow store (float64)
    "labels":    (B,) int64
    "index":     (B,) int64                 trajectory indices
    "x0":        (B, S+1, C, H, W) float32  the teacher's x0-predictions (only with with_x0=True)
The boundaries are the teacher grid indices s * K / S, s = 0..S; each must be a saved grid index of the store.

Whole batches are gathered from the memory-mapped shards: a sampler yields sorted index arrays (one per
batch) and the dataset reads each array with one `take` per touched shard (at most `max_open_shards` shards
stay mapped per process; the maps hold no file descriptors). Split: the last `val_count`
trajectories are validation, the rest training. DDP: every rank draws the same seeded permutation per epoch
and takes every world_size-th batch of it (training batches are all full; the tail that does not fill a
global batch is left out that epoch); validation is split into equal contiguous parts.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ard.checks import AtLeastOne, Indices, NonNegativeInt, check_knobs
from ard.diffusion import student_grid_indices
from ard.store.format import MANIFEST, MAX_OPEN_SHARDS, StoreError, TrajectoryStore, to_float32
from ard.store.text import store_conditioner


def student_boundaries(store: TrajectoryStore, student_steps: int, boundaries: list[int] | None = None) -> list[int]:
    """Grid indices of an S-step student's S + 1 boundaries: the given ones (0 = the noise, ascending, K = the
    clean state), or s * K / S (s = 0..S); StoreError when the store cannot serve them."""
    path = store.root / MANIFEST
    k = store.manifest["solver"]["num_steps"]
    if boundaries is not None:
        if (len(boundaries) != student_steps + 1 or boundaries[0] != 0 or boundaries[-1] != k
                or any(a >= b for a, b in zip(boundaries, boundaries[1:]))):
            raise StoreError(f"data.boundaries={boundaries}: {student_steps + 1} grid indices ascending strictly from "
                             f"0 (the noise) to K={k} (the clean state of {path}) are needed")
    elif student_steps < 1 or k % student_steps:
        raise StoreError(f"{path}: field 'solver.num_steps' is K={k}; student_steps={student_steps} must divide it "
                         "(or give data.boundaries)")
    boundaries = student_grid_indices(k, student_steps) if boundaries is None else list(boundaries)
    missing = [b for b in boundaries if b not in store.grid_indices]
    if missing:
        raise StoreError(f"{path}: field 'grid.indices' {store.grid_indices} lacks {missing}, needed by a "
                         f"{student_steps}-step student (boundaries {boundaries})")
    return boundaries


class StudentBatches(Dataset):
    """dataset[indices] -> one whole batch (see the module docstring) for a sorted int64 index array."""

    def __init__(self, store: TrajectoryStore, boundaries: list[int], with_x0: bool, check_finite: bool):
        self.store, self.with_x0, self.check_finite = store, with_x0, check_finite
        self.positions = [store.grid_indices.index(b) for b in boundaries]  # positions in the saved grid
        self.timesteps = torch.tensor([store.grid_labels[p] for p in self.positions])  # (S+1,) int64 or float64

    def __len__(self) -> int:
        return self.store.num_trajectories

    def check_values(self, field: str, values: torch.Tensor, index: torch.Tensor) -> None:
        """Every |value| within the bound recorded when the store was written (NaN compares False: caught too)."""
        bound = self.store.max_abs[field]
        low, high = torch.aminmax(values)
        if not (-bound <= low and high <= bound):
            rows = (values.abs() <= bound).flatten(1).all(dim=1)  # (B,) False for NaN, inf, too large
            raise StoreError(f"{self.store.root}: {field} of trajectory {int(index[~rows][0])} holds NaN, inf or a "
                             f"value beyond the |value| <= {bound:g} recorded when the store was written: the store "
                             f"is damaged (run `ard-store verify {self.store.root}`)")

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {"index": torch.from_numpy(np.asarray(indices, dtype=np.int64))}  # (B,)
        for field in ("states", "x0") if self.with_x0 else ("states",):
            batch[field] = to_float32(self.store.read(indices, self.positions, field), self.store.dtype)  # (B, S+1, C, H, W)
            if self.check_finite:
                self.check_values(field, batch[field], batch["index"])
        batch["labels"] = torch.from_numpy(self.store.labels[indices])  # (B,)
        batch["timesteps"] = self.timesteps.expand(len(indices), -1).clone()  # (B, S+1)
        return batch


class BatchIndexSampler(DistributedSampler):
    """Yields this rank's batches as sorted int64 index arrays (a DistributedSampler, so Lightning keeps it).

    shuffle=True: a permutation seeded by (seed, epoch), the same on every rank; rank r takes batches
    r, r + W, ... of it; only full batches (drop_last). shuffle=False: the indices in order, split into W equal
    contiguous parts (the remainder of len(indices) / W is left out), last batch possibly short.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(indices, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.skip = 0  # batches of the next epoch already trained on before a resume (see `resume`)

    def _batches(self) -> np.ndarray | list[np.ndarray]:
        n, b, w = len(self.indices), self.batch_size, self.num_replicas
        if self.shuffle:
            order = self.indices[np.random.default_rng([self.seed, self.epoch]).permutation(n)]  # (n,)
            per_rank = n // (b * w)
            return order[: per_rank * b * w].reshape(per_rank, w, b)[:, self.rank]  # (per_rank, B)
        part = self.indices[self.rank * (n // w): (self.rank + 1) * (n // w)]
        return [part[a: a + b] for a in range(0, len(part), b)]

    def __iter__(self):
        skip, self.skip = self.skip, 0  # a resumed epoch starts after its finished batches, once
        return (np.sort(batch) for batch in self._batches()[skip:])

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue epoch `epoch` after its first `batches_done` batches (a mid-epoch checkpoint)."""
        if batches_done >= len(self):
            epoch, batches_done = epoch + 1, 0
        self.set_epoch(epoch)
        self.skip = batches_done

    def __len__(self) -> int:
        n, b, w = len(self.indices), self.batch_size, self.num_replicas
        return n // (b * w) if self.shuffle else -(-(n // w) // b)


class TrajectoryDataModule(L.LightningDataModule):
    """A trajectory store (ard.store) as batches of an S-step student; checks the store when opened."""

    def __init__(self, path: str, student_steps: AtLeastOne, batch_size: AtLeastOne = 64, val_count: AtLeastOne = 512,
                 seed: NonNegativeInt = 0, num_workers: NonNegativeInt = 0, with_x0: bool = False,
                 check_finite: bool = True, max_open_shards: AtLeastOne = MAX_OPEN_SHARDS,
                 boundaries: Indices | None = None):
        """
        Args:
            path: the store directory (written by `ard predict -c configs/<setting>/trajectories.yaml`).
            student_steps: S; the boundaries are the grid indices s * K / S (or `boundaries`), which the store
                must hold.
            batch_size: trajectories per batch (per process under DDP).
            val_count: trajectories held out for validation (the last val_count indices of the store).
            seed: seed of the training shuffle (a new permutation every epoch: (seed, epoch)).
            num_workers: DataLoader worker processes (each reads whole batches from the memory map).
            with_x0: also yield the teacher's x0-predictions ("x0"); the store must have them.
            check_finite: raise when a batch holds NaN / inf or values beyond the bound the store recorded
                when it was written (cheap; `ard-store verify` checks every byte).
            max_open_shards: shards kept memory-mapped per process and state field (an LRU). The maps hold no
                file descriptor, so this bounds address space and map count, not `ulimit -n`.
            boundaries: the student's S + 1 boundaries as teacher grid indices (0 = the noise, K = clean), when
                they are not s * K / S (e.g. the paper's 999 / 749 / 500 / 250 on DiT's 25-step grid: 0, 6, 12,
                18, 25); None: s * K / S.
        """
        check_knobs(TrajectoryDataModule.__init__, {k: v for k, v in locals().items() if k != "self"}, "data.")
        super().__init__()
        self.save_hyperparameters()
        self.path = path
        self.student_steps = student_steps
        self.store = TrajectoryStore(path, max_open_shards)
        self.manifest = self.store.manifest
        self.prompt_condition = store_conditioner(path, self.manifest)  # a text store's labels -> their prompts
        self.boundaries = student_boundaries(self.store, student_steps, boundaries)  # grid indices tau_0..tau_S
        self.timesteps = [self.store.grid_labels[self.store.grid_indices.index(b)] for b in self.boundaries]
        if with_x0 and not self.store.has_x0:
            raise StoreError(f"{self.store.root / MANIFEST}: field 'state.x0' is false; with_x0=True needs a store "
                             "made with with_x0: true")
        if not 0 <= val_count < self.store.num_trajectories:
            raise StoreError(f"{self.store.root / MANIFEST}: field 'num_trajectories' is "
                             f"{self.store.num_trajectories}; val_count={val_count} must be smaller")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """A text store's batch: its labels as their prompts' stored encodings (read once per batch, on the batch's
        device); a class-label store's batch as it is."""
        if self.prompt_condition is None:
            return batch
        return {**batch, "labels": self.prompt_condition(batch["labels"])}

    def check_compatible(self, state_shape: tuple, num_classes: int) -> None:
        """One-line ValueError naming the store and field when it was made for another shape or class count."""
        path = self.store.root / MANIFEST
        if tuple(state_shape) != self.store.state_shape:
            raise StoreError(f"{path}: field 'state.shape' is {list(self.store.state_shape)}, the student needs "
                             f"{list(state_shape)}")
        if int(num_classes) != self.manifest["num_classes"]:
            raise StoreError(f"{path}: field 'num_classes' is {self.manifest['num_classes']}, the student needs "
                             f"{num_classes}")

    def setup(self, stage: str | None = None) -> None:
        n, val = self.store.num_trajectories, self.hparams.val_count
        self.train_indices = np.arange(0, n - val, dtype=np.int64)
        self.val_indices = np.arange(n - val, n, dtype=np.int64)
        self.dataset = StudentBatches(self.store, self.boundaries, self.hparams.with_x0, self.hparams.check_finite)

    def _loader(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = BatchIndexSampler(indices, self.hparams.batch_size, shuffle, self.hparams.seed, world, rank)
        if shuffle and len(sampler) == 0:
            raise StoreError(f"{self.store.root}: {len(indices)} training trajectories make no full batch of "
                             f"{self.hparams.batch_size} x {world} processes")
        if shuffle and trainer is not None and trainer.fit_loop.restarting:
            # Lightning builds the iterator before it would set the epoch: continue where the checkpoint was
            sampler.resume(trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        workers = self.hparams.num_workers
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=cuda)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_indices, shuffle=False)
