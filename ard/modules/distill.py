"""ARD distillation (Kim et al. 2025, sec. 3): train the student on the teacher's stored trajectories.

`ard fit -c configs/digits/ard.yaml` (re-running the same command resumes from `last.ckpt`).

One training step is one pass of the student over all S steps of a batch of trajectories
(`StepMSELoss`): loss = sum_s w_s * mean_b ||x_hat_{tau_{s+1}} - target_s||^2 / (CHW) (ARD sec. 3.3;
"uniform" weights w_s = 1 / S are the re-implementation's mean over steps). What the student is fed
(`inputs`: the teacher's states, its own rollout, or a mix) and what it regresses (`targets`: the stored
trajectory, the teacher run from the student's state, or Imagine Flash's shifted reconstruction) are the
recipe knobs of ard/student/recipe.py. Each step's loss is logged as `train/loss_step{s}`, and the
fraction of rollout inputs as `train/rollout_fraction`.

Configured by the trainer, not here (see the YAML presets): EMA weights (Lightning's
`EMAWeightAveraging`, which swaps them in for validation and copies them into the model when training
ends), gradient clipping (`gradient_clip_val`), bf16-mixed precision on GPU, checkpointing and DDP.
What the module adds for them: validation (per-step loss of the EMA student on held-out trajectories, fed
the teacher's states as `val/loss_step{s}` and its own states as `val/rollout_mse_step{s}`: the error that
exposure bias adds, ard.student.exposure) and the sample grid, both made with the EMA weights; the boundary timesteps of the store,
kept in every checkpoint so a checkpoint can be sampled without the store; the standalone EMA student
(`<default_root_dir>/student_ema/`, see `export_student`) written when fitting ends.

ARD + GAN (ARD sec. 4; `ard fit -c configs/digits/ard.yaml -c configs/digits/ard_gan.yaml`): with
`gan_weight` > 0 a discriminator (`ard.student.gan`: trainable heads on the tokens of `frozen_teacher()`, which
is loaded on first use and is not a submodule, so it is neither trained, averaged, checkpointed nor wrapped by
DDP) is trained against real samples (`ard.data.real`), and `gan_step` runs after the regression loss:
manual optimisation, a student step on L_reg + lambda L_gan then a discriminator step, gradients clipped by
`gan_grad_clip` (the trainer's `gradient_clip_val` must be null). Lightning's `global_step` then counts both
optimisers' steps (2 per iteration: `max_steps`, ModelCheckpoint's `every_n_train_steps` count those), the
warm-up counts iterations. DDP needs `strategy: ddp_find_unused_parameters_true` (each backward reaches only
one optimiser's parameters). The discriminator's heads are in the checkpoint (and, as the EMA callback averages
the whole module, in its average, which is never used: resuming restores the raw heads); the exported student
is the student alone. With `gan_weight` 0 (the default) none of this exists: the regression training as before.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from ard.atomic import atomic_directory
from ard.checks import check_finite_weights, check_timesteps, stop_on_non_finite
from ard.diffusion import ddim_grid, recorded_solver
from ard.data.real import RealSamples
from ard.student.exposure import exposure_errors
from ard.student import ARDStudent, HeadKind, HistoryStart, MaskKind, OutputKind, StepMSELoss, sample
from ard.student.attention import check_choice
from ard.student.gan import (GAN_LOSSES, AugmentKind, FakeKind, GanLossKind, NoiseLevels, RenoiseKind,
                             TeacherDiscriminator, adaptive_weight, diff_augment, draw_generator, draw_timesteps,
                             renoise, rollout_final, teacher_features)
from ard.student.model import CONFIG_NAME
from ard.student.recipe import InputKind, TargetKind, rollout_probability, student_inputs, substep_paths
from ard.teacher import DIGITS_TEACHER, Numerics, check_teacher, load_teacher, num_classes, teacher_identity
from ard.viz import image_grid, log_image, save_png

# The student's knobs are declared once, in ARDStudent.__init__; this module forwards them and takes
# their defaults from there.
_STUDENT = inspect.signature(ARDStudent.__init__).parameters
SAMPLING_CONFIG = "ard_sampling.json"  # beside an exported student: its boundary timesteps and training recipe
RECIPE_SEED = 1_000_003  # seed of the recipe's draws (ard.student.gan.draw_generator), apart from gan_seed's
RECIPE_KNOBS = ("inputs", "rollout_prob", "rollout_ramp_steps", "targets", "target_substeps", "srl_shift")


class ARDDistillation(L.LightningModule):
    """The ARD student distilled from a DiT teacher's trajectory store (per-step MSE, AdamW)."""

    def __init__(
        self,
        teacher: str = str(DIGITS_TEACHER),
        teacher_size: str | None = None,
        numerics: Numerics | None = None,
        num_steps: int = 4,
        history_blocks: int = _STUDENT["history_blocks"].default,
        mask: MaskKind = _STUDENT["mask"].default,
        window: int = _STUDENT["window"].default,
        heads: HeadKind = _STUDENT["heads"].default,
        output: OutputKind = _STUDENT["output"].default,
        history_start: HistoryStart = _STUDENT["history_start"].default,
        clip_x0: bool = _STUDENT["clip_x0"].default,
        step_weights: Literal["uniform"] | list[float] = "uniform",
        inputs: InputKind = "teacher",
        rollout_prob: float = 0.5,
        rollout_ramp_steps: int = 0,
        targets: TargetKind = "trajectory",
        target_substeps: int | None = None,
        srl_shift: float = 1.0,
        lr: float = 1e-4,
        history_gate_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        samples_per_class: int = 8,
        sample_classes: list[int] | None = None,
        sample_seed: int = 0,
        vae: str | None = None,
        latent_scale: float = 0.18215,
        gradient_checkpointing: bool = False,
        init_student: str | None = None,
        gan_weight: float = 0.0,
        gan_warmup: int = 3000,
        gan_loss: GanLossKind = "hinge",
        gan_blocks: list[int] | None = None,
        gan_fake: FakeKind = "teacher_forced",
        gan_renoise: RenoiseKind = "independent",
        gan_noise_levels: NoiseLevels = "uniform",
        gan_augment: AugmentKind = "none",
        gan_real: str = "digits:train",
        gan_holdout: str | None = "digits:val",
        gan_lr: float = 1e-3,
        gan_grad_clip: float | None = 1.0,
        gan_seed: int = 0,
    ):
        """
        Args:
            teacher: the teacher DiT the student is initialised from (a diffusers directory or an official
                DiT checkpoint, see `ard.teacher.load_teacher`); the store must hold its trajectories.
            teacher_size: key of ard.teacher.DIT_SIZES; required for single-file checkpoints.
            numerics: the teacher's numerics ("dit" | "diffusers"; None: the checkpoint's own); must be the
                store's (its manifest's `teacher.numerics`).
            num_steps: S, student steps; must equal the data's `student_steps`.
            history_blocks: N, lowest blocks with history attention (0 = the step-distillation baseline).
            mask: which earlier steps each step sees in those blocks (ARDStudent).
            window: previous steps visible with mask="window".
            heads: "shared" output head or one per step.
            output: the head's output read as eps / x0 (then a DDIM jump) or as the next state.
            history_start: "closed" (zero history gates: the untrained student equals the baseline) or
                "plain" (the paper).
            clip_x0: clamp the implied x0 to [-1, 1] (pixel-space teachers).
            step_weights: w_s of the loss sum over steps: "uniform" (1 / S each) or S numbers.
            inputs: what the student is fed (ard/student/recipe.py): "teacher" (the stored states: teacher
                forcing), "rollout" (its own S-step rollout from the trajectory's noise, no grad, KV cache) or
                "mixed" (per trajectory, the rollout with probability rollout_prob).
            rollout_prob: "mixed" only: the probability of rollout inputs (after the ramp).
            rollout_ramp_steps: "mixed" only: the probability ramps linearly from 0 over this many iterations
                (scheduled sampling; 0: constant).
            targets: what each step regresses: "trajectory" (the stored teacher state), "teacher_from_state"
                (the frozen teacher's DDIM from the student's input state to the next boundary: Imagine Flash's
                backward distillation) or "shifted_reconstruction" (Imagine Flash's SRL, in x0 space).
            target_substeps: "teacher_from_state": the teacher's DDIM sub-steps per student step, on the
                store's grid (must divide K / S); None: K / S (the store's own solver).
            srl_shift: "shifted_reconstruction": the shift of the re-noising timestep (recipe.shift_timesteps;
                1: the student's own input timestep).
            lr: AdamW learning rate (ARD: 1e-4).
            history_gate_lr: learning rate of the history gates ("closed" start); None: `lr`.
            weight_decay: AdamW weight decay (ARD: 0).
            betas: AdamW betas.
            samples_per_class: columns of the sample grid made at each validation (0: no grid).
            sample_classes: rows of the grid (one class each); None: every class.
            sample_seed: seed of the grid's noise (the same noise every time, so grids are comparable).
            vae: diffusers AutoencoderKL directory decoding latent states for the grid (latent teachers).
            latent_scale: latents = scale * VAE latents (0.18215 for sd-vae-ft-ema).
            gradient_checkpointing: recompute each transformer block's activations in the backward pass
                (diffusers' gradient checkpointing): the same loss and gradients in less memory, for one more
                forward pass of compute.
            init_student: an exported student directory (`student_ema/`, see `export_student`) to start from
                instead of the teacher's weights (ARD + GAN's second stage); its settings and boundary
                timesteps must equal this run's.
            gan_weight: factor times the adaptive weight of the GAN loss (ARD sec. 4, the re-implementation:
                10); 0: no discriminator, exactly the regression training (automatic optimisation).
            gan_warmup: iterations with the GAN weight at 0 while the discriminator learns (paper: 3000).
            gan_loss: "hinge" (the re-implementation) or "non_saturating" (DMD2).
            gan_blocks: teacher blocks whose tokens the discriminator heads see; None: all (the re-implementation).
            gan_fake: what the discriminator sees as fake: the final state of the teacher-forced one-pass
                forward, or the final sample of the student's own S-step rollout from the trajectory's noise
                (KV cache; gradient through the last step only, see `ard.student.gan.rollout_final`).
            gan_renoise: real and fake before the teacher sees them: "none" (clean, t = 0), or re-noised to random
                timesteps, the "same" for each real/fake pair or "independent" ones (the default, with uniform
                levels: the best FID against real digits in the pilot, docs/results/gan_pilot.json).
            gan_noise_levels: distribution of those timesteps: "uniform" (DMD2) or "high" (LADD's logit-normal).
            gan_augment: differentiable augmentation of real and fake against memorisation ("translation_cutout":
                DiffAugment).
            gan_real: real samples in the student's space (`ard.data.real.RealSamples`): "digits:train" or a
                directory with latents.npy and labels.npy (scripts/encode_real_latents.py).
            gan_holdout: real samples never shown to the discriminator; their logits are logged to detect
                memorisation (None: not measured).
            gan_lr: discriminator AdamW learning rate (the re-implementation: 1e-3; the student's is `lr`).
            gan_grad_clip: max gradient norm of the student and discriminator steps with the GAN (manual
                optimisation: the trainer's gradient_clip_val must be null); None: no clipping.
            gan_seed: seed of the GAN stage's draws (real samples, re-noising, augmentation), combined with the
                iteration and the rank, so that a resumed run draws exactly the same.
        """
        super().__init__()
        self.save_hyperparameters()
        if step_weights != "uniform" and len(step_weights) != num_steps:
            raise ValueError(f"step_weights has {len(step_weights)} entries; num_steps={num_steps} needs {num_steps}")
        self.step_weights = [1.0 / num_steps] * num_steps if step_weights == "uniform" else list(step_weights)
        teacher_model = load_teacher(teacher, teacher_size, numerics)
        self.student = ARDStudent(teacher_model, num_steps, history_blocks=history_blocks, mask=mask,
                                  window=window, heads=heads, output=output, history_start=history_start,
                                  clip_x0=clip_x0).train()  # the teacher was loaded in eval mode
        if gradient_checkpointing:
            self.student.transformer.enable_gradient_checkpointing()
        self.state_shape = (teacher_model.config.in_channels, teacher_model.config.sample_size,
                            teacher_model.config.sample_size)  # (C, H, W) of one state
        self.num_classes = num_classes(teacher_model)
        self.teacher_identity = teacher_identity(teacher_model)  # checked against the store's in setup
        if samples_per_class and self.state_shape[0] not in (1, 3) and vae is None:
            raise ValueError(f"teacher {teacher}: {self.state_shape[0]}-channel (latent) states need `vae` to "
                             "draw sample grids (or samples_per_class: 0)")
        self.inputs = check_choice("inputs", inputs, InputKind)
        self.targets = check_choice("targets", targets, TargetKind)
        if not 0 <= rollout_prob <= 1 or rollout_ramp_steps < 0:
            raise ValueError(f"rollout_prob={rollout_prob} must lie in [0, 1] and rollout_ramp_steps="
                             f"{rollout_ramp_steps} be >= 0")
        if targets == "shifted_reconstruction" and output == "next_state":
            raise ValueError("targets='shifted_reconstruction' needs an x0-prediction: output 'eps' or 'x0'")
        if not srl_shift > 0:
            raise ValueError(f"srl_shift={srl_shift} must be > 0 (1: re-noise at the student's input timestep)")
        self.loss_fn = StepMSELoss(targets)  # completed with the store's solver in setup
        self._init_timesteps = self._load_init_student(init_student) if init_student is not None else None
        # ARD + GAN (sec. 4): trainable heads on the frozen teacher's features; none when gan_weight is 0, so
        # that the module (state_dict, optimiser, automatic optimisation) is exactly the regression one.
        for name, kind in (("gan_loss", GanLossKind), ("gan_fake", FakeKind), ("gan_renoise", RenoiseKind),
                           ("gan_noise_levels", NoiseLevels), ("gan_augment", AugmentKind)):
            check_choice(name, self.hparams[name], kind)
        self.discriminator = None
        if gan_weight:
            self.discriminator = TeacherDiscriminator(teacher_model.config.num_attention_heads *
                                                      teacher_model.config.attention_head_dim,
                                                      len(teacher_model.transformer_blocks), gan_blocks)
            self.gan_loss_fn = GAN_LOSSES[gan_loss]()
            self.automatic_optimization = False  # a generator and a discriminator step per batch
        self.real: dict[str, RealSamples] = {}  # the GAN's real samples, "train" / "holdout" (loaded in setup)
        del teacher_model
        self.timesteps: list[int] | None = None  # the store's S + 1 boundary timesteps (last = CLEAN)
        # Frozen helpers loaded on first use (frozen_teacher(), the grid's VAE), kept in a plain dict so
        # that they are not submodules: not trained, averaged, checkpointed or wrapped by DDP.
        self._frozen: dict[str, torch.nn.Module] = {}

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        """Check the store against the student before anything runs (one-line errors)."""
        datamodule = self.trainer.datamodule
        if not all(hasattr(datamodule, a) for a in ("check_compatible", "timesteps", "student_steps")):
            raise ValueError(f"{type(self).__name__} needs a trajectory store as data "
                             f"(ard.data.trajectories.TrajectoryDataModule); got {type(datamodule).__name__}")
        datamodule.check_compatible(self.state_shape, self.num_classes)
        # the student must start from the store's teacher: weights, config and numerics
        check_teacher(datamodule.manifest["teacher"], self.teacher_identity,
                      str(Path(datamodule.path) / "manifest.json"), f"model.teacher={self.hparams.teacher}")
        if datamodule.student_steps != self.hparams.num_steps:
            raise ValueError(f"data.student_steps={datamodule.student_steps} but model.num_steps="
                             f"{self.hparams.num_steps}: set both to the same S")
        self.timesteps = [int(t) for t in datamodule.timesteps]
        solver = recorded_solver(datamodule.manifest["solver"], str(Path(datamodule.path) / "manifest.json"))
        grid = ddim_grid(solver["num_steps"], solver["timestep_spacing"])  # the teacher's K + 1 grid timesteps
        substeps = self.hparams.target_substeps or (solver["num_steps"] // self.hparams.num_steps)
        paths = substep_paths(grid, datamodule.boundaries, substeps) if self.targets == "teacher_from_state" else None
        self.loss_fn = StepMSELoss(self.targets, solver["guidance_scale"], solver["clip_sample"],
                                   None if paths is None else torch.tensor(paths), self.hparams.srl_shift,
                                   solver["cfg_channels"])
        self._setup_gan()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(checkpoint["state_dict"], f"step {self.global_step}: checkpoint (not written)")
        checkpoint["boundary_timesteps"] = self.timesteps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("boundary_timesteps")
        if self.timesteps is not None and saved != self.timesteps:  # resuming on a store (setup ran first)
            raise ValueError(f"the store's boundary timesteps {self.timesteps} differ from the checkpoint's {saved}")
        self.timesteps = saved

    # ------------------------------------------------------------------ loss
    def step_losses(self, batch: dict, inputs: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-step loss, mean over the batch: (S,). inputs (B, S, C, H, W): None = the teacher's states;
        generator: the iteration's draws (SRL's re-noising)."""
        teacher = self.frozen_teacher() if self.targets != "trajectory" else None
        return self.loss_fn(self.student, batch["states"], batch["timesteps"], batch["labels"], inputs, teacher,
                            generator).mean(dim=0)

    def training_inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This iteration's student inputs (B, S, C, H, W) and which rows are rollouts (B,) (see `inputs`); a
        rollout uses the current weights, not the EMA's (as SFD and Self Forcing do)."""
        hp = self.hparams
        prob = rollout_probability(self.inputs, hp.rollout_prob, hp.rollout_ramp_steps, self.global_step)
        return student_inputs(self.student, batch["states"], batch["timesteps"], batch["labels"], prob, generator)

    def _log_losses(self, split: str, per_step: torch.Tensor) -> torch.Tensor:
        loss = (per_step.new_tensor(self.step_weights) * per_step).sum()
        on_step = split == "train"
        self.log(f"{split}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=True)
        self.log_dict({f"{split}/loss_step{s}": value for s, value in enumerate(per_step)},
                      on_step=on_step, on_epoch=not on_step, sync_dist=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # one stream for the iteration's recipe draws (mixed inputs, SRL noise), a function of (step, rank) alone:
        # a resumed run draws exactly what the uninterrupted one did
        generator = draw_generator(RECIPE_SEED, self.global_step, self.global_rank)
        inputs, rollout = self.training_inputs(batch, generator)  # (B, S, C, H, W), (B,)
        self.log("train/rollout_fraction", rollout.float().mean(), on_step=True, on_epoch=False)
        per_step = self.step_losses(batch, inputs, generator)
        stop_on_non_finite(self.trainer, "loss", {f"train/loss_step{s}": v for s, v in enumerate(per_step)})
        loss = self._log_losses("train", per_step)
        return loss if self.discriminator is None else self.gan_step(batch, loss)

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:  # fp16's scaler skips inf steps itself
            stop_on_non_finite(self.trainer, "gradient of", {n: p.grad for n, p in self.named_parameters()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Whatever the recipe, validation regresses the stored trajectory: comparable across recipes.
        fed, own = exposure_errors(self.student, batch["states"], batch["timesteps"], batch["labels"])  # (B, S) each
        self._log_losses("val", fed.mean(dim=0))
        self.log_dict({f"val/rollout_mse_step{s}": value for s, value in enumerate(own.mean(dim=0))}, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        gates = [p for name, p in self.student.named_parameters() if name == "history_gate"]
        others = [p for name, p in self.student.named_parameters() if name != "history_gate" and p.requires_grad]
        groups = [{"params": others}]
        if gates:
            groups.append({"params": gates, "lr": hp.history_gate_lr or hp.lr})
        student = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        if self.discriminator is None:
            return student
        return [student, torch.optim.AdamW(self.discriminator.parameters(), lr=hp.gan_lr, weight_decay=hp.weight_decay,
                                           betas=tuple(hp.betas))]

    # ------------------------------------------------------------------ GAN stage (ARD sec. 4)
    def _load_init_student(self, directory: str) -> list[int]:
        """Copy an exported student's weights into the student; return its boundary timesteps."""
        loaded, timesteps = load_exported(directory)
        ours = self.student.settings()
        for key, value in loaded.settings().items():
            if value != ours[key]:
                raise ValueError(f"{Path(directory) / CONFIG_NAME}: field {key!r} is {value!r} but this run's student "
                                 f"has {ours[key]!r} (model.init_student must have the same settings)")
        self.student.load_state_dict(loaded.state_dict())
        return timesteps

    def _setup_gan(self) -> None:
        """Check init_student against the store; load the GAN's real samples (one-line errors)."""
        hp = self.hparams
        if self._init_timesteps is not None and self._init_timesteps != self.timesteps:
            raise ValueError(f"{Path(hp.init_student) / SAMPLING_CONFIG}: boundary timesteps {self._init_timesteps} "
                             f"differ from the store's {self.timesteps}")
        if self.discriminator is None:
            return
        for part, field in (("train", "gan_real"), ("holdout", "gan_holdout")):
            source = hp[field]
            if source is None:
                continue
            real = RealSamples(source, field)
            low, high = int(real.labels.min()), int(real.labels.max())
            if real.shape != self.state_shape or not 0 <= low <= high < self.num_classes:
                raise ValueError(f"model.{field}={source}: {len(real)} samples of shape {list(real.shape)} with labels "
                                 f"{low}..{high}; the student needs shape "
                                 f"{list(self.state_shape)} and labels in [0, {self.num_classes})")
            self.real[part] = real

    def gan_step(self, batch: dict, reg_loss: torch.Tensor) -> torch.Tensor:
        """One student step on L_reg + lambda * L_gan, then one discriminator step (ARD sec. 4; manual
        optimisation, gradients clipped by hand). lambda = gan_weight * the adaptive weight, 0 during the warm-up.
        The fake is made once per iteration and reused, detached, by the discriminator step. Returns the
        student's loss (detached)."""
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        # With manual optimisation Lightning's global_step counts the steps of both optimisers: 2 per iteration.
        iteration = self.global_step // 2
        g = draw_generator(hp.gan_seed, iteration, self.global_rank)
        labels = batch["labels"]  # (B,)
        adversarial = iteration >= hp.gan_warmup
        with torch.set_grad_enabled(adversarial):
            fake = self._fake(batch)  # (B, C, H, W)
        # generator (the student)
        weight, loss = reg_loss.new_zeros(()), reg_loss
        if adversarial:
            self.toggle_optimizer(opt_g)  # no gradients for the discriminator's heads in this step
            gan_loss = self.gan_loss_fn.generator(self._logits(fake, self._timesteps(len(labels), g), labels, g)).mean()
            weight = hp.gan_weight * adaptive_weight(reg_loss, gan_loss, self._last_layer())
            loss = reg_loss + weight * gan_loss
            self.log("gan/g_loss", gan_loss, on_step=True, sync_dist=True)
        self._optimiser_step(opt_g, loss)
        if adversarial:
            self.untoggle_optimizer(opt_g)
        # discriminator: the teacher's features need no gradient here (real and fake are both constants)
        real, real_labels = (v.to(self.device) for v in self.real["train"].draw(len(labels), g))
        t_fake = self._timesteps(len(labels), g)
        t_real = t_fake if hp.gan_renoise == "same" else self._timesteps(len(labels), g)
        logits_real = self._logits(real, t_real, real_labels, g, grad_features=False)  # (B, n*L)
        logits_fake = self._logits(fake.detach(), t_fake, labels, g, grad_features=False)  # (B, n*L)
        d_loss = self.gan_loss_fn.discriminator(logits_real, logits_fake).mean()
        self._optimiser_step(opt_d, d_loss)
        self.log_dict({"gan/d_loss": d_loss, "gan/weight": weight}, prog_bar=True, on_step=True, sync_dist=True)
        self.log_dict({"gan/logits_real": logits_real.mean(), "gan/logits_fake": logits_fake.mean()},
                      on_step=True, sync_dist=True)
        if "holdout" in self.real and iteration % self.trainer.log_every_n_steps == 0:
            self.log("gan/logits_holdout", self._holdout_logits(len(labels), g), on_step=True, sync_dist=True)
        return loss.detach()

    def _fake(self, batch: dict) -> torch.Tensor:
        """What the discriminator sees as fake (B, C, H, W): the student's final state (see `gan_fake`)."""
        if self.hparams.gan_fake == "teacher_forced":
            return self.student(batch["states"][:, :-1], batch["timesteps"], batch["labels"])[:, -1]  # (B, C, H, W)
        return rollout_final(self.student, batch["states"][:, 0], batch["labels"], batch["timesteps"])

    def _timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """The teacher's timesteps (n,) for n discriminator inputs: 0 (clean) or re-noising draws."""
        if self.hparams.gan_renoise == "none":
            return torch.zeros(n, dtype=torch.long)
        return draw_timesteps(self.hparams.gan_noise_levels, n, g)

    def _logits(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
                grad_features: bool = True) -> torch.Tensor:
        """Discriminator logits (B, n*L) of x (B, C, H, W): augmented, re-noised to t (B,), through the frozen
        teacher's blocks and the heads."""
        hp = self.hparams
        if hp.gan_augment == "translation_cutout":
            x = diff_augment(x, g)  # (B, C, H, W)
        if hp.gan_renoise != "none":
            x = renoise(x, t, self.student.scheduler, g)  # (B, C, H, W)
        with torch.set_grad_enabled(grad_features and torch.is_grad_enabled()):
            features, conditioning = teacher_features(self.frozen_teacher(), x, t.to(self.device), labels,
                                                      self.discriminator.blocks)
        return self.discriminator(features, conditioning)  # (B, n*L)

    @torch.no_grad()
    def _holdout_logits(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Mean logit of n held-out real samples (discriminator in eval mode: no power iteration)."""
        real, labels = (v.to(self.device) for v in self.real["holdout"].draw(n, g))
        self.discriminator.eval()
        logits = self._logits(real, self._timesteps(n, g), labels, g)  # (n, n_heads*L)
        self.discriminator.train()
        return logits.mean()

    def _optimiser_step(self, optimizer, loss: torch.Tensor) -> None:
        self.zero_grad()  # every parameter's: the step sees exactly the gradients of this backward
        self.manual_backward(loss)
        if self.hparams.gan_grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gan_grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def _last_layer(self) -> torch.Tensor:
        """Weight of the layer that outputs the final state: the adaptive weight's W (ARD sec. 4)."""
        head = self.student.transformer if self.student.heads is None else self.student.heads[-1]
        return head.proj_out_2.weight

    # ------------------------------------------------------------------ samples
    def on_validation_epoch_start(self) -> None:
        # Callback hooks run before the module's: EMAWeightAveraging has swapped the EMA weights in here
        # (and swaps them out again in its on_validation_epoch_end, before the module's would run).
        if self.trainer.sanity_checking or not self.hparams.samples_per_class or not self.trainer.is_global_zero:
            return
        grid = self.sample_grid()
        log_image(self.logger, "val/samples", grid, self.global_step)
        save_png(grid, Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png")

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray:
        """S-step samples, one row per class, `samples_per_class` columns, fixed noise: a uint8 grid."""
        hp = self.hparams
        classes = hp.sample_classes if hp.sample_classes is not None else range(self.num_classes)
        labels = torch.tensor(list(classes), device=self.device).repeat_interleave(hp.samples_per_class)  # (n,)
        g = torch.Generator().manual_seed(hp.sample_seed)
        noise = torch.randn(len(labels), *self.state_shape, generator=g).to(self.device)  # (n, C, H, W)
        return image_grid(self.generate(noise, labels), nrow=hp.samples_per_class)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final S-step samples from noise (n, C, H, W) as images in [-1, 1] (VAE-decoded for latents)."""
        if self.timesteps is None:
            raise ValueError("the boundary timesteps are unknown: fit on a store first, or load a checkpoint")
        timesteps = torch.tensor(self.timesteps, device=self.device)  # (S+1,)
        x = sample(self.student, noise, labels, timesteps)[:, -1]  # (n, C, H, W)
        if self.hparams.vae is None:
            return x
        from ard.latents import decode_latents, load_vae

        if "vae" not in self._frozen:
            self._frozen["vae"] = load_vae(self.hparams.vae)
        return decode_latents(self._frozen["vae"].to(self.device), x, self.hparams.latent_scale)  # (n, 3, H', W')

    # ------------------------------------------------------------------ teacher, export
    def frozen_teacher(self):
        """The frozen teacher in eval mode on this module's device (for the GAN stage's features).

        Loaded on first use and kept outside the module's submodules: not in the optimiser, the EMA,
        the checkpoint or the DDP wrapper."""
        if "teacher" not in self._frozen:
            self._frozen["teacher"] = load_teacher(self.hparams.teacher, self.hparams.teacher_size,
                                                   self.hparams.numerics).requires_grad_(False)
        return self._frozen["teacher"].to(self.device)

    def export_student(self, directory: str | Path) -> Path:
        """Write the student (its current weights) as a standalone directory: ARDStudent.save_pretrained
        plus `ard_sampling.json` with the boundary timesteps, so sampling needs neither teacher nor store."""
        if self.timesteps is None:
            raise ValueError("the boundary timesteps are unknown: fit on a store first, or load a checkpoint")
        check_finite_weights(self.student.state_dict(), f"export to {directory} (not written)")
        with atomic_directory(directory) as tmp:  # readers never see a student without its timesteps
            self.student.save_pretrained(tmp)
            recipe = {k: self.hparams[k] for k in RECIPE_KNOBS}  # provenance: how the student was trained
            (tmp / SAMPLING_CONFIG).write_text(json.dumps({"timesteps": self.timesteps, "recipe": recipe}) + "\n")
        return Path(directory)

    def on_fit_end(self) -> None:
        # EMAWeightAveraging has copied the EMA weights into the model at on_train_end.
        if self.trainer.is_global_zero:
            self.export_student(Path(self.trainer.default_root_dir) / "student_ema")


def load_exported(directory: str | Path) -> tuple[ARDStudent, list[int]]:
    """A standalone student directory (export_student) -> (student in eval mode, boundary timesteps)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"student directory not found: {directory}")
    try:
        student = ARDStudent.from_pretrained(directory)
    except (OSError, RuntimeError) as e:  # diffusers: a weights file missing or unreadable
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{directory}: student weights missing or unreadable ({str(e).strip().splitlines()[0]})") from None
    check_finite_weights(student.state_dict(), str(directory))
    path = directory / SAMPLING_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (export the student with scripts/sample_student.py export)")
    try:
        timesteps = json.loads(path.read_text())["timesteps"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: expected JSON with a list field 'timesteps'") from None
    if not isinstance(timesteps, list) or len(timesteps) != student.num_steps + 1:
        raise ValueError(f"{path}: 'timesteps' must list {student.num_steps + 1} integers for a "
                         f"{student.num_steps}-step student")
    return student, check_timesteps(timesteps, f"{path}: field 'timesteps'")
