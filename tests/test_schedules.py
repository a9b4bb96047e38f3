"""The schedules (ard/schedules.py): the variance-preserving one computes exactly what DDIM always did; the flow
one's Euler step is the affine jump and diffusers' FlowMatchEulerDiscreteScheduler step; its grid is explicit and
recorded; every student output reads back to the (x0, eps) it was made from; an untrained flow student (N = 0)
reproduces the flow teacher; a flow store's manifest is checked against its grid."""
import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ard.backbones.dit import DiT
from ard.checks import CLEAN, check_timesteps
from ard.diffusion import (ddim_sample, flow_sample, flow_solver_identity, guided_prediction, sample_at,
                           solver_grid, student_grid_indices, teacher_path)
from ard.schedules import (FlowSchedule, VPSchedule, alpha_bar, ddim_jump, make_scheduler, predict_x0, q_sample,
                           schedule_from_settings, schedule_of)
from ard.store.schema import check_manifest
from ard.student import ARDStudent, sample

torch.manual_seed(0)
X = torch.randn(3, 1, 8, 8)
X0 = torch.randn(3, 1, 8, 8)
EPS = torch.randn(3, 1, 8, 8)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = DiT().build("digits", num_layers=2)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_the_variance_preserving_jump_is_ddim_bit_for_bit():
    schedule, scheduler = VPSchedule(), make_scheduler()
    t_from, t_to = torch.tensor([943, 451, 205]), torch.tensor([697, 205, CLEAN])
    a, b = alpha_bar(scheduler, t_from), alpha_bar(scheduler, t_to)
    for clip in (False, True):
        nxt, x0 = schedule.jump(X, EPS, t_from, t_to, "eps", clip)
        assert torch.equal(nxt, ddim_jump(X, EPS, a, b, clip)) and torch.equal(x0, predict_x0(X, EPS, a, clip))
    assert torch.equal(schedule.q_sample(X0, t_from, EPS), q_sample(X0, a.float().view(-1, 1, 1, 1), EPS))
    torch.testing.assert_close(schedule.snr(t_from), a / (1 - a))


def test_the_variance_preserving_teacher_path_is_ddim_on_its_grid():
    model, labels = tiny_model(), torch.tensor([1, 4, 7])
    noise = torch.randn(3, 1, 8, 8)
    traj = ddim_sample(model, noise, labels, 4, 2.0, clip_sample=True)
    at = sample_at(model, VPSchedule(), noise, labels, traj.timesteps, 2.0, True)
    torch.testing.assert_close(at, traj.states[:, -1], atol=1e-5, rtol=1e-5)


