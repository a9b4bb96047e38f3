"""ARD distillation (Kim et al. 2025, sec. 3): train the student on the teacher's stored trajectories.

`ard fit -c configs/digits/ard.yaml` (re-running the same command resumes from `last.ckpt`).

One training iteration is the paper's algorithm (`ARDDistillation.regression`): the iteration's random
draws -> the student's inputs (the recipe: the teacher's states, its own rollout, or a mix) -> one pass of
the student over all S steps and the per-step losses L_s (`StepMSELoss`) -> loss = sum_s w_s L_s (ARD sec. 3.3;
"uniform" w_s = 1 / S is the re-implementation's mean over steps). What the student is fed and what it
regresses are the `recipe` (ard/student/recipe.py). Each step's loss is logged as `train/loss_step{s}` (with
SRL added to another target or SNR-weighted, also its parts: `train/srl_step{s}`, SRL's unweighted x0-space
MSE, and `train/<target>_step{s}`), the fraction of rollout inputs as `train/rollout_fraction`. With
`noise_correction` the student is trained, validated, sampled and exported with Imagine Flash's first-step noise
correction (docs/method.md, "Noise correction").

Configured by the trainer, not here (see the YAML presets): EMA weights (`ard.ema.WarmupEMA`, Lightning's
`EMAWeightAveraging` with its decay warmed up, which swaps them in for validation and copies them into the model when
training ends), gradient clipping (`gradient_clip_val`), bf16-mixed precision on GPU, checkpointing and DDP. What the
module adds for them: validation (per-step loss of the EMA student on held-out trajectories, fed the teacher's states as
`val/loss_step{s}` and its own states as `val/rollout_mse_step{s}`: the error that exposure bias adds,
ard.student.exposure) and the sample grid, both made with the EMA weights; the store's boundary timesteps, kept in every
checkpoint so that a checkpoint can be sampled without the store; the standalone EMA student
(`<default_root_dir>/student_ema/`, ard.student.export) written when fitting ends.

The GAN stage (docs/method.md, "The GAN stage") is a subclass with its own file: ard/modules/distill_gan.py.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import lightning as L
import numpy as np
import torch

from ard.checks import (AtLeastOne, Beta, Finite, Indices, NonNegative, NonNegativeInt, Positive, Weights,
                        check_fields, check_finite_weights, check_knobs, stop_on_non_finite)
from ard.diffusion import recorded_solver, solver_grid
from ard.schedules import schedule_of
from ard.student import ARDStudent, HeadKind, HistoryStart, MaskKind, OutputKind, StepMSELoss, sample
from ard.student.exposure import exposure_errors
from ard.student.export import export_student, load_exported
from ard.student.gan import draw_generator
from ard.student.model import CONFIG_NAME
from ard.student.recipe import Recipe, student_inputs, substep_paths
from ard.backbones import SERVED, TEXT, backbone_of
from ard.backbones.dit import Numerics, num_classes
from ard.teacher import DIGITS_TEACHER, check_teacher, load_teacher, teacher_identity
from ard.store.text import check_pooled
from ard.viz import image_grid, log_image, save_png

# The student's knobs are declared once, in ARDStudent.__init__; this module forwards them and takes
# their defaults from there.
_STUDENT = inspect.signature(ARDStudent.__init__).parameters
RECIPE_SEED = 1_000_003  # seed of the recipe's draws (ard.student.gan.draw_generator), apart from the GAN's


@dataclass(frozen=True)
class SampleGrid:
    """The sample grid drawn at every validation (`model.init_args.samples`)."""

    per_class: NonNegativeInt = 8  # columns: samples per class (0: no grid)
    classes: Indices | None = None  # rows, one class each; None: every class
    seed: int = 0  # seed of the grid's noise: the same noise every time, so that grids are comparable
    vae: str | None = None  # diffusers AutoencoderKL directory decoding latent states (latent teachers)
    latent_scale: Positive = 0.18215  # latents = scale * (VAE latents - shift) (sd-vae-ft-ema; SD3's VAE: 1.5305)
    latent_shift: Finite = 0.0  # (SD3's VAE: 0.0609, its config's shift_factor; 0 for the SD and SDXL VAEs)

    def __post_init__(self):
        check_fields(self, "samples.")


class Regression(NamedTuple):
    """One iteration's regression pass (ARDDistillation.regression)."""

    loss: torch.Tensor  # () sum_s w_s L_s
    terms: torch.Tensor  # (S,) w_s L_s, the loss's per-step terms (with their graph)
    final: torch.Tensor  # (B, C, H, W) the student's last-step prediction, with its graph
    rollout: torch.Tensor  # (B,) bool: which rows were fed the student's own rollout


