"""ARD + GAN (ard/student/gan.py, ard/modules/distill_gan.py) on a tiny teacher and store: losses on known logits,
the adaptive weight by hand, the discriminator's losses equal to those of the code before it became an object
(tests/data/discriminator_losses.json), which parameters get gradients in each step (never the frozen teacher,
which stays bit-identical), a discriminator that separates a separable toy case, one iteration clock (the
recipe's ramp, the warm-up, max_steps and checkpoints count iterations), the GAN path during its warm-up equal to
regression-only training bit for bit, a crash and resume with identical losses, an export without the
discriminator, a GAN checkpoint of the earlier layout refused in one line, and the presets (digits and ImageNet,
the latter built on a tiny random DiT)."""
import csv
import json
import math
import runpy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ard.bench.recipe_cost import cpu_matched_iterations
from ard.cli import main as ard_main
from ard.data.real import RealSamples
from ard.data.trajectories import TrajectoryDataModule
from ard.modules.distill import ARDDistillation
from ard.modules.distill_gan import ARDGANDistillation, GanStage
from ard.student.export import load_exported
from ard.student.gan import (HingeLoss, NonSaturatingLoss, TeacherDiscriminator, adaptive_weight, diff_augment,
                             draw_generator, draw_timesteps)
from ard.teacher import load_teacher
from test_distill import VAL, ard_subprocess, args_for, crash_args, flatten, store, teacher_dir  # noqa: F401
from test_store import tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
S = 4


def gan_args(root, teacher_dir, store, *extra):
    """`ard fit -c ard.yaml -c ard_gan.yaml` on the tiny teacher and store (test_distill's overrides after both)."""
    args = args_for(root, teacher_dir, store, "--model.init_args.init_student=null", *extra)
    return args[:3] + ["-c", str(ROOT / "configs/digits/ard_gan.yaml")] + args[3:]


def logged(root, prefixes=("train/", "gan/")) -> dict[int, dict[str, float]]:
    """{logged step: {metric: value}} from every run's metrics.csv under root (later runs win)."""
    out = {}
    for path in sorted((Path(root) / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith(prefixes) and v != ""}
                if values:
                    out.setdefault(int(row["step"]), {}).update(values)
    return out


# ------------------------------------------------------------------ pieces
def test_losses_on_known_logits():
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.5]])
    hinge, ns = HingeLoss(), NonSaturatingLoss()
    assert hinge.discriminator(real, fake).tolist() == [(0 + 0.5) / 2 + (0 + 1.5) / 2]
    assert hinge.generator(fake).tolist() == [0.75]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 (softplus)
    torch.testing.assert_close(ns.discriminator(real, fake),
                               torch.tensor([(sp(-2) + sp(-0.5)) / 2 + (sp(-2) + sp(0.5)) / 2]))
    torch.testing.assert_close(ns.generator(fake), torch.tensor([(sp(2) + sp(-0.5)) / 2]))
    assert hinge.discriminator(real.repeat(3, 1), fake.repeat(3, 1)).shape == (3,)  # unreduced: one per sample


def test_adaptive_weight_equals_a_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    x, y = torch.randn(2), torch.randn(3)
    reg = ((w @ x - y) ** 2).sum()  # d/dW = 2 (Wx - y) x^T
    gan = (w @ x).sum() * 0.5  # d/dW = 0.5 * 1 x^T
    by_hand = (2 * (w @ x - y)).norm() * x.norm() / (0.5 * math.sqrt(3) * x.norm() + 1e-4)
    weight = adaptive_weight(reg, gan, w)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, by_hand.detach())
    assert float(adaptive_weight(reg, (w * 0).sum(), w)) == 1e4  # a vanishing GAN gradient: clamped
    reg.backward()  # the graphs were kept for the step's backward
    torch.testing.assert_close(w.grad, torch.outer(2 * (w @ x - y), x).detach())


