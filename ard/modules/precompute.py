"""Teacher trajectory precompute: `predict_step` runs the teacher's DDIM + CFG on one store shard.

Used with `ard.store.jobs.StoreShards` (the shards still to compute, as predict batches) and
`ard.store.writer.TrajectoryStoreWriter` (writes each shard atomically and keeps the manifest):
`ard predict -c configs/digits/trajectories.yaml`.

Determinism: trajectory i's noise and label are functions of (seed, i) alone (`trajectory_inputs`), and a
shard is always computed as the same micro-batches of `micro_batch_size` consecutive indices, whatever the
number of processes; float results depend on batch composition, so this fixes them (on the same hardware
and software) for any DDP world size and any sequence of interruptions.

Text teachers (PixArt, SD3): the prompts (`prompts`, a JSON Lines file or a .txt of one prompt per line) are encoded
once into the store's conditioning sidecar (ard/store/text.py; resumable; SD3's with their pooled embeddings) before
the manifest exists, and trajectory i's label is the index of its prompt; the manifest (version 2) records the
encoder, the prompts', embeddings' (and pooled embeddings') sha256 and the null prompt.

One writer per store: global rank 0 locks the store directory (`ard.runlock`) in `prepare_data`, before the
writer's setup checks or creates the manifest, and a callback the module adds releases it when the run ends,
however it ends; a second precompute into the same store stops with one line naming the first.
"""
from __future__ import annotations

import lightning as L
import torch

from ard.checks import CLEAN, AtLeastOne, Indices, NonNegative, NonNegativeInt, Positive, check_choice, check_knobs
from ard.diffusion import (CfgChannels, ddim_grid, flow_solver_identity, precision_of_trainer, solve, solver_identity,
                           trajectory_inputs)
from ard.schedules import FlowSchedule, ScheduleKind, TimestepSpacing
from ard.backbones import SERVED, TEXT, backbone_of
from ard.backbones.dit import Numerics, num_classes
from ard.conditioning import read_prompts
from ard.runlock import DirectoryLock
from ard.teacher import DIGITS_TEACHER, load_teacher, teacher_identity
from ard.text_encoders import TextEncoderKind, load_text_encoder



