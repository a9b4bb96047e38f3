"""FID / IS / precision-recall against closed forms and hand computations; the uint8 image path; the
reference cache and ADM npz references; bootstrap and noise floor."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from ard.data.digits import load_digits_split, to_uint8
from ard.metrics import (DigitFeatures, FeatureStats, InceptionFeatures, adm_npz_writer, bootstrap_fid,
                         compute_metrics, digits_images, extract, fid_between, fid_from_features, fid_noise_floor, inception_score,
                         load_npz_images, nhwc_to_nchw, precision_recall, reference_from_adm_npz,
                         reference_from_images, save_npz_images)
from ard.metrics.classifier import uint8_to_float
from ard.metrics.precision_recall import manifold_radii


@pytest.fixture(scope="module")
def extractor():
    return DigitFeatures()


@pytest.fixture(scope="module")
def digits():
    return digits_images("all")  # (1797, 1, 8, 8) uint8


def closed_form_fid(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), by scipy (independent of torchmetrics' eigvals)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def exact_samples(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly sigma."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T)).T)  # whitened: cov(z) = I
    return torch.from_numpy(mu + z @ np.linalg.cholesky(sigma).T)  # (n, D)


def random_cov(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- FID
def test_fid_of_a_set_against_itself_is_zero(extractor, digits):
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(fid_from_features(f, f)) < 1e-8
    assert abs(fid_between(digits[:600], digits[:600], extractor)) < 1e-6


def test_fid_matches_closed_form_from_exact_statistics():
    d = 6
    mu1, mu2 = np.zeros(d), np.linspace(-1, 1, d)
    s1, s2 = random_cov(d, 1), random_cov(d, 2)  # non-commuting covariances
    expected = closed_form_fid(mu1, s1, mu2, s2)
    reference = FeatureStats(torch.from_numpy(mu2), torch.from_numpy(s2), 50)
    got = fid_from_features(exact_samples(mu1, s1, 50, 3), reference)
    assert got == pytest.approx(expected, rel=1e-8)
    # diagonal covariances: sum (mu1 - mu2)^2 + (sqrt(a) - sqrt(b))^2, by hand
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    got = fid_from_features(exact_samples(np.zeros(3), np.diag(a), 20, 4), exact_samples(np.ones(3), np.diag(b), 30, 5))
    assert got == pytest.approx(3 + 1 + 1 + 0, rel=1e-8)


def test_fid_of_sampled_gaussians_within_one_percent():
    d, n = 4, 200_000
    s1, s2 = random_cov(d, 6), random_cov(d, 7)
    mu2 = np.full(d, 1.5)
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.from_numpy(np.linalg.cholesky(s1)), torch.from_numpy(np.linalg.cholesky(s2))
    x1 = torch.randn(n, d, generator=g, dtype=torch.float64) @ l1.T  # (n, d) ~ N(0, s1)
    x2 = torch.randn(n, d, generator=g, dtype=torch.float64) @ l2.T + torch.from_numpy(mu2)  # (n, d) ~ N(mu2, s2)
    assert fid_from_features(x1, x2) == pytest.approx(closed_form_fid(np.zeros(d), s1, mu2, s2), rel=0.01)


def test_preloaded_reference_equals_plain_torchmetrics(extractor, digits):
    """Our statistics preloading gives torchmetrics' own answer, and the extractor works as its `feature=`."""
    a, b = digits[:700], digits[700:1500]
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(b, real=True)
    metric.update(a, real=False)
    fa, _ = extract(a, extractor)
    fb, _ = extract(b, extractor)
    assert float(metric.compute()) == pytest.approx(fid_from_features(fa, FeatureStats.of(fb)), rel=1e-5)
    assert fid_between(a, b, extractor) == pytest.approx(fid_from_features(fa, fb), rel=1e-12)


def test_fid_dimension_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        fid_from_features(torch.randn(10, 4), torch.randn(10, 5))


# ---------------------------------------------------------------- Inception Score
def test_inception_score_of_confident_uniform_predictions_is_num_classes():
    labels = torch.arange(1000) % 10
    logits = 60.0 * torch.nn.functional.one_hot(labels, 10).double()  # p(y|x) one-hot, p(y) uniform
    assert inception_score(logits)[0] == pytest.approx(10.0, rel=1e-9)
    assert inception_score(logits[:1].expand(1000, -1))[0] == pytest.approx(1.0, rel=1e-9)


