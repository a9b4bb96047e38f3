"""Imagine Flash's SRL as built (ard/student/srl.py, ard/student/loss.py) and noise correction in training: the
retention measure on an analytic denoiser whose answer is known, the per-step shift rule and table, the SNR step
weights equalising the epsilon gradient, the unclipped x0, the combined objective; noise correction changing only
step 0's direction term in the student's pass, its rollouts, the backward-distillation targets and the export."""
import json
from types import SimpleNamespace

import pytest
import torch

from ard.backbones import BACKBONES
from ard.backbones.dit import DiT
from ard.diffusion import ddim_grid, ddim_sample, guided_x0, teacher_path
from ard.schedules import VPSchedule, alpha_bar, make_scheduler, predict_x0
from ard.student import ARDStudent, StepMSELoss, sample
from ard.student.export import SAMPLING_CONFIG, export_student, exported_noise_correction
from ard.student.loss import mse, unclipped
from ard.student.recipe import (Recipe, shift_timesteps, shifted_reconstruction, srl_timesteps, student_inputs,
                                substep_paths, teacher_from_state)
from ard.student.srl import retention, retention_timesteps, snr_weights
from test_student_model import tiny_teacher

BOUNDARIES = [943, 697, 451, 205, -1]  # an S = 4 student on the K = 24 leading grid


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of per-class Gaussian data x0 = mu_c + sqrt(v) z (z ~ N(0, I)), as a DiT-like model:
    E[x0 | x_t] = mu + g (x_t - alpha mu) with g = alpha v / (alpha_bar v + 1 - alpha_bar); returns the epsilon that
    implies. Its retention at t is alpha_bar v / (alpha_bar v + 1 - alpha_bar). Served by the DiT adapter's maths
    (`gaussian_family`): a DiT's config fields, output and labels."""

    def __init__(self, means: torch.Tensor, variance: float):
        super().__init__()
        self.means, self.variance = means, variance  # (G, C, H, W), v
        self.config = SimpleNamespace(in_channels=means.shape[1], num_embeds_ada_norm=len(means))
        self.ab = make_scheduler().alphas_cumprod.double()  # (1000,)

    def forward(self, x, t, labels):
        a = self.ab[t].to(x).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        mu = self.means[labels]  # (B, C, H, W)
        x0 = mu + a.sqrt() * self.variance / (a * self.variance + 1 - a) * (x - a.sqrt() * mu)  # (B, C, H, W)
        return SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt())

    @staticmethod
    def expected_retention(t: int, variance: float) -> float:
        a = float(make_scheduler().alphas_cumprod[t])
        return a * variance / (a * variance + 1 - a)


class GaussianFamily(DiT):
    family, model_class = "gaussian", GaussianDenoiser


@pytest.fixture(autouse=True)
def gaussian_family(monkeypatch):
    """The toy denoiser as a teacher family, for this module's tests."""
    monkeypatch.setitem(BACKBONES, GaussianFamily.family, GaussianFamily())


