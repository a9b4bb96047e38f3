"""The Lightning prediction writer of the trajectory store.

setup: builds the manifest from the data (`StoreShards`: path, count, shard size, dtype) and the module
(`PrecomputeTrajectories.store_identity`: teacher, solver, grid, seed, ...); every rank checks the directory
(empty, or the same store: resume), rank 0 writes the manifest, all meet at a barrier.
write_on_batch_end: writes the shard atomically (ard.store.format.write_shard) on the rank that computed it.
on_predict_end: after a barrier, rank 0 consolidates the manifest from the shard sidecars and prints a
summary line. A progress bar (rank 0, trajectories per second, advanced after every micro-batch by the
module's `on_trajectories_done` calls) replaces Lightning's shards-per-second one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ard.store import format as fmt


class TrajectoryStoreWriter(BasePredictionWriter):
    """Writes each predicted shard into the store of the `StoreShards` data; keeps its manifest."""

    def __init__(self, progress_bar: bool = True):
        """
        Args:
            progress_bar: show a progress bar in trajectories per second on rank 0 (set the trainer's
                `enable_progress_bar: false` to hide Lightning's own, which counts shards).
        """
        super().__init__(write_interval="batch")
        self.progress_bar = progress_bar
        self.manifest: dict | None = None
        self._bar = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        from ard.store.jobs import StoreShards

        data = trainer.datamodule
        if not isinstance(data, StoreShards) or not hasattr(pl_module, "store_identity"):
            raise ValueError(f"{type(self).__name__} needs data ard.store.jobs.StoreShards and a model with "
                             f"store_identity() (ard.modules.precompute.PrecomputeTrajectories); got "
                             f"{type(data).__name__} and {type(pl_module).__name__}")
        trainer.predict_loop.return_predictions = False  # the writer keeps them; do not pile them up in memory
        manifest = fmt.new_manifest(
            **pl_module.store_identity(), dtype=data.dtype, num_trajectories=data.num_trajectories,
            shard_size=data.shard_size,
            created={"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
                     "accelerator": type(trainer.accelerator).__name__, "world_size": trainer.world_size},
            config={"model": {"class_path": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                              "init_args": dict(pl_module.hparams)},
                    "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}",
                             "init_args": dict(data.hparams)},
                    "trainer": {"precision": str(trainer.precision), "world_size": trainer.world_size}})
        self.root = Path(data.path)
        existing = fmt.check_output(self.root, manifest)  # every rank, before anyone writes: all raise alike
        trainer.strategy.barrier("ard-store-check")
        if existing is None and trainer.is_global_zero:
            fmt.create_store(self.root, manifest)
        trainer.strategy.barrier("ard-store-created")
        self.manifest = fmt.read_manifest(self.root)  # the existing one when resuming (its created / config)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        data = trainer.datamodule
        if self.progress_bar and trainer.is_global_zero:
            from tqdm import tqdm

            total = sum(item["count"] for item in data.assigned)
            desc = "trajectories" if trainer.world_size == 1 else f"trajectories (rank 0 of {trainer.world_size})"
            self._bar = tqdm(total=total, desc=desc, unit="traj", dynamic_ncols=True, file=sys.stderr)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if prediction is None:  # a padding item: this rank had no shard left
            return
        dtype = self.manifest["state"]["dtype"]
        arrays = {name: fmt.to_numpy(prediction[name], dtype) for name in fmt.STATE_FIELDS if name in prediction}
        arrays.update(labels=prediction["labels"].cpu().numpy(), index=prediction["index"].cpu().numpy())
        fmt.write_shard(self.root, self.manifest, prediction["shard"], arrays)

    def on_trajectories_done(self, count: int) -> None:
        """Called by PrecomputeTrajectories after each micro-batch: the bar moves every few seconds."""
        if self._bar is not None:
            self._bar.update(count)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        trainer.strategy.barrier("ard-store-end")
        if not trainer.is_global_zero:
            return
        manifest = fmt.consolidate(self.root)
        seconds = time.perf_counter() - self._start
        before = set(trainer.datamodule.complete_at_start)
        new = [s for s in manifest["shards"] if s["shard"] not in before]
        count = sum(s["count"] for s in new)
        status = "complete" if manifest["complete"] else f"incomplete ({len(manifest['shards'])} of " \
                                                        f"{manifest['num_shards']} shards)"
        print(f"ard-store: wrote {count} trajectories ({len(new)} shards, {fmt.human_bytes(fmt.stored_bytes(new))}) "
              f"in {seconds:.1f} s ({count / max(seconds, 1e-9):.1f} traj/s); store {self.root} {status}: "
              f"{sum(s['count'] for s in manifest['shards'])} of {manifest['num_trajectories']} trajectories, "
              f"{fmt.human_bytes(fmt.stored_bytes(manifest['shards']))}", file=sys.stderr)
