"""The shipped digit classifier: loads, is accurate on the held-out split, fails loudly on bad files; training
is deterministic; the augmentation only translates."""
import json
import shutil

import pytest
import torch

from ard.data.digits import load_digits_split, to_uint8
from ard.metrics.classifier import (CONFIG_NAME, DIGIT_CLASSIFIER, WEIGHTS_NAME, ClassifierTraining, _random_shift,
                                    accuracy, load_digit_classifier, train_digit_classifier)


def test_shipped_classifier_val_accuracy():
    model, config = load_digit_classifier()
    val_x, val_y = load_digits_split("val", config["training"]["val_fraction"], config["training"]["split_seed"])
    acc = accuracy(model, to_uint8(val_x), val_y)
    assert acc >= 0.97
    assert acc == pytest.approx(config["val_accuracy"], abs=1e-9)  # the recorded figure is this measurement
    assert config["architecture"]["num_features"] == 64


def test_classifier_rejects_float_images():
    model, _ = load_digit_classifier()
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(2, 1, 8, 8))


def test_load_missing_file(tmp_path):
    shutil.copytree(DIGIT_CLASSIFIER, tmp_path / "clf")
    (tmp_path / "clf" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_digit_classifier(tmp_path / "clf")


def test_load_mismatched_weights(tmp_path):
    shutil.copytree(DIGIT_CLASSIFIER, tmp_path / "clf")
    weights = tmp_path / "clf" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256 differs"):
        load_digit_classifier(tmp_path / "clf")


def test_load_mismatched_architecture(tmp_path):
    shutil.copytree(DIGIT_CLASSIFIER, tmp_path / "clf")
    config_path = tmp_path / "clf" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["architecture"]["width"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the architecture"):
        load_digit_classifier(tmp_path / "clf")


def test_random_shift_is_a_translation_with_background_fill():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
    shifted = _random_shift(images, 1, g)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))  # (N, 1, 10, 10), 0 = background
    candidates = torch.stack([padded[:, :, dy:dy + 8, dx:dx + 8]
                              for dy in range(3) for dx in range(3)])  # (9, N, 1, 8, 8)
    matches = (candidates == shifted[None]).flatten(2).all(-1)  # (9, N)
    assert matches.any(0).all()
    assert matches[4].float().mean() < 0.5  # most images did move (the centre candidate is no shift)
    assert torch.equal(_random_shift(images, 0, g), images)


def test_training_is_deterministic():
    a, acc_a = train_digit_classifier(ClassifierTraining(epochs=1))
    b, acc_b = train_digit_classifier(ClassifierTraining(epochs=1))
    assert acc_a == acc_b
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.slow
def test_training_reproduces_shipped_accuracy():
    """Full default training (about 40 s on one thread) gets the shipped accuracy back."""
    _, config = load_digit_classifier()
    _, acc = train_digit_classifier(ClassifierTraining(**config["training"]))
    assert acc >= 0.97
    assert acc == pytest.approx(config["val_accuracy"], abs=0.01)
