"""Replacement (score-SDE "combine-noisy"), method.md §10.

After every step the visible region is replaced by the observation noised to the new level:
    x_{n+1} ← M ⊙ (y + σ_{n+1}·ε) + M̄ ⊙ x_{n+1},   ε ~ N(0, I) fresh each step.
"""

from ..sampling.heun import Method, SamplerState
from .base import register


def replace_known(s: SamplerState, x, sigma):
    """M ⊙ (y + σ·ε) + M̄ ⊙ x with fresh per-sample ε (no noise, and no draw, at σ = 0). Shared with MCG and RePaint."""
    M, y = s.task.M, s.task.y
    known = y + sigma * s.randn_like(x) if sigma > 0 else y
    return M * known + (1 - M) * x


@register
class Replacement(Method):
    name = "replace"

    def post_step(self, s: SamplerState, n: int, x, x_next):
        return replace_known(s, x_next, s.sigmas[n + 1])
