"""Realism of a set of images against reference images: FID and KID on the TF-Inception pool_3 features of fid.py.

KID (Bińkowski et al. 2018, "Demystifying MMD GANs") is the unbiased estimator of the squared MMD between the two
feature distributions under the polynomial kernel k(a, b) = (a·b / d + 1)³, d = 2048:
    KID = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (m n).
As in the reference implementations (Bińkowski's `polynomial_mmd_averages`, clean-fid, torch-fidelity: 100 subsets of
at most 1,000), sets larger than KID_SUBSET_SIZE are scored as the mean over KID_SUBSETS random subsets of
min(m, n, KID_SUBSET_SIZE) images each (drawn without replacement, numpy's default_rng(seed)); up to that size the
estimator takes every image (each reference subset would be a permutation of the whole set: the same number).
Unbiased means it can be negative, and it is ≈ 0 for two samples of one distribution; tables show KID × 1000.

Its uncertainty over images: `kid_bootstrap` resamples the n images with replacement, paired (fill i goes with its
original i; every set of a multi-seed row takes the same draw), BOOTSTRAP_DRAWS times with numpy's
default_rng(seed); each draw's KID is the estimator above with the multiplicities as weights, the pairs of copies of
one image left out of the within-set sums as the diagonal is (a duplicate is not a second independent sample).
`kid_difference` is the paired bootstrap of KID(a) − KID(b) of two methods against the same originals: the same
draws for both, so what the images have in common cancels.

FID is fid.py's Fréchet distance of the two feature sets' Gaussians (biased upward at a few hundred images: compare
FIDs only at equal n). `realism` is the whole thing from images: tensor (or list of tensors) in, numbers out.
"""

from __future__ import annotations

import numpy as np

KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100
BOOTSTRAP_DRAWS = 200
BOOTSTRAP_MAX = KID_SUBSET_SIZE  # the bootstrap holds n×n kernel matrices: whole-set estimates only


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a_i, b_j) = (a_i · b_j / d + 1)³ for [m, d] and [n, d] features → [m, n] float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T / a.shape[1] + 1) ** 3


