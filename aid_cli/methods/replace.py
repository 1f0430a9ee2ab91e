"""Replacement (score-SDE "combine-noisy"), method.md §10.

After every step the visible region is replaced by the observation noised to the new level:
    x_{n+1} ← M ⊙ (y + σ_{n+1}·ε) + M̄ ⊙ x_{n+1},   ε ~ N(0, I) fresh each step.
"""

from ..sampling.heun import Method, SamplerState
from .base import register


@register
class Replacement(Method):
    name = "replace"

    def post_step(self, s: SamplerState, n: int, x, x_next):
        M, y = s.task.M, s.task.y
        sigma_next = s.sigmas[n + 1]
        known = y + sigma_next * s.randn_like(x_next) if sigma_next > 0 else y
        return M * known + (1 - M) * x_next
