"""The ARD student: the teacher's diffusers transformer (copied) plus history attention in its lowest N blocks.

Step layout: the S states of a trajectory are folded into the batch (rows ordered (b, s)), so every
block runs the teacher's own code on tokens (B*S, L, D) and each row gets the time embedding of its
own timestep (token-wise time embedding, ARD sec. 3.2). Only the image self-attention of the lowest N blocks
is replaced (`HistoryAttnProcessor`; SD3's joint image-text attention: `JointHistoryAttnProcessor`, its text
tokens each step's own); blocks above N attend within their own row, i.e. their own step. What
is family-specific (the blocks, the head, the condition) goes through the teacher's adapter (ard/backbones/).

Output (ARD sec. 3.3; docs/method.md, "Output parametrisation"): the head's output, first C channels (learned-sigma teachers
predict 2C), is read as
    eps        -> x0 = (x - b_s eps) / a_s, then the schedule's jump to tau_{s+1} (ard/schedules.py: DDIM, Song et
                  al. 2021, eq. 12, sigma = 0, for variance-preserving teachers): with the teacher's own output
                  (eps, or velocity for a flow teacher) the untrained student is the teacher run with S big steps;
    x0         -> the same jump from the predicted x0;
    velocity   -> a flow teacher's v = eps - x0: x0 = x - sigma v, then the jump (Euler: x + (sigma' - sigma) v);
    next_state -> x_{tau_{s+1}} directly (the authors' re-implementation).
The schedule is the store's teacher's (`use_schedule`; variance preserving until told otherwise).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from einops import rearrange
from safetensors.torch import load_file, save_file

from ard.atomic import atomic_directory
from ard.checks import check_choice
from ard.schedules import OutputKind, Schedule, VPSchedule, schedule_from_settings
from ard.student.attention import HISTORY_PROCESSORS, HistoryContext, IgnoreHistory, KVCache, MaskKind
from ard.backbones import backbone, backbone_of
from ard.backbones.files import teacher_family

HeadKind = Literal["shared", "per_step"]
HistoryStart = Literal["plain", "closed"]

CONFIG_NAME = "ard_student.json"  # the ARD settings beside the diffusers config.json
EXTRA_WEIGHTS = "ard_student.safetensors"  # per-step heads and history gates (absent when neither exists)
FORMAT_VERSION = 1


class HeadCopy(nn.Module):
    """One step's copy of the output head's layers (modules or parameters), under the same names."""

    def __init__(self, layers: dict[str, nn.Module | nn.Parameter]):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, copy.deepcopy(layer))


class ARDStudent(nn.Module):
    """ARD student around a deep copy of `teacher` (a diffusers transformer of a served family, ard/backbones/).

    Knobs (docs/method.md, "Student steps", "History attention and masks M1-M4"):
        num_steps:      S, student steps (any S >= 1).
        history_blocks: N, lowest blocks with history attention (0 = step-distillation baseline); 6 as
                        in the paper (6 of 28 for DiT-XL/2).
        mask:           which earlier steps a step sees in those blocks; block_causal (M4) as in the paper.
        window:         M2 only: previous steps visible to each step (M2 in the paper: 1).
        heads:          "shared" (the teacher's final layer) or "per_step" (S copies of it).
        output:         eps / x0 / velocity (+ the schedule's jump to the next boundary) or next_state (direct).
        history_start:  "closed": per block and head a history gate g = 0 (the untrained student equals
                        the baseline exactly); "plain": full history from the start (the paper).
        clip_x0:        clamp the x0 implied by eps / x0 outputs to [-1, 1] (pixel-space teachers).
        schedule:       the teacher's (ard/schedules.py), checked against `output`; None: variance preserving,
                        unchecked until the first forward or `use_schedule` (distillation sets the store's).
    Defaults of heads / output / history_start (docs/results/digits_benchmark*.md): eps + DDIM jump beat
    direct next-state regression (its 400-iteration EMA student, which the EMA's start dominated: see docs/method.md,
    "Output parametrisation", under review); history_start is "plain" (the
    paper) because the closed start's gates stay shut under training at the main learning rate (largest
    opening 0.0005-0.0033 over 3 seeds and S = 2, 3, 4), so a "closed" ARD student keeps computing the
    baseline; per-step heads were not measured (they equal the shared head at init), so the smaller shared
    head is the default.
    """

    def __init__(self, teacher: nn.Module, num_steps: int, history_blocks: int = 6,
                 mask: MaskKind = "block_causal", window: int = 1, heads: HeadKind = "shared",
                 output: OutputKind = "eps", history_start: HistoryStart = "plain", clip_x0: bool = False,
                 schedule: Schedule | None = None):
        super().__init__()
        self.backbone = backbone_of(teacher)  # the family's adapter (stateless)
        num_layers = len(self.backbone.blocks(teacher))
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        if not 0 <= history_blocks <= num_layers:
            raise ValueError(f"history_blocks={history_blocks} must lie in [0, {num_layers}] (teacher's blocks)")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.num_steps = num_steps  # S
        self.history_blocks = history_blocks  # N
        self.mask = check_choice("mask", mask, MaskKind)
        self.window = window
        self.heads_kind = check_choice("heads", heads, HeadKind)
        self.output = check_choice("output", output, OutputKind)
        self.history_start = check_choice("history_start", history_start, HistoryStart)
        self.clip_x0 = clip_x0
        self.schedule = VPSchedule()  # the teacher's schedule: where the boundaries sit (distillation: the store's)
        if schedule is not None:
            self.use_schedule(schedule)

        self.transformer = self.backbone.disable_condition_dropout(copy.deepcopy(teacher))
        blocks = self.backbone.blocks(self.transformer)
        processor = HISTORY_PROCESSORS[self.backbone.history_kind]  # self- or joint image-text attention
        for i in range(history_blocks):
            self.backbone.history_attention(blocks[i]).set_processor(processor(i, mask, window))
            for other in self.backbone.passthrough_attentions(blocks[i]):
                other.set_processor(IgnoreHistory(other.processor))
        # Per-step heads: S copies of the teacher's output head's layers. The transformer's own head is then
        # unused and frozen (kept so it stays a diffusers module).
        self.heads = None
        own_head = self.backbone.head_layers(self.transformer)
        if heads == "per_step":
            self.heads = nn.ModuleList(HeadCopy(own_head) for _ in range(num_steps))
            for layer in own_head.values():
                layer.requires_grad_(False)
        # History gates (N, H), g = 0 at init: only where some step has history to gate.
        self.history_gate = None
        if history_start == "closed" and history_blocks > 0 and mask != "block_diagonal" and num_steps > 1:
            heads_per_block = self.backbone.history_attention(blocks[0]).heads
            device = next(self.transformer.parameters()).device
            self.history_gate = nn.Parameter(torch.zeros(history_blocks, heads_per_block, device=device))

    # ------------------------------------------------------------------ settings
    def use_schedule(self, schedule: Schedule, top: torch.Tensor | None = None) -> None:
        """Read the head on `schedule` (the store's teacher's, ard.schedules.schedule_of); one line when the output
        cannot be read on it (at the first boundary's label `top`, given)."""
        schedule.check_output(self.output, top)
        self.schedule = schedule

    def settings(self) -> dict:
        """The ARD knobs and the schedule, as written to ard_student.json."""
        return dict(num_steps=self.num_steps, history_blocks=self.history_blocks, mask=self.mask,
                    window=self.window, heads=self.heads_kind, output=self.output,
                    history_start=self.history_start, clip_x0=self.clip_x0, schedule=self.schedule.settings())

    # ------------------------------------------------------------------ core
    def _transformer(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, history: HistoryContext,
                     step: int | None = None) -> torch.Tensor:
        """The teacher's forward with the history context in the lowest N blocks and our own head(s).

        x (R, C, H, W); t, y (R,). Rows are ordered (b, s) over history.num_steps steps (step None) or
        all belong to one step (step s). Returns the raw output (R, C', H, W).
        """
        family, model = self.backbone, self.transformer
        hidden = family.embed(model, x)  # (R, L, D)
        prepared = family.prepare(model, t, y, hidden.dtype)  # timestep / condition embeddings, once
        for i, block in enumerate(family.blocks(model)):
            kwargs = dict(history=history) if i < self.history_blocks else None  # others keep their processor
            hidden = family.run_block(model, block, hidden, prepared, kwargs)  # (R, L, D)
        conditioning = prepared.conditioning  # (R, D)
        if self.heads is None or step is not None:
            out = self._head(hidden, conditioning, step)  # (R, L, p*p*C')
        else:  # per-step heads over rows ordered (b, s)
            steps = history.num_steps
            hidden = rearrange(hidden, "(b s) l d -> b s l d", s=steps)  # (B, S, L, D)
            conditioning = rearrange(conditioning, "(b s) d -> b s d", s=steps)  # (B, S, D)
            out = torch.stack([self._head(hidden[:, s], conditioning[:, s], s) for s in range(steps)],
                              dim=1)  # (B, S, L, p*p*C')
            out = rearrange(out, "b s l e -> (b s) l e")  # (B*S, L, p*p*C')
        return self.backbone.unpatchify(self.transformer, out)  # (R, C', H, W)

    def head_layers(self, s: int | None) -> nn.Module:
        """The output head's layers of step s: the transformer's own (shared head) or step s's copy."""
        return self.transformer if self.heads is None else self.heads[s]

    def _head(self, hidden: torch.Tensor, conditioning: torch.Tensor, s: int | None) -> torch.Tensor:
        """The output head of step s: hidden (R, L, D) -> (R, L, p*p*C')."""
        return self.backbone.head(self.transformer, self.head_layers(s), hidden, conditioning)  # (R, L, p*p*C')

    def _next_state(self, x: torch.Tensor, raw: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                    corrected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read the raw output as eps / x0 / next state; x (R, C, H, W), t_from, t_to (R,).

        Returns the next state (R, C, H, W) and the implied x0-prediction (R, C, H, W) (None for
        next_state outputs). `corrected` (R,) bool: rows whose direction term b' eps uses their input x (the noise
        x_T) instead of eps (noise correction, `step`).
        """
        if corrected is not None and self.output == "next_state":
            raise ValueError("noise_correction needs an epsilon-parametrised student (output 'eps', 'x0' or "
                             "'velocity'); this one has output='next_state'")
        pred = self.backbone.prediction(self.transformer, raw)  # (R, C, H, W)
        if self.output == "next_state":
            return pred, None
        self.schedule.check_output(self.output, t_from)
        direction = None
        if corrected is not None:
            eps = self.schedule.read(x, pred, t_from, self.output)[1]  # (R, C, H, W)
            direction = torch.where(corrected.view(-1, 1, 1, 1), x, eps)  # (R, C, H, W)
        return self.schedule.jump(x, pred, t_from, t_to, self.output, self.clip_x0, direction)  # (R, C, H, W) each

    def forward(self, states: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, return_x0: bool = False,
                noise_correction: bool = False):
        """One pass over all S steps (training), each step fed the given input state.

        states (B, S, C, H, W): inputs x_{tau_0..tau_{S-1}} (the teacher's states, or the student's own
        rollout); timesteps (B, S+1) int64 boundary timesteps (the last is CLEAN = -1); labels (B,) (the
        null class allowed). Returns the predicted next states (B, S, C, H, W) = x_{tau_1..tau_S}; with
        return_x0 also the x0-predictions (B, S, C, H, W) (eps / x0 outputs only). noise_correction: step 0
        (whose input is the noise x_T) jumps as `step` does with it, so training can match corrected inference.
        """
        if return_x0 and self.output == "next_state":
            raise ValueError("return_x0: output='next_state' predicts no x0 (use output 'eps' or 'x0')")
        batch, steps = states.shape[:2]
        if steps != self.num_steps or tuple(timesteps.shape) != (batch, steps + 1):
            raise ValueError(f"states {tuple(states.shape)} / timesteps {tuple(timesteps.shape)}: expected "
                             f"(B, {self.num_steps}, C, H, W) and (B, {self.num_steps + 1})")
        x = rearrange(states, "b s c h w -> (b s) c h w")  # (B*S, C, H, W)
        t_from = rearrange(timesteps[:, :-1], "b s -> (b s)")  # (B*S,)
        t_to = rearrange(timesteps[:, 1:], "b s -> (b s)")  # (B*S,)
        y = self.backbone.repeat(labels, steps)  # (B*S,)
        history = HistoryContext(num_steps=steps, gate=self.history_gate)
        raw = self._transformer(x, t_from, y, history)  # (B*S, C', H, W)
        first = (torch.arange(batch * steps, device=x.device) % steps == 0) if noise_correction else None  # (B*S,)
        out, x0 = self._next_state(x, raw, t_from, t_to, first)  # (B*S, C, H, W) each
        out = rearrange(out, "(b s) c h w -> b s c h w", b=batch)  # (B, S, C, H, W)
        if not return_x0:
            return out
        return out, rearrange(x0, "(b s) c h w -> b s c h w", b=batch)  # (B, S, C, H, W) each

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for one S-step trajectory of `batch_size` samples."""
        return KVCache(batch_size=batch_size, num_steps=self.num_steps, num_layers=self.history_blocks)

    def step(self, x: torch.Tensor, s: int, t_from: torch.Tensor, t_to: torch.Tensor, labels: torch.Tensor,
             cache: KVCache, noise_correction: bool = False) -> torch.Tensor:
        """Student step s from x (B, C, H, W) at t_from (B,) to t_to (B,); labels (B,).

        Appends this step's keys/values of the history blocks to `cache` (which must hold steps 0..s-1 of
        the same trajectories) and returns the next state (B, C, H, W).
        noise_correction (Imagine Flash, Kohler et al. 2024, sec. 3.4): at step 0, whose input is the pure
        noise x_T, the DDIM direction term uses x_T itself instead of the predicted epsilon (which is
        what an exact model would return there); the x0-prediction is the model's. Other steps unchanged.
        """
        if not 0 <= s < self.num_steps or cache.steps != s or cache.batch_size != x.shape[0]:
            raise ValueError(f"step {s} of a {self.num_steps}-step student with batch {x.shape[0]}: the cache "
                             f"holds {cache.steps} steps of batch {cache.batch_size} (expected {s} of {x.shape[0]})")
        history = HistoryContext(num_steps=self.num_steps, step=s, cache=cache, gate=self.history_gate)
        raw = self._transformer(x, t_from, labels, history, step=s)  # (B, C', H, W)
        cache.steps += 1
        corrected = None
        if noise_correction and s == 0:  # the input is the noise x_T
            corrected = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # (B,)
        return self._next_state(x, raw, t_from, t_to, corrected)[0]  # (B, C, H, W)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Write a standalone student directory atomically: the diffusers transformer (config.json +
        safetensors; a tied embedder under every block's keys, as copies: ard.backbones.dit_embedders),
        ard_student.json (the ARD settings) and ard_student.safetensors (heads, gates)."""
        with atomic_directory(directory) as tmp:
            self.transformer.save_pretrained(tmp, safe_serialization=True)
            extra = {k: v.detach().contiguous() for k, v in self.state_dict(keep_vars=True).items()
                     if not k.startswith("transformer.")}  # (keep_vars: no copies of a tied embedder made)
            if extra:
                save_file(extra, str(tmp / EXTRA_WEIGHTS))
            (tmp / CONFIG_NAME).write_text(json.dumps(dict(format_version=FORMAT_VERSION, **self.settings()),
                                                      indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, tie_embedders: bool | None = None) -> "ARDStudent":
        """Load a directory written by save_pretrained (needs neither the teacher nor the store).

        tie_embedders: as `ard.teacher.load_teacher`'s (None: one shared embedder when every block's copy is
        equal, e.g. a student saved tied; one per block when they differ, e.g. one distilled untied; True refuses
        those in one line naming the file and the key)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path}: not found (not an ARD student directory)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if config.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version must be {FORMAT_VERSION}")
        schedule = config.pop("schedule", None)  # absent in students of before: variance preserving
        unknown = sorted(set(config) - set(SETTING_TYPES))
        missing = sorted(set(SETTING_TYPES) - set(config))
        if unknown or missing:
            raise ValueError(f"{config_path}: {'unknown field ' + repr(unknown[0]) if unknown else 'missing field ' + repr(missing[0])}")
        for key, kind in SETTING_TYPES.items():
            if not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool)):
                raise ValueError(f"{config_path}: field {key!r} must be {kind.__name__}, got {config[key]!r}")
        transformer = backbone(teacher_family(directory)).load_saved(directory, tie_embedders)
        try:
            student = cls(transformer, **config, schedule=schedule_from_settings(schedule))
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        del transformer
        extra_path = directory / EXTRA_WEIGHTS
        expected = {k for k in student.state_dict() if not k.startswith("transformer.")}
        extra = load_file(str(extra_path)) if extra_path.exists() else {}
        if set(extra) != expected:
            what = sorted(set(extra) ^ expected)[0]
            raise ValueError(f"{extra_path}: {'unexpected' if what in extra else 'missing'} tensor {what!r} "
                             f"for the settings in {CONFIG_NAME}")
        student.load_state_dict({**student.state_dict(), **extra})
        return student.eval()


# Types of the fields of ard_student.json (besides format_version and the schedule's settings): the __init__ knobs.
SETTING_TYPES = dict(num_steps=int, history_blocks=int, mask=str, window=int, heads=str, output=str,
                      history_start=str, clip_x0=bool)
