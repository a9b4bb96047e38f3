"""The benchmark's experiments: the students, training recipes and GAN stages it trains (as `ard fit` overrides of
configs/digits/ard.yaml), the variant names of older reports, and the GAN pilot's knob settings."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def knobs(group: str = "", **values) -> list[str]:
    """`ard fit` overrides of the model's init args, in a nested group or flat (group ""):
    knobs("recipe", inputs="rollout") -> ["--model.init_args.recipe.inputs=rollout"]."""
    prefix = f"--model.init_args.{group + '.' if group else ''}"
    return [f"{prefix}{k}={v}" for k, v in values.items()]


DIRECT = knobs(output="next_state", heads="per_step")  # the paper's parametrisation: the next state, a head per step
# Students: name -> overrides of the student's knobs (ard.student.ARDStudent).
MODELS: dict[str, list[str]] = {
    "baseline": knobs(history_blocks=0),
    "ard": knobs(history_blocks=6),  # history in all 6 blocks, plain start
    "ard-N1": knobs(history_blocks=1),
    "ard-N2": knobs(history_blocks=2),
    "ard-N3": knobs(history_blocks=3),
    "ard-closed": knobs(history_start="closed"),
    "ard-closed-gatelr": knobs(history_start="closed", history_gate_lr=0.05),
    "ard-M3": knobs(mask="noise_and_current"),
    "ard-N6-direct": knobs(history_blocks=6) + DIRECT,  # the paper's proportion, all 6
    "baseline-direct": knobs(history_blocks=0) + DIRECT,
    "ard-direct": DIRECT,  # history in the preset's 1 block
    # trained (and so sampled) with Imagine Flash's first-step noise correction, against the " [nc]" rows of
    # ard-N1, which apply it at inference only
    "ard-N1-nc-trained": knobs(history_blocks=1, noise_correction=True),
}
# Each student's baseline: N = 0 with the student's output and heads (the verdicts add the recipe and second stage)
BASELINES: dict[str, str] = {m: "baseline-direct" if set(DIRECT) <= set(o) else "baseline" for m, o in MODELS.items()}
SRL_IF_S4 = "[295,295,295,205]"  # ard.student.srl.retention_timesteps at top retention 0.4, boundaries 943/697/451/205
# Training recipes (ard/student/recipe.py): suffix -> overrides; "" is teacher forcing on the stored trajectory.
RECIPES: dict[str, list[str]] = {
    "": knobs("recipe", inputs="teacher", targets="trajectory"),  # stated, whatever the preset says
    "rollout": knobs("recipe", inputs="rollout"),
    "mixed": knobs("recipe", inputs="mixed", rollout_prob=1.0, rollout_ramp_steps=600),
    "backward": knobs("recipe", inputs="rollout", targets="teacher_from_state"),
    "srl": knobs("recipe", inputs="rollout", targets="shifted_reconstruction"),
    # SRL re-noised far below the student's timestep, so that its top steps' targets keep the student's x0
    "srl-shift0.1": knobs("recipe", inputs="rollout", targets="shifted_reconstruction", srl_shift=0.1),
    # Imagine Flash's SRL (S = 4): per-step tau' whose target keeps 0.4 of the student's x0 at the top three steps
    # and the input's own 0.60 at the bottom one (docs/results/srl_retention.json), SNR step weights, no clipping
    "srl-if": knobs("recipe", inputs="rollout", targets="shifted_reconstruction", srl_timesteps=SRL_IF_S4,
                    srl_weights="snr"),
    # the same SRL added, times 0.1, to the trajectory target on the student's own rollouts
    "rollout+srl-if": knobs("recipe", inputs="rollout", targets="trajectory", srl_timesteps=SRL_IF_S4,
                            srl_weights="snr", srl_weight=0.1),
}
@dataclass(frozen=True)
class TeacherGrid:
    """The training store's teacher and grid, as overlays of the digits presets."""
    trajectories: str | None = None  # a configs/digits/trajectories.yaml overlay (None: the preset's store)
    boundaries: Callable[[int], list[int]] | None = None  # an S-step student's grid indices (None: s * K / S)
    fit: str | None = None  # a configs/digits/ard.yaml overlay: another teacher's presets
    teacher: str | None = None  # the teacher the evaluation samples (None: ard-eval's default, the digits DiT)


