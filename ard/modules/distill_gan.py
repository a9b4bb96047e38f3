"""ARD + GAN (docs/method.md, "The GAN stage"): the second stage, fine-tuning an exported regression student with a
GAN loss beside the regression loss.

    ard fit -c configs/digits/ard.yaml -c configs/digits/ard_gan.yaml   # after stage 1 has finished

A discriminator (ard.student.gan.TeacherDiscriminator: trainable heads on the tokens of the frozen teacher,
which is loaded on first use and is not a submodule, so it is neither trained, averaged, checkpointed nor
wrapped by DDP) is trained against real samples (ard.data.real). One iteration, manual optimisation:

    the regression pass of ARDDistillation (its loss L_reg and the student's last-step prediction)
    -> the fake: that prediction where the inputs coincide (gan.fake "teacher_forced" with every row teacher-
       forced), else the student's own S-step rollout (`rollout_final`) or a teacher-forced pass of its own
    -> a student step on L_reg + lambda L_gan, lambda = gan.weight * the adaptive weight (0 during the warm-up)
    -> a discriminator step on real against the (detached) fake.

On a text store (PixArt, SD3) the real samples' labels are prompt indices of the store, conditioned on their stored
encodings as the batches are (ard.data.real: e.g. real latents of captioned images whose captions are the prompts).

One clock: Lightning's `global_step` counts iterations (the discriminator's optimiser is stepped through the
strategy, not through Lightning's step counter), so `trainer.max_steps`, ModelCheckpoint's intervals, the
warm-up, the recipe's ramp and logging all count iterations. DDP needs `strategy: ddp_find_unused_parameters_true`
(each backward reaches only one optimiser's parameters). The discriminator's heads are in the checkpoint (and, as
the EMA callback averages the whole module, in its average, which is never used: resuming restores the raw
heads); the exported student is the student alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ard.checks import Indices, NonNegative, NonNegativeInt, Positive, check_choice, check_fields
from ard.data.real import RealSamples
from ard.modules.distill import ARDDistillation, Regression
from ard.student.gan import (AdaptiveGrad, AugmentKind, FakeKind, GanLossKind, NoiseLevels, RenoiseKind,
                             TeacherDiscriminator, adaptive_weight, draw_generator)
from ard.student.sampling import rollout_final


@dataclass(frozen=True)
class GanStage:
    """The GAN stage's knobs (`model.init_args.gan`); the re-implementation's values unless a comment says."""

    weight: Positive = 10.0  # factor times the adaptive weight of the GAN loss (the re-implementation: 10)
    adaptive_grad: AdaptiveGrad = "last_step"  # the regression gradient the adaptive weight compares: the last
    # step's term (the re-implementation's: its per-step head 4 sees only step 4) or the whole loss's ("all_steps":
    # with a shared head it sums every step's gradient, up to ~4x larger at S = 4); equal for per-step heads
    warmup: NonNegativeInt = 3000  # iterations with the GAN weight at 0 while the discriminator learns (paper: 3000)
    loss: GanLossKind = "hinge"  # "hinge" (the re-implementation, LADD) or "non_saturating" (DMD2)
    blocks: Indices | None = None  # teacher blocks the heads see; None: all (the re-implementation)
    fake: FakeKind = "teacher_forced"  # the last step of the one-pass forward, or of the student's own rollout
    renoise: RenoiseKind = "independent"  # real and fake shown clean ("none"), or re-noised: "same" t or not
    noise_levels: NoiseLevels = "uniform"  # re-noising timesteps: "uniform" (DMD2) or "high" (LADD's logit-normal)
    augment: AugmentKind = "none"  # "translation_cutout": DiffAugment on real and fake, against memorisation
    r1: NonNegative = 0.0  # gamma of the R1 penalty gamma / 2 ||grad_x D(x)||^2 on real samples (0: none, the
    # re-implementation's); a double backward through the frozen teacher per discriminator step
    real: str = "digits:train"  # real samples (ard.data.real.RealSamples): "digits:train" or a latents directory
    holdout: str | None = "digits:val"  # real samples never shown to the heads, whose logits detect memorisation
    lr: Positive = 1e-3  # discriminator AdamW learning rate (the re-implementation: 1e-3; the student's is `lr`)
    grad_clip: Positive | None = 1.0  # max gradient norm of both steps (the trainer's gradient_clip_val must be null)
    seed: int = 0  # seed of the stage's draws, combined with the iteration and the rank (a resume draws the same)

    def __post_init__(self):
        for name, kind in (("loss", GanLossKind), ("fake", FakeKind), ("renoise", RenoiseKind),
                           ("noise_levels", NoiseLevels), ("augment", AugmentKind), ("adaptive_grad", AdaptiveGrad)):
            check_choice(f"gan.{name}", getattr(self, name), kind)
        check_fields(self, "gan.")  # weight > 0: without the GAN, train the regression module (ARDDistillation)


class ARDGANDistillation(ARDDistillation):
    """The GAN stage: ARDDistillation's regression plus a discriminator on the frozen teacher (ARD + GAN)."""

    def __init__(self, gan: GanStage = GanStage(), **kwargs):
        """
        Args:
            gan: the GAN stage's knobs (GanStage: weight, warmup, loss, blocks, fake, renoise, noise_levels,
                augment, r1, real, holdout, lr, grad_clip, seed).
            **kwargs: the regression module's arguments (ARDDistillation); `init_student` is the stage-1 student.
        """
        super().__init__(**kwargs)
        self.gan = GanStage(**gan) if isinstance(gan, dict) else gan  # (hyperparameters of a checkpoint)
        teacher = self.student.transformer.config  # the student is a copy of the teacher: the same blocks
        self.discriminator = TeacherDiscriminator(teacher.num_attention_heads * teacher.attention_head_dim,
                                                  teacher.num_layers, self.gan.blocks, self.gan.loss,
                                                  self.gan.renoise, self.gan.noise_levels, self.gan.augment,
                                                  self.gan.r1)
        self.automatic_optimization = False  # a student and a discriminator step per iteration
        self.real: dict[str, RealSamples] = {}  # "train" / "holdout" real samples (loaded in setup)

    def setup(self, stage: str) -> None:
        """The regression module's store checks, then the real samples (one-line errors)."""
        super().setup(stage)
        self.discriminator.schedule = self.student.schedule  # re-noising on the store's teacher's schedule
        for part, source in (("train", self.gan.real), ("holdout", self.gan.holdout)):
            if source is None:
                continue
            field = "gan.real" if part == "train" else "gan.holdout"
            real = RealSamples(source, field)
            low, high = int(real.labels.min()), int(real.labels.max())
            if real.shape != self.state_shape or not 0 <= low <= high < self.num_classes:
                raise ValueError(f"model.{field}={source}: {len(real)} samples of shape {list(real.shape)} with labels "
                                 f"{low}..{high}; the student needs shape {list(self.state_shape)} and labels in "
                                 f"[0, {self.num_classes})")
            self.real[part] = real

    def configure_optimizers(self):
        student = super().configure_optimizers()
        hp = self.hparams
        return [student, torch.optim.AdamW(self.discriminator.parameters(), lr=self.gan.lr,
                                           weight_decay=hp.weight_decay, betas=tuple(hp.betas))]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One student step on L_reg + lambda L_gan, then one discriminator step (ARD + GAN). Returns the
        student's loss (detached: both steps are taken here)."""
        regression = self.regression(batch)
        iteration, teacher, labels = self.global_step, self.frozen_teacher(), batch["labels"]
        g = draw_generator(self.gan.seed, iteration, self.global_rank)
        adversarial = iteration >= self.gan.warmup
        fake = self.fake(batch, regression, adversarial)  # (B, C, H, W)
        opt_g, opt_d = self.optimizers()
        # the student
        weight, loss = regression.loss.new_zeros(()), regression.loss
        if adversarial:
            self.toggle_optimizer(opt_g)  # no gradients for the discriminator's heads in this step
            gan_loss = self.discriminator.generator_loss(teacher, fake, labels, g).mean()
            compared = regression.terms[-1] if self.gan.adaptive_grad == "last_step" else regression.loss
            weight = self.gan.weight * adaptive_weight(compared, gan_loss, self._last_layer())
            loss = regression.loss + weight * gan_loss
            self.log("gan/g_loss", gan_loss, on_step=True, sync_dist=True)
        self._optimiser_step(opt_g, loss)
        if adversarial:
            self.untoggle_optimizer(opt_g)
        # the discriminator
        real, real_labels = (v.to(self.device) for v in self.real["train"].draw(len(labels), g))
        d_loss, logits_real, logits_fake = self.discriminator.discriminator_loss(teacher, real,
                                                                                 self.condition(real_labels), fake,
                                                                                 labels, g)
        self._optimiser_step(opt_d, d_loss.mean(), counted=False)
        self.log_dict({"gan/d_loss": d_loss.mean(), "gan/weight": weight}, prog_bar=True, on_step=True, sync_dist=True)
        self.log_dict({"gan/logits_real": logits_real.mean(), "gan/logits_fake": logits_fake.mean()},
                      on_step=True, sync_dist=True)
        if "holdout" in self.real and iteration % self.trainer.log_every_n_steps == 0:
            held, held_labels = (v.to(self.device) for v in self.real["holdout"].draw(len(labels), g))
            self.log("gan/logits_holdout",
                     self.discriminator.holdout_logit(teacher, held, self.condition(held_labels), g),
                     on_step=True, sync_dist=True)
        return loss.detach()

    def fake(self, batch: dict, regression: Regression, adversarial: bool) -> torch.Tensor:
        """What the discriminator sees as fake (B, C, H, W): the student's final state (see GanStage.fake), with
        its graph during the adversarial phase. The regression pass's own last step where its inputs are the
        teacher's states, as "teacher_forced" asks; otherwise a pass of its own."""
        states, timesteps, labels = batch["states"], batch["timesteps"], batch["labels"]
        if self.gan.fake == "teacher_forced" and not regression.rollout.any():
            return regression.final if adversarial else regression.final.detach()
        with torch.set_grad_enabled(adversarial):
            if self.gan.fake == "teacher_forced":
                return self.student(states[:, :-1], timesteps, labels)[:, -1]  # (B, C, H, W)
            return rollout_final(self.student, states[:, 0], labels, timesteps)  # (B, C, H, W)

    def _optimiser_step(self, optimizer, loss: torch.Tensor, counted: bool = True) -> None:
        """Backward, clip and step. counted=False steps through the strategy (precision, hooks) but not through
        Lightning's step counter, so that `global_step` counts iterations."""
        self.zero_grad()  # every parameter's: the step sees exactly the gradients of this backward
        self.manual_backward(loss)
        if self.gan.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gan.grad_clip, gradient_clip_algorithm="norm")
        if counted:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def _last_layer(self) -> torch.Tensor:
        """Weight of the layer that outputs the final state: the adaptive weight's W (docs/method.md, "The GAN stage")."""
        return self.student.backbone.output_weight(self.student.head_layers(-1))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gan_clock"] = "iterations"  # global_step counts iterations (see the module docstring)

    @staticmethod
    def upgrade_checkpoint(checkpoint: dict, path: str) -> dict:
        """Refuse a GAN-stage checkpoint whose step counter counted optimiser steps (written by an earlier ard); give
        knobs added since its run their values of then: the regression module's new defaults, and the adaptive
        weight on the whole regression loss ("all_steps", the only one there was)."""
        if "hyper_parameters" in checkpoint and checkpoint.get("gan_clock") != "iterations":
            raise ValueError(f"{path}: a GAN stage written by an earlier ard, whose step counter counted two optimiser "
                             "steps per iteration (or not a GAN stage): it cannot resume; restart the stage from its "
                             "init_student in a new trainer.default_root_dir")
        checkpoint = ARDDistillation._with_new_defaults(checkpoint)
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("gan"), dict) and "adaptive_grad" not in hparams["gan"]:
            hparams = {**hparams, "gan": {**hparams["gan"], "adaptive_grad": "all_steps"}}
            checkpoint = {**checkpoint, "hyper_parameters": hparams}
        return checkpoint

