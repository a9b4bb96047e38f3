"""One timestep + label embedder shared by every block, as in the official DiT (ard.backbones.dit_embedders).

diffusers' DiT gives every block its own copy (`transformer_blocks[i].norm1.emb`); the official DiT has one
`t_embedder` and one `y_embedder`. Tied, a DiT computes bit for bit what it computed untied (the copies were
equal), holds and trains the embedder once, and still lists every block's keys in its state dict (the diffusers
layout, the same `teacher_identity`). Weights whose copies differ are never silently tied.
"""
import re
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ard.backbones.dit import DIT_SIZES, build_dit
from ard.backbones.dit_embedders import embedders_tied, first_differing_embedder
from ard.backbones.dit_official import official_keys, to_official_state_dict
from ard.backbones.files import WEIGHTS_NAME
from ard.student.export import load_checkpoint_student
from ard.student.model import ARDStudent
from ard.teacher import DIGITS_TEACHER, load_teacher, teacher_identity
from test_convert import TINY, official_state_dict

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 3
DRIFTED = "transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"  # the copy test_drifted_* moves


def unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared parameter once


def embedder_size(model) -> int:
    return sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(DIT_SIZES, "tiny", {**TINY, "num_layers": LAYERS})
    return "tiny"


@pytest.fixture
def official(tmp_path, tiny) -> Path:
    """A converted-on-load official checkpoint: 3 blocks, width 64, learned sigma, 10 classes, random weights."""
    path = tmp_path / "dit.pt"
    torch.save(official_state_dict(num_layers=LAYERS), path)
    return path


def inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([0, 1, 250, 999, 500, 37])[:batch],
            torch.tensor([0, 3, 9, 10, 10, 5])[:batch])  # 10: the null class


def test_tied_dit_xl2_counts_the_official_parameters():
    """DiT-XL/2 built on the meta device (no memory). The official model (facebookresearch/DiT) counts 675,129,632
    parameters: 674,834,720 trained plus its fixed pos_embed (a frozen nn.Parameter of 256 x 1152 = 294,912).
    diffusers keeps pos_embed as a buffer, so the tied model's parameters are exactly the official trained ones and
    parameters + pos_embed buffer the official total; untied, 27 more embedders of 1,624,320 (t) + 1,153,152 (y)."""
    with torch.device("meta"):
        tied, untied = build_dit("DiT-XL/2"), build_dit("DiT-XL/2", tie_embedders=False)
    assert embedders_tied(tied) and not embedders_tied(untied)
    emb = tied.transformer_blocks[0].norm1.emb
    assert sum(p.numel() for p in emb.timestep_embedder.parameters()) == 1_624_320
    assert sum(p.numel() for p in emb.class_embedder.parameters()) == 1_153_152
    assert unique_parameters(tied) == 674_834_720
    assert unique_parameters(tied) + tied.pos_embed.pos_embed.numel() == 675_129_632
    assert unique_parameters(untied) == 674_834_720 + 27 * 2_777_472 == 749_826_464
    assert set(tied.state_dict()) == set(untied.state_dict())  # every block's keys still listed


@torch.no_grad()
def test_tied_teacher_computes_and_hashes_as_the_untied_one(official, tiny):
    tied, untied = load_teacher(official, tiny), load_teacher(official, tiny, tie_embedders=False)
    assert embedders_tied(tied) and not embedders_tied(untied)
    assert unique_parameters(untied) - unique_parameters(tied) == (LAYERS - 1) * embedder_size(tied)
    x, t, y = inputs()
    assert torch.equal(tied(x, t, y).sample, untied(x, t, y).sample)
    assert teacher_identity(tied) == teacher_identity(untied)  # what the store's manifest records
    state = tied.state_dict()
    assert list(state) == list(untied.state_dict()) and first_differing_embedder(state) is None
    assert state[DRIFTED].data_ptr() != state[DRIFTED.replace(".2.", ".0.")].data_ptr()  # copies: safetensors saves


def test_training_keeps_one_embedder_whose_gradient_sums_the_blocks(official, tiny):
    """A few AdamW steps on a tiny student: the tied one keeps one embedder (the untied one's copies drift apart);
    the first loss is the same bits, and the shared embedder's gradient is the sum of the copies' gradients."""
    torch.manual_seed(0)
    students = {tie: ARDStudent(load_teacher(official, tiny, tie_embedders=tie), num_steps=2, history_blocks=1)
                for tie in (True, False)}
    g = torch.Generator().manual_seed(2)
    states, target = torch.randn(4, 2, 4, 8, 8, generator=g), torch.randn(4, 2, 4, 8, 8, generator=g)
    timesteps, labels = torch.tensor([[999, 500, -1]] * 4), torch.tensor([1, 2, 3, 10])
    optimisers = {tie: torch.optim.AdamW(s.parameters(), lr=1e-3) for tie, s in students.items()}
    losses = {True: [], False: []}
    for step in range(3):
        for tie, student in students.items():
            loss = (student(states, timesteps, labels) - target).square().mean()
            optimisers[tie].zero_grad()
            loss.backward()
            losses[tie].append(loss.detach())
            if step == 0:
                blocks = student.transformer.transformer_blocks
                grads = [b.norm1.emb.class_embedder.embedding_table.weight.grad for b in blocks]
                if tie:
                    shared = grads[0].clone()
                else:
                    torch.testing.assert_close(shared, sum(grads), rtol=1e-4, atol=1e-5)  # summation order
            optimisers[tie].step()
    assert torch.equal(losses[True][0], losses[False][0])
    tied, untied = students[True].transformer, students[False].transformer
    assert embedders_tied(tied) and first_differing_embedder(tied.state_dict()) is None
    assert first_differing_embedder(untied.state_dict()) is not None  # what tying prevents
    assert not torch.equal(tied.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight,
                           load_teacher(official, tiny).transformer_blocks[0].norm1.emb.class_embedder
                           .embedding_table.weight)  # the shared embedder was trained


