"""DPS (diffusion posterior sampling, Chung et al. 2023), method.md §10: the step follows the residual's gradient.

    x_{n+1} ← x_{n+1} − ζ·∇_{x_n} ‖y − M ⊙ D(x_n; σ_n)‖₂

with the unsquared norm per image (as the reference code's `torch.linalg.norm`), the gradient taken at the step's start
through the denoiser and applied after the unconditional Heun step; no replacement. The forward it differentiates is the
Heun step's own: 2N − 1 NFE and N backward passes. ζ = 0 is exactly `unguided`. Default ζ = 0.5, the reference
inpainting config (DPS2022 `inpainting_config.yaml`, VP coordinates, see gradient.py): tune it.
"""

from ..sampling.heun import SamplerState
from .base import register
from .gradient import GradientAtStart, residual_norm


@register
class DPS(GradientAtStart):
    name = "dps"

    def __init__(self, zeta: float = 0.5):
        self.zeta = float(zeta)

    def post_step(self, s: SamplerState, n: int, x, x_next):
        g = self.start_gradient(s, lambda d: residual_norm(s, d))
        return x_next.detach() - self.zeta * g