def test_inception_score_splits_and_seed():
    logits = torch.randn(1000, 10, generator=torch.Generator().manual_seed(0)) * 3
    one = inception_score(logits, split_size=1000)
    assert math.isnan(one[1])
    four = inception_score(logits, split_size=250, seed=1)
    assert four == inception_score(logits, split_size=250, seed=1)
    assert four[1] > 0 and four[0] < one[0]  # smaller splits see less of p(y): lower mean (Jensen)


def test_extractor_logits_head_works_as_torchmetrics_feature(extractor, digits):
    metric = InceptionScore(feature=extractor.logits_head(), splits=1)
    metric.update(digits)
    assert float(metric.compute()[0]) == pytest.approx(inception_score(extract(digits, extractor)[1])[0], rel=1e-5)


# ---------------------------------------------------------------- precision / recall
def test_manifold_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert torch.equal(manifold_radii(x, k=1), torch.tensor([1.0, 1.0, 2.0]))
    assert torch.equal(manifold_radii(x, k=2), torch.tensor([3.0, 2.0, 3.0]))


def test_precision_recall_hand_example():
    """Real 0..4 (k=1 radii 1); fake {0.5, 10} (radii 9.5): half the fakes lie on the real manifold
    (precision 0.5), every real point lies in the fake ball around 0.5 (recall 1)."""
    real = torch.arange(5.0)[:, None]
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_self_and_far_away():
    x = torch.randn(600, 32, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x, k=3, batch_size=128) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3, batch_size=128) == (0.0, 0.0)


# ---------------------------------------------------------------- uint8 image path
def test_uint8_path_matches_hand_computation(extractor):
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0, 1.2, -3.0, 0.001]).repeat(8).reshape(1, 1, 8, 8)
    u = to_uint8(x)
    hand = torch.tensor([0, 64, 128, 159, 255, 255, 0, 128], dtype=torch.uint8)  # round((x + 1) * 127.5), clipped
    assert torch.equal(u[0, 0, 0], hand)
    as_float = uint8_to_float(u)
    assert torch.allclose(as_float[0, 0, 0], hand.float() / 127.5 - 1)
    clf = extractor.classifier
    by_hand = clf.features(clf.conv(hand.float().repeat(8).reshape(1, 1, 8, 8) / 127.5 - 1))  # (1, 64)
    features, logits = extractor.features_and_logits(u)
    assert torch.equal(features, by_hand)
    assert torch.equal(logits, clf.head(by_hand))


def test_digits_survive_the_uint8_round_trip():
    x, _ = load_digits_split("all")
    assert (uint8_to_float(to_uint8(x)) - x).abs().max() <= 0.5 / 127.5 + 1e-6


def test_image_layout_checks(extractor, digits):
    with pytest.raises(TypeError, match="uint8"):
        extractor(digits.float())
    with pytest.raises(ValueError, match="NCHW"):
        extractor(digits.permute(0, 2, 3, 1))
    nhwc_rgb = digits.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # ADM npz layout (N, 8, 8, 3)
    assert torch.equal(extractor(nhwc_to_nchw(nhwc_rgb)[:50]), extractor(digits[:50]))
    rgb = digits[:4].repeat(1, 3, 1, 1)
    rgb[:, 1] = 0
    with pytest.raises(ValueError, match="greyscale"):
        extractor(rgb)


def test_inception_extractor_needs_torch_fidelity(tmp_path):
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch-fidelity"):
            InceptionFeatures(tmp_path / "weights.pth")
    else:
        with pytest.raises(FileNotFoundError, match="weights.pth"):
            InceptionFeatures(tmp_path / "weights.pth")


