"""load_teacher and the teacher quirks: round trips, layouts, one-line errors, label dropout, eps, labels."""
import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

from ard.backbones.dit import DIT_SIZES, NUMERICS_KEY, DiT, build_dit, null_class, set_numerics
from ard.teacher import check_teacher, load_teacher, teacher_identity
from test_convert import official_state_dict


def inputs(model, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(batch, c, s, s, generator=g)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, null_class(model) + 1, (batch,), generator=g)  # null class included
    return x, t, y


def perturbed(model):
    """Move every weight off its initial value: a "round trip" that re-initialised would not match."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_diffusers_directory_round_trips_exactly(tmp_path):
    model = perturbed(build_dit("digits"))
    model.save_pretrained(tmp_path / "teacher")
    loaded = load_teacher(tmp_path / "teacher", "digits")
    assert not loaded.training and NUMERICS_KEY not in loaded.config  # a diffusers-trained teacher: untouched
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    x, t, y = inputs(model)
    assert torch.equal(model.eval()(x, t, y).sample, loaded(x, t, y).sample)


@torch.no_grad()
def test_pipeline_snapshot_uses_its_transformer_subfolder(tmp_path):
    model = perturbed(build_dit("digits", num_layers=2))
    model.save_pretrained(tmp_path / "snapshot" / "transformer")
    (tmp_path / "snapshot" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    loaded = load_teacher(tmp_path / "snapshot")
    x, t, y = inputs(model)
    assert torch.equal(model.eval()(x, t, y).sample, loaded(x, t, y).sample)
    with pytest.raises(ValueError, match="config.json: num_layers=2 does not match size 'digits'"):
        load_teacher(tmp_path / "snapshot", "digits")


def test_missing_path_and_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"not found: {tmp_path / 'nope'}$"):
        load_teacher(tmp_path / "nope", "digits")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json"):
        load_teacher(tmp_path / "empty")


def test_checkpoint_with_the_wrong_shapes_names_the_key(tmp_path):
    narrow = build_dit("digits", attention_head_dim=16)  # width 64, the digits size has 128
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match=r"narrow.safetensors: key '.*' has shape \(.*64.*\), the chosen"):
        load_teacher(tmp_path / "narrow.safetensors", "digits")
    torch.save(official_state_dict(num_layers=6, width=64, in_channels=1, out_channels=1), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match=r"dit.pt: key 'pos_embed.proj.weight' has shape \(64, 1, 2, 2\)"):
        load_teacher(tmp_path / "dit.pt", "digits")
    with pytest.raises(ValueError, match=r"dit.pt: missing key 'blocks\.\d+\..*' .* with 12 blocks"):
        load_teacher(tmp_path / "dit.pt", "DiT-S/2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable weights-only torch checkpoint"):
        load_teacher(tmp_path / "junk.pt", "digits")


@torch.no_grad()
def test_label_dropout_is_disabled_after_loading(tmp_path):
    model = perturbed(DiTTransformer2DModel(**{**DIT_SIZES["digits"], "num_layers": 2}))  # dropout as shipped
    x, t, y = inputs(model, batch=64)
    y = y.clamp(max=null_class(model) - 1)  # real labels only: dropping one changes the output
    model.train()
    assert not torch.equal(model(x, t, y).sample, model(x, t, y).sample)  # diffusers' default: p = 0.1 per block
    model.save_pretrained(tmp_path / "teacher")
    loaded = load_teacher(tmp_path / "teacher").train()
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in loaded.transformer_blocks)
    assert torch.equal(loaded(x, t, y).sample, loaded(x, t, y).sample)
    assert torch.equal(loaded(x, t, y).sample, loaded.eval()(x, t, y).sample)


@torch.no_grad()
def test_numerics_are_recorded_and_restored(tmp_path):
    model = set_numerics(perturbed(build_dit("digits", num_layers=2)), "dit")
    model.save_pretrained(tmp_path / "teacher")
    x, t, y = inputs(model)
    expected = model.eval()(x, t, y).sample
    assert torch.equal(load_teacher(tmp_path / "teacher")(x, t, y).sample, expected)
    plain = DiTTransformer2DModel.from_pretrained(tmp_path / "teacher").eval()  # the shift is not a config field
    assert plain.config[NUMERICS_KEY] == "dit" and not torch.allclose(plain(x, t, y).sample, expected, atol=1e-4)
    assert torch.equal(set_numerics(plain)(x, t, y).sample, expected)
    as_diffusers = load_teacher(tmp_path / "teacher", numerics="diffusers")  # an explicit choice wins
    assert as_diffusers.config.norm_eps == 1e-5 and not torch.allclose(as_diffusers(x, t, y).sample, expected,
                                                                       atol=1e-4)
    with pytest.raises(ValueError, match="numerics must be one of"):
        set_numerics(model, "official")


def test_check_condition_names_the_bad_label():
    model = build_dit("digits", num_layers=1)  # 10 classes, null = 10
    DiT().check_condition(model, torch.tensor([0, 9]))
    DiT().check_condition(model, torch.tensor([0, 10]), allow_null=True)
    for labels, allow_null, bad in [([3, 10], False, 10), ([11], True, 11), ([2, -1], False, -1)]:
        with pytest.raises(ValueError, match=f"class label {bad} out of range"):
            DiT().check_condition(model, torch.tensor(labels), allow_null=allow_null)


@torch.no_grad()
def test_prediction_takes_the_first_channels_of_learned_sigma():
    model = perturbed(build_dit("digits", num_layers=1, in_channels=4, out_channels=8))
    x, t, y = inputs(model, batch=2)
    out = model.eval()(x, t, y).sample  # (2, 8, 8, 8): eps then the variance interpolation
    eps = DiT().prediction(model, out)
    assert eps.shape == x.shape and torch.equal(eps, out[:, :4])
    plain = build_dit("digits", num_layers=1)  # 1 channel in, 1 out
    out = plain.eval()(*inputs(plain, batch=2)).sample  # (2, 1, 8, 8)
    assert torch.equal(DiT().prediction(plain, out), out)  # no learned sigma: the whole output


@torch.no_grad()
def test_snapshot_subfolder_and_official_checkpoint_are_one_teacher(tmp_path):
    """A hub-style pipeline snapshot of official weights (no numerics recorded), its transformer/ subfolder and
    the official .pt are one teacher (weights, config, numerics); another config or numerics is another one."""
    torch.save(official_state_dict(num_layers=6, width=128, in_channels=1, out_channels=1), tmp_path / "dit.pt")
    official = load_teacher(tmp_path / "dit.pt", "digits")  # converted, "dit" numerics
    plain = build_dit("digits")
    plain.load_state_dict(official.state_dict())
    plain.save_pretrained(tmp_path / "snapshot" / "transformer")  # as on the hub: diffusers' numerics
    (tmp_path / "snapshot" / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    identity = teacher_identity(official)
    assert identity["numerics"] == "dit" and len(identity["weights_sha256"]) == 64
    for path in (tmp_path / "snapshot", tmp_path / "snapshot" / "transformer"):
        assert teacher_identity(load_teacher(path, numerics="dit")) == identity
    as_diffusers = teacher_identity(load_teacher(tmp_path / "snapshot"))
    assert as_diffusers["numerics"] == "diffusers" and as_diffusers["weights_sha256"] == identity["weights_sha256"]
    with pytest.raises(ValueError, match="m.json: field 'teacher.numerics' is 'dit', t has 'diffusers'.*"
                                         "load it with numerics='dit'"):
        check_teacher(identity, as_diffusers, "m.json", "t")
    # Same weights (same shapes), 8 heads of 16 instead of 4 of 32: another teacher.
    heads = DiTTransformer2DModel(**{**DIT_SIZES["digits"], "num_attention_heads": 8, "attention_head_dim": 16})
    heads.load_state_dict(official.state_dict())
    other = teacher_identity(set_numerics(heads, "dit"))
    assert other["weights_sha256"] == identity["weights_sha256"] and other["config_sha256"] != identity["config_sha256"]
    with pytest.raises(ValueError, match="field 'teacher.config_sha256' is"):
        check_teacher(identity, other, "m.json", "t")
    check_teacher({**identity, "path": "elsewhere"}, identity, "m.json", "t")  # the path is information only


def test_manifests_without_numerics_read_as_diffusers_numerics():
    model = perturbed(build_dit("digits", num_layers=1))
    identity = teacher_identity(model)
    older = {k: v for k, v in identity.items() if k != "numerics"}
    check_teacher(older, identity, "m.json", "t")
    with pytest.raises(ValueError, match="field 'teacher.numerics' is 'diffusers'"):
        check_teacher(older, teacher_identity(set_numerics(model, "dit")), "m.json", "t")
