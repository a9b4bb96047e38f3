"""The store being written, as predict data: the shards still to compute, assigned to DDP ranks.

Shards (not samples) are assigned to ranks, so a shard's contents never depend on the number of processes.
Rank 0 lists the complete shards on disk and broadcasts the list (Lightning's strategy), rank r then takes
pending[r::world_size]; ranks with fewer shards get count-0 padding items (no work, no duplicates: unlike
Lightning's DistributedSampler, which pads with repeated samples) so that every rank runs the same number
of predict steps. An iterable dataset, so Lightning adds no sampler of its own.
"""
from __future__ import annotations

import math
import warnings

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from ard.checks import AtLeastOne, check_knobs
from ard.store.format import StoreDtype, StoreError, completed_shards, read_manifest, shard_span

# Lightning warns about what this design does on purpose: a sized iterable dataset (one process reads it)
# whose batches carry no sampler indices (the writer does not need them).
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")


class ShardList(IterableDataset):
    """Yields {"shard", "start", "count"} for each shard of a fixed list (count 0 = padding)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class StoreShards(L.LightningDataModule):
    """The trajectory store at `path` as predict batches: one batch per shard still missing."""

    def __init__(self, path: str, num_trajectories: AtLeastOne, shard_size: AtLeastOne = 1024,
                 dtype: StoreDtype = "float32"):
        """
        Args:
            path: the store directory (created if missing; re-running resumes it).
            num_trajectories: trajectories in the store (indices 0 .. num_trajectories - 1).
            shard_size: consecutive trajectories per shard file set (the unit of work, resume and atomicity).
            dtype: storage dtype of the states: float16, bfloat16 or float32.
        """
        super().__init__()
        self.save_hyperparameters()
        self.path = path
        self.num_trajectories = num_trajectories
        self.shard_size = shard_size
        self.dtype = dtype
        check_knobs(StoreShards.__init__, dict(num_trajectories=num_trajectories, shard_size=shard_size), "data.")
        self.num_shards = math.ceil(num_trajectories / shard_size)
        self.assigned: list[dict] = []  # this rank's shards in the current run (set by predict_dataloader)
        self.complete_at_start: list[int] = []  # shards complete before the current run (all ranks agree)

    def predict_dataloader(self) -> DataLoader:
        """Called after the writer's setup made or checked the manifest (all ranks passed its barrier)."""
        trainer = self.trainer
        manifest = read_manifest(self.path)
        done: list[int] | str = []
        if trainer.is_global_zero:
            try:
                done = sorted(completed_shards(self.path, manifest))
            except StoreError as e:  # sent to every rank, so that all stop (none waits at a collective)
                done = str(e)
        done = trainer.strategy.broadcast(done, src=0)
        if isinstance(done, str):
            raise StoreError(done)
        self.complete_at_start = done
        pending = [k for k in range(self.num_shards) if k not in set(done)]
        world, rank = trainer.world_size, trainer.global_rank
        mine = [dict(zip(("shard", "start", "count"), (k, *shard_span(manifest, k)))) for k in pending[rank::world]]
        self.assigned = mine
        # Every rank runs the same number of predict steps (at least one, so that the writer's end-of-run
        # barrier is reached everywhere); padding items have count 0 and compute nothing.
        steps = max(math.ceil(len(pending) / world), 1)
        return DataLoader(ShardList(mine + [{"shard": -1, "start": 0, "count": 0}] * (steps - len(mine))),
                          batch_size=None)