@pytest.mark.parametrize("heads", ["shared", "per_step"])
def test_the_last_steps_term_is_the_last_heads_regression_gradient(teacher_dir, heads):
    """gan.adaptive_grad "last_step" compares the GAN gradient at the last head with the gradient of the regression
    loss's last-step term: with per-step heads (the re-implementation's final_layer4) that is the whole loss's
    gradient there; a shared head also collects every other step's, which "all_steps" (ard's earlier choice) used."""
    module = ARDDistillation(teacher=str(teacher_dir), history_blocks=2, heads=heads, samples=dict(per_class=0))
    torch.manual_seed(0)
    states, labels = torch.randn(4, 5, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    timesteps = torch.tensor([943, 697, 451, 205, -1]).expand(4, -1)  # the digits store's S = 4 boundaries
    terms = torch.tensor(module.step_weights) * module.loss_fn(module.student, states, timesteps, labels).mean(0)
    head = module.student.transformer if module.student.heads is None else module.student.heads[-1]
    last, = torch.autograd.grad(terms[-1], head.proj_out_2.weight, retain_graph=True)
    whole, = torch.autograd.grad(terms.sum(), head.proj_out_2.weight)
    if heads == "per_step":
        torch.testing.assert_close(last, whole)
    else:
        assert whole.norm() > 1.2 * last.norm()
    with pytest.raises(ValueError, match="gan.adaptive_grad='last' is not one of 'last_step', 'all_steps'"):
        GanStage(adaptive_grad="last")


def test_draws_are_a_function_of_seed_iteration_and_rank():
    a, b, c = (draw_timesteps("high", 1000, draw_generator(0, i, r)) for i, r in ((5, 0), (5, 0), (5, 1)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) <= 999 and float(a.float().median()) > 600  # favours high noise
    u = draw_timesteps("uniform", 4000, draw_generator(0, 0, 0)).float()
    assert abs(float(u.mean()) - 499.5) < 20


def test_diff_augment_is_differentiable_and_moves_pixels():
    x = torch.randn(16, 1, 8, 8, requires_grad=True)
    y = diff_augment(x, draw_generator(0, 0, 0))
    assert y.shape == x.shape and not torch.equal(y, x)
    assert float((y == 0).float().mean()) >= 0.1  # cutout: at least part of a 4x4 square in every image
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_local_batch_norm_needs_equal_virtual_batches():
    disc = TeacherDiscriminator(width=8, num_layers=2, blocks=None, loss="hinge", renoise="none", noise_levels="uniform",
                                augment="none")
    features, c = [torch.randn(16, 4, 8) for _ in range(2)], torch.randn(16, 8)
    assert disc(features, c).shape == (16, 2 * 4)  # one logit per token per head
    with pytest.raises(ValueError, match="virtual batches"):
        disc([f[:9] for f in features], c[:9])  # 9 samples in 2 groups


def test_real_samples_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents.npy: not found"):
        RealSamples(str(tmp_path))
    np.save(tmp_path / "latents.npy", np.zeros((3, 4, 2, 2), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="labels.npy: expected 3 integer labels"):
        RealSamples(str(tmp_path))


# ------------------------------------------------------------------ in-process training
def module_for(teacher_dir, recipe: dict | None = None, **gan) -> ARDGANDistillation:
    return ARDGANDistillation(teacher=str(teacher_dir), history_blocks=2, samples=dict(per_class=0), lr=1e-3,
                              recipe=recipe or {}, gan=dict(weight=10.0, warmup=1) | gan)


def test_discriminator_losses_equal_those_before_it_became_an_object(teacher_dir):
    """The generator loss, the discriminator loss and the logits of fixed real and fake samples, drawn in the
    stage's order from one generator, equal the values the module computed before the discriminator owned
    its settings (recorded with that code on the same tiny teacher)."""
    pinned = json.loads((ROOT / "tests" / "data" / "discriminator_losses.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key, want in pinned.items():
            loss, renoise, augment = key.split("-")
            torch.manual_seed(0)  # the heads' initialisation, as when the values were recorded
            disc = module_for(teacher_dir, loss=loss, renoise=renoise, augment=augment, noise_levels="high",
                              blocks=[0, 1]).discriminator
            teacher = load_teacher(str(teacher_dir))
            gen = torch.Generator().manual_seed(1)
            real, fake = torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 1, 8, 8, generator=gen)
            labels, g = torch.arange(8), draw_generator(0, 0, 0)
            got = {"g_loss": disc.generator_loss(teacher, fake, labels, g).mean()}
            d_loss, logits_real, logits_fake = disc.discriminator_loss(teacher, real, labels, fake, labels, g)
            got |= {"d_loss": d_loss.mean(), "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
            for name, value in want.items():
                assert float(got[name]) == pytest.approx(value, rel=1e-6), (key, name)
    finally:
        torch.set_num_threads(threads)


def test_r1_adds_the_squared_input_gradient_of_the_real_logits(teacher_dir):
    """With gan.r1 > 0 the discriminator loss is the plain one plus r1 / 2 ||d sum(logits_real) / d real||^2 per real
    sample (the same draws, the same heads), and the penalty's double backward reaches the heads, not the teacher."""
    teacher = load_teacher(str(teacher_dir)).requires_grad_(False)  # frozen, as the module holds it
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 1, 8, 8, generator=gen)
    labels = torch.arange(8)
    losses = {}
    for r1 in (0.0, 2.0):
        torch.manual_seed(0)
        disc = module_for(teacher_dir, r1=r1).discriminator
        losses[r1] = disc.discriminator_loss(teacher, real, labels, fake, labels, draw_generator(0, 0, 0))[0]
    torch.manual_seed(0)
    fresh = module_for(teacher_dir).discriminator  # the heads before any forward (spectral norm's power iteration)
    g = draw_generator(0, 0, 0)  # the loss's draws, in its order: the fakes' timesteps, the reals', then re-noising
    fresh.timesteps(8, g)
    t_real, x = fresh.timesteps(8, g), real.clone().requires_grad_(True)
    grad, = torch.autograd.grad(fresh.logits(teacher, x, t_real, labels, g).sum(), x)
    penalty = grad.square().flatten(1).sum(1)
    assert penalty.min() > 0
    torch.testing.assert_close(losses[2.0] - losses[0.0], penalty, rtol=1e-4, atol=1e-6)
    losses[2.0].mean().backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    assert not any(p.grad is not None for p in teacher.parameters())


class GradRecorder(L.Callback):
    """Per optimiser step: which parameters of the module hold a gradient, and for which optimiser."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        index = [o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers].index(optimizer)
        self.steps.append((index, {n for n, p in pl_module.named_parameters() if p.grad is not None}))


def test_only_the_heads_learn_in_the_discriminator_step_and_the_teacher_stays_frozen(tmp_path, teacher_dir, store):
    module = module_for(teacher_dir, fake="rollout", renoise="same")
    recorder = GradRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, TrajectoryDataModule(str(store), S, batch_size=16, val_count=VAL))
    assert trainer.global_step == 4 and len(recorder.steps) == 8  # 4 iterations, 2 optimiser steps each
    heads = {n for n, _ in module.named_parameters() if n.startswith("discriminator.")}
    trainable = {n for n, p in module.named_parameters() if n.startswith("student.") and p.requires_grad}
    for i, (index, names) in enumerate(recorder.steps):
        assert index == i % 2  # the student's step, then the discriminator's
        assert names == (heads if index else trainable), (i, sorted(names ^ (heads if index else trainable))[:3])
    teacher = module.frozen_teacher()
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    fresh = load_teacher(str(teacher_dir))
    for name, value in fresh.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name  # bit-identical after 4 GAN iterations
    in_optimisers = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    assert not in_optimisers & {id(p) for p in teacher.parameters()}
    assert all(k.startswith(("student.", "discriminator.")) for k in module.state_dict())  # no teacher in checkpoints


def test_discriminator_separates_a_separable_toy_case(teacher_dir):
    """Real digits against constant grey images: a few discriminator steps drive the hinge loss down."""
    disc = module_for(teacher_dir, renoise="none").discriminator
    teacher, real_samples = load_teacher(str(teacher_dir)), RealSamples("digits:train")
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    losses = []
    for i in range(30):
        g = draw_generator(0, i, 0)
        real, labels = real_samples.draw(16, g)
        loss = disc.discriminator_loss(teacher, real, labels, torch.zeros_like(real), labels, g)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] > 1.5 and np.mean(losses[-5:]) < 0.3 * losses[0], losses


# ------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def regression(tmp_path_factory, teacher_dir, store):
    root = tmp_path_factory.mktemp("regression")
    ard_main(args_for(root, teacher_dir, store, "--trainer.max_steps=6", "--model.init_args.samples.per_class=0"))
    return root


def test_gan_during_warmup_equals_regression_only_training(tmp_path, teacher_dir, store, regression):
    """lambda = 0 all along: the manual student step (clipped by hand) must be the automatic one, bit for bit,
    while the discriminator trains beside it (6 iterations = 12 optimiser steps)."""
    ard_main(gan_args(tmp_path, teacher_dir, store, "--model.init_args.gan.warmup=1000", "--trainer.max_steps=6",
                      "--model.init_args.samples.per_class=0"))
    gan, reg = logged(tmp_path), logged(regression)
    assert sorted(gan) == sorted(reg) == list(range(6))
    for step in range(6):
        assert {k: v for k, v in gan[step].items() if k.startswith("train/")} == reg[step], step
        assert gan[step]["gan/weight"] == 0 and "gan/d_loss" in gan[step]
    files = [load_file(str(root / "student_ema" / "diffusion_pytorch_model.safetensors"))
             for root in (tmp_path, regression)]
    assert files[0].keys() == files[1].keys()
    for name in files[1]:
        assert torch.equal(files[0][name], files[1][name]), name  # the EMA students


def test_the_continued_student_gets_the_gan_stages_cpu_time(tmp_path, teacher_dir, store, regression):
    """One iteration of each second stage is timed from the exported student; the continued student's length is the
    GAN stage's iterations times their CPU ratio (a GAN iteration costs more: a discriminator step besides), and a
    re-run reuses the record instead of timing again."""
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"teacher": str(teacher_dir)}},
                                       "data": {"init_args": {"val_count": VAL}}}))
    out = tmp_path / "match.json"
    match = cpu_matched_iterations(out, store, S, "ard-N2", regression / "student_ema", 10, (), str(overlay),
                                   warmup=1, iterations=3)
    assert match["cpu_ratio"] == pytest.approx(match["gan_cpu_s"] / match["continued_cpu_s"])
    assert match["cpu_ratio"] > 1 and match["continued_steps"] == round(10 * match["cpu_ratio"])
    assert cpu_matched_iterations(out, store, S, "ard-N2", regression / "student_ema", 10, (), str(overlay)) == match


def test_the_regression_module_holds_no_gan_state(teacher_dir):
    plain = ARDDistillation(teacher=str(teacher_dir), history_blocks=2, samples=dict(per_class=0))
    gan = module_for(teacher_dir)
    assert plain.automatic_optimization and not gan.automatic_optimization and not hasattr(plain, "discriminator")
    assert isinstance(plain.configure_optimizers(), torch.optim.AdamW)
    assert {k for k in gan.state_dict() if k not in plain.state_dict()} == {
        k for k in gan.state_dict() if k.startswith("discriminator.")}
    with pytest.raises(ValueError, match=r"gan.weight=0.0: must be greater than 0"):
        GanStage(weight=0.0)
    with pytest.raises(ValueError, match=r"gan.fake='last' is not one of"):
        GanStage(fake="last")


def test_one_clock_the_recipe_ramp_ends_after_its_iterations(tmp_path, teacher_dir, store):
    """Mixed inputs ramping to probability 1 over R GAN iterations: every row is a rollout from iteration R on
    (with two optimiser steps per iteration counted, the ramp used to end after R / 2), and max_steps = R + 1
    runs R + 1 iterations."""
    ramp = 4
    module = module_for(teacher_dir, recipe=dict(inputs="mixed", rollout_prob=1.0, rollout_ramp_steps=ramp), warmup=2)
    fractions = []

    class Fraction(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            fractions.append(float(trainer.callback_metrics["train/rollout_fraction"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=ramp + 1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Fraction()])
    trainer.fit(module, TrajectoryDataModule(str(store), S, batch_size=16, val_count=VAL))
    assert trainer.global_step == ramp + 1 and len(fractions) == ramp + 1
    assert module.recipe.rollout_probability(ramp) == 1.0 and fractions[0] == 0.0 and fractions[ramp] == 1.0
    assert 0 < fractions[ramp // 2] < 1  # probability 0.5 at half the ramp: some rows, not all


def gan_resume_args(root, teacher_dir, store, regression):
    return gan_args(root, teacher_dir, store, "--model.init_args.gan.warmup=5", "--trainer.max_steps=8",
                    f"--model.init_args.init_student={regression / 'student_ema'}",
                    "--model.init_args.gan.fake=rollout", "--model.init_args.gan.augment=translation_cutout")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, teacher_dir, store, regression):
    root = tmp_path_factory.mktemp("gan")
    ard_main(gan_resume_args(root, teacher_dir, store, regression))
    return root


def test_gan_fit_logs_health_and_exports_the_student_alone(gan_run, regression):
    rows = logged(gan_run)
    assert sorted(rows) == list(range(8))
    for step, row in rows.items():
        assert {"gan/d_loss", "gan/weight", "gan/logits_real", "gan/logits_fake", "gan/logits_holdout"} <= set(row)
        assert (row["gan/weight"] > 0) == (step >= 5) and ("gan/g_loss" in row) == (step >= 5)  # warm-up: 5
    exported = gan_run / "student_ema"
    names = [n for f in exported.glob("*.safetensors") for n in load_file(str(f))]
    assert names and not any("discriminator" in n for n in names)
    student, timesteps = load_exported(exported)
    assert student.settings() == load_exported(regression / "student_ema")[0].settings()
    ckpt = torch.load(gan_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["global_step"] == 8  # iterations
    assert any(k.startswith("discriminator.") for k in ckpt["current_model_state"])


def test_gan_crash_then_resume_gives_the_same_losses(tmp_path, teacher_dir, store, regression, gan_run):
    """Crash before iteration 4 (a mid-epoch checkpoint), re-run: iterations 4-7 (across the end of the
    warm-up at 5) log exactly the uninterrupted run's losses and end with the same weights."""
    args = gan_resume_args(tmp_path, teacher_dir, store, regression)
    with pytest.raises(RuntimeError, match="crash before step 4"):
        ard_main(args + crash_args(4))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    ard_main(args)
    resumed, reference = logged(tmp_path), logged(gan_run)
    for step in range(4, 8):
        assert resumed[step] == reference[step], step
    final, ref = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                  for r in (tmp_path, gan_run))
    for key in ("state_dict", "current_model_state"):
        for name, value in ref[key].items():
            assert torch.equal(final[key][name], value), (key, name)


@pytest.mark.slow
def test_gan_under_ddp_two_processes(tmp_path, teacher_dir, store):
    """2 gloo processes with the ImageNet preset's strategy (each backward reaches one optimiser's parameters
    only) run 4 GAN iterations, with the GAN weight on from the second, to the end."""
    proc = ard_subprocess(*gan_args(
        tmp_path, teacher_dir, store, "--trainer.max_steps=4", "--model.init_args.gan.warmup=1",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true",
        "--data.init_args.batch_size=8", "--model.init_args.samples.per_class=0", "--trainer.limit_val_batches=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 2
    rows = logged(tmp_path)
    assert all(rows[step]["gan/weight"] > 0 for step in range(1, 4))


def test_init_student_of_other_settings_fails_in_one_line(tmp_path, teacher_dir, store, regression, capsys):
    with pytest.raises(SystemExit):
        ard_main(gan_args(tmp_path, teacher_dir, store, "--model.init_args.history_blocks=0",
                          f"--model.init_args.init_student={regression / 'student_ema'}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert len(err) == 1 and "ard_student.json: field 'history_blocks' is 2 but this run's student has 0" in err[0], err


def test_real_data_of_another_shape_fails_in_one_line(tmp_path, teacher_dir, store, capsys):
    np.save(tmp_path / "latents.npy", np.zeros((4, 4, 8, 8), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(4, np.int64))
    with pytest.raises(SystemExit):
        ard_main(gan_args(tmp_path / "run", teacher_dir, store, f"--model.init_args.gan.real={tmp_path}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ard: error:")]
    assert len(err) == 1 and "samples of shape [4, 8, 8]" in err[0] and "needs shape [1, 8, 8]" in err[0], err


# ------------------------------------------------------------------ presets
def print_config(capsys, *configs, flat: bool = True) -> dict:
    """`ard fit -c ... --print_config` of the presets (flat: {"model.init_args.lr": ..., ...})."""
    with pytest.raises(SystemExit):
        ard_main(["fit", *[a for c in configs for a in ("-c", str(ROOT / "configs" / c))], "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    return flatten(config) if flat else config


def test_digits_gan_presets_resolve(capsys):
    ard = print_config(capsys, "digits/ard.yaml")
    gan = print_config(capsys, "digits/ard.yaml", "digits/ard_gan.yaml")
    base = print_config(capsys, "digits/ard.yaml", "digits/ard_gan.yaml", "digits/baseline_gan.yaml")
    assert gan["model.class_path"] == "ard.modules.distill_gan.ARDGANDistillation"
    assert gan["model.init_args.gan.weight"] == 0.3 and gan["trainer.gradient_clip_val"] is None  # as screened at S = 4
    assert gan["model.init_args.init_student"] == "runs/digits/ard/student_ema" and gan["trainer.max_steps"] == 200
    assert ard["model.class_path"] == "ard.modules.distill.ARDDistillation" and not any("gan" in k for k in ard)
    assert {k: v for k, v in gan.items() if k.startswith("model.init_args.recipe")} == {
        k: v for k, v in ard.items() if k.startswith("model.init_args.recipe")}  # the stage keeps ard.yaml's recipe
    assert {k for k in gan if gan[k] != base[k]} == {"model.init_args.history_blocks", "model.init_args.init_student",
                                                      "trainer.default_root_dir", "trainer.logger.init_args.name"}
    assert base["model.init_args.init_student"] == "runs/digits/baseline/student_ema"


def test_imagenet_gan_preset_builds_on_a_tiny_random_dit(tmp_path, capsys):
    config = print_config(capsys, "imagenet256/ard.yaml", "imagenet256/ard_gan.yaml", flat=False)
    assert config["data"]["init_args"]["batch_size"] * config["trainer"]["devices"] == 48  # the re-implementation's
    assert config["trainer"]["strategy"] == "ddp_find_unused_parameters_true"
    kwargs = dict(config["model"]["init_args"])
    # tiny stand-ins for DiT-XL/2 (learned sigma, 4 latent channels), the VAE and the real latents
    teacher = tiny_teacher(tmp_path / "dit", size="DiT-S/2", num_layers=7, sample_size=8, num_attention_heads=2,
                           attention_head_dim=8)
    np.save(tmp_path / "latents.npy", np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float16))
    np.save(tmp_path / "labels.npy", np.arange(16, dtype=np.int64) * 60)
    kwargs |= dict(teacher=str(teacher), teacher_size=None, samples=dict(per_class=0), init_student=None,
                   gan=dict(kwargs["gan"], real=str(tmp_path), holdout=str(tmp_path)))
    module = ARDGANDistillation(**kwargs)
    assert len(module.discriminator.heads) == 7  # gan.blocks: all blocks (history in the lowest 6)
    g = draw_generator(0, 0, 0)
    real, labels = RealSamples(module.gan.real).draw(8, g)
    assert real.shape == (8, 4, 8, 8) and real.dtype == torch.float32
    disc = module.discriminator
    logits = disc.logits(module.frozen_teacher(), real, disc.timesteps(8, g), labels, g)
    assert logits.shape == (8, 7 * 16)  # 7 heads x 16 tokens (8x8 latents, patch 2)
    optimisers = module.configure_optimizers()
    assert [o.param_groups[0]["lr"] for o in optimisers] == [kwargs["lr"], kwargs["gan"]["lr"]]


def test_encode_real_latents_from_an_image_folder(tmp_path):
    """An image folder (class subfolders, any sizes and modes) -> centre-cropped, VAE-encoded real latents."""
    from diffusers import AutoencoderKL
    from PIL import Image

    encode_real_latents = runpy.run_path(str(ROOT / "scripts" / "encode_real_latents.py"), run_name="encode_real_latents")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(4,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2,
                  sample_size=256).save_pretrained(tmp_path / "vae")  # 3 downsamplings: 256 -> 32, as sd-vae-ft-ema
    rng = np.random.default_rng(0)
    for name, size, mode in (("b/1.png", (300, 260), "RGB"), ("a/2.JPEG", (256, 600), "RGB"),
                             ("b/3.png", (520, 512), "L")):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / "images" / name)
    encode_real_latents["main"](["--images", str(tmp_path / "images"), "--vae", str(tmp_path / "vae"),
                              "--out", str(tmp_path / "latents"), "--batch-size", "2", "--device", "cpu"])
    real = RealSamples(str(tmp_path / "latents"))
    assert real.shape == (4, 32, 32) and real.images.dtype == np.float16
    assert real.labels.tolist() == [0, 1, 1]  # class = sorted subfolder ("a", "b")
    assert np.isfinite(real.images).all() and float(np.abs(real.images).max()) > 0
