"""Train a diffusion teacher on the digits (CFG condition dropout), with epsilon prediction on DiT's schedule or
with rectified flow (velocity prediction, Liu et al. 2023; ard/schedules.py).

A class-conditional DiT (the embedded default: `ard fit -c configs/digits/teacher.yaml`) or a text-conditioned
PixArt on the digits' captions (the text-to-image default: `ard fit -c configs/digits_t2i/teacher.yaml`; each image
gets one of its digit's captions at random, ard/data/captions.py, encoded by the text encoder once at the start). EMA weights come from
Lightning's `EMAWeightAveraging` callback (configured in the YAML), which swaps them in for validation
(callback hooks run before the module's, so the grid is drawn at validation start, on the EMA weights),
stores them as the checkpoint's `state_dict` and copies them into the model when training ends;
`on_fit_end` then exports the model in diffusers format into `<default_root_dir>/teacher_ema/`.
`scripts/export_teacher.py CKPT OUT` exports the EMA weights of any checkpoint (`export_ema`).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from ard.backbones import TEXT, Family, backbone, backbone_of
from ard.checks import (AtLeastOne, AtLeastTwo, NonNegative, NonNegativeInt, Positive, Probability, check_choice,
                        check_knobs)
from ard.data.captions import NAMES, CaptionConditions
from ard.diffusion import flow_solver_identity, solve, solver_identity
from ard.schedules import FLOW_TIME_SCALE, FlowSchedule, Schedule, ScheduleKind, VPSchedule
from ard.text_encoders import TextEncoderKind, load_text_encoder
from ard.viz import image_grid, log_image, save_png


def diffusion_loss(model, schedule: Schedule, x0: torch.Tensor, labels, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Unreduced denoising loss, shape (B,): the MSE of the model's epsilon to the noise (Ho et al. 2020, eq. 14) on a
    variance-preserving schedule, of its velocity to eps - x0 on a flow one (Liu et al. 2023, eq. 1; Esser et al.
    2024, eq. 3 with uniform sigma).

    x0: (B, C, H, W) clean images; t: (B,) time labels of `schedule`; noise: (B, C, H, W); labels: the (B,) rows'
    conditions (class labels or a TextCondition; the null condition where dropped).
    """
    x_t = schedule.q_sample(x0, t, noise)  # (B, C, H, W)
    pred = backbone_of(model).predict(model, x_t, t, labels)  # (B, C, H, W)
    target = noise if schedule.kind == "vp" else noise - x0  # (B, C, H, W)
    return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)


