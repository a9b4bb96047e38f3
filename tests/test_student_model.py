"""Invariants of the ARD student on a tiny DiT (CPU, fp32): cache = one pass, no leak from the future,
each mask's visibility, N = 0 = teacher, closed start = baseline, sampling, loss, save/load."""
import json

import pytest
import torch

from ard.schedules import alpha_bar, ddim_jump, make_scheduler
from ard.student import ARDStudent, StepMSELoss, sample
from ard.backbones.dit import DiT, build_dit

B, S = 3, 4
TIMESTEPS = torch.tensor([999, 749, 499, 249, -1])
MASKS = [("block_causal", 1), ("noise_and_current", 1), ("window", 1), ("window", 2), ("block_diagonal", 1)]
VISIBLE = {  # step s -> steps whose inputs its output depends on (S = 4, history in one block)
    ("block_causal", 1): [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}],
    ("noise_and_current", 1): [{0}, {0, 1}, {0, 2}, {0, 3}],
    ("window", 1): [{0}, {0, 1}, {1, 2}, {2, 3}],
    ("window", 2): [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}],
    ("block_diagonal", 1): [{0}, {1}, {2}, {3}],
}
# With history in N blocks a window reaches N * w steps back (block 1 of step s reads block-0 tokens of
# step s-1, which read step s-2): the receptive field of the paper's M2 "current + previous step".
VISIBLE_WINDOW1_N2 = [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}]


def tiny_teacher(out_channels=1):
    torch.manual_seed(0)
    model = build_dit("digits", num_layers=3, out_channels=out_channels)
    for p in model.parameters():  # make the adaLN-zero / output layers non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def inputs(steps=S, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, steps, 1, 8, 8, generator=g)
    timesteps = torch.linspace(999, 0, steps + 1).long()
    timesteps[-1] = -1
    labels = torch.tensor([0, 7, 10])[:B]  # 10 = the null class
    return states, timesteps.expand(B, -1), labels


@pytest.fixture(params=["one_mask", "per_step"])
def layout(request):
    """Run a test with both one-pass layouts (the 16-token tiny DiT would otherwise take one_mask only)."""
    return request.param


def with_layout(student, layout):
    for block in student.transformer.transformer_blocks[:student.history_blocks]:
        block.attn1.processor.one_mask_below_tokens = 10 ** 9 if layout == "one_mask" else 0
    return student


def open_gates(student):
    if student.history_gate is not None:
        with torch.no_grad():
            student.history_gate.uniform_(0.2, 2.0)
    return student


def cached(student, states, timesteps, labels):
    cache = student.new_cache(states.shape[0])
    return torch.stack([student.step(states[:, s], s, timesteps[:, s], timesteps[:, s + 1], labels, cache)
                        for s in range(student.num_steps)], dim=1)


@pytest.mark.parametrize("mask,window", MASKS)
@pytest.mark.parametrize("heads", ["shared", "per_step"])
@pytest.mark.parametrize("start", ["plain", "closed"])
def test_cached_steps_equal_one_pass(teacher, mask, window, heads, start, layout):
    """On the network's own output (output="next_state"): the eps / x0 readings multiply any float error
    by up to sqrt(a_to / a_from) ~ 33 at t = 999 with this untrained teacher's O(1) eps (states ~ 30);
    they are checked relative to the states' scale in test_sampling_matches_teacher_forcing_on_own_history."""
    student = with_layout(open_gates(ARDStudent(teacher, S, history_blocks=2, mask=mask, window=window, heads=heads,
                                                history_start=start, output="next_state")).eval(), layout)
    if heads == "per_step":  # make the heads differ, so a wrong head would show
        with torch.no_grad():
            for head in student.heads:
                head.proj_out_2.bias.add_(0.1 * torch.randn_like(head.proj_out_2.bias))
    states, timesteps, labels = inputs()
    with torch.no_grad():
        one_pass = student(states, timesteps, labels)
        steps = cached(student, states, timesteps, labels)
    assert (one_pass - steps).abs().max() <= 1e-5