def test_one_flow_euler_step_is_the_affine_jump_and_diffusers_step():
    schedule = FlowSchedule(3.0)
    sigmas = schedule.grid_sigmas(4)
    t_from = torch.full((3,), 1000 * sigmas[1], dtype=torch.float64)
    t_to = torch.full((3,), 1000 * sigmas[2], dtype=torch.float64)
    v = EPS - X0
    x = (1 - sigmas[1]) * X0 + sigmas[1] * EPS
    euler, x0 = schedule.jump(x, v, t_from, t_to, "velocity")
    affine = (1 - sigmas[2]) * X0 + sigmas[2] * EPS
    torch.testing.assert_close(euler, affine, atol=2e-6, rtol=0)
    torch.testing.assert_close(x0, X0, atol=2e-6, rtol=0)
    replaced = schedule.jump(x, v, t_from, t_to, "velocity", direction=EPS)[0]  # the affine form itself
    torch.testing.assert_close(replaced, affine, atol=2e-6, rtol=0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our shifted sigmas, used as given
    scheduler.set_timesteps(sigmas=sigmas[:-1])
    assert scheduler.sigmas.tolist() == pytest.approx(sigmas, abs=1e-6)
    scheduler._step_index = 1
    theirs = scheduler.step(v, scheduler.timesteps[1], x).prev_sample
    torch.testing.assert_close(euler, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule, t", [(VPSchedule(), [697, 205]), (FlowSchedule(2.0), [734.5, 120.25])])
@pytest.mark.parametrize("output", ["eps", "x0", "velocity"])
def test_every_output_reads_back_to_the_state_it_was_made_from(schedule, t, output):
    if schedule.kind == "vp" and output == "velocity":
        with pytest.raises(ValueError, match="variance preserving"):
            schedule.check_output(output)
        return
    labels = schedule.label_tensor([t[0]] * 3)
    t_to = schedule.label_tensor([t[1]] * 3)
    a, b = (c.float().view(-1, 1, 1, 1) for c in schedule.coefficients(labels))
    x = a * X0 + b * EPS
    pred = {"eps": EPS, "x0": X0, "velocity": EPS - X0}[output]
    x0, eps = schedule.read(x, pred, labels, output)
    torch.testing.assert_close(x0, X0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps, EPS, atol=1e-4, rtol=1e-4)
    a2, b2 = (c.float().view(-1, 1, 1, 1) for c in schedule.coefficients(t_to))
    torch.testing.assert_close(schedule.jump(x, pred, labels, t_to, output)[0], a2 * X0 + b2 * EPS, atol=1e-4,
                               rtol=1e-4)


def test_flow_grids_are_explicit_and_students_take_every_kth_point():
    schedule = FlowSchedule(3.0)
    assert schedule.grid_sigmas(2) == pytest.approx([1.0, 0.75, 0.0])
    assert FlowSchedule(1.0).grid_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    grid = solver_grid(flow_solver_identity(24, 3.0, 1.5, False, "fp32"))
    assert grid[0] == 1000.0 and grid[-1] == CLEAN and len(grid) == 25
    assert [grid[i] for i in student_grid_indices(24, 2)] == pytest.approx([1000.0, 750.0, CLEAN])
    with pytest.raises(ValueError, match="must divide the teacher's K=24"):
        student_grid_indices(24, 5)
    assert check_timesteps([1000.0, 750.0, CLEAN], "x", "flow") == [1000.0, 750.0, CLEAN]
    with pytest.raises(ValueError, match="numbers 1000 sigma in"):
        check_timesteps([1200.0, CLEAN], "x", "flow")


def test_eps_output_is_refused_where_the_state_is_the_noise():
    with pytest.raises(ValueError, match="cannot give x0 at sigma = 1"):
        FlowSchedule().check_output("eps", torch.tensor([1000.0]))
    FlowSchedule().check_output("eps", torch.tensor([999.0]))  # below sigma = 1 it is defined
    student = ARDStudent(tiny_model(), 2, history_blocks=0, output="eps", schedule=FlowSchedule())
    with pytest.raises(ValueError, match="cannot give x0 at sigma = 1"):
        sample(student, X, torch.tensor([0, 1, 2]), torch.tensor([1000.0, 500.0, CLEAN], dtype=torch.float64))
    with pytest.raises(ValueError, match="variance preserving"):
        ARDStudent(tiny_model(), 2, history_blocks=0, output="velocity", schedule=VPSchedule())


@pytest.mark.parametrize("noise_correction", [False, True])
def test_an_untrained_flow_student_is_the_flow_teacher_at_its_boundaries(noise_correction):
    teacher, labels = tiny_model(1), torch.tensor([2, 5, 9])
    noise = torch.randn(3, 1, 8, 8)
    schedule = FlowSchedule(3.0)
    timesteps = schedule.labels(schedule.grid_sigmas(4))
    expected = sample_at(teacher, schedule, noise, labels, timesteps, 1.0, noise_correction=noise_correction)
    student = ARDStudent(teacher, 4, history_blocks=0, output="velocity", schedule=schedule)
    with torch.no_grad():
        got = sample(student, noise, labels, schedule.label_tensor(timesteps), noise_correction)[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if not noise_correction:  # the K-step teacher itself, on its own grid
        torch.testing.assert_close(flow_sample(teacher, noise, labels, 4, 1.0, 3.0).states[:, -1], expected,
                                   atol=1e-5, rtol=1e-5)
    # the training pass (teacher forcing on the teacher's own states) gives the same next states
    states = flow_sample(teacher, noise, labels, 4, 1.0, 3.0).states  # (B, 5, C, H, W)
    path = schedule.label_tensor(timesteps).expand(3, -1)
    with torch.no_grad():
        nxt = student(states[:, :-1], path, labels)
    torch.testing.assert_close(nxt, states[:, 1:], atol=1e-5, rtol=1e-5)


def test_cfg_guides_the_velocity_and_the_teacher_path_steps_it():
    model, labels = tiny_model(), torch.tensor([3, 3, 3])
    t = torch.full((3,), 750.0, dtype=torch.float64)
    v = guided_prediction(model, X, t, labels, 2.0)
    plain = teacher_path(model, FlowSchedule(), X, labels, torch.tensor([[750.0, 500.0]] * 3, dtype=torch.float64),
                         2.0)
    torch.testing.assert_close(plain, X - 0.25 * v, atol=1e-6, rtol=0)


def test_schedules_round_trip_through_their_settings():
    for schedule in (VPSchedule(), FlowSchedule(3.0)):
        again = schedule_from_settings(copy.deepcopy(schedule.settings()))
        assert type(again) is type(schedule) and again.settings() == schedule.settings()
    assert isinstance(schedule_from_settings(None), VPSchedule)  # a student saved before schedules were recorded
    with pytest.raises(ValueError, match="schedule.kind='edm'"):
        schedule_from_settings({"kind": "edm"})
    assert schedule_of(flow_solver_identity(8, 3.0, 1.0, False, "fp32")).settings() == {"kind": "flow", "shift": 3.0}


def test_a_flow_manifest_is_checked_against_its_grid():
    from ard.store.format import new_manifest

    sigmas = FlowSchedule(3.0).grid_sigmas(4)
    keep = [0, 2, 4]
    kw = dict(teacher={"weights_sha256": "0" * 64, "config_sha256": "0" * 64},
              solver=flow_solver_identity(4, 3.0, 1.5, True, "fp32"), grid_indices=keep,
              grid_timesteps=[round(1000 * sigmas[i]) for i in keep[:-1]] + [CLEAN], state_shape=(1, 8, 8),
              dtype="float32", with_x0=False, num_classes=10, num_trajectories=4, shard_size=4, seed=0,
              micro_batch_size=4)
    manifest = new_manifest(**kw, grid_sigmas=[sigmas[i] for i in keep])
    assert manifest["version"] == 2 and manifest["grid"]["sigmas"] == [sigmas[i] for i in keep]
    check_manifest(manifest, "m")
    with pytest.raises(Exception, match="not the solver's grid"):
        new_manifest(**kw, grid_sigmas=[1.0, 0.5, 0.0])
