"""RePaint (Lugmayr et al. 2022), method.md §10: replacement before every denoising step, plus time travel up the grid.

Before every step σ_n → σ_{n+1} the known region is replaced by the observation at the step's level,
    x_n ← M ⊙ (y + σ_n·ε) + M̄ ⊙ x_n,   ε fresh,
and the schedule walks back up the grid now and then; going from index a to a − 1 the loop re-noises
x ← x + √(σ_{a−1}² − σ_a²)·z, the EDM form of undoing one DDPM step.

The schedule is the reference's `get_schedule_jump` on grid levels t = N − n (t = 0 is σ = 0): walking down, on reaching
a level j that is a multiple of `jump_length` it goes back up `jump_length` levels, one at a time, and down again, until
it has passed j `jump_n_sample` times. One change: the reference allows jump levels j < N − jump_length, we allow
j ≤ N − jump_length (a jump may go back up to σ_max), so that every step can be resampled. Then the defaults,
`jump_length=1, jump_n_sample=10`, do every step σ_n → σ_{n+1} ten times (n → n+1 → n → n+1 …, ten forward moves), then
go on. That is the paper's budget, "10 resamplings of the 35-NFE base": NFE = 10·(2N − 1) = 350 at N = 18 (a Heun step
costs 2 NFE, the final Euler step 1). The reference's 10/10 are for DDPM's 250 steps; on the 18-step grid they give a
single jump point (σ = 0, back up to σ_8 ≈ 3.3, nine times): 206 NFE, spent on the low-noise half only. In general
NFE = Σ over the forward moves n → n+1 of (2 if n < N − 1 else 1).
"""

from __future__ import annotations

from ..sampling.heun import Method, SamplerState
from .base import register
from .replace import replace_known


def jump_schedule(num_steps: int, jump_length: int = 1, jump_n_sample: int = 10) -> list[int]:
    """RePaint's time-travel schedule as the grid indices the loop visits: starts at 0, ends at N, moves by ±1."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be at least 1")
    N = num_steps
    jumps = {j: jump_n_sample - 1 for j in range(0, N - jump_length + 1, jump_length)}
    t, levels = N, [N]
    while t >= 1:
        t -= 1
        levels.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                levels.append(t)
    return [N - t for t in levels]


@register
class RePaint(Method):
    name = "repaint"

    def __init__(self, jump_length: int = 1, jump_n_sample: int = 10):
        self.jump_length, self.jump_n_sample = int(jump_length), int(jump_n_sample)

    def schedule(self, num_steps: int):
        return jump_schedule(num_steps, self.jump_length, self.jump_n_sample)

    def pre_step(self, s: SamplerState, n: int, x):
        return replace_known(s, x, s.sigmas[n])
