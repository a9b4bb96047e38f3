"""Training recipes (ard/student/recipe.py): rollout inputs are the student's own sampler output and carry no
gradient; backward-distillation targets reproduce the stored trajectory when fed the teacher's states; SRL
targets on a hand-made case; noise correction changes exactly the first step's epsilon; the exposure-bias
measurement; and the recipes through `ard fit` (they train, log, and round-trip into the export; SRL's retention,
shift table, step weights and noise correction in training: tests/test_srl.py)."""
import json

import pytest
import torch

from ard.diffusion import ddim_grid, ddim_sample
from ard.schedules import VPSchedule, alpha_bar, make_scheduler
from ard.student.exposure import exposure_errors
from ard.modules.distill import ARDDistillation, load_exported
from ard.student import ARDStudent, HistoryContext, StepMSELoss, sample
from ard.student.recipe import (Recipe, shift_timesteps, shifted_reconstruction, student_inputs,
                                substep_paths, teacher_from_state)
from test_distill import S, args_for, step_losses, store, teacher_dir  # noqa: F401 (fixtures)
from ard.backbones.dit import DiT
from test_student_model import inputs, tiny_teacher

K = 8  # the teacher grid of the hand-made trajectories (S = 2 or 4 divides it)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def trajectory(teacher, steps, n=3, guidance=2.0):
    """The teacher's K-step DDIM trajectory at the boundaries of an S-step student: (n, S+1, 1, 8, 8), timesteps."""
    g = torch.Generator().manual_seed(3)
    noise, labels = torch.randn(n, 1, 8, 8, generator=g), torch.tensor([1, 4, 9])[:n]
    boundaries = [s * K // steps for s in range(steps + 1)]
    traj = ddim_sample(teacher, noise, labels, num_steps=K, guidance_scale=guidance, save_indices=boundaries,
                       clip_sample=True)
    return traj.states, torch.tensor(traj.timesteps).expand(n, -1), labels, boundaries


def test_rollout_inputs_are_the_students_own_samples_without_gradient(teacher):
    student = ARDStudent(teacher, S, history_blocks=2)
    states, timesteps, labels = inputs()
    traj = torch.cat([states, torch.randn(3, 1, 1, 8, 8)], dim=1)  # (B, S+1, C, H, W)
    own, rows = student_inputs(student, traj, timesteps, labels, prob=1.0)
    with torch.no_grad():
        expected = sample(student, traj[:, 0], labels, timesteps)[:, :-1]
    assert rows.all() and torch.equal(own, expected)  # bit for bit: the same cached sampler
    assert own.grad_fn is None and not own.requires_grad  # nothing flows back through the rollout
    assert torch.equal(own[:, 0], traj[:, 0])  # x_T is exact
    # mixed: the chosen rows are rollouts, the others the teacher's states, the draw is the generator's
    mixed, rows = student_inputs(student, traj, timesteps, labels, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(rows, torch.rand(3, generator=torch.Generator().manual_seed(0)) < 0.5)
    for b in range(3):
        assert torch.equal(mixed[b], own[b] if rows[b] else traj[b, :-1])
    teacher_only, rows = student_inputs(student, traj, timesteps, labels, prob=0.0)
    assert not rows.any() and torch.equal(teacher_only, traj[:, :-1])
    # the loss on rollout inputs trains the student's one pass only
    StepMSELoss()(student, traj, timesteps, labels, inputs=own).sum().backward()
    assert all(p.grad is not None for p in student.transformer.transformer_blocks[0].parameters())


def test_rollout_probability_schedules():
    assert Recipe("teacher", 0.7).rollout_probability(5) == 0 and Recipe("rollout", 0.7, 10).rollout_probability(0) == 1
    assert Recipe("mixed", 0.7).rollout_probability(0) == 0.7
    assert [Recipe("mixed", 0.8, 100).rollout_probability(s) for s in (0, 50, 100, 500)] == [0, 0.4, 0.8, 0.8]


@pytest.mark.parametrize("steps", [2, 4])
def test_teacher_from_state_on_the_teachers_states_reproduces_the_trajectory(teacher, steps):
    states, timesteps, labels, boundaries = trajectory(teacher, steps)
    paths = torch.tensor(substep_paths(ddim_grid(K), boundaries, K // steps))  # (S, K/S + 1)
    assert paths[:, 0].tolist() == timesteps[0, :-1].tolist() and paths[:, -1].tolist() == timesteps[0, 1:].tolist()
    target = teacher_from_state(teacher, VPSchedule(), states[:, :-1], paths, labels, 2.0, True)  # (B, S, C, H, W)
    torch.testing.assert_close(target, states[:, 1:], atol=2e-5, rtol=0)
    coarse = teacher_from_state(teacher, VPSchedule(), states[:, :-1], torch.tensor(substep_paths(ddim_grid(K), boundaries, 1)),
                                labels, 2.0, True)  # one DDIM jump per student step: not the K-step teacher
    assert (coarse - states[:, 1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="target_substeps=3 must divide"):
        substep_paths(ddim_grid(K), boundaries, 3)


def test_shifted_reconstruction_target_by_hand(teacher):
    zero = tiny_teacher()
    torch.nn.init.zeros_(zero.proj_out_2.weight), torch.nn.init.zeros_(zero.proj_out_2.bias)  # eps = 0 everywhere
    x0 = torch.randn(2, 3, 1, 8, 8)
    t_from = torch.tensor([[943, 451, 205]] * 2)
    labels = torch.tensor([2, 5])
    target = shifted_reconstruction(zero, x0, t_from, labels, 2.0, False, 1.0, torch.Generator().manual_seed(7))
    # eps = 0: the teacher's x0 of x = sqrt(a) x0 + sqrt(1 - a) n is x / sqrt(a) = x0 + sqrt((1 - a) / a) n
    a = alpha_bar(make_scheduler(), t_from.flatten()).float().view(2, 3, 1, 1, 1)
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(7)).view(2, 3, 1, 8, 8)
    torch.testing.assert_close(target, x0 + ((1 - a) / a).sqrt() * noise, atol=1e-4, rtol=1e-5)
    assert shift_timesteps(torch.tensor([0, 500, 999]), 1.0).tolist() == [0, 500, 999]
    assert shift_timesteps(torch.tensor([0, 999]), 3.0).tolist() == [0, 999]
    assert shift_timesteps(torch.tensor([500]), 3.0).item() == round(999 * 3 * (500 / 999) / (1 + 2 * 500 / 999))


def test_noise_correction_replaces_exactly_the_first_steps_epsilon(teacher):
    student = ARDStudent(teacher, S, history_blocks=2).eval()
    states, timesteps, labels = inputs()
    noise = states[:, 0]
    with torch.no_grad():
        plain, corrected = (sample(student, noise, labels, timesteps, nc) for nc in (False, True))
        # step 0 by hand: x0 from the model's eps, direction sqrt(1 - b) x_T instead of sqrt(1 - b) eps
        history = HistoryContext(num_steps=S, step=0, cache=student.new_cache(3))
        eps = DiT().prediction(teacher, student._transformer(noise, timesteps[:, 0], labels, history, step=0))
        a, b = (alpha_bar(student.schedule.scheduler, timesteps[:, i]).float().view(-1, 1, 1, 1) for i in (0, 1))
        torch.testing.assert_close(corrected[:, 1] - plain[:, 1], (1 - b).sqrt() * (noise - eps), atol=1e-5, rtol=0)
        # later steps: the same function of the same inputs (the cache holds the corrected states' keys)
        cache = student.new_cache(3)
        student.step(corrected[:, 0], 0, timesteps[:, 0], timesteps[:, 1], labels, cache, noise_correction=True)
        for s in range(1, S):
            x = student.step(corrected[:, s], s, timesteps[:, s], timesteps[:, s + 1], labels, cache,
                             noise_correction=True)
            assert torch.equal(x, corrected[:, s + 1])
    direct = ARDStudent(teacher, S, history_blocks=2, output="next_state")
    with pytest.raises(ValueError, match="noise_correction needs an epsilon-parametrised student"):
        sample(direct, noise, labels, timesteps, noise_correction=True)


def test_exposure_errors_split_teacher_forcing_from_own_states(teacher):
    states, timesteps, labels, _ = trajectory(teacher, 4)
    student = ARDStudent(teacher, 4, history_blocks=2).eval()
    fed, own = exposure_errors(student, states, timesteps, labels)
    assert fed.shape == own.shape == (3, 4)
    torch.testing.assert_close(fed[:, 0], own[:, 0])  # step 0 gets x_T either way
    assert (own[:, 1:] - fed[:, 1:]).abs().max() > 0  # later steps see the student's own states
    with torch.no_grad():
        expected = (sample(student, states[:, 0], labels, timesteps)[:, 1:] - states[:, 1:]).square().mean((2, 3, 4))
    torch.testing.assert_close(own, expected)


@pytest.mark.parametrize("recipe", [
    ["--model.init_args.recipe.inputs=rollout", "--model.init_args.recipe.targets=teacher_from_state",
     "--model.init_args.recipe.target_substeps=3"],
    ["--model.init_args.recipe.inputs=mixed", "--model.init_args.recipe.rollout_ramp_steps=4",
     "--model.init_args.recipe.targets=shifted_reconstruction", "--model.init_args.recipe.srl_shift=2.0"],
    ["--model.init_args.recipe.inputs=rollout", "--model.init_args.recipe.srl_weight=0.5",
     "--model.init_args.recipe.srl_weights=snr", "--model.init_args.recipe.srl_timesteps=[600, 400, 250, 150]",
     "--model.init_args.noise_correction=true"],
], ids=["rollout_backward", "mixed_srl", "rollout_trajectory_srl_nc"])
def test_recipes_train_through_the_cli_and_round_trip_into_the_export(tmp_path, teacher_dir, store, recipe):
    from ard.cli import main as ard_main

    ard_main(args_for(tmp_path, teacher_dir, store, "--trainer.max_steps=6", *recipe))
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(6)) and all(
        torch.isfinite(torch.tensor(list(v.values()))).all() for v in losses.values())
    export = tmp_path / "student_ema"
    settings = json.loads((export / "ard_sampling.json").read_text())
    for arg in recipe:
        if "init_args.recipe." not in arg:
            continue
        key, value = arg.split("init_args.recipe.")[1].split("=")
        assert str(settings["recipe"][key]) == value, key
    assert settings.get("noise_correction", False) == ("--model.init_args.noise_correction=true" in recipe)
    student, timesteps = load_exported(export)
    assert len(timesteps) == S + 1 and student.history_blocks == 2
    if "--model.init_args.recipe.srl_weight=0.5" in recipe:  # the combined objective logs its parts per step
        header = next((tmp_path / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0].split(",")
        assert {f"train/{part}_step{s}" for part in ("srl", "trajectory") for s in range(S)} <= set(header)


def test_bad_recipe_knobs_fail_in_one_line(teacher_dir):
    with pytest.raises(ValueError, match="recipe.inputs='rolout'"):
        Recipe(inputs="rolout")
    with pytest.raises(ValueError, match="recipe.targets='shifted_reconstruction' needs an x0-prediction"):
        ARDDistillation(teacher=str(teacher_dir), history_blocks=2, recipe=Recipe(targets="shifted_reconstruction"),
                        output="next_state", samples=dict(per_class=0))
    with pytest.raises(ValueError, match="recipe.rollout_prob=1.5: must be less than or equal to 1"):
        ARDDistillation(teacher=str(teacher_dir), history_blocks=2, recipe=dict(inputs="mixed", rollout_prob=1.5),
                        samples=dict(per_class=0))
    with pytest.raises(ValueError, match="recipe.srl_shift=0.0: must be greater than 0"):
        Recipe(targets="shifted_reconstruction", srl_shift=0.0)
    with pytest.raises(ValueError, match="recipe.srl_timesteps=\\[500, 200\\]: num_steps=4 needs 4 timesteps"):
        ARDDistillation(teacher=str(teacher_dir), history_blocks=2, recipe=dict(srl_weight=1.0, srl_timesteps=[500, 200]),
                        samples=dict(per_class=0))
    with pytest.raises(ValueError, match="recipe.srl_weight=1.0 \\(SRL\\) needs an x0-prediction"):
        ARDDistillation(teacher=str(teacher_dir), history_blocks=2, recipe=dict(srl_weight=1.0), output="next_state",
                        samples=dict(per_class=0))
    with pytest.raises(ValueError, match="model.noise_correction=True needs an epsilon-parametrised student"):
        ARDDistillation(teacher=str(teacher_dir), history_blocks=2, noise_correction=True, output="next_state",
                        samples=dict(per_class=0))