@torch.no_grad()
def test_saved_students_and_teachers_load_back_tied(tmp_path, official, tiny):
    teacher = load_teacher(official, tiny)
    teacher.save_pretrained(tmp_path / "teacher")  # safetensors: the copies do not share memory
    again = load_teacher(tmp_path / "teacher")
    assert embedders_tied(again) and teacher_identity(again) == teacher_identity(teacher)
    student = ARDStudent(teacher, num_steps=2, history_blocks=1, heads="per_step")
    assert embedders_tied(student.transformer)  # the student is a deep copy: still one module
    for p in student.transformer.transformer_blocks[0].norm1.emb.parameters():
        p.add_(0.01)  # a trained embedder
    student.save_pretrained(tmp_path / "student")
    saved = load_file(str(tmp_path / "student" / WEIGHTS_NAME))
    assert set(saved) == set(teacher.state_dict()) and first_differing_embedder(saved) is None  # diffusers layout
    loaded = ARDStudent.from_pretrained(tmp_path / "student")
    assert embedders_tied(loaded.transformer)
    states, timesteps, labels = torch.randn(3, 2, 4, 8, 8), torch.tensor([[999, 500, -1]] * 3), torch.tensor([0, 4, 10])
    assert torch.equal(loaded(states, timesteps, labels), student.eval()(states, timesteps, labels))


def test_official_to_tied_diffusers_to_official_is_the_identity(tmp_path, official, tiny):
    state = torch.load(official, weights_only=True)
    model = load_teacher(official, tiny)
    back = to_official_state_dict(model.state_dict(), LAYERS, model.config.sample_size)
    assert set(back) == set(state) == official_keys(LAYERS)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key  # pos_embed too
    # The script: diffusers directory -> .pt, the same tensors.
    main = runpy.run_path(str(ROOT / "scripts" / "convert_dit_checkpoint.py"))["main"]
    model.save_pretrained(tmp_path / "dir")
    main([str(tmp_path / "dir"), "--to-official", "--out", str(tmp_path / "back.pt")])
    written = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(written) == set(state) and all(torch.equal(written[k], v) for k, v in state.items())


def test_drifted_copies_load_untied_by_default_and_are_refused_when_tying_is_asked(tmp_path, official, tiny):
    """A student distilled with one embedder per block (an earlier version): by default it loads untied and computes
    what it was trained to; tie_embedders=True, a tied module's load_state_dict (a resume), a checkpoint recording
    tie_embedders=True and the official layout refuse it in one line naming the file and the block."""
    drifted = ARDStudent(load_teacher(official, tiny, tie_embedders=False), num_steps=2, history_blocks=1)
    with torch.no_grad():
        drifted.transformer.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight.add_(1e-3)
    drifted.save_pretrained(tmp_path / "student")
    loaded = ARDStudent.from_pretrained(tmp_path / "student")
    assert not embedders_tied(loaded.transformer)
    states, timesteps, labels = torch.randn(2, 2, 4, 8, 8), torch.tensor([[999, 500, -1]] * 2), torch.tensor([0, 10])
    with torch.no_grad():
        assert torch.equal(loaded(states, timesteps, labels), drifted.eval()(states, timesteps, labels))
    refusals = [lambda: ARDStudent.from_pretrained(tmp_path / "student", tie_embedders=True),
                lambda: load_teacher(tmp_path / "student", tie_embedders=True),
                lambda: ARDStudent(load_teacher(official, tiny), num_steps=2, history_blocks=1).load_state_dict(
                    drifted.state_dict()),
                lambda: to_official_state_dict(drifted.transformer.state_dict(), LAYERS, 8)]
    for i, refuse in enumerate(refusals):
        with pytest.raises(ValueError, match=re.escape(DRIFTED)) as e:
            refuse()
        assert "\n" not in str(e.value) and (i > 1 or str(tmp_path / "student") in str(e.value)), str(e.value)
    # An `ard fit` checkpoint of it: loaded untied unless the run recorded tie_embedders=True.
    checkpoint = {"boundary_timesteps": [999, 500, -1],
                  "state_dict": {f"student.{k}": v for k, v in drifted.state_dict().items()},
                  "hyper_parameters": {"teacher": str(official), "teacher_size": tiny, "numerics": None,
                                       "num_steps": 2, "history_blocks": 1, "recipe": {}}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    student = load_checkpoint_student(tmp_path / "old.ckpt").student
    assert not embedders_tied(student.transformer)
    checkpoint["hyper_parameters"]["tie_embedders"] = True
    torch.save(checkpoint, tmp_path / "tied.ckpt")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'tied.ckpt'))}: transformer\\.{DRIFTED}"):
        load_checkpoint_student(tmp_path / "tied.ckpt")


def test_the_shipped_digits_teacher_keeps_one_embedder_per_block():
    """It was trained untied (each block's embedder initialised and trained on its own): tying would change it, so
    the default loads it untied, and asking for tying is refused naming the file."""
    assert not embedders_tied(load_teacher())
    with pytest.raises(ValueError, match=f"^{re.escape(str(DIGITS_TEACHER))}: transformer_blocks\\.1\\.norm1\\.emb\\."):
        load_teacher(tie_embedders=True)