# ---------------------------------------------------------------- references
def test_reference_cache_round_trip(tmp_path, extractor, digits, monkeypatch):
    ref = reference_from_images(digits[:400], extractor, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith(extractor.identity)

    def no_extract(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("ard.metrics.reference.extract", no_extract)
    cached = reference_from_images(digits[:400], extractor, cache_dir=tmp_path)
    assert torch.equal(cached.features, ref.features) and torch.equal(cached.stats.sigma, ref.stats.sigma)
    assert cached.identity == ref.identity
    with pytest.raises(AssertionError, match="cache"):  # other data: another key, recomputed
        reference_from_images(digits[:401], extractor, cache_dir=tmp_path)
    np.savez(files[0], junk=np.zeros(1))
    with pytest.raises(ValueError, match=files[0].name):
        reference_from_images(digits[:400], extractor, cache_dir=tmp_path)


def test_reference_from_adm_npz(tmp_path, extractor, digits):
    images = digits[:300].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # (300, 8, 8, 3)
    mu, sigma = np.full(64, 0.5), np.eye(64)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma)
    ref = reference_from_adm_npz(tmp_path / "ref.npz", extractor)
    assert torch.equal(ref.stats.mu, torch.from_numpy(mu)) and torch.equal(ref.stats.sigma, torch.from_numpy(sigma))
    assert torch.equal(ref.features, extract(digits[:300], extractor)[0])
    own = reference_from_adm_npz(tmp_path / "ref.npz", extractor, use_file_stats=False)
    assert torch.allclose(own.stats.mu, ref.features.double().mean(0))
    np.savez(tmp_path / "inception.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="inception.npz: mu has shape"):
        reference_from_adm_npz(tmp_path / "inception.npz", extractor)
    np.savez(tmp_path / "nchw.npz", arr_0=digits[:10].numpy())
    with pytest.raises(ValueError, match="nchw.npz: arr_0 must be"):
        reference_from_adm_npz(tmp_path / "nchw.npz", extractor)


def test_adm_sample_batch_round_trip(tmp_path, digits):
    labels = torch.arange(50) % 10
    path = save_npz_images(tmp_path / "samples.npz", digits[:50], labels)
    with np.load(path, allow_pickle=False) as z:
        assert z["arr_0"].shape == (50, 8, 8, 3) and z["arr_0"].dtype == np.uint8  # the TF evaluator's layout
        assert np.array_equal(z["arr_1"], labels.numpy())
    back = load_npz_images(path)  # (50, 3, 8, 8): grey repeated to RGB
    assert torch.equal(back, digits[:50].expand(-1, 3, -1, -1))
    with pytest.raises(TypeError, match="bad.npz"):
        save_npz_images(tmp_path / "bad.npz", digits[:5].float())
    assert not (tmp_path / "bad.npz").exists()
    # Streamed batch by batch: the same file as in one piece; an unfinished stream leaves the old file alone.
    with adm_npz_writer(tmp_path / "streamed.npz", 50, (8, 8), labels) as write:
        for batch in digits[:50].split(7):
            write(batch)
    assert (tmp_path / "streamed.npz").read_bytes() == path.read_bytes()
    before = path.read_bytes()
    with pytest.raises(ValueError, match="samples.npz: 14 of 50 images written"):
        with adm_npz_writer(path, 50, (8, 8), labels) as write:
            write(digits[:7])
            write(digits[7:14])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", "streamed.npz"]


# ---------------------------------------------------------------- bootstrap, noise floor, the suite
def test_bootstrap_and_noise_floor():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2000, 8, generator=g), torch.randn(1000, 8, generator=g) + 0.5
    values = bootstrap_fid(fake, FeatureStats.of(real), num_resamples=8, seed=3)
    assert values.shape == (8,) and values.std() > 0
    assert torch.equal(values, bootstrap_fid(fake, FeatureStats.of(real), num_resamples=8, seed=3))
    assert abs(values.mean() - fid_from_features(fake, real)) < 4 * values.std()  # centred near the FID (2.0)
    floor = fid_noise_floor(real, seed=0)
    assert 0 < floor < 0.1 < fid_from_features(fake, real)
    assert floor == fid_noise_floor(real, seed=0)


def test_compute_metrics_on_real_digits(extractor, digits):
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    reference = reference_from_images(digits[perm[:900]], extractor)
    real = compute_metrics(digits[perm[900:]], reference, extractor, bootstrap=4)
    noise = torch.randint(0, 256, (897, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fake = compute_metrics(noise, reference, extractor, bootstrap=4)
    assert set(real) == {"fid", "fid_sd", "is", "precision", "recall", "num_samples", "num_reference", "extractor"}
    assert real["fid"] < 30 < 500 < fake["fid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and fake["recall"] < 0.2
    assert real["is"] > 9 > 5 > fake["is"]  # 10 classes, confidently and evenly recognised
    other = DigitFeatures()
    other.identity = "other"
    with pytest.raises(ValueError, match="not built with extractor other"):
        compute_metrics(digits[:10], reference, other)