@pytest.mark.parametrize("mask,window,blocks", [(m, w, 1) for m, w in MASKS] + [("window", 1, 2)])
@pytest.mark.parametrize("start", ["plain", "closed"])
def test_each_step_sees_exactly_its_visible_steps(teacher, mask, window, blocks, start, layout):
    student = with_layout(open_gates(ARDStudent(teacher, S, history_blocks=blocks, mask=mask, window=window,
                                                history_start=start)), layout)
    visible = VISIBLE[(mask, window)] if blocks == 1 else VISIBLE_WINDOW1_N2
    states, timesteps, labels = inputs()
    states.requires_grad_(True)
    out = student(states, timesteps, labels)
    for s in range(S):
        (grad,) = torch.autograd.grad(out[:, s].sum(), states, retain_graph=True)
        seen = {j for j in range(S) if grad[:, j].abs().sum() > 0}
        assert seen == visible[s], f"step {s}"
        assert all(torch.count_nonzero(grad[:, j]) == 0 for j in range(s + 1, S))  # nothing from the future


@pytest.mark.parametrize("out_channels", [1, 2])  # 2: learned sigma, eps is the first channel
def test_baseline_one_step_is_teacher_ddim_jump_exactly(out_channels):
    teacher = tiny_teacher(out_channels)
    states, timesteps, labels = inputs(steps=1)
    x, t = states[:, 0], timesteps[:, 0]
    with torch.no_grad():
        eps = DiT().prediction(teacher, teacher(x, t, labels).sample)
        sched = make_scheduler()
        expected = ddim_jump(x, eps, alpha_bar(sched, t), alpha_bar(sched, timesteps[:, 1]))
        student = ARDStudent(teacher, 1, history_blocks=0).eval()
        assert torch.equal(student(states, timesteps, labels)[:, 0], expected)
        assert torch.equal(cached(student, states, timesteps, labels)[:, 0], expected)


def test_baseline_multi_step_is_teacher_on_folded_batch(teacher):
    states, timesteps, labels = inputs()
    x = states.flatten(0, 1)
    t_from, t_to = timesteps[:, :-1].flatten(), timesteps[:, 1:].flatten()
    sched = make_scheduler()
    with torch.no_grad():
        eps = teacher(x, t_from, labels.repeat_interleave(S)).sample
        expected = ddim_jump(x, eps, alpha_bar(sched, t_from), alpha_bar(sched, t_to)).view_as(states)
        for student in (ARDStudent(teacher, S, history_blocks=0),
                        ARDStudent(teacher, S, history_blocks=3, mask="block_diagonal", history_start="plain")):
            assert (student(states, timesteps, labels) - expected).abs().max() <= 1e-5
        assert torch.equal(ARDStudent(teacher, S, history_blocks=0)(states, timesteps, labels), expected)


@pytest.mark.parametrize("mask,window", MASKS[:3])
@pytest.mark.parametrize("heads", ["shared", "per_step"])
def test_closed_start_equals_baseline(teacher, mask, window, heads, layout):
    baseline = ARDStudent(teacher, S, history_blocks=0, heads=heads).eval()
    ard = with_layout(ARDStudent(teacher, S, history_blocks=3, mask=mask, window=window, heads=heads,
                                 history_start="closed").eval(), layout)
    states, timesteps, labels = inputs()
    noise = states[:, 0]
    with torch.no_grad():
        assert torch.equal(ard(states, timesteps, labels), baseline(states, timesteps, labels))
        assert (sample(ard, noise, labels, TIMESTEPS) - sample(baseline, noise, labels, TIMESTEPS)).abs().max() <= 1e-5
    plain = ARDStudent(teacher, S, history_blocks=3, mask=mask, window=window, history_start="plain").eval()
    with torch.no_grad():  # the plain start does change the function (else the test above proves nothing)
        assert (plain(states, timesteps, labels) - baseline(states, timesteps, labels)).abs().max() > 1e-3


@pytest.mark.parametrize("output", ["eps", "x0", "next_state"])
def test_sampling_matches_teacher_forcing_on_own_history(teacher, output):
    student = open_gates(ARDStudent(teacher, S, history_blocks=2, output=output, heads="per_step",
                                    clip_x0=output == "x0")).eval()
    noise, _, labels = inputs()
    with torch.no_grad():
        states = sample(student, noise[:, 0], labels, TIMESTEPS)
        assert states.shape == (B, S + 1, 1, 8, 8) and torch.equal(states[:, 0], noise[:, 0])
        again = student(states[:, :-1], TIMESTEPS.expand(B, -1), labels)
        assert (again - states[:, 1:]).abs().max() <= 1e-5 * states.abs().max().clamp_min(1)
        per_sample = sample(student, noise[:, 0], labels, TIMESTEPS.expand(B, -1).clone())
        assert torch.equal(per_sample, states)