class PrecomputeTrajectories(L.LightningModule):
    """Samples the teacher's deterministic solver (DDIM, eta = 0, or flow Euler) + CFG trajectories of one store
    shard per predict batch."""

    def __init__(self, teacher: str = str(DIGITS_TEACHER), teacher_size: str | None = None, num_steps: AtLeastOne = 24,
                 timestep_spacing: TimestepSpacing = "leading", guidance_scale: NonNegative = 2.0,
                 clip_sample: bool = False, save_indices: Indices | None = None, with_x0: bool = False,
                 seed: NonNegativeInt = 0, micro_batch_size: AtLeastOne = 256, numerics: Numerics | None = None,
                 cfg_channels: CfgChannels = "all", prompts: str | None = None, text_encoder: TextEncoderKind = "hash",
                 text_encoder_path: str | list[str] | None = None, text_max_tokens: AtLeastOne = 120,
                 null_prompt: str = "",
                 schedule: ScheduleKind = "vp", shift: Positive = 1.0):
        """
        Args:
            teacher: the teacher DiT (a diffusers directory or an official DiT checkpoint, see
                `ard.teacher.load_teacher`).
            teacher_size: key of ard.backbones.dit.DIT_SIZES; required for single-file checkpoints.
            num_steps: K, the teacher's DDIM steps (the grid has K + 1 states, the last one clean).
            timestep_spacing: DDIM timestep spacing ("leading": see ard.diffusion for why K = 24 needs it).
            guidance_scale: classifier-free guidance scale w (Ho & Salimans 2022, eq. 6; 1 = no guidance).
            clip_sample: clip the x0-prediction to [-1, 1] in every DDIM step (pixel-space teachers).
            save_indices: grid indices (0..K) of the saved states; None: all K + 1. Must include 0 (the noise
                x_T) and K (the final sample).
            with_x0: also save the teacher's x0-prediction at every saved state.
            seed: trajectory i's noise and label depend only on (seed, i).
            micro_batch_size: trajectories per teacher forward (x2 with CFG). Part of the store's identity:
                float results depend on batch composition.
            numerics: compute like the official DiT ("dit") or diffusers' port ("diffusers"); None: the
                checkpoint's own (ard.teacher.load_teacher). Recorded in the manifest's `teacher` field.
            cfg_channels: "all" guides every epsilon channel; "dit" only the first 3, as facebookresearch/DiT's
                sample.py (ard.diffusion.guided_prediction). The autocast precision is the trainer's `precision`
                (32-true, bf16-mixed or 16-mixed); both are recorded in the manifest's `solver` field.
            prompts: text teachers only: the prompt file (JSON Lines {"id", "text"}, or .txt: one prompt per line;
                ard.conditioning.read_prompts); trajectory i's label indexes it.
            text_encoder: text teachers only: the prompts' encoder (ard.text_encoders; "hash": the deterministic
                stand-in, as wide as the teacher's caption_channels; "t5": from text_encoder_path; "sd3": SD3's
                CLIP-L, CLIP-G and T5 from text_encoder_path, with the pooled embeddings an SD3 teacher reads).
            text_encoder_path: "t5": a local directory with its tokenizer and safetensors weights; "sd3": an SD3
                pipeline snapshot (text_encoder, text_encoder_2, text_encoder_3 and their tokenizers), or a list of
                three directories (CLIP-L, CLIP-G, T5, each with its tokenizer).
            text_max_tokens: the encoder's maximum prompt length (longer prompts are refused, never cut;
                PixArt-alpha: 120, Sigma: 300; "sd3": T5's token count, the SD3 pipeline's 256).
            null_prompt: text teachers only: the null (negative) prompt of CFG.
            schedule: the teacher's training schedule (ard/schedules.py): "vp" (epsilon prediction, DDIM on
                DiT's linear betas) or "flow" (velocity prediction, rectified flow: Euler on the grid
                sigma_k = shift(1 - k / K), recorded in the manifest's grid.sigmas; SD3 teachers: flow only).
            shift: "flow" only: the grid's time shift (1: uniform in sigma; SD3: 3.0).
        """
        check_knobs(PrecomputeTrajectories.__init__, {k: v for k, v in locals().items() if k != "self"}, "model.")
        super().__init__()
        self.save_hyperparameters()
        self.schedule = check_choice("model.schedule", schedule, ScheduleKind)
        if schedule == "flow" and cfg_channels != "all":
            raise ValueError(f"model.cfg_channels={cfg_channels!r}: a flow teacher's CFG guides every channel ('all')")
        self.sigmas = FlowSchedule(shift).grid_sigmas(num_steps) if schedule == "flow" else None  # (K+1,) flow grid
        # K + 1 timesteps, last = CLEAN (DDIM: refuses bad spacings; flow: round(1000 sigma), the manifest's record)
        self.grid = (ddim_grid(num_steps, timestep_spacing) if self.sigmas is None
                     else [round(1000 * s) for s in self.sigmas[:-1]] + [CLEAN])
        self.save_indices = list(range(num_steps + 1)) if save_indices is None else sorted(set(save_indices))
        if self.save_indices[0] != 0 or self.save_indices[-1] != num_steps:
            raise ValueError(f"save_indices must lie in [0, {num_steps}] and include 0 (the noise) and {num_steps} "
                             f"(the final sample); got {save_indices}")
        self.teacher = load_teacher(teacher, teacher_size, numerics, families=(*SERVED, *TEXT))
        self.teacher.requires_grad_(False)
        adapter = backbone_of(self.teacher)
        self.family = adapter.family
        if schedule not in adapter.schedules:
            raise ValueError(f"model.schedule={schedule!r}: a {self.family!r} teacher is sampled on the "
                             f"{' or '.join(map(repr, adapter.schedules))} schedule only")
        self.identity = teacher_identity(self.teacher)
        cfg = self.teacher.config
        self.state_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)  # (C, H, W)
        self.store_lock: DirectoryLock | None = None  # held by global rank 0 while predicting
        self.encoder, self.prompts, self.sidecar = None, None, None  # text teachers: see `conditioning`
        self.section: dict | None = None  # a text store's conditioning section, once encoded
        if (self.family in TEXT) != (prompts is not None):
            raise ValueError(f"model.prompts={prompts!r}: a {self.family!r} teacher " + (
                "is conditioned on text and needs a prompt file" if prompts is None else
                "is conditioned on class labels and takes no prompts"))
        if prompts is not None:
            width, pooled = adapter.text_dims(self.teacher)  # what the encoder must make
            self.encoder = load_text_encoder(text_encoder, width, text_encoder_path, text_max_tokens, pooled)
            self.prompts = read_prompts(prompts, self.encoder.max_tokens, self.encoder.count_tokens)

    def conditioning(self) -> dict | None:
        """A text store's manifest section: the prompts encoded into the store (once; then read back, and kept)."""
        if self.prompts is None:
            return None
        if self.section is None:
            from ard.store.text import encode_prompts

            self.section = encode_prompts(self.trainer.datamodule.path, self.prompts, self.encoder,
                                          null_prompt=self.hparams.null_prompt)
        return self.section

    def solver(self) -> dict:
        """The teacher's sampling settings (the manifest's `solver`): DDIM, or flow Euler."""
        hp, precision = self.hparams, precision_of_trainer(self.trainer.precision)
        if self.sigmas is None:
            return solver_identity(hp.num_steps, hp.timestep_spacing, hp.guidance_scale, hp.clip_sample,
                                   hp.cfg_channels, precision)
        return flow_solver_identity(hp.num_steps, hp.shift, hp.guidance_scale, hp.clip_sample, precision)

    def store_identity(self) -> dict:
        """The manifest fields this module decides (see ard.store.format.new_manifest)."""
        hp = self.hparams
        conditioning = self.conditioning()
        return dict(
            teacher={"path": hp.teacher, **self.identity},
            solver=self.solver(),
            grid_indices=self.save_indices,
            grid_timesteps=[self.grid[i] for i in self.save_indices],
            grid_sigmas=None if self.sigmas is None else [self.sigmas[i] for i in self.save_indices],
            state_shape=self.state_shape,
            with_x0=hp.with_x0,
            num_classes=num_classes(self.teacher) if conditioning is None else len(self.prompts),
            seed=hp.seed,
            micro_batch_size=hp.micro_batch_size,
            conditioning=conditioning,
        )

    def num_labels(self) -> int:
        """Labels are classes, or a text store's prompt indices."""
        return num_classes(self.teacher) if self.prompts is None else len(self.prompts)

    def condition(self, labels: torch.Tensor):
        """The teacher's condition of `labels` (m,): the labels themselves, or their encoded prompts."""
        if self.prompts is None:
            return labels.to(self.device)
        if self.sidecar is None:
            from ard.store.text import TextSidecar

            self.sidecar = TextSidecar(self.trainer.datamodule.path, self.conditioning())
        return self.sidecar.condition(labels).to(self.device)

    def configure_callbacks(self) -> list[L.Callback]:
        """The callback that releases the store lock however predicting ends."""
        return [ReleaseStoreLock()]

    def prepare_data(self) -> None:
        """Lock the store on global rank 0 (data.path; Lightning calls this hook before any setup hook, so before
        the writer's): a one-line ValueError naming the process that is writing it."""
        path = getattr(self.trainer.datamodule, "path", None)
        if path is not None and self.trainer.is_global_zero:
            self.store_lock = DirectoryLock(path, "data.path").acquire()
            self.conditioning()  # text teachers: encode the prompts once, before any manifest

    def release_store_lock(self) -> None:
        """Delete the store's lock file and unlock it (nothing when this process holds no lock)."""
        if self.store_lock is not None:
            self.store_lock.release()
            self.store_lock = None

    def setup(self, stage: str) -> None:
        from ard.store.writer import TrajectoryStoreWriter

        if not any(isinstance(c, TrajectoryStoreWriter) for c in self.trainer.callbacks):
            raise ValueError(f"{type(self).__name__} needs the callback ard.store.writer.TrajectoryStoreWriter in "
                             "trainer.callbacks (nothing would be written)")

    def _report_progress(self, count: int) -> None:
        """Tell the trainer's callbacks that have `on_trajectories_done` (the store writer's progress bar)
        that `count` more trajectories are computed: a shard takes minutes, its micro-batches seconds."""
        for callback in self._trainer.callbacks if self._trainer is not None else []:
            if hasattr(callback, "on_trajectories_done"):
                callback.on_trajectories_done(count)

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        """batch: one shard {"shard", "start", "count"} (count 0: padding for a rank with no work left).

        Returns the shard's "index" (n,), "labels" (n,), "states" (n, G, C, H, W) [and "x0"], on the CPU.
        """
        if batch["count"] == 0:
            return None
        hp = self.hparams
        start, stop = int(batch["start"]), int(batch["start"]) + int(batch["count"])
        states, x0s, labels = [], [], []
        solver = self.solver()
        for a in range(start, stop, hp.micro_batch_size):  # the fixed micro-batch layout of the shard
            idx = range(a, min(a + hp.micro_batch_size, stop))
            noise, y = trajectory_inputs(hp.seed, idx, self.state_shape, self.num_labels())  # (m, C, H, W), (m,)
            traj = solve(self.teacher, solver, noise.to(self.device), self.condition(y), self.save_indices,
                         return_x0=hp.with_x0)
            states.append(traj.states.float().cpu())  # (m, G, C, H, W)
            if hp.with_x0:
                x0s.append(traj.x0.float().cpu())  # (m, G, C, H, W)
            labels.append(y)
            self._report_progress(len(idx))
        out = {"shard": int(batch["shard"]), "index": torch.arange(start, stop), "labels": torch.cat(labels),
               "states": torch.cat(states)}  # states: (n, G, C, H, W)
        if hp.with_x0:
            out["x0"] = torch.cat(x0s)  # (n, G, C, H, W)
        return out


class ReleaseStoreLock(L.Callback):
    """Releases PrecomputeTrajectories' store lock when predicting ends, normally or by an exception (a module
    has no exception hook, a callback has)."""

    def teardown(self, trainer: L.Trainer, pl_module: PrecomputeTrajectories, stage: str) -> None:
        pl_module.release_store_lock()

    def on_exception(self, trainer: L.Trainer, pl_module: PrecomputeTrajectories, exception: BaseException) -> None:
        pl_module.release_store_lock()
