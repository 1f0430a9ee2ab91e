"""GradPaint (Grechka et al. 2023), method.md §10: combine-image plus a normalised gradient step on a harmony loss.

Every Heun evaluation uses the combined estimate M ⊙ y + M̄ ⊙ D (as `ddnm`). After the step σ_n → σ_{n+1} (paper eq. 9:
the gradient is taken w.r.t. the step's start x_t and applied to the step's result x_{t−1}):

    x_{n+1} ← x_{n+1} − α·∇_{x_n}L / ‖∇_{x_n}L‖₂,    L = L_mse + λ_al·L_al                  (norms per image)
    L_mse = (1/HW)·‖M ⊙ (D(x_n; σ_n) − y)‖²                 (eq. 5: the raw estimate against y on the visible region)
    L_al  = mean over channels of al(Î_c, M),   Î = M ⊙ y + M̄ ⊙ D(x_n; σ_n)   (the collage)
    al(I, M) = (1/HW)·Σ_ij (D_x I·D_x M + D_y I·D_y M)²     (eq. 6)

where (D_x I, D_y I) = ∇I/‖∇I‖₂ at each pixel, and 0 where ∇I = 0 (eq. 7): the unit image-gradient direction, dotted
with the unit normal of the mask border (the mask's own normalised gradient; the paper's mask marks the hole and ours
the visible part, D(1 − M) = −D(M), and the square drops the sign). So al lives on the border only and is smallest when
the collage does not change across it. ∇ is forward differences (I[i, j+1] − I[i, j], 0 on the last column; likewise for
rows), so on a border pixel it is exactly the jump between a visible and a hole pixel; the paper leaves the scheme open.

Paper values (pixel models): α = 0.005, λ_al = 400 while n < 0.45·N (its first 45 of 100 DDPM steps), 0 afterwards.
Latent models: MSE only (`lambda_al=0`). Cost: 2N − 1 NFE (the gradient reuses the Heun step's evaluation at x_n) and N
backward passes. α = 0 is exactly `ddnm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling.heun import SamplerState
from .base import register
from .gradient import GradientAtStart, per_sample


def _forward_differences(img: torch.Tensor):
    gx = F.pad(img[..., :, 1:] - img[..., :, :-1], (0, 1))
    gy = F.pad(img[..., 1:, :] - img[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def _normalised(gx: torch.Tensor, gy: torch.Tensor):
    """(gx, gy)/‖(gx, gy)‖ per pixel, 0 where the gradient vanishes (with a gradient that stays finite there)."""
    sq = gx ** 2 + gy ** 2
    nonzero = sq > 0
    norm = torch.where(nonzero, sq, torch.ones_like(sq)).sqrt()
    return torch.where(nonzero, gx / norm, 0.0), torch.where(nonzero, gy / norm, 0.0)


def alignment_loss(img: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """L_al per image [B]: al(I_c, M) of eq. 6 for each channel, averaged over channels."""
    ix, iy = _normalised(*_forward_differences(img))
    mx, my = _normalised(*_forward_differences(M))  # [B, 1, H, W], broadcast over channels
    al = ((ix * mx + iy * my) ** 2).sum((-2, -1)) / (img.shape[-2] * img.shape[-1])
    return al.mean(1)


@register
class GradPaint(GradientAtStart):
    name = "gradpaint"

    def __init__(self, alpha: float = 0.005, lambda_al: float = 400.0, al_until: float = 0.45):
        self.alpha, self.lambda_al, self.al_until = float(alpha), float(lambda_al), float(al_until)

    def denoise(self, s: SamplerState, x, sigma):
        return s.task.complete(super().denoise(s, x, sigma))

    def loss(self, s: SamplerState, n: int, denoised: torch.Tensor) -> torch.Tensor:
        """L = L_mse + λ_al·L_al per image, λ_al switched off from n ≥ al_until·N on."""
        M, y = s.task.M, s.task.y
        loss = per_sample((M * (denoised - y)) ** 2) / (y.shape[-2] * y.shape[-1])
        if self.lambda_al and n < self.al_until * s.num_steps:
            loss = loss + self.lambda_al * alignment_loss(s.task.complete(denoised), M)
        return loss

    def post_step(self, s: SamplerState, n: int, x, x_next):
        g = self.start_gradient(s, lambda d: self.loss(s, n, d))
        norm = torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *([1] * (g.ndim - 1)))
        direction = torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
        return x_next.detach() - self.alpha * direction
