"""The backbone layer (ard/backbones/): every family's adapter pieces compose to the model's own forward, the
registry finds a model's adapter, and nothing outside the layer names a diffusers model class."""
import ast
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ard.backbones import BACKBONES, backbone, backbone_of
from ard.backbones.dit import build_dit
from ard.backbones.pixart import PixArt
from ard.backbones.sd3 import SD3
from ard.backbones.text import TextCondition

ROOT = Path(__file__).resolve().parents[1]
MODEL_CLASSES = {"DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "Transformer2DModel"}


def text_condition(rows: int, tokens: int = 5, width: int = 32, seed: int = 0) -> TextCondition:
    """Random encoded prompts of 2..tokens valid tokens (the rest padding), with a 2-token null prompt."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(rows) % (tokens - 1) + 2  # (R,)
    mask = torch.arange(tokens)[None] < valid[:, None]  # (R, T)
    null = TextCondition(torch.randn(1, tokens, width, generator=g), torch.arange(tokens)[None] < 2)
    return TextCondition(torch.randn(rows, tokens, width, generator=g), mask, null=null)


@contextmanager
def diffusers_log():
    """The records diffusers logs inside the block (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def open_gates_and_vary_heads(student) -> None:
    """Open a closed-start student's history gates to random widths and make its per-step heads differ, so that a
    wrong gate or head would show (in place, under no_grad)."""
    if student.history_gate is not None:
        student.history_gate.uniform_(0.2, 2.0)
    for head in student.heads or []:
        head.proj_out.bias.add_(0.1 * torch.randn_like(head.proj_out.bias))


def sd3_condition(rows: int, tokens: int = 5, seed: int = 0) -> TextCondition:
    """Random encoded prompts for a tiny SD3: every token valid (SD3 reads no mask), 32 wide, with 24-wide pooled
    embeddings, and a null prompt of the same length."""
    g = torch.Generator().manual_seed(seed)
    null = TextCondition(torch.randn(1, tokens, 32, generator=g), torch.ones(1, tokens, dtype=torch.bool),
                         pooled=torch.randn(1, 24, generator=g))
    return TextCondition(torch.randn(rows, tokens, 32, generator=g), torch.ones(rows, tokens, dtype=torch.bool),
                         pooled=torch.randn(rows, 24, generator=g), null=null)


def tiny(family: str, size: str = "tiny"):
    """A tiny model of the family (1 x 8 x 8 states; learned sigma, 2C output channels, where the family has it)
    and 3 rows' conditions; `size`: a text family's tiny size ("sd35-tiny": SD3.5's dual attention and qk-norm)."""
    torch.manual_seed(0)
    if family == "dit":
        return build_dit("digits", num_layers=2, out_channels=2).eval(), torch.tensor([0, 3, 10])  # 10: null class
    adapter, condition = (SD3(), sd3_condition(3)) if family == "sd3" else (PixArt(), text_condition(3))
    model = adapter.build(size)
    for p in model.parameters():  # adaLN / output layers start at zero: make every path non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval(), condition


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_the_adapters_pieces_are_the_models_own_forward(family):
    """prepare -> embed -> run_block (each block) -> head -> unpatchify, with the model's own head layers,
    is the diffusers forward bit for bit; `prediction` keeps the first C channels."""
    model, y = tiny(family)
    adapter = backbone_of(model)
    assert adapter is backbone(family)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 0])
    with torch.no_grad():
        hidden = adapter.embed(model, x)  # (3, L, D)
        prepared = adapter.prepare(model, t, y, hidden.dtype)
        for block in adapter.blocks(model):
            hidden = adapter.run_block(model, block, hidden, prepared, None)
        raw = adapter.unpatchify(model, adapter.head(model, model, hidden, prepared.conditioning))
        own = adapter.forward(model, x, t, y)
    assert torch.equal(raw, own) and raw.shape == (3, model.config.out_channels, 8, 8)
    assert torch.equal(adapter.prediction(model, raw), raw[:, :1])
    assert set(adapter.head_layers(model)) and adapter.output_weight(model) is not None
    null = adapter.null_condition(model, y)
    with torch.no_grad():  # the null condition is the unconditional forward of every row
        unconditional = adapter.forward(model, x, t, adapter.cat([null]))
        both = adapter.forward(model, torch.cat([x, x]), torch.cat([t, t]), adapter.cat([y, null]))
    torch.testing.assert_close(both, torch.cat([own, unconditional]))
    assert not torch.allclose(own, unconditional)


def test_a_model_of_no_served_family_is_named():
    with pytest.raises(TypeError, match="^Linear is not of a known teacher family"):
        backbone_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^teacher family 'flux' has no adapter; known: 'dit', 'pixart', 'sd3'"):
        backbone("flux")


def test_nothing_outside_the_backbone_layer_names_a_diffusers_model_class():
    """The student, precompute, distillation, the GAN stage and evaluation go through the adapters: outside
    ard/backbones/ no code (imports, names, attributes; comments and strings aside) names a model class."""
    offenders = []
    for path in sorted((ROOT / "ard").rglob("*.py")):
        if "backbones" in path.relative_to(ROOT / "ard").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else
                     [node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in MODEL_CLASSES]
    assert not offenders, offenders