def gaussian_data(variance: float, per_class: int = 200, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(classes, 1, 8, 8, generator=g) - 0.5  # (G, 1, 8, 8)
    labels = torch.arange(classes).repeat_interleave(per_class)  # (N,)
    x0 = means[labels] + variance ** 0.5 * torch.randn(len(labels), 1, 8, 8, generator=g)  # (N, 1, 8, 8)
    return GaussianDenoiser(means, variance), x0, labels


def test_retention_of_the_exact_gaussian_denoiser_is_its_shrinkage():
    toy, x0, labels = gaussian_data(0.25)
    ts = [0, 150, 300, 450, 600, 800, 999]
    got = retention(toy, x0, labels, ts, generator=torch.Generator().manual_seed(1), batch_size=512)
    want = [GaussianDenoiser.expected_retention(t, 0.25) for t in ts]
    assert got == pytest.approx(want, abs=0.01), list(zip(ts, got, want))
    assert want[0] > 0.99 and want[-1] < 1e-3  # from "the target is the input" to "only the class mean"
    with pytest.raises(ValueError, match="differ within their class"):
        retention(toy, toy.means[labels], labels, [0])


def test_retention_rule_picks_the_shift_per_step():
    curve = {0: 1.0, 200: 0.9, 400: 0.6, 600: 0.3, 800: 0.1, 999: 0.0}
    # 943 and 697 keep < 0.4: both move to where 0.4 survives (0.6 - 0.3 (t - 400) / 200 >= 0.4: t <= 533);
    # 451 keeps 0.52 and 205 keeps 0.9: no shift
    assert retention_timesteps(curve, BOUNDARIES[:-1], 0.4) == [533, 533, 451, 205]
    assert retention_timesteps(curve, BOUNDARIES[:-1], 0.95) == [100, 100, 100, 100]
    assert retention_timesteps(curve, [943], 1.5) == [0]  # nothing keeps that much: the least noise
    # on the Gaussian toy the picks keep the target
    toy, x0, labels = gaussian_data(0.25)
    measured = dict(zip(range(0, 1000, 50), retention(toy, x0, labels, range(0, 1000, 50), batch_size=2000)))
    picks = retention_timesteps(measured, BOUNDARIES[:-1], 1 / 3)
    assert picks[0] == picks[1] < 451 and all(GaussianDenoiser.expected_retention(p, 0.25) > 0.3 for p in picks)


def test_srl_table_sets_tau_prime_per_step():
    t_from = torch.tensor([BOUNDARIES[:-1]] * 2)  # (B, S)
    assert srl_timesteps(t_from, table=[600, 500, 300, 100]).tolist() == [[600, 500, 300, 100]] * 2
    assert torch.equal(srl_timesteps(t_from, 2.0), shift_timesteps(t_from, 2.0))  # no table: srl_shift
    with pytest.raises(ValueError, match="one timestep per student step, 4 needed"):
        srl_timesteps(t_from, table=[600, 300])
    # the teacher's x0 of x = sqrt(a') x0 + sqrt(1 - a') n with eps = 0 is x0 + sqrt((1 - a') / a') n at tau' of the table
    zero = tiny_teacher()
    torch.nn.init.zeros_(zero.proj_out_2.weight), torch.nn.init.zeros_(zero.proj_out_2.bias)  # eps = 0 everywhere
    x0, labels = torch.randn(2, 4, 1, 8, 8), torch.tensor([2, 5])
    table = [600, 500, 300, 100]
    target = shifted_reconstruction(zero, x0, t_from, labels, 2.0, False, 1.0, torch.Generator().manual_seed(7),
                                    table=table)
    a = alpha_bar(make_scheduler(), torch.tensor(table)).float().view(1, 4, 1, 1, 1)
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(7)).view(2, 4, 1, 8, 8)
    torch.testing.assert_close(target, x0 + ((1 - a) / a).sqrt() * noise, atol=1e-4, rtol=1e-5)
    # and through the loss
    loss = StepMSELoss("shifted_reconstruction", 2.0, srl_timesteps=table)
    srl, _ = loss.srl(zero, x0, t_from, labels, torch.Generator().manual_seed(7))
    torch.testing.assert_close(srl, (((1 - a) / a).sqrt() * noise).square().flatten(2).mean(2), rtol=1e-4, atol=0)


def test_snr_weights_equalise_the_epsilon_gradient_of_each_step(capsys):
    """A student whose epsilon misses by the same amount at every step, against a teacher that knows x0 (the exact
    denoiser of nearly point-like classes: the target keeps almost none of the student's output): the x0-space
    loss's gradient w.r.t. the student's epsilon scales as (sigma / alpha)^2 per step, the SNR-weighted one not."""
    toy, x0, labels = gaussian_data(1e-4, per_class=20)
    t_from = torch.tensor(BOUNDARIES[:-1])  # (S,)
    kept = retention(toy, x0, labels, t_from.tolist(), generator=torch.Generator().manual_seed(2))
    assert max(kept) < 0.01  # the target is (nearly) the class mean: the residual is the student's own error
    g = torch.Generator().manual_seed(3)
    a = alpha_bar(make_scheduler(), t_from).float().view(1, 4, 1, 1, 1)  # (1, S, 1, 1, 1)
    noise = torch.randn(len(labels), 4, 1, 8, 8, generator=g)  # (B, S, 1, 8, 8)
    x = a.sqrt() * x0[:, None] + (1 - a).sqrt() * noise  # (B, S, 1, 8, 8) the student's inputs
    miss = 0.1 * torch.randn(noise.shape, generator=g)  # the same epsilon error scale at every step
    ratios = {}
    for weights in ("uniform", "snr"):
        eps = (noise + miss).requires_grad_()  # the student's epsilon output
        x0_pred = predict_x0(x.flatten(0, 1), eps.flatten(0, 1), a.expand(len(labels), -1, -1, -1, -1).flatten())
        loss = StepMSELoss("shifted_reconstruction", srl_weights=weights)
        _, weighted = loss.srl(toy, x0_pred.view_as(x), t_from.expand(len(labels), -1), labels,
                               torch.Generator().manual_seed(4))
        weighted.sum().backward()
        norms = eps.grad.transpose(0, 1).flatten(1).norm(dim=1)  # (S,) per step
        ratios[weights] = float(norms.max() / norms.min())
    with capsys.disabled():
        print(f"\nepsilon-gradient norm ratio max/min over the steps {t_from.tolist()}: {ratios}")
    assert ratios["snr"] < 2 and ratios["uniform"] > 1000
    torch.testing.assert_close(snr_weights(t_from).mean(), torch.tensor(1.0, dtype=torch.float64))


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def batch(steps=4):
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(3, steps + 1, 1, 8, 8, generator=g)  # (B, S+1, C, H, W)
    timesteps = torch.tensor([BOUNDARIES] if steps == 4 else [[943, 451, -1]]).expand(3, -1)
    return traj, timesteps, torch.tensor([0, 7, 3])