def draw_times(schedule: Schedule, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training time labels (n,): uniform integer timesteps in [0, T) (variance preserving), or 1000 sigma with
    sigma uniform in (0, 1] (flow)."""
    if schedule.kind == "vp":
        return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)  # [0, 1)
    return FLOW_TIME_SCALE * (1 - u)  # (n,) in (0, 1000]


class TeacherTraining(L.LightningModule):
    """A teacher trained from scratch with epsilon prediction (or rectified flow) and 10% condition dropout for CFG."""

    def __init__(self, family: Family = "dit", size: str = "digits", lr: Positive = 1e-3, weight_decay: NonNegative = 0.0,
                 warmup_steps: NonNegativeInt = 500, label_dropout: Probability = 0.1,
                 num_train_timesteps: AtLeastTwo = 1000, sample_guidance_scale: NonNegative = 2.0,
                 sample_steps: AtLeastOne = 24, clip_sample: bool = True, samples_per_class: NonNegativeInt = 8,
                 seed: NonNegativeInt = 0, text_encoder: TextEncoderKind = "hash", schedule: ScheduleKind = "vp"):
        """
        Args:
            family: "dit" (class labels) or "pixart" (the digits' captions).
            size: a named size of the family (ard.backbones.dit.DIT_SIZES, ard.backbones.pixart.PIXART_SIZES).
            lr: AdamW learning rate (after a linear warm-up).
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear learning-rate warm-up.
            label_dropout: probability of replacing a condition by the null class or prompt (CFG training).
            num_train_timesteps: T of the linear-beta schedule (1e-4..0.02).
            sample_guidance_scale: CFG scale of the sample grids made at validation.
            sample_steps: solver steps of those grids (DDIM, or Euler for flow).
            clip_sample: clip the x0-prediction to [-1, 1] when sampling (pixel-space data).
            samples_per_class: columns of the validation sample grid (one row per class).
            seed: seed of the validation noise (same noise every time, so grids are comparable).
            text_encoder: a text family's encoder of the captions (ard.text_encoders).
            schedule: "vp" (epsilon prediction on the linear-beta schedule, DDIM grids) or "flow" (rectified flow:
                velocity prediction, sigma uniform in (0, 1], Euler grids; num_train_timesteps then unused).
        """
        check_knobs(TeacherTraining.__init__, {k: v for k, v in locals().items() if k != "self"}, "model.")
        super().__init__()
        self.save_hyperparameters()
        self.model = backbone(check_choice("family", family, Family)).build(size)
        self.text = family in TEXT
        self.captions = (CaptionConditions(load_text_encoder(text_encoder, self.model.config.caption_channels))
                         if self.text else None)  # every caption and the null prompt, encoded once
        self.schedule = (VPSchedule(num_train_timesteps) if check_choice("schedule", schedule, ScheduleKind) == "vp"
                         else FlowSchedule())

    def condition(self, digits: torch.Tensor, drop: torch.Tensor | None = None,
                  templates: torch.Tensor | None = None):
        """The model's condition of digit labels (B,): the labels, or caption `templates` (B,) of each digit
        (None: drawn at random) as encoded text; rows where `drop` get the null class or prompt."""
        if self.text:
            return self.captions(digits, templates, drop)
        return digits if drop is None else torch.where(
            drop, backbone_of(self.model).null_condition(self.model, digits), digits)  # (B,)

    def training_step(self, batch, batch_idx):
        x0, labels = batch  # (B, C, H, W), (B,)
        t = draw_times(self.schedule, x0.shape[0], self.device)  # (B,)
        drop = torch.rand(x0.shape[0], device=self.device) < self.hparams.label_dropout  # (B,)
        condition = self.condition(labels, drop)
        loss = diffusion_loss(self.model, self.schedule, x0, condition, t, torch.randn_like(x0)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x0, labels = batch  # (B, C, H, W), (B,)
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # fixed t and noise: comparable numbers
        t = draw_times(self.schedule, x0.shape[0], self.device, g)  # (B,)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        condition = self.condition(labels, templates=torch.zeros_like(labels))  # each digit's first caption
        loss = diffusion_loss(self.model, self.schedule, x0, condition, t, noise).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_start(self):
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        grid = self.sample_grid()
        log_image(self.logger, "val/samples", grid, self.global_step)
        save_png(grid, Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png")

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """One row per digit (its first caption for text), `samples_per_class` columns, fixed noise: a uint8 grid."""
        hp, cfg = self.hparams, self.model.config
        n_cls = len(NAMES)
        g = torch.Generator().manual_seed(hp.seed)
        noise = torch.randn(n_cls * hp.samples_per_class, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                            generator=g).to(self.device)  # (10 * k, C, H, W)
        labels = torch.arange(n_cls, device=self.device).repeat_interleave(hp.samples_per_class)  # (10 * k,)
        condition = self.condition(labels, templates=torch.zeros_like(labels))
        solver = (solver_identity(hp.sample_steps, "leading", hp.sample_guidance_scale, hp.clip_sample, "all", "fp32")
                  if self.schedule.kind == "vp" else
                  flow_solver_identity(hp.sample_steps, 1.0, hp.sample_guidance_scale, hp.clip_sample, "fp32"))
        traj = solve(self.model, solver, noise, condition, save_indices=[hp.sample_steps])
        return image_grid(traj.states[:, -1], nrow=hp.samples_per_class)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / max(1, self.hparams.warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @classmethod
    def export_ema(cls, checkpoint: str | Path, out: str | Path) -> Path:
        """Write the EMA teacher of a Lightning checkpoint (its `state_dict`) as a diffusers directory."""
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        module = cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        module.model.save_pretrained(out)
        return Path(out)

    def on_fit_end(self):
        # EMAWeightAveraging has copied the EMA weights into self.model at on_train_end.
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "teacher_ema"
            self.model.save_pretrained(out)
