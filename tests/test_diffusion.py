"""The teacher sampler against a plain DDIM loop written here, determinism, grid and label checks."""
import pytest
import torch

from ard.diffusion import (CLEAN, ddim_grid, ddim_sample, guided_prediction, precision_of_trainer, recorded_solver,
                           sample_at, solver_identity, trajectory_inputs)
from ard.schedules import VPSchedule, alpha_bar, ddim_jump, make_scheduler
from ard.backbones.dit import build_dit


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = build_dit("digits", num_layers=2)
    for p in model.parameters():  # make the adaLN-zero / output layers non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def reference_ddim(model, x, labels, K, w, clip):
    """Plain DDIM (eta = 0) with CFG on DiT's linear schedule and leading spacing, no diffusers scheduler."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    ab = torch.cumprod(1 - betas, dim=0)
    ratio = 1000 // K
    states = [x]
    for t in reversed([k * ratio for k in range(K)]):
        tt = torch.full((x.shape[0],), t)
        null = torch.full_like(labels, model.config.num_embeds_ada_norm)
        e_c = model(x, tt, labels).sample[:, :1]
        e_u = model(x, tt, null).sample[:, :1]
        eps = e_u + w * (e_c - e_u)
        a, a_prev = ab[t], (ab[t - ratio] if t - ratio >= 0 else torch.tensor(1.0))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        states.append(x)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("clip", [False, True])
def test_sampler_matches_reference_loop(teacher, clip):
    noise, labels = trajectory_inputs(0, range(6), (1, 8, 8), 10)
    K, w = 6, 2.0
    traj = ddim_sample(teacher, noise, labels, K, w, spacing="leading", clip_sample=clip)
    ref = reference_ddim(teacher, noise, labels, K, w, clip)
    assert traj.states.shape == (6, K + 1, 1, 8, 8)
    torch.testing.assert_close(traj.states, ref, atol=2e-5, rtol=1e-4)
    assert traj.timesteps == [k * (1000 // K) for k in reversed(range(K))] + [CLEAN]


def test_subset_x0_and_determinism(teacher):
    noise, labels = trajectory_inputs(3, range(4), (1, 8, 8), 10)
    full = ddim_sample(teacher, noise, labels, 12, 1.5)
    sub = ddim_sample(teacher, noise, labels, 12, 1.5, save_indices=[0, 4, 8, 12], return_x0=True)
    assert sub.grid_indices == [0, 4, 8, 12]
    torch.testing.assert_close(sub.states, full.states[:, [0, 4, 8, 12]], atol=0, rtol=0)
    # the x0-prediction of the final state is the sample itself, and x0 at step i leads to state i+1
    torch.testing.assert_close(sub.x0[:, -1], sub.states[:, -1], atol=0, rtol=0)
    again = ddim_sample(teacher, noise, labels, 12, 1.5, save_indices=[0, 4, 8, 12], return_x0=True)
    assert torch.equal(again.states, sub.states) and torch.equal(again.x0, sub.x0)


def test_trajectory_inputs_depend_only_on_seed_and_index():
    n1, y1 = trajectory_inputs(7, [0, 1, 2, 3], (1, 8, 8), 10)
    n2, y2 = trajectory_inputs(7, [2, 3], (1, 8, 8), 10)
    assert torch.equal(n1[2:], n2) and torch.equal(y1[2:], y2)
    n3, _ = trajectory_inputs(8, [2, 3], (1, 8, 8), 10)
    assert not torch.equal(n2, n3)


def test_ddim_jump_matches_scheduler_step():
    scheduler = make_scheduler("leading", clip_sample=True)
    scheduler.set_timesteps(24)
    x, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t, prev = 451, 451 - 41
    ref = scheduler.step(eps, t, x, eta=0.0).prev_sample
    got = ddim_jump(x, eps, alpha_bar(scheduler, torch.full((3,), t)), alpha_bar(scheduler, torch.full((3,), prev)),
                    clip_x0=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_grid_refuses_inconsistent_spacing():
    assert ddim_grid(25, "trailing")[:2] == [999, 959]
    assert len(ddim_grid(24, "leading")) == 25
    with pytest.raises(ValueError, match="trailing"):
        ddim_grid(24, "trailing")


def test_label_out_of_range_is_refused(teacher):
    noise = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="class label 10 out of range"):
        ddim_sample(teacher, noise, torch.tensor([3, 10]), 4, 1.5)


@pytest.mark.parametrize("clip", [False, True])
def test_sampling_at_given_timesteps_on_the_full_grid_is_the_ddim_sampler(teacher, clip):
    x, labels = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    grid = ddim_grid(8)
    at = sample_at(teacher, VPSchedule(), x, labels, grid, 2.0, clip)
    torch.testing.assert_close(at, ddim_sample(teacher, x, labels, 8, 2.0, clip_sample=clip).states[:, -1],
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must decrease and end at -1"):
        sample_at(teacher, VPSchedule(), x, labels, [451, 943, CLEAN])


def test_dit_cfg_guides_only_the_first_three_channels():
    """facebookresearch/DiT forward_with_cfg: eps[:, :3] guided, the rest the conditional output."""
    torch.manual_seed(0)
    model = build_dit("digits", num_layers=1, in_channels=4, out_channels=8).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([900, 500, 100]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        eps_c = model(x, t, y).sample[:, :4]
        eps_u = model(x, t, torch.full_like(y, 10)).sample[:, :4]
        every = guided_prediction(model, x, t, y, 4.0, "all")
        dit = guided_prediction(model, x, t, y, 4.0, "dit")
    guided = eps_u + 4.0 * (eps_c - eps_u)
    torch.testing.assert_close(every, guided, atol=1e-5, rtol=0)
    torch.testing.assert_close(dit[:, :3], guided[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(dit[:, 3], eps_c[:, 3], atol=1e-5, rtol=0)
    assert (dit[:, 3] - every[:, 3]).abs().max() > 1e-3  # the fourth channel differs between the two


def test_solver_identity_and_older_manifests():
    solver = solver_identity(24, "leading", 1.5, False, "dit", "fp16")
    assert solver["cfg_channels"] == "dit" and solver["precision"] == "fp16" and solver["num_steps"] == 24
    older = {k: v for k, v in solver_identity(24, "leading", 1.5, False, "all", "fp16").items() if k != "cfg_channels"}
    assert recorded_solver({**older, "precision": "16-mixed"}, "m.json") == {**older, "cfg_channels": "all",
                                                                          "precision": "fp16"}
    with pytest.raises(ValueError, match="m.json: field 'solver.precision' is 'bf16-true'"):
        recorded_solver({**older, "precision": "bf16-true"}, "m.json")
    with pytest.raises(ValueError, match="trainer.precision is '16-true'"):
        precision_of_trainer("16-true")