class ARDDistillation(L.LightningModule):
    """The ARD student distilled from a DiT teacher's trajectory store (per-step MSE, AdamW)."""

    def __init__(
        self,
        teacher: str = str(DIGITS_TEACHER),
        teacher_size: str | None = None,
        numerics: Numerics | None = None,
        tie_embedders: bool | None = None,  # one timestep + label embedder for all blocks (ard.teacher.load_teacher)
        num_steps: AtLeastOne = 4,
        history_blocks: NonNegativeInt = _STUDENT["history_blocks"].default,
        mask: MaskKind = _STUDENT["mask"].default,
        window: AtLeastOne = _STUDENT["window"].default,
        heads: HeadKind = _STUDENT["heads"].default,
        output: OutputKind = _STUDENT["output"].default,
        history_start: HistoryStart = _STUDENT["history_start"].default,
        clip_x0: bool = _STUDENT["clip_x0"].default,
        step_weights: Literal["uniform"] | Weights = "uniform",
        recipe: Recipe = Recipe(),
        lr: Positive = 1e-4,
        history_gate_lr: Positive | None = None,
        weight_decay: NonNegative = 0.0,
        betas: tuple[Beta, Beta] = (0.9, 0.999),
        samples: SampleGrid = SampleGrid(),
        gradient_checkpointing: bool = False,
        init_student: str | None = None,
        noise_correction: bool = False,
    ):
        """
        Args:
            teacher: the teacher DiT the student is initialised from (a diffusers directory or an official
                DiT checkpoint, see `ard.teacher.load_teacher`); the store must hold its trajectories.
            teacher_size: key of ard.backbones.dit.DIT_SIZES; required for single-file checkpoints.
            numerics: the teacher's numerics ("dit" | "diffusers"; None: the checkpoint's own); must be the
                store's (its manifest's `teacher.numerics`).
            tie_embedders: every block shares block 0's timestep + label embedder, as in the official DiT (trained
                and counted once; ard.backbones.dit_embedders.tie_block_embedders). None: where the teacher's copies are equal
                (official weights), else one per block (e.g. the shipped digits teacher); True: tie, refusing a
                teacher whose copies differ; False: one per block, as diffusers builds it.
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
            recipe: what the student is fed and what it regresses (ard.student.recipe.Recipe: inputs,
                rollout_prob, rollout_ramp_steps, targets, target_substeps, srl_shift, srl_timesteps, srl_weights,
                srl_weight); a rollout uses the current weights, not the EMA's (as SFD and Self Forcing do).
            lr: AdamW learning rate (ARD: 1e-4).
            history_gate_lr: learning rate of the history gates ("closed" start); None: `lr`.
            weight_decay: AdamW weight decay (ARD: 0).
            betas: AdamW betas.
            samples: the sample grid of every validation (SampleGrid: per_class, classes, seed, vae,
                latent_scale, latent_shift).
            gradient_checkpointing: recompute each transformer block's activations in the backward pass
                (diffusers' gradient checkpointing): the same loss and gradients in less memory, for one more
                forward pass of compute.
            init_student: an exported student directory (`student_ema/`, ard.student.export) to start from
                instead of the teacher's weights (the GAN stage, or a continued run); its settings and
                boundary timesteps must equal this run's.
            noise_correction: Imagine Flash's first-step noise correction in training (step 0's DDIM direction
                term is the input noise x_T): the student's pass, its rollouts (recipe inputs), step 0's
                teacher_from_state target, the validation rollouts and sample grid; recorded in the export's
                ard_sampling.json so that sampling can use it too. Needs output "eps" or "x0".
        """
        check_knobs(ARDDistillation.__init__, {k: v for k, v in locals().items() if k != "self"}, "model.")
        super().__init__()
        recipe = Recipe(**recipe) if isinstance(recipe, dict) else recipe  # (hyperparameters of a checkpoint)
        samples = SampleGrid(**samples) if isinstance(samples, dict) else samples
        self.save_hyperparameters()  # (Lightning stores the dataclasses as plain dicts)
        if step_weights != "uniform" and (len(step_weights) != num_steps or not sum(step_weights) > 0):
            raise ValueError(f"step_weights={list(step_weights)}: num_steps={num_steps} needs {num_steps} weights "
                             ">= 0, not all 0")
        self.step_weights = [1.0 / num_steps] * num_steps if step_weights == "uniform" else list(step_weights)
        self.recipe, self.samples = recipe, samples
        if recipe.targets == "shifted_reconstruction" and output == "next_state":
            raise ValueError("recipe.targets='shifted_reconstruction' needs an x0-prediction: output 'eps' or 'x0'")
        if recipe.srl_weight > 0 and output == "next_state":
            raise ValueError(f"recipe.srl_weight={recipe.srl_weight} (SRL) needs an x0-prediction: output 'eps' or "
                             "'x0'")
        if recipe.srl_timesteps is not None and len(recipe.srl_timesteps) != num_steps:
            raise ValueError(f"recipe.srl_timesteps={list(recipe.srl_timesteps)}: num_steps={num_steps} needs "
                             f"{num_steps} timesteps, one per student step")
        if noise_correction and output == "next_state":
            raise ValueError("model.noise_correction=True needs an epsilon-parametrised student: output 'eps' or "
                             "'x0'")
        self.noise_correction = noise_correction
        teacher_model = load_teacher(teacher, teacher_size, numerics, tie_embedders, families=(*SERVED, *TEXT))
        self.text = backbone_of(teacher_model).family in TEXT  # labels index the store's encoded prompts
        self.prompt_condition = None  # a text store's labels -> their encoded prompts (setup)
        self.student = ARDStudent(teacher_model, num_steps, history_blocks=history_blocks, mask=mask,
                                  window=window, heads=heads, output=output, history_start=history_start,
                                  clip_x0=clip_x0).train()  # the teacher was loaded in eval mode
        if gradient_checkpointing:
            self.student.transformer.enable_gradient_checkpointing()
        config = teacher_model.config
        self.state_shape = (config.in_channels, config.sample_size, config.sample_size)  # (C, H, W) of one state
        self.num_classes = None if self.text else num_classes(teacher_model)  # a text store's: its prompts (setup)
        self.teacher_identity = teacher_identity(teacher_model)  # checked against the store's in setup
        if samples.per_class and self.state_shape[0] not in (1, 3) and samples.vae is None:
            raise ValueError(f"teacher {teacher}: {self.state_shape[0]}-channel (latent) states need samples.vae to "
                             "draw sample grids (or samples.per_class: 0)")
        self.loss_fn = StepMSELoss(recipe.targets, noise_correction=noise_correction)  # completed in setup
        self._init_timesteps = self._load_init_student(init_student) if init_student is not None else None
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
        manifest = str(Path(datamodule.path) / "manifest.json")
        if self.text:
            self.num_classes = datamodule.manifest["num_classes"]  # its prompts (the teacher identity is checked)
            self.prompt_condition = datamodule.prompt_condition  # (the data module converts the batches' labels)
            student = self.student
            check_pooled(datamodule.manifest["conditioning"], student.backbone.text_dims(student.transformer)[1],
                         manifest)
        datamodule.check_compatible(self.state_shape, self.num_classes)
        # the student must start from the store's teacher: weights, config and numerics
        check_teacher(datamodule.manifest["teacher"], self.teacher_identity, manifest,
                      f"model.teacher={self.hparams.teacher}")
        if datamodule.student_steps != self.hparams.num_steps:
            raise ValueError(f"data.student_steps={datamodule.student_steps} but model.num_steps="
                             f"{self.hparams.num_steps}: set both to the same S")
        self.timesteps = list(datamodule.timesteps)  # DDIM timesteps (int) or 1000 sigma (float) of a flow store
        if self._init_timesteps is not None and self._init_timesteps != self.timesteps:
            raise ValueError(f"{self.hparams.init_student}: boundary timesteps {self._init_timesteps} differ from "
                             f"the store's {self.timesteps}")
        solver = recorded_solver(datamodule.manifest["solver"], manifest)
        schedule = schedule_of(solver)  # the teacher's: the student's head is read on it
        if schedule.kind != "vp" and self.recipe.uses_srl:
            raise ValueError(f"{manifest}: a flow teacher's store ('solver.name' {solver['name']!r}); recipe SRL "
                             "(targets 'shifted_reconstruction', srl_weight > 0) is defined on DiT's timesteps only")
        try:
            self.student.use_schedule(schedule, schedule.label_tensor(self.timesteps[:1]))
        except ValueError as e:
            raise ValueError(f"{manifest}: model.{e}") from None
        grid = solver_grid(solver)  # the teacher's K + 1 grid labels
        substeps = self.recipe.target_substeps
        substeps = solver["num_steps"] // self.hparams.num_steps if substeps is None else substeps
        paths = (substep_paths(grid, datamodule.boundaries, substeps)
                 if self.recipe.targets == "teacher_from_state" else None)
        recipe = self.recipe
        self.loss_fn = StepMSELoss(recipe.targets, solver["guidance_scale"], solver["clip_sample"],
                                   None if paths is None else torch.tensor(paths), recipe.srl_shift,
                                   solver["cfg_channels"], recipe.srl_timesteps, recipe.srl_weights,
                                   recipe.srl_weight, self.noise_correction, schedule)

    def condition(self, labels: torch.Tensor):
        """The teacher's condition of store labels (B,): the class labels, or their encoded prompts (a text store's
        sidecar, with the null prompt for CFG)."""
        return self.prompt_condition(labels) if self.text else labels

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_weights(checkpoint["state_dict"], f"step {self.global_step}: checkpoint (not written)")
        checkpoint["boundary_timesteps"] = self.timesteps
        checkpoint["schedule"] = self.student.schedule.settings()  # what the labels mean (ard.schedules)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("boundary_timesteps")
        if self.timesteps is not None and saved != self.timesteps:  # resuming on a store (setup ran first)
            raise ValueError(f"the store's boundary timesteps {self.timesteps} differ from the checkpoint's {saved}")
        self.timesteps = saved

    @staticmethod
    def upgrade_checkpoint(checkpoint: dict, path: str) -> dict:
        """A checkpoint written before the knobs were grouped (flat recipe and sample-grid knobs, `gan_*` knobs)
        in today's layout, so that a regression run resumes; a GAN stage of that layout counted two optimiser
        steps per iteration and is refused (ard.checkpoints.SafeCheckpointIO calls this before comparing). Knobs
        added since (the SRL recipe fields, noise_correction) get their defaults, which train what it trained."""
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        if "inputs" not in hparams:
            return ARDDistillation._with_new_defaults(checkpoint)
        if hparams.get("gan_weight"):
            raise ValueError(f"{path}: a GAN stage written by an earlier ard, whose step counter counted two optimiser "
                             "steps per iteration: it cannot resume; restart the stage from its init_student in a "
                             "new trainer.default_root_dir")
        for name in [k for k in hparams if k.startswith("gan_")]:
            del hparams[name]
        hparams["recipe"] = {k: hparams.pop(k) for k in Recipe.__dataclass_fields__ if k in hparams}
        hparams["samples"] = {"per_class": hparams.pop("samples_per_class"), "classes": hparams.pop("sample_classes"),
                              "seed": hparams.pop("sample_seed"), "vae": hparams.pop("vae"),
                              "latent_scale": hparams.pop("latent_scale")}
        return ARDDistillation._with_new_defaults({**checkpoint, "hyper_parameters": hparams})

    @staticmethod
    def _with_new_defaults(checkpoint: dict) -> dict:
        """Knobs added since a checkpoint was written (recipe and sample-grid fields, noise_correction) at their
        defaults, which train what that checkpoint's run trained."""
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        if not hparams:
            return checkpoint
        if isinstance(hparams.get("recipe"), dict):
            hparams["recipe"] = {**asdict(Recipe()), **hparams["recipe"]}
        if isinstance(hparams.get("samples"), dict):
            hparams["samples"] = {**asdict(SampleGrid()), **hparams["samples"]}
        hparams.setdefault("noise_correction", False)
        return {**checkpoint, "hyper_parameters": hparams}

    # ------------------------------------------------------------------ training (ARD sec. 3.3)
    def regression(self, batch: dict) -> Regression:
        """One iteration of ARD's regression: draws -> inputs -> per-step losses L_s -> sum_s w_s L_s."""
        # the iteration's draws (mixed inputs, SRL noise): a function of (iteration, rank) alone, so that a
        # resumed run draws exactly what the uninterrupted one did
        generator = draw_generator(RECIPE_SEED, self.global_step, self.global_rank)
        prob = self.recipe.rollout_probability(self.global_step)
        inputs, rollout = student_inputs(self.student, batch["states"], batch["timesteps"], batch["labels"], prob,
                                         generator, self.noise_correction)  # (B, S, C, H, W), (B,)
        recipe = self.recipe
        teacher = self.frozen_teacher() if recipe.targets != "trajectory" or recipe.uses_srl else None
        parts = self.loss_fn.terms(self.student, batch["states"], batch["timesteps"], batch["labels"], inputs,
                                   teacher, generator)  # (B, S) losses, (B, S, C, H, W) states
        losses, predictions = parts.loss, parts.states
        per_step = losses.mean(dim=0)  # (S,) L_s
        stop_on_non_finite(self.trainer, "loss", {f"train/loss_step{s}": v for s, v in enumerate(per_step)})
        terms = per_step.new_tensor(self.step_weights) * per_step  # (S,) w_s L_s
        loss = terms.sum()  # sum_s w_s L_s
        self._log_losses("train", loss, per_step)
        if parts.srl is not None and (recipe.srl_weight > 0 or recipe.srl_weights != "uniform"):  # loss != SRL's MSE
            shown = {"srl": parts.srl} if parts.target is None else {"srl": parts.srl, recipe.targets: parts.target}
            self.log_dict({f"train/{name}_step{s}": v for name, part in shown.items()
                           for s, v in enumerate(part.detach().mean(dim=0))}, on_step=True, on_epoch=False,
                          sync_dist=True)
        self.log("train/rollout_fraction", rollout.float().mean(), on_step=True, on_epoch=False)
        return Regression(loss, terms, predictions[:, -1], rollout)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.regression(batch).loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:  # fp16's scaler skips inf steps itself
            stop_on_non_finite(self.trainer, "gradient of", {n: p.grad for n, p in self.named_parameters()})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Whatever the recipe, validation regresses the stored trajectory: comparable across recipes.
        fed, own = exposure_errors(self.student, batch["states"], batch["timesteps"], batch["labels"],
                                   self.noise_correction)  # (B, S) each: own sampled as at inference
        per_step = fed.mean(dim=0)  # (S,)
        self._log_losses("val", (per_step.new_tensor(self.step_weights) * per_step).sum(), per_step)
        self.log_dict({f"val/rollout_mse_step{s}": value for s, value in enumerate(own.mean(dim=0))}, sync_dist=True)

    def _log_losses(self, split: str, loss: torch.Tensor, per_step: torch.Tensor) -> None:
        on_step = split == "train"
        self.log(f"{split}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=True)
        self.log_dict({f"{split}/loss_step{s}": value for s, value in enumerate(per_step)},
                      on_step=on_step, on_epoch=not on_step, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        gates = [p for name, p in self.student.named_parameters() if name == "history_gate"]
        others = [p for name, p in self.student.named_parameters() if name != "history_gate" and p.requires_grad]
        groups = [{"params": others}]
        if gates:
            groups.append({"params": gates, "lr": hp.history_gate_lr or hp.lr})
        return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))

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

    # ------------------------------------------------------------------ samples
    def on_validation_epoch_start(self) -> None:
        # Callback hooks run before the module's: EMAWeightAveraging has swapped the EMA weights in here
        # (and swaps them out again in its on_validation_epoch_end, before the module's would run).
        if self.trainer.sanity_checking or not self.samples.per_class or not self.trainer.is_global_zero:
            return
        grid = self.sample_grid()
        log_image(self.logger, "val/samples", grid, self.global_step)
        save_png(grid, Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png")

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray:
        """S-step samples, one row per class, `samples.per_class` columns, fixed noise: a uint8 grid."""
        grid = self.samples
        classes = grid.classes if grid.classes is not None else range(self.num_classes)
        labels = torch.tensor(list(classes), device=self.device).repeat_interleave(grid.per_class)  # (n,)
        g = torch.Generator().manual_seed(grid.seed)
        noise = torch.randn(len(labels), *self.state_shape, generator=g).to(self.device)  # (n, C, H, W)
        return image_grid(self.generate(noise, self.condition(labels)), nrow=grid.per_class)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final S-step samples from noise (n, C, H, W) as images in [-1, 1] (VAE-decoded for latents)."""
        if self.timesteps is None:
            raise ValueError("the boundary timesteps are unknown: fit on a store first, or load a checkpoint")
        timesteps = self.student.schedule.label_tensor(self.timesteps, self.device)  # (S+1,)
        x = sample(self.student, noise, labels, timesteps, self.noise_correction)[:, -1]  # (n, C, H, W)
        if self.samples.vae is None:
            return x
        from ard.latents import decode_latents, load_vae

        if "vae" not in self._frozen:
            self._frozen["vae"] = load_vae(self.samples.vae)
        return decode_latents(self._frozen["vae"].to(self.device), x, self.samples.latent_scale,
                              shift=self.samples.latent_shift)  # (n, 3, H', W')

    # ------------------------------------------------------------------ teacher, export
    def frozen_teacher(self):
        """The frozen teacher in eval mode on this module's device (the recipe's targets, the GAN's features).

        Loaded on first use and kept outside the module's submodules: not in the optimiser, the EMA,
        the checkpoint or the DDP wrapper."""
        if "teacher" not in self._frozen:
            self._frozen["teacher"] = load_teacher(self.hparams.teacher, self.hparams.teacher_size,
                                                   self.hparams.numerics, families=(*SERVED, *TEXT)
                                                   ).requires_grad_(False)
        return self._frozen["teacher"].to(self.device)

    def export_student(self, directory: str | Path) -> Path:
        """Write the student (its current weights) as a standalone directory (ard.student.export), with the
        boundary timesteps, the recipe it was trained with and whether it is sampled with noise correction."""
        if self.timesteps is None:
            raise ValueError("the boundary timesteps are unknown: fit on a store first, or load a checkpoint")
        return export_student(self.student, self.timesteps, directory, asdict(self.recipe),
                              noise_correction=self.noise_correction)

    def on_fit_end(self) -> None:
        # EMAWeightAveraging has copied the EMA weights into the model at on_train_end.
        if self.trainer.is_global_zero:
            self.export_student(Path(self.trainer.default_root_dir) / "student_ema")