def test_srl_regresses_the_unclipped_x0(teacher):
    student = ARDStudent(teacher, 4, history_blocks=1, clip_x0=True)
    traj, timesteps, labels = batch()
    out = StepMSELoss("shifted_reconstruction", 2.0).terms(student, traj, timesteps, labels, teacher=teacher,
                                                          generator=torch.Generator().manual_seed(5))
    assert student.clip_x0  # restored
    with unclipped(student):
        _, x0 = student(traj[:, :-1], timesteps, labels, return_x0=True)  # (B, S, C, H, W)
    assert x0.abs().max() > 2  # clipping would change it
    target = shifted_reconstruction(teacher, x0.detach(), timesteps[:, :-1], labels, 2.0, False, 1.0,
                                    torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.loss, mse(x0, target))
    clipped = shifted_reconstruction(teacher, x0.clamp(-1, 1).detach(), timesteps[:, :-1], labels, 2.0, False, 1.0,
                                     torch.Generator().manual_seed(5))
    assert (out.loss - mse(x0.clamp(-1, 1), clipped)).abs().max() > 1e-2
    # the next states stay the clip_x0 student's own (with and without noise correction)
    for nc in (False, True):
        states = StepMSELoss("shifted_reconstruction", 2.0, noise_correction=nc).terms(
            student, traj, timesteps, labels, teacher=teacher).states
        torch.testing.assert_close(states, student(traj[:, :-1], timesteps, labels, noise_correction=nc),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", ["uniform", "snr"])
def test_combined_objective_is_trajectory_plus_lambda_srl(teacher, weights):
    student = ARDStudent(teacher, 4, history_blocks=1)
    traj, timesteps, labels = batch()
    both = StepMSELoss("trajectory", 2.0, srl_weight=0.5, srl_weights=weights).terms(
        student, traj, timesteps, labels, teacher=teacher, generator=torch.Generator().manual_seed(6))
    plain = StepMSELoss("trajectory", 2.0)(student, traj, timesteps, labels)
    srl = StepMSELoss("shifted_reconstruction", 2.0, srl_weights=weights)(
        student, traj, timesteps, labels, teacher=teacher, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(both.loss, plain + 0.5 * srl)
    torch.testing.assert_close(both.target, plain)
    scale = snr_weights(timesteps[:, :-1]).float() if weights == "snr" else 1.0
    torch.testing.assert_close(both.srl * scale, srl)
    assert Recipe(srl_weight=0.5).uses_srl and not Recipe().uses_srl
    with pytest.raises(ValueError, match="recipe.srl_weight=0.5: adds SRL to the 'trajectory'"):
        Recipe(targets="shifted_reconstruction", srl_weight=0.5)
    with pytest.raises(ValueError, match="recipe.srl_timesteps=\\[500\\]: replaces srl_shift"):
        Recipe(srl_timesteps=[500], srl_shift=2.0)
    with pytest.raises(ValueError, match="recipe.srl_weights='sn': must be 'uniform' or 'snr'"):
        Recipe(srl_weights="sn")
    with pytest.raises(ValueError, match="recipe.srl_timesteps=\\[1000\\]: must be less than 1000"):
        Recipe(srl_timesteps=[1000])


# ---------------------------------------------------------------- noise correction in training
def test_noise_correction_in_training_changes_only_step0s_direction_term(teacher):
    student = ARDStudent(teacher, 4, history_blocks=2)
    traj, timesteps, labels = batch()
    plain, x0 = student(traj[:, :-1], timesteps, labels, return_x0=True)
    corrected, x0_nc = student(traj[:, :-1], timesteps, labels, return_x0=True, noise_correction=True)
    assert torch.equal(corrected[:, 1:], plain[:, 1:]) and torch.equal(x0_nc, x0)  # later steps, every x0
    b = alpha_bar(make_scheduler(), timesteps[:, 1]).float().view(-1, 1, 1, 1)  # (B, 1, 1, 1) alpha_bar(tau_1)
    torch.testing.assert_close(corrected[:, 0], b.sqrt() * x0[:, 0] + (1 - b).sqrt() * traj[:, 0])
    assert (corrected[:, 0] - plain[:, 0]).abs().max() > 1e-3
    # the loss's pass is that one
    states = StepMSELoss(noise_correction=True).terms(student, traj, timesteps, labels).states
    assert torch.equal(states, corrected)
    # the rollout inputs are the corrected sampler's states (x_T exact, the later ones differ)
    own, _ = student_inputs(student, traj, timesteps, labels, 1.0, noise_correction=True)
    with torch.no_grad():
        assert torch.equal(own, sample(student, traj[:, 0], labels, timesteps, noise_correction=True)[:, :-1])
        assert (own[:, 1] - sample(student, traj[:, 0], labels, timesteps)[:, 1]).abs().max() > 1e-3


def test_noise_correction_of_backward_distillation_targets_is_step0s_only(teacher):
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 4, 9])
    traj = ddim_sample(teacher, torch.randn(3, 1, 8, 8, generator=g), labels, num_steps=8, guidance_scale=2.0,
                       save_indices=[0, 4, 8], clip_sample=True)  # an S = 2 student on a K = 8 grid
    states = traj.states  # (B, 3, 1, 8, 8)
    for substeps in (4, 1):
        paths = torch.tensor(substep_paths(ddim_grid(8), [0, 4, 8], substeps))  # (S, m+1)
        plain = teacher_from_state(teacher, VPSchedule(), states[:, :-1], paths, labels, 2.0, True)
        corrected = teacher_from_state(teacher, VPSchedule(), states[:, :-1], paths, labels, 2.0, True, noise_correction=True)
        torch.testing.assert_close(corrected[:, 1:], plain[:, 1:], atol=1e-5, rtol=1e-5)  # step 1 unchanged
        x_t = states[:, 0]
        torch.testing.assert_close(corrected[:, 0], teacher_path(teacher, VPSchedule(), x_t, labels, paths[:1].expand(3, -1), 2.0,
                                                              True, noise_correction=True), atol=1e-5, rtol=1e-5)
        assert (corrected[:, 0] - plain[:, 0]).abs().max() > 1e-3
    # one jump: sqrt(b) x0_teacher(x_T) + sqrt(1 - b) x_T
    t0 = torch.full((3,), int(paths[0, 0]))
    b = alpha_bar(make_scheduler(), paths[0, 1:]).float().view(1, 1, 1, 1)
    torch.testing.assert_close(corrected[:, 0], b.sqrt() * guided_x0(teacher, VPSchedule(), x_t, t0, labels, 2.0, True)
                               + (1 - b).sqrt() * x_t, atol=1e-5, rtol=0)
    # the loss regresses the corrected step 0 on the corrected target
    student = ARDStudent(teacher, 2, history_blocks=1)
    ts = torch.tensor(traj.timesteps).expand(3, -1)
    loss = StepMSELoss("teacher_from_state", 2.0, True, paths, noise_correction=True)(student, states, ts, labels,
                                                                                    teacher=teacher)
    own = student(states[:, :-1], ts, labels, noise_correction=True)
    torch.testing.assert_close(loss, mse(own, corrected))


