"""Oracles for sanity (method.md §10; GradPaint's COPY and GREYFILL): no network, no sampling, 0 NFE.

- `copy`: the completed image is the ground truth (LPIPS 0). It needs x0, which no method ever sees: only the benchmark
  puts it in `SamplerState.extras["x0"]` (`sample(..., extras={"x0": x0})`).
- `greyfill`: the hole is filled with grey, 0 in [−1, 1].

Both go through `finish`, so the visible pixels are y exactly.
"""

import torch

from ..errors import UserError
from ..sampling.heun import Method, SamplerState
from .base import register


@register
class Copy(Method):
    """Oracle: the ground truth itself (needs x0; only `aid bench` has it)."""

    name = "copy"
    oracle = True
    sees_truth = True

    def fill(self, s: SamplerState) -> torch.Tensor:
        if "x0" not in s.extras:
            raise UserError("copy is an oracle: it needs the ground truth, which only `aid bench` has")
        return s.extras["x0"]


@register
class GreyFill(Method):
    """Oracle: the hole filled with grey (0 in [−1, 1])."""

    name = "greyfill"
    oracle = True

    def fill(self, s: SamplerState) -> torch.Tensor:
        return torch.zeros_like(s.task.y)
