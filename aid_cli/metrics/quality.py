"""Pixel-level quality of a completed image against the original: PSNR (whole image and hole only) and SSIM.

Conventions (as everywhere inside aid): batches of float NCHW images in [−1, 1]; a mask M of shape [N, 1, H, W]
(or [N, C, H, W]) with 1 = known and 0 = hole, the same M as `Task.M`. The hole is M̄ = 1 − M. Every function returns
one value per image, a float tensor of shape [N] (float64 for PSNR, the input's dtype for SSIM).

PSNR = 10 · log10(R² / MSE), R the data range (2 for [−1, 1], the default; R = 1 on [0, 1] or 255 on [0, 255] gives the
same number, PSNR only depends on the error relative to R).
  - `psnr`: MSE over all pixels × channels.
  - `psnr_hole`: MSE over the hole pixels only (M = 0) × channels, the paper's masked-region PSNR (method.md §9).
    Pixels where M is fractional count with weight 1 − M.
  Identical images (MSE = 0) give +inf, not a capped value (as skimage's `peak_signal_noise_ratio`); an image with no
  hole pixels gives nan from `psnr_hole`. The CLI writes both as JSON null.

SSIM (Wang et al. 2004), exactly as `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=R, channel_axis=…)`:
  - local statistics under an 11-tap separable Gaussian window, σ = 1.5 (radius int(3.5 σ + 0.5) = 5, weights
    normalised to sum 1); population (biased) variances and covariance;
  - SSIM map = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), C1 = (0.01 R)², C2 = (0.03 R)²;
  - the mean is taken over the pixels at least 5 from every border (skimage crops (win − 1) / 2 = 5 pixels before
    averaging, so its border padding never matters: here the filter runs "valid", without padding), per channel, then
    over channels.
  SSIM is NOT shift-invariant (the luminance term uses the means), so the range matters: `ssim_01` maps [−1, 1] images
  to [0, 1] and uses R = 1, the standard setting (identical to [0, 255] with R = 255). That is the number aid reports.
  Images need at least 11 × 11 pixels.

Hole texture (a diagnostic, not a quality score): `hole_texture` is the mean absolute difference between the luminance
(channel mean, on the [0, 1] scale) of neighbouring pixels, over horizontal and vertical pairs that both lie in the
hole. Of a completed image against the original's, it says whether a fill is smoother than the truth (below it) or
noisier (above it): LPIPS punishes both, PSNR rewards the smooth one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage: radius = int(truncate · σ + 0.5) = 5 → 11 taps (Wang 2004)
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 2.0  # images in [−1, 1]
SSIM_MIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # the window's 11 taps: the smallest side SSIM takes


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape != ref.shape:
        raise ValueError(f"expected two NCHW batches of the same shape, got {tuple(x.shape)} and {tuple(ref.shape)}")


def _psnr_from_mse(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    """10 log10(R² / MSE); MSE = 0 → +inf, MSE = nan → nan."""
    return 10 * torch.log10(data_range ** 2 / mse)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR of each image of x [N, C, H, W] against ref, over all pixels and channels → [N] float64 (dB)."""
    _check_pair(x, ref)
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    return _psnr_from_mse(mse, data_range)


