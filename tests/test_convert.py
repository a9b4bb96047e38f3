"""Official DiT checkpoint -> diffusers: the converted model computes exactly what the official DiT does.

The reference below re-implements facebookresearch/DiT models.py (DiT.forward, DiTBlock, FinalLayer,
TimestepEmbedder.timestep_embedding, get_2d_sincos_pos_embed) directly on the official state dict.
"""
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ard.atomic import atomic_directory
from ard.backbones.dit import DIT_SIZES, NUMERICS_KEY, set_numerics
from ard.backbones.dit_official import convert_official_state_dict, is_official_state_dict, official_keys
from ard.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_dit_checkpoint.py"
# A learned-sigma DiT small enough for a test: 2 blocks, width 64, 2 heads, 8x8x4 input, patch 2, 10 classes.
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, patch_size=2, in_channels=4,
            out_channels=8, sample_size=8, num_embeds_ada_norm=10)


# ---------------------------------------------------------------- the official DiT, written out
def sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed: (grid^2, dim), first half from grid[0] (the w coordinate)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))  # (d/2,)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, d)

    axis = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis), axis=0).reshape(2, 1, grid_size, grid_size)  # w goes first
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def official_state_dict(num_layers=2, width=64, patch=2, in_channels=4, out_channels=8, input_size=8,
                        num_classes=10, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in facebookresearch/DiT's layout (every modulation and the final layer non-zero)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, fan_in=None):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in or shape[-1])

    def linear(name, n_in, n_out):
        return {f"{name}.weight": rand(n_out, n_in), f"{name}.bias": rand(n_out, fan_in=10)}

    grid = input_size // patch
    state = {"x_embedder.proj.weight": rand(width, in_channels, patch, patch, fan_in=in_channels * patch * patch),
             "x_embedder.proj.bias": rand(width, fan_in=10),
             "pos_embed": torch.from_numpy(sincos_pos_embed(width, grid)).float()[None],  # (1, L, D)
             "y_embedder.embedding_table.weight": rand(num_classes + 1, width, fan_in=1),  # + the null row
             **linear("t_embedder.mlp.0", 256, width), **linear("t_embedder.mlp.2", width, width),
             **linear("final_layer.adaLN_modulation.1", width, 2 * width),
             **linear("final_layer.linear", width, patch * patch * out_channels)}
    for i in range(num_layers):
        for name, n_in, n_out in [("attn.qkv", width, 3 * width), ("attn.proj", width, width),
                                  ("mlp.fc1", width, 4 * width), ("mlp.fc2", 4 * width, width),
                                  ("adaLN_modulation.1", width, 6 * width)]:
            state.update(linear(f"blocks.{i}.{name}", n_in, n_out))
    return state


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """DiT's TimestepEmbedder.timestep_embedding: [cos, sin] of t * exp(-ln(max_period) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)  # (half,)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def official_forward(sd, x, t, y, num_heads, patch, out_channels):
    """DiT.forward (eval: no label dropout) on an official state dict; x (B, C, H, W) -> (B, out, H, W)."""
    def lin(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)  # (B, D, g, g)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, L, D)
    B, L, D = h.shape
    c = lin(F.silu(lin(timestep_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")  # (B, D)
    c = c + sd["y_embedder.embedding_table.weight"][y]  # (B, D)
    norm = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731 - elementwise_affine=False
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(
            F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)  # 6 x (B, D)
        qkv = lin(modulate(norm(h), shift_msa, scale_msa), f"{b}.attn.qkv")  # (B, L, 3D)
        q, k, v = qkv.reshape(B, L, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        attn = (q @ k.transpose(-2, -1) * (D // num_heads) ** -0.5).softmax(dim=-1)  # (B, H, L, L)
        a = (attn @ v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        h = h + gate_msa[:, None] * lin(a, f"{b}.attn.proj")
        m = F.gelu(lin(modulate(norm(h), shift_mlp, scale_mlp), f"{b}.mlp.fc1"), approximate="tanh")  # (B, L, 4D)
        h = h + gate_mlp[:, None] * lin(m, f"{b}.mlp.fc2")
        i += 1
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)  # 2 x (B, D)
    h = lin(modulate(norm(h), shift, scale), "final_layer.linear")  # (B, L, p*p*out)
    g = int(L ** 0.5)
    h = h.reshape(B, g, g, patch, patch, out_channels)  # (B, g, g, p, p, out)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, out_channels, g * patch, g * patch)  # (B, out, H, W)


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(DIT_SIZES, "tiny", TINY)
    return "tiny"


# ---------------------------------------------------------------- conversion
@torch.no_grad()
def test_converted_model_equals_official_dit_forward(tmp_path, tiny_size):
    sd = official_state_dict()
    torch.save(sd, tmp_path / "dit.pt")
    model = load_teacher(tmp_path / "dit.pt", tiny_size)
    assert model.config[NUMERICS_KEY] == "dit" and model.config.norm_eps == 1e-6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 999, 999, 500, 37, 999])
    y = torch.tensor([0, 3, 9, 10, 0, 10, 5, 7])  # 10 = the null (CFG) class
    ref = official_forward(sd, x, t, y, num_heads=2, patch=2, out_channels=8)  # (8, 8, 8, 8)
    out = model(x, t, y).sample
    assert out.shape == ref.shape == (8, 8, 8, 8)
    assert ref.std() > 0.1 and (ref[3] - ref[4]).abs().max() > 0.1  # not trivially zero; labels matter
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Diffusers' own numerics (its DiT port as shipped) do not reproduce DiT except at t = 0.
    diff = (set_numerics(model, "diffusers")(x, t, y).sample - ref).abs().amax(dim=(1, 2, 3))
    assert diff[0] < 1e-4 and diff[1:].min() > 1e-4


def test_conversion_maps_every_tensor_and_copies_the_shared_embedders():
    sd = official_state_dict(num_layers=3)
    out = convert_official_state_dict(sd, num_layers=3, sample_size=8)
    assert set(official_keys(3)) == set(sd)
    assert len(out) == len(sd) - 1 - 3 * 2 + 3 * 6 + 2 * 5  # - pos_embed, qkv -> q/k/v, 5 shared per extra block
    for i in range(3):
        emb = f"transformer_blocks.{i}.norm1.emb."
        assert torch.equal(out[emb + "timestep_embedder.linear_2.weight"], sd["t_embedder.mlp.2.weight"])
        assert torch.equal(out[emb + "class_embedder.embedding_table.weight"],
                           sd["y_embedder.embedding_table.weight"])
        qkv = torch.cat([out[f"transformer_blocks.{i}.attn1.to_{n}.weight"] for n in "qkv"])
        assert torch.equal(qkv, sd[f"blocks.{i}.attn.qkv.weight"])


@pytest.mark.parametrize("edit, num_layers, sample_size, match", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), 2, 8, "missing key 'blocks.1.mlp.fc2.bias'"),
    (lambda sd: None, 1, 8, "unexpected key 'blocks.1.adaLN_modulation.1.bias'"),
    (lambda sd: sd.pop("pos_embed"), 2, 8, "missing key 'pos_embed'"),
    (lambda sd: sd["pos_embed"].add_(0.01), 2, 8, "key 'pos_embed' is not the fixed 2D sin-cos table"),
    (lambda sd: None, 2, 16, "key 'pos_embed' has 16 tokens.*sample_size 16"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.bias": torch.zeros(64)}), 2, 8, "key 'blocks.0.attn.qkv.bias'"),
])
def test_conversion_errors_name_the_key(edit, num_layers, sample_size, match):
    sd = official_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match) as e:
        convert_official_state_dict(sd, num_layers, sample_size)
    assert "\n" not in str(e.value)


def test_layout_detection():
    assert is_official_state_dict(official_state_dict(num_layers=1))
    # partial: conversion names what is missing
    assert is_official_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    assert not is_official_state_dict({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not an official"):
        convert_official_state_dict({"proj_out_2.weight": torch.zeros(1)}, num_layers=1)


# ---------------------------------------------------------------- scripts/convert_dit_checkpoint.py
def digits_official(tmp_path, width=128, name="dit_digits.pt") -> Path:
    """An official-layout checkpoint of the "digits" size (6 blocks, 1 channel, no learned sigma)."""
    path = tmp_path / name
    torch.save(official_state_dict(num_layers=6, width=width, in_channels=1, out_channels=1), path)
    return path


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


@torch.no_grad()
def test_script_writes_a_diffusers_directory(tmp_path):
    ckpt, out = digits_official(tmp_path), tmp_path / "teachers" / "dit"
    proc = run_script(ckpt, "--size", "digits", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dit numerics" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    converted, direct = load_teacher(out, "digits"), load_teacher(ckpt, "digits")
    assert converted.config[NUMERICS_KEY] == "dit" and converted.config.norm_eps == 1e-6
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 4, 9, 10])
    torch.testing.assert_close(converted(x, t, y).sample, direct(x, t, y).sample, atol=0, rtol=0)
    ref = official_forward(torch.load(ckpt, weights_only=True), x, t, y, num_heads=4, patch=2, out_channels=1)
    torch.testing.assert_close(converted(x, t, y).sample, ref, atol=1e-5, rtol=0)


def test_script_refuses_to_overwrite_and_errors_name_the_problem(tmp_path):
    main = runpy.run_path(str(SCRIPT))["main"]
    ckpt, out = digits_official(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=f"{out}: exists and is not empty"):
        main([str(ckpt), "--size", "digits", "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    main([str(ckpt), "--size", "digits", "--out", str(out), "--force"])
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()

    narrow = digits_official(tmp_path, width=64, name="dit_narrow.pt")  # 6 blocks but width 64, not 128
    for ckpt_, size, expected in [(narrow, "digits", "key 'pos_embed.proj.weight' has shape (64, 1, 2, 2)"),
                                  (ckpt, "DiT-S/2", "missing key 'blocks.")]:  # 6 blocks given, 12 expected
        with pytest.raises(SystemExit) as e:
            main([str(ckpt_), "--size", size, "--out", str(tmp_path / "never")])
        assert e.value.code.startswith(f"error: {ckpt_}: ") and expected in e.value.code
        assert "\n" not in e.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit_digits.pt", "dit_narrow.pt", "out"]  # no new dir


def test_script_missing_checkpoint_is_a_one_line_error(tmp_path):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "absent.pt"), "--size", "DiT-XL/2", "--out", str(tmp_path / "out")])
    assert e.value.code == f"error: teacher checkpoint not found: {tmp_path / 'absent.pt'}"  # exit status 1
    assert not (tmp_path / "out").exists()


def test_atomic_directory_leaves_the_old_directory_on_error(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]