def test_export_records_noise_correction(tmp_path, teacher):
    student = ARDStudent(teacher, 2, history_blocks=1)
    on = export_student(student, [943, 451, -1], tmp_path / "on", {"inputs": "rollout"}, noise_correction=True)
    off = export_student(student, [943, 451, -1], tmp_path / "off", {"inputs": "rollout"})
    assert json.loads((on / SAMPLING_CONFIG).read_text())["noise_correction"] is True
    assert "noise_correction" not in json.loads((off / SAMPLING_CONFIG).read_text())  # unchanged file when off
    assert exported_noise_correction(on) and not exported_noise_correction(off)


def test_a_student_trained_with_noise_correction_is_evaluated_with_it(tmp_path, teacher):
    """ard-eval and sample_student take the exported flag: the trained-corrected student's samples are those of
    `sample(..., noise_correction=True)`, whether or not the caller asks for the correction."""
    from ard.evaluate import student_sampler
    torch.manual_seed(0)
    student = ARDStudent(teacher, 2, history_blocks=1)
    on = export_student(student, [943, 451, -1], tmp_path / "on", {}, noise_correction=True)
    off = export_student(student, [943, 451, -1], tmp_path / "off", {})
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    ts = torch.tensor([943, 451, -1])
    with torch.no_grad():
        corrected = sample(student.eval(), noise, labels, ts, True)[:, -1]
        plain = sample(student, noise, labels, ts, False)[:, -1]
        assert not torch.allclose(corrected, plain)  # the correction changes the samples
        torch.testing.assert_close(student_sampler(str(on))[0](noise, labels), corrected)
        torch.testing.assert_close(student_sampler(str(off))[0](noise, labels), plain)
        torch.testing.assert_close(student_sampler(str(off), noise_correction=True)[0](noise, labels), corrected)