# "paper25": DiT's own 25-step respacing, as the paper's setting (configs/imagenet256/paper.yaml), with boundaries
# uniform in t: T (S - s) / S, grid index 24 s / S (S = 4: 999 / 749 / 500 / 250), then the clean state; the students
# train with configs/digits/paper.yaml (the variants state the parametrisation).
# "t2i": the text-to-image default (configs/digits_t2i/: the captioned PixArt teacher, K = 24 leading).
# The controls, all at CFG 1.5 (the flow teacher is far off the data at 2.0): "cfg15" the shipped epsilon teacher,
# "flow" the rectified-flow teacher of the same architecture (configs/digits_flow/, Euler on sigma_k = 1 - k / 24),
# "w64" / "w32" the epsilon teachers of width 64 / 32 (configs/digits_size/; "cfg15" is their width 128).
GRIDS: dict[str, TeacherGrid] = {
    "leading24": TeacherGrid(),
    "paper25": TeacherGrid("configs/digits/paper_trajectories.yaml", lambda s: [24 * i // s for i in range(s)] + [25],
                           fit="configs/digits/paper.yaml"),
    "t2i": TeacherGrid("configs/digits_t2i/trajectories.yaml", fit="configs/digits_t2i/ard.yaml",
                       teacher="ard/assets/digits_t2i_teacher"),
    "cfg15": TeacherGrid("configs/digits/trajectories_cfg15.yaml"),
    "flow": TeacherGrid("configs/digits_flow/trajectories.yaml", fit="configs/digits_flow/ard.yaml",
                        teacher="ard/assets/digits_flow_teacher"),
    **{f"w{w}": TeacherGrid(f"configs/digits_size/trajectories_w{w}.yaml", fit=f"configs/digits_size/ard_w{w}.yaml",
                            teacher=f"ard/assets/digits_teacher_w{w}") for w in (64, 32)},
}
# A variant is a model, optionally followed by "+" and a recipe: "ard-N2+rollout".
VARIANTS: dict[str, list[str]] = {m + ("+" + r if r else ""): MODELS[m] + RECIPES[r] for m in MODELS for r in RECIPES}
# Reports written while the closed history start was the student's default named their variants by it:
RENAMED_SINCE_PLAIN_DEFAULT = {"ard": "ard-closed", "ard-plain": "ard", "ard-direct": "ard-closed-direct"}
NC = " [nc]"  # name suffix of a student's rows sampled with noise correction (ARDStudent.step)

GAN_PRESET = "configs/digits/ard_gan.yaml"  # the GAN stage (ard.modules.distill_gan.ARDGANDistillation)
# ARD + GAN (sec. 4): name -> (the regression variant whose student of the same S and seed it fine-tunes with
# GAN_PRESET, with the GAN or not), for every regression variant: "<variant>-gan", and "<variant>-continued", that
# student trained as long in CPU time (same batch and lr) without the GAN, the comparison the GAN stage must beat
GAN_VARIANTS: dict[str, tuple[str, bool]] = {f"{v}-{stage}": (v, stage == "gan") for v in VARIANTS
                                             for stage in ("gan", "continued")}


def second_stage(regression: str, adversarial: bool) -> str:
    """The GAN_VARIANTS name of the second stage of `regression` with the GAN or without it (`-continued`)."""
    return f"{regression}-{'gan' if adversarial else 'continued'}"


# One iteration of the GAN stage as bench_recipes times it: the regression module's preset (its batch and lr, so
# that the ratio to teacher forcing is the stage's own cost) turned into the GAN module, adversarial from the first
# iteration, the teacher-forced fake (taken from the regression pass)
GAN_ITERATION: list[str] = ["--model.class_path=ard.modules.distill_gan.ARDGANDistillation",
                            *knobs("gan", weight=10.0, warmup=0, fake="teacher_forced"), "--trainer.gradient_clip_val=null"]

# The GAN pilot (scripts/pilot_gan.py): knob setting -> overrides of GAN_PRESET
PILOT_KNOBS: dict[str, list[str]] = {
    "renoise-none": knobs("gan", renoise="none"),
    "renoise-independent-uniform": knobs("gan", renoise="independent", noise_levels="uniform"),
    "renoise-same-uniform": knobs("gan", renoise="same", noise_levels="uniform"),
    "renoise-independent-high": knobs("gan", renoise="independent", noise_levels="high"),
    "rollout-independent-uniform": knobs("gan", fake="rollout", renoise="independent", noise_levels="uniform"),
    "weight1-independent-uniform": knobs("gan", weight=1, renoise="independent", noise_levels="uniform"),
    "augment-independent-uniform": knobs("gan", augment="translation_cutout", renoise="independent",
                                         noise_levels="uniform"),
    # the screens from well-trained students (S = 2 and 4, 1200 iterations, the presets' recipe): the adaptive
    # weight's factor and regression gradient, a warm-up long enough for the discriminator to see before the student
    # does, R1; each overrides the preset as it is when the screen runs (the report records its GAN block)
    "preset": [],  # the preset as it is
    "weight0.1": knobs("gan", weight=0.1),
    "weight0.3": knobs("gan", weight=0.3),
    "last-step": knobs("gan", adaptive_grad="last_step"),
    "warmup100": knobs("gan", warmup=100),
    "r1": knobs("gan", r1=0.1),  # R1 on real digits (gamma small: 8x8 inputs)
    "r1-1": knobs("gan", r1=1.0),
}