def psnr_hole(x: torch.Tensor, ref: torch.Tensor, M: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """PSNR over the hole only: MSE over the pixels where M = 0 (1 = known, as `Task.M`), × channels → [N] float64.

    M is [N, 1, H, W] (broadcast over channels) or [N, C, H, W]. Images without hole pixels give nan.
    """
    _check_pair(x, ref)
    if M.ndim != 4 or M.shape[0] != x.shape[0] or M.shape[-2:] != x.shape[-2:] or M.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mask {tuple(M.shape)} does not fit images {tuple(x.shape)}")
    hole = (1 - M.double()).expand_as(x)
    err = (x.double() - ref.double()).pow(2) * hole
    count = hole.flatten(1).sum(1)
    mse = err.flatten(1).sum(1) / count  # 0 / 0 = nan when there is no hole
    return _psnr_from_mse(mse, data_range)


def gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE, dtype=torch.float64) -> torch.Tensor:
    """1-D Gaussian weights of scipy.ndimage / skimage: radius int(truncate σ + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def _filter_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable filter of every channel of x [N, C, H, W], no padding → [N, C, H − 2r, W − 2r]."""
    c, k = x.shape[1], taps.numel()
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(x: torch.Tensor, ref: torch.Tensor, data_range: float, sigma: float = SSIM_SIGMA,
             K1: float = SSIM_K1, K2: float = SSIM_K2) -> torch.Tensor:
    """The SSIM map on the border-cropped ("valid") region, [N, C, H − 2r, W − 2r] (Wang 2004, Eq. 13)."""
    _check_pair(x, ref)
    if not x.is_floating_point():
        raise ValueError("SSIM needs floating-point images")
    ref = ref.to(x.dtype)
    taps = gaussian_taps(sigma, dtype=x.dtype).to(x.device)
    if min(x.shape[-2:]) < taps.numel():
        raise ValueError(f"SSIM needs images of at least {taps.numel()}x{taps.numel()} pixels, got "
                         f"{x.shape[-1]}x{x.shape[-2]}")
    # Second moments are taken about each channel's global mean: the variance is shift-invariant, and this keeps
    # float32 (the MPS path) from cancelling catastrophically in E[x²] − E[x]².
    cx, cy = x.mean((2, 3), keepdim=True), ref.mean((2, 3), keepdim=True)
    x0, y0 = x - cx, ref - cy
    mx0, my0 = _filter_valid(x0, taps), _filter_valid(y0, taps)
    vx = _filter_valid(x0 * x0, taps) - mx0 * mx0
    vy = _filter_valid(y0 * y0, taps) - my0 * my0
    vxy = _filter_valid(x0 * y0, taps) - mx0 * my0
    mx, my = mx0 + cx, my0 + cy
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return (2 * mx * my + C1) * (2 * vxy + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image of x [N, C, H, W] against ref, images in whatever range `data_range` states → [N].

    Equals skimage's structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=<C>) image by image (mean over the cropped map of each channel, then channels).
    """
    return ssim_map(x, ref, data_range, sigma).flatten(1).mean(1)


def ssim_01(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The SSIM aid reports: images in [−1, 1] mapped to [0, 1], data range 1 → [N]."""
    return ssim((x + 1) / 2, (ref + 1) / 2, data_range=1.0)


def hole_texture_sums(x: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ |luminance difference|, number) over the horizontal and vertical pairs of neighbouring hole pixels (x in
    [−1, 1], luminance the channel mean read on the [0, 1] scale) → two [N] tensors in x's dtype, differentiable in x."""
    if M.ndim != 4 or M.shape[0] != x.shape[0] or M.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask {tuple(M.shape)} does not fit images {tuple(x.shape)}")
    L = (x.mean(dim=1, keepdim=True) + 1) / 2
    hole = (M < 0.5).all(dim=1, keepdim=True).to(x.dtype)
    pairs_x, pairs_y = hole[..., :, 1:] * hole[..., :, :-1], hole[..., 1:, :] * hole[..., :-1, :]
    total = ((L[..., :, 1:] - L[..., :, :-1]).abs() * pairs_x).flatten(1).sum(1) + \
        ((L[..., 1:, :] - L[..., :-1, :]).abs() * pairs_y).flatten(1).sum(1)
    return total, pairs_x.flatten(1).sum(1) + pairs_y.flatten(1).sum(1)


def hole_texture(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Mean |luminance difference| of neighbouring hole pixels (x in [−1, 1], read on the [0, 1] scale), in float64
    → [N]; nan for an image whose hole holds no two neighbouring pixels."""
    total, count = hole_texture_sums(x.double(), M)
    return total / count  # 0 / 0 = nan when there is no pair


def texture_ratio(fill: torch.Tensor, truth: torch.Tensor) -> float | None:
    """Σ `hole_texture` of the fills over Σ of the originals', over the images where both are defined; None where
    the originals' holes hold no texture at all."""
    keep = torch.isfinite(fill) & torch.isfinite(truth)
    return float(fill[keep].sum() / truth[keep].sum()) if truth[keep].sum() > 0 else None


def finite_or_none(v: float) -> float | None:
    """JSON has no inf/nan: such values are written as null."""
    return v if math.isfinite(v) else None
