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

from ard.store.format import StoreDtype, completed_shards, read_manifest

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

    def __init__(self, path: str, num_trajectories: int, shard_size: int = 1024, dtype: StoreDtype = "float32"):
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
        if num_trajectories < 1 or shard_size < 1:
            raise ValueError(f"num_trajectories ({num_trajectories}) and shard_size ({shard_size}) must be >= 1")
        self.num_shards = math.ceil(num_trajectories / shard_size)
        self.assigned: list[dict] = []  # this rank's shards in the current run (set by predict_dataloader)
        self.complete_at_start: list[int] = []  # shards complete before the current run (all ranks agree)

    def span(self, shard: int) -> dict:
        start = shard * self.shard_size
        return {"shard": shard, "start": start, "count": min(self.shard_size, self.num_trajectories - start)}

    def predict_dataloader(self) -> DataLoader:
        """Called after the writer's setup made or checked the manifest (all ranks passed its barrier)."""
        trainer = self.trainer
        done = None
        if trainer.is_global_zero:
            done = sorted(completed_shards(self.path, read_manifest(self.path)))
        self.complete_at_start = trainer.strategy.broadcast(done, src=0)
        done = set(self.complete_at_start)
        pending = [k for k in range(self.num_shards) if k not in done]
        world, rank = trainer.world_size, trainer.global_rank
        mine = [self.span(k) for k in pending[rank::world]]
        padding = math.ceil(len(pending) / world) - len(mine)
        self.assigned = mine
        items = mine + [{"shard": -1, "start": 0, "count": 0}] * max(padding, 1 if not pending else 0)
        return DataLoader(ShardList(items), batch_size=None)
