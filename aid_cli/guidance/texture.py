"""Texture terms of the terminal cost, options beyond the paper (`losses.terminal_cost`): they compare statistics of
the fill's texture with the truth's, where eq. 2's L2 terms and LPIPS compare the pixels or features themselves and so
reward the smooth mean of the plausible fills.

  --lambda-texture  λ_tex · log²((T(x̂) + ε) / (T(x0) + ε)),  T the hole texture of `metrics.quality.hole_texture`
  --lambda-gram     λ_gram · mean over AlexNet's first GRAM_LAYERS taps l of ‖G_l(x̂) − G_l(x0)‖²_F / ‖G_l(x0)‖²_F,
                    G_l the Gram matrix (Gatys et al. 2016) of the LPIPS trunk's features around the hole

x̂ is the completed image M ⊙ y + M̄ ⊙ X_N, so neither term's gradient reaches a visible pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics.quality import hole_texture_sums

TEXTURE_EPS = 1 / 255  # one 8-bit grey level on the [0, 1] scale: texture below it does not show in a saved image
GRAM_LAYERS = 3  # AlexNet relu1, relu2, relu3 (grids of 15², 7², 3² at 64 px; relu4 and relu5 add no finer one)


def hole_texture_t(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`metrics.quality.hole_texture` in x's dtype and differentiable in x: the mean |luminance difference| (channel
    mean, [0, 1] scale) over horizontal and vertical pairs of neighbouring hole pixels → [N]; 0, not nan, where the
    hole holds no pair."""
    total, count = hole_texture_sums(x, M)
    return total / count.clamp_min(1)


def texture_cost(completed: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, eps: float = TEXTURE_EPS) -> torch.Tensor:
    """log²((T(x̂) + ε) / (T(x0) + ε)) per image [N], T = `hole_texture_t`, x̂ the completed image.

    The squared log ratio, because it is
      - scale-free: it reads only the ratio T(x̂)/T(x0) (the validation's texture ratio), so one weight serves flat
        and busy images alike; a fill half as textured as the truth costs what one twice as textured does;
      - two-sided: ∂/∂T(x̂) = 2·log(ratio)/(T(x̂) + ε) is negative for a fill smoother than the truth (descent adds
        texture) and positive for a rougher one (descent removes it), and zero at the match, where the cost is smooth
        (no kink for the optimiser to chatter on, as |T(x̂) − T(x0)| would have);
      - finite: ε keeps the log finite where the truth is flat or the hole has no pair (T = 0: the cost is 0 and so
        is its gradient), and bounds the slope at a flat fill by 2·|log(ε/(T(x0) + ε))|/ε.
    A hole of exactly equal neighbours (a flat fill) is a stationary point: |·| has no slope at 0."""
    t_fill, t_true = hole_texture_t(completed, M), hole_texture_t(x0, M)
    return torch.log((t_fill + eps) / (t_true + eps)) ** 2


def hole_grid(M: torch.Tensor, size) -> torch.Tensor:
    """The hole M̄ = 1 − M [N, 1, H, W] on a feature grid `size` (h, w): a cell is 1 where any hole pixel falls in
    its window (adaptive max-pool), so the hole's rim of features, which see both sides, is kept."""
    hole = (1 - M).amax(dim=1, keepdim=True)
    return F.adaptive_max_pool2d(hole, size)


def gram_matrix(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """G = Σ_p m_p f_p f_pᵀ / (C · Σ_p m_p) [N, C, C] of features f [N, C, h, w] over the positions the mask m
    [N, 1, h, w] keeps (Gatys et al.'s Gram, normalised by channels × kept positions); 0 where m keeps none."""
    C = f.shape[1]
    fm = (f * m).flatten(2)
    return fm @ f.flatten(2).transpose(1, 2) / (C * m.flatten(1).sum(1).clamp_min(1))[:, None, None]


def gram_cost(lpips, completed: torch.Tensor, x0: torch.Tensor, M: torch.Tensor,
              layers: int = GRAM_LAYERS) -> torch.Tensor:
    """mean_l ‖G_l(x̂) − G_l(x0)‖²_F / ‖G_l(x0)‖²_F per image [N]: the Gram matrices of the LPIPS model's trunk (its
    scaled input, the tapped ReLU outputs `LPIPS.taps`) at its first `layers` taps, each over the hole's cells of
    that layer's grid (`hole_grid`). Each layer's distance is relative to the truth's Gram norm, so every layer
    counts alike (their norms differ by orders of magnitude) and one weight serves flat and busy images. The trunk's
    weights stay frozen; the gradient flows to x̂."""
    d = 0
    with torch.no_grad():
        truth = lpips.taps(x0.to(lpips.shift.dtype))[:layers]
    for f_fill, f_true in zip(lpips.taps(completed.to(lpips.shift.dtype))[:layers], truth):
        m = hole_grid(M.to(f_fill.dtype), f_fill.shape[-2:])
        g_true = gram_matrix(f_true, m)
        norm = g_true.pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
        d = d + (gram_matrix(f_fill, m) - g_true).pow(2).sum(dim=(1, 2)) / norm
    return d / layers