def _check(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID takes two [N, D] feature sets of one D, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features contain NaN or inf")
    return x, y


def _within(k: np.ndarray, w: np.ndarray | None) -> float:
    """Mean of k over pairs of distinct images (weights w: multiplicities; copies of one image never pair)."""
    if w is None:
        n = k.shape[0]
        return float((k.sum() - np.trace(k)) / (n * (n - 1)))
    return float((w @ k @ w - (w * w) @ np.diag(k)) / (w.sum() ** 2 - (w * w).sum()))


def _cross(k: np.ndarray, wx: np.ndarray | None, wy: np.ndarray | None) -> float:
    if wx is None:
        return float(k.mean())
    return float(wx @ k @ wy / (wx.sum() * wy.sum()))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² of two [m, D], [n, D] feature sets under `polynomial_kernel`, every image taken."""
    x, y = _check(x, y)
    return _within(polynomial_kernel(x, x), None) + _within(polynomial_kernel(y, y), None) \
        - 2 * _cross(polynomial_kernel(x, y), None, None)


def kid(x: np.ndarray, y: np.ndarray, subset_size: int = KID_SUBSET_SIZE, subsets: int = KID_SUBSETS,
        seed: int = 0) -> float:
    """KID of two feature sets: `mmd2_unbiased` of the whole sets up to `subset_size` images each, else the mean over
    `subsets` random subsets of min(m, n, subset_size) images (the reference implementations' procedure)."""
    x, y = _check(x, y)
    if max(len(x), len(y)) <= subset_size:
        return mmd2_unbiased(x, y)
    s = min(len(x), len(y), subset_size)
    rng = np.random.default_rng(seed)
    return float(np.mean([mmd2_unbiased(x[rng.choice(len(x), s, replace=False)],
                                        y[rng.choice(len(y), s, replace=False)]) for _ in range(subsets)]))


class _PairedKernels:
    """Kernel matrices of sets xs[0], xs[1], … (e.g. one method's fills under several seeds, or two methods' fills)
    against one reference set y, every set paired image by image with y; `kid(w)` is their KIDs under multiplicities
    w (None: every image once)."""

    def __init__(self, xs: list[np.ndarray], y: np.ndarray):
        checked = [_check(x, y) for x in xs]
        y = checked[0][1]
        if any(len(x) != len(y) for x, _ in checked):
            raise ValueError(f"a paired bootstrap needs one fill per original: sets of {[len(x) for x, _ in checked]} "
                             f"images against {len(y)}")
        if len(y) > BOOTSTRAP_MAX:
            raise ValueError(f"the bootstrap takes at most {BOOTSTRAP_MAX} images (n×n kernel matrices), got {len(y)}")
        self.n = len(y)
        self.kyy = polynomial_kernel(y, y)
        self.kxx = [polynomial_kernel(x, x) for x, _ in checked]
        self.kxy = [polynomial_kernel(x, y) for x, _ in checked]

    def kid(self, w: np.ndarray | None = None) -> np.ndarray:
        yy = _within(self.kyy, w)
        return np.array([_within(kxx, w) + yy - 2 * _cross(kxy, w, w) for kxx, kxy in zip(self.kxx, self.kxy)])

    def draws(self, draws: int, seed: int):
        """`draws` multiplicity vectors of n images drawn with replacement (a draw of one image alone, which has no
        pair to score, is drawn again: only with a handful of images)."""
        rng = np.random.default_rng(seed)
        done = 0
        while done < draws:
            w = np.bincount(rng.integers(0, self.n, self.n), minlength=self.n).astype(np.float64)
            if (w > 0).sum() >= 2:
                done += 1
                yield w


def kid_bootstrap(xs: np.ndarray | list[np.ndarray], y: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                  seed: int = 0) -> np.ndarray:
    """[draws] KIDs of paired bootstrap resamples of the images: of one set x against y, or of the mean over several
    sets xs (one per noise seed) against y, every set taking the same draw. Its std is KID's std over images."""
    xs = [xs] if isinstance(xs, np.ndarray) and xs.ndim == 2 else list(xs)
    k = _PairedKernels(xs, y)
    return np.array([k.kid(w).mean() for w in k.draws(draws, seed)])


def kid_difference(a: np.ndarray | list[np.ndarray], b: np.ndarray | list[np.ndarray], y: np.ndarray,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """KID(a) − KID(b) of two methods' fills against the same originals y (each a set, or a list of one set per seed:
    the mean over seeds), with its paired bootstrap: {"delta", "std", "a_worse" (the fraction of draws where a's KID is
    the higher), "draws"}."""
    a = [a] if isinstance(a, np.ndarray) and a.ndim == 2 else list(a)
    b = [b] if isinstance(b, np.ndarray) and b.ndim == 2 else list(b)
    k = _PairedKernels(a + b, y)

    def delta(w):
        v = k.kid(w)
        return v[:len(a)].mean() - v[len(a):].mean()

    boot = np.array([delta(w) for w in k.draws(draws, seed)])
    return {"delta": float(delta(None)), "std": float(boot.std(ddof=1)), "a_worse": float((boot > 0).mean()),
            "draws": draws}


def realism(x, ref, model=None, device="cpu", batch: int = 50, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """FID and KID of images x against reference images `ref` ({"fid", "kid", "kid_std", "n", "n_ref"}; kid_std: the
    paired bootstrap's when x and ref pair up one to one and n ≤ BOOTSTRAP_MAX, else None).

    x, ref: uint8 [N, 3, H, W] (0..255) or float in [−1, 1], or lists of [3, H, W] / [1, 3, H, W] images of different
    sizes; each is resized to 299×299 as fid.py says. `model`: a `fid.load_inception()` result to reuse."""
    from .fid import fid_from_features, inception_features, load_inception

    model = model if model is not None else load_inception(device)
    fx = inception_features(x, batch=batch, model=model)
    fy = inception_features(ref, batch=batch, model=model)
    paired = len(fx) == len(fy) and len(fx) <= BOOTSTRAP_MAX
    return {"fid": fid_from_features(fx, fy), "kid": kid(fx, fy),
            "kid_std": float(kid_bootstrap(fx, fy, draws, seed).std(ddof=1)) if paired else None,
            "n": len(fx), "n_ref": len(fy)}


__all__ = ["kid", "kid_bootstrap", "kid_difference", "mmd2_unbiased", "polynomial_kernel", "realism",
           "KID_SUBSET_SIZE", "KID_SUBSETS", "BOOTSTRAP_DRAWS"]