def test_caches_are_independent_and_checked(teacher):
    student = open_gates(ARDStudent(teacher, S, history_blocks=2)).eval()
    states, timesteps, labels = inputs()
    other = torch.randn_like(states)
    with torch.no_grad():
        c1, c2 = student.new_cache(B), student.new_cache(B)
        outs = []
        for s in range(S):  # interleave two trajectories: no state may leak between them
            student.step(other[:, s], s, timesteps[:, s], timesteps[:, s + 1], labels, c2)
            outs.append(student.step(states[:, s], s, timesteps[:, s], timesteps[:, s + 1], labels, c1))
        assert torch.equal(torch.stack(outs, 1), cached(student, states, timesteps, labels))
        with pytest.raises(ValueError, match="cache holds 0 steps"):
            student.step(states[:, 1], 1, timesteps[:, 1], timesteps[:, 2], labels, student.new_cache(B))


def test_any_number_of_steps(teacher, layout):
    for steps in (1, 2, 3, 6):
        student = with_layout(open_gates(ARDStudent(teacher, steps, history_blocks=3, heads="per_step",
                                                    output="next_state")).eval(), layout)
        states, timesteps, labels = inputs(steps)
        with torch.no_grad():
            assert (student(states, timesteps, labels) - cached(student, states, timesteps, labels)).abs().max() <= 1e-5


def test_loss_and_gradient_checkpointing(teacher):
    student = open_gates(ARDStudent(teacher, S, history_blocks=2, heads="per_step", history_start="closed"))
    states, timesteps, labels = inputs()
    trajectory = torch.cat([states, torch.randn(B, 1, 1, 8, 8)], dim=1)  # (B, S+1, C, H, W)
    loss = StepMSELoss()(student, trajectory, timesteps, labels)
    assert loss.shape == (B, S)
    expected = (student(states, timesteps, labels) - trajectory[:, 1:]).square().mean(dim=(2, 3, 4))
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert student.history_gate.grad.abs().sum() > 0 and "transformer.proj_out_1.weight" not in grads
    student.zero_grad()
    student.transformer.enable_gradient_checkpointing()
    StepMSELoss()(student, trajectory, timesteps, labels).sum().backward()
    for n, p in student.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_save_load_round_trip(teacher, tmp_path):
    student = open_gates(ARDStudent(teacher, S, history_blocks=2, mask="window", window=2, heads="per_step",
                                    output="x0", clip_x0=True)).eval()
    with torch.no_grad():
        for head in student.heads:
            head.proj_out_2.bias.add_(0.1)
    path = tmp_path / "student"
    ARDStudent(teacher, 2, history_blocks=0).save_pretrained(path)  # replaced atomically below
    student.save_pretrained(path)
    loaded = ARDStudent.from_pretrained(path)
    assert loaded.settings() == student.settings()
    sd, ld = student.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    states, timesteps, labels = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(states, timesteps, labels), student(states, timesteps, labels))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_bad_settings_and_files_give_one_line_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="mask='causal'"):
        ARDStudent(teacher, S, history_blocks=1, mask="causal")
    with pytest.raises(ValueError, match=r"history_blocks=4 must lie in \[0, 3\]"):
        ARDStudent(teacher, S, history_blocks=4)
    path = tmp_path / "student"
    ARDStudent(teacher, S, history_blocks=1, history_start="closed").save_pretrained(path)
    config = json.loads((path / "ard_student.json").read_text())
    (path / "ard_student.json").write_text(json.dumps({**config, "heads": "many"}))
    with pytest.raises(ValueError, match=r"ard_student.json: heads='many'"):
        ARDStudent.from_pretrained(path)
    (path / "ard_student.json").write_text(json.dumps({**config, "num_steps": "4"}))
    with pytest.raises(ValueError, match=r"ard_student.json: field 'num_steps' must be int"):
        ARDStudent.from_pretrained(path)
    (path / "ard_student.json").write_text(json.dumps({**config, "history_start": "plain"}))
    with pytest.raises(ValueError, match=r"ard_student.safetensors: unexpected tensor 'history_gate'"):
        ARDStudent.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="not an ARD student directory"):
        ARDStudent.from_pretrained(tmp_path)
