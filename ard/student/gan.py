"""The GAN stage of ARD ("ARD + GAN", docs/method.md, "The GAN stage"): a discriminator on the frozen teacher's features.

Discriminator (what the authors' re-implementation builds, after StyleGAN-T's projected discriminator): the
frozen teacher minus its final layer returns the tokens after a chosen list of blocks and its own conditioning
c = t_emb + y_emb; one small trainable head per chosen block turns tokens (B, L, D) into one logit per token:

    SN-Conv1d(k=1) -> local BN -> LeakyReLU(0.2) -> residual [SN-Conv1d(k=9, circular) -> local BN -> LeakyReLU(0.2)]
    logit_l = <SN-Conv1d(k=1)(h)_l, Linear(c)> / sqrt(64)        (projection conditioning, Miyato & Koyama 2018)

(SN: spectral norm; local BN: batch norm over virtual batches of 8 without running statistics). The teacher
is an argument of every call, never a submodule, so it is never trained, averaged, checkpointed or wrapped.

Losses (EDM2 style: small callables returning unreduced losses, the caller reduces): hinge (the
re-implementation, LADD) and non-saturating (DMD2). The generator's GAN loss enters with the adaptive weight
lambda = ||grad L_reg|| / (||grad L_gan|| + 1e-4) at the last layer, clamped to [0, 1e4] and detached (VQGAN,
Esser et al. 2021, eq. 7), times a factor (10 in the re-implementation).

Re-noising (not recorded in the paper's code; DMD2 and LADD re-noise): real and fake are taken to a random
timestep t before the teacher sees them, x_t = sqrt(a_t) x + sqrt(1 - a_t) eps; "none" shows them clean at t = 0.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import spectral_norm

from ard.backbones import backbone_of
from ard.schedules import Schedule, VPSchedule

GanLossKind = Literal["hinge", "non_saturating"]
FakeKind = Literal["teacher_forced", "rollout"]  # the final state of the one-pass forward, or of the S-step sampler
RenoiseKind = Literal["none", "same", "independent"]  # t = 0, or one t per real/fake pair, or one t each
AdaptiveGrad = Literal["last_step", "all_steps"]  # the regression gradient the adaptive weight compares
NoiseLevels = Literal["uniform", "high"]  # t uniform in [0, 999], or LADD's logit-normal favouring high noise
AugmentKind = Literal["none", "translation_cutout"]  # DiffAugment (Zhao et al. 2020) on real and fake
CMAP_DIM = 64  # width of the projection conditioning (StyleGAN-T, the re-implementation)
VIRTUAL_BATCH = 8  # samples per local batch norm group


class LocalBatchNorm(nn.Module):
    """Batch norm over groups of `virtual_batch` samples, with affine weights and no running statistics."""

    def __init__(self, channels: int, virtual_batch: int = VIRTUAL_BATCH, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = math.ceil(x.shape[0] / self.virtual_batch)
        if x.shape[0] % groups:
            raise ValueError(f"batch {x.shape[0]} does not split into {groups} equal virtual batches of "
                             f"<= {self.virtual_batch}")
        g = x.reshape(groups, -1, *x.shape[1:])  # (G, B/G, C, L)
        mean = g.mean(dim=(1, 3), keepdim=True)  # (G, 1, C, 1)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)  # (G, 1, C, 1)
        g = (g - mean) / (var + self.eps).sqrt()  # (G, B/G, C, L)
        return g.reshape(x.shape) * self.weight[:, None] + self.bias[:, None]  # (B, C, L)


def _conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")),
        LocalBatchNorm(channels), nn.LeakyReLU(0.2))


class DiscriminatorHead(nn.Module):
    """Tokens (B, L, D) of one teacher block and the conditioning c (B, D) -> one logit per token (B, L)."""

    def __init__(self, width: int, cmap_dim: int = CMAP_DIM):
        super().__init__()
        self.first = _conv_block(width, kernel_size=1)
        self.residual = _conv_block(width, kernel_size=9)
        self.out = spectral_norm(nn.Conv1d(width, cmap_dim, kernel_size=1))
        self.cmap = nn.Linear(width, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, tokens: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        h = self.first(tokens.transpose(1, 2))  # (B, D, L)
        h = (h + self.residual(h)) / math.sqrt(2)  # (B, D, L)
        out = self.out(h)  # (B, 64, L)
        return (out * self.cmap(conditioning)[:, :, None]).sum(dim=1) / math.sqrt(self.cmap_dim)  # (B, L)


class TeacherDiscriminator(nn.Module):
    """The GAN stage's discriminator: one DiscriminatorHead per chosen block of the frozen teacher, and the
    settings of what it is shown (loss, re-noising, noise levels, augmentation). The teacher is an argument of
    every call; `g` is the iteration's generator (draw_generator), from which every random draw is taken in a
    fixed order, so that a resumed run draws exactly the same."""

    def __init__(self, width: int, num_layers: int, blocks: list[int] | None, loss: GanLossKind,
                 renoise: RenoiseKind, noise_levels: NoiseLevels, augment: AugmentKind, r1: float = 0.0):
        super().__init__()
        blocks = list(range(num_layers)) if blocks is None else sorted(set(blocks))
        if not blocks or not all(0 <= b < num_layers for b in blocks):
            raise ValueError(f"gan.blocks={blocks} must be a non-empty list of block indices in [0, {num_layers})")
        self.blocks = blocks
        self.heads = nn.ModuleList(DiscriminatorHead(width) for _ in blocks)
        self.loss = GAN_LOSSES[loss]()
        self.renoise, self.noise_levels, self.augment, self.r1 = renoise, noise_levels, augment, r1
        self.schedule: Schedule = VPSchedule()  # the teacher's: where the re-noising labels sit (distillation sets it)

    def forward(self, features: list[torch.Tensor], conditioning: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, conditioning) for head, f in zip(self.heads, features)], dim=1)  # (B, n*L)

    def timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """The teacher's timesteps (n,) for n inputs: 0 (shown clean) or re-noising draws."""
        if self.renoise == "none":
            return torch.zeros(n, dtype=torch.long)
        return draw_timesteps(self.noise_levels, n, g)

    def logits(self, teacher, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
               grad_features: bool = True) -> torch.Tensor:
        """Logits (B, n*L) of x (B, C, H, W): augmented, re-noised to t (B,), through the frozen teacher's blocks
        and the heads; differentiable w.r.t. x when grad_features."""
        if self.augment == "translation_cutout":
            x = diff_augment(x, g)  # (B, C, H, W)
        if self.renoise != "none":
            x = renoise(x, t, self.schedule, g)  # (B, C, H, W)
        with torch.set_grad_enabled(grad_features and torch.is_grad_enabled()):
            features, conditioning = teacher_features(teacher, x, t.to(x.device), labels, self.blocks)
        return self(features, conditioning)  # (B, n*L)

    def generator_loss(self, teacher, fake: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The student's GAN loss (B,) for its samples `fake` (B, C, H, W), differentiable w.r.t. them."""
        return self.loss.generator(self.logits(teacher, fake, self.timesteps(len(labels), g), labels, g))  # (B,)

    def discriminator_loss(self, teacher, real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                           labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads' loss (B,) on real (B, C, H, W) against fake (B, C, H, W) samples (both constants: the
        teacher's features need no gradient, except for the R1 penalty), and the logits of each (B, n*L). With
        r1 > 0 the loss adds the R1 penalty (Mescheder et al. 2018, eq. 9) r1 / 2 ||d sum(logits) / d real||^2 per
        real sample, the gradient taken through the frozen teacher to the real input before augmentation and
        re-noising."""
        t_fake = self.timesteps(len(labels), g)  # (B,)
        t_real = t_fake if self.renoise == "same" else self.timesteps(len(labels), g)  # (B,)
        penalised = self.r1 > 0 and torch.is_grad_enabled()
        real = real.detach().requires_grad_(penalised)  # (B, C, H, W)
        # the penalty's double backward: only the math attention kernel has one
        with sdpa_kernel(SDPBackend.MATH) if penalised else contextlib.nullcontext():
            logits_real = self.logits(teacher, real, t_real, real_labels, g, grad_features=penalised)  # (B, n*L)
        logits_fake = self.logits(teacher, fake.detach(), t_fake, labels, g, grad_features=False)  # (B, n*L)
        loss = self.loss.discriminator(logits_real, logits_fake)  # (B,)
        if penalised:
            grad, = torch.autograd.grad(logits_real.sum(), real, create_graph=True)  # (B, C, H, W)
            loss = loss + self.r1 / 2 * grad.square().flatten(1).sum(1)  # (B,)
        return loss, logits_real.detach(), logits_fake

    @torch.no_grad()
    def holdout_logit(self, teacher, real: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Mean logit of held-out real samples (B, C, H, W), never trained on: the memorisation probe (heads in
        eval mode: no power iteration)."""
        training = self.training
        self.eval()
        logits = self.logits(teacher, real, self.timesteps(len(labels), g), labels, g)  # (B, n*L)
        self.train(training)
        return logits.mean()


def teacher_features(teacher, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                     blocks: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen teacher's tokens after each of `blocks` (each (B, L, D)) and its conditioning c = t_emb +
    y_emb (B, D), for x (B, C, H, W) at timesteps t (B,) with labels (B,). Differentiable w.r.t. x."""
    family = backbone_of(teacher)
    hidden = family.embed(teacher, x)  # (B, L, D)
    features = []
    prepared = family.prepare(teacher, t, labels, hidden.dtype)
    for i, block in enumerate(family.blocks(teacher)[: blocks[-1] + 1]):
        hidden = family.run_block(teacher, block, hidden, prepared, None)  # (B, L, D)
        if i in blocks:
            features.append(hidden)
    conditioning = prepared.conditioning  # (B, D)
    return features, conditioning


class HingeLoss:
    """Hinge GAN loss (Lim & Ye 2017; the re-implementation, LADD); logits (B, n) -> per-sample losses (B,)."""

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - real).mean(dim=1) + F.relu(1 + fake).mean(dim=1)  # (B,)

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean(dim=1)  # (B,)


class NonSaturatingLoss:
    """Non-saturating GAN loss (Goodfellow et al. 2014; DMD2); logits (B, n) -> per-sample losses (B,)."""

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real).mean(dim=1) + F.softplus(fake).mean(dim=1)  # (B,)

    def generator(self, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake).mean(dim=1)  # (B,)


GAN_LOSSES: dict[str, type] = {"hinge": HingeLoss, "non_saturating": NonSaturatingLoss}


def adaptive_weight(reg_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||d L_reg / d W|| / (||d L_gan / d W|| + 1e-4), clamped to [0, max_weight], detached; W is
    the last layer's weight (VQGAN eq. 7; docs/method.md, "The GAN stage"). Both graphs are kept for the backward that follows."""
    reg_grad, = torch.autograd.grad(reg_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (reg_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def draw_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """A CPU generator for one iteration's random draws: a function of (seed, iteration, rank) alone, so a
    resumed run draws exactly the same and every DDP rank draws differently."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0]))


def draw_timesteps(levels: NoiseLevels, n: int, generator: torch.Generator) -> torch.Tensor:
    """n re-noising timesteps (n,) int64 in [0, 999]: uniform, or "high" = round(999 sigmoid(N(1, 1))) (LADD's
    logit-normal, m = 1, s = 1: median 730)."""
    if levels == "uniform":
        return torch.randint(0, 1000, (n,), generator=generator)
    return (999 * torch.sigmoid(1 + torch.randn(n, generator=generator))).round().long()


def renoise(x: torch.Tensor, t: torch.Tensor, schedule: Schedule, generator: torch.Generator) -> torch.Tensor:
    """x_t = a_t x + b_t eps for x (B, C, H, W) and labels t (B,) of `schedule` (a re-noising timestep in [0, 1000)
    is sigma = t / 1000 on a flow schedule), eps drawn from `generator`."""
    noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)  # (B, C, H, W)
    return schedule.q_sample(x, t.to(x.device), noise)  # (B, C, H, W)


def diff_augment(x: torch.Tensor, generator: torch.Generator, translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """DiffAugment's translation and cutout (Zhao et al. 2020), differentiable: shift each image by up to
    `translation` of its size (edges repeated), then zero one square of `cutout` of its size. x (B, C, H, W)."""
    b, c, h, w = x.shape
    sy, sx = max(1, round(h * translation)), max(1, round(w * translation))
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), generator=generator)  # (B, 1, 1)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), generator=generator)  # (B, 1, 1)
    rows = (torch.arange(h)[None, :, None] + dy).clamp(0, h - 1)  # (B, H, 1)
    cols = (torch.arange(w)[None, None, :] + dx).clamp(0, w - 1)  # (B, 1, W)
    index = (rows * w + cols).flatten(1).to(x.device)  # (B, H*W)
    x = x.flatten(2).gather(2, index[:, None].expand(-1, c, -1)).view(b, c, h, w)  # (B, C, H, W)
    ch, cw = round(h * cutout), round(w * cutout)
    cy = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), generator=generator) - ch // 2  # (B, 1, 1) top row
    cx = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), generator=generator) - cw // 2  # (B, 1, 1) left column
    ys, xs = torch.arange(h)[None, :, None] - cy, torch.arange(w)[None, None, :] - cx  # (B, H, 1), (B, 1, W)
    keep = ~((ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw))  # (B, H, W)
    return x * keep[:, None].to(device=x.device, dtype=x.dtype)  # (B, C, H, W)

