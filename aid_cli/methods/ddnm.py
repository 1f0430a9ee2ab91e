"""Combine-image (DDNM-style), method.md §10: every network evaluation sees the observation pasted into its estimate.

Inside each Heun evaluation x̂0 = M ⊙ y + M̄ ⊙ D(x; σ) replaces D in d = (x − x̂0)/σ (for inpainting, DDNM's null-space
projection A†y + (I − A†A)x̂0 is exactly this). Costs 2N − 1 NFE, no backward. The last (Euler) step lands on x̂0, so
the final state already equals y on the visible region.
"""

from ..sampling.heun import Method, SamplerState
from .base import register


@register
class CombineImage(Method):
    name = "ddnm"

    def denoise(self, s: SamplerState, x, sigma):
        return s.task.complete(s.D(x, sigma))  # M ⊙ y + M̄ ⊙ x̂0
