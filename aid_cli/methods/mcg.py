"""MCG (manifold-constrained gradient, Chung et al. 2022), method.md §10: DPS's gradient on the hole, then replacement.

As in the reference (`ManifoldConstraintGradient`: unconditional step, then the gradient, then the projection), after
the unconditional Heun step σ_n → σ_{n+1}:

    g = ∇_{x_n} ‖M ⊙ (y − D(x_n; σ_n))‖₂           (unsquared norm per image, through the denoiser, at the step's start)
    x_{n+1} ← x_{n+1} − α·M̄ ⊙ g                      (hole only)
    x_{n+1} ← M ⊙ (y + σ_{n+1}·ε) + M̄ ⊙ x_{n+1}      (replacement, as `replace`)

The forward it differentiates is the Heun step's own: 2N − 1 NFE and N backward passes. α = 0 is exactly `replace` (same
evaluations, same noise draws). Default α = 1.0, the reference code's default scale (VP coordinates, see gradient.py):
tune it.
"""

from ..sampling.heun import SamplerState
from .base import register
from .gradient import GradientAtStart, residual_norm
from .replace import replace_known


@register
class MCG(GradientAtStart):
    name = "mcg"

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def post_step(self, s: SamplerState, n: int, x, x_next):
        g = self.start_gradient(s, lambda d: residual_norm(s, d))
        x_next = x_next.detach() - self.alpha * s.task.hole * g
        return replace_known(s, x_next, s.sigmas[n + 1])
