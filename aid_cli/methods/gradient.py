"""Plumbing shared by the methods that backpropagate through the denoiser at the step's start (DPS, MCG, GradPaint).

Their gradient is ∇_{x_n} of a loss on D(x_n; σ_n), the very evaluation the Heun step makes first. So `pre_step` makes
x_n a leaf that requires grad, `denoise` keeps the autograd graph of that one evaluation (and hands the Heun step a
detached copy), every other evaluation runs without a graph, and `post_step` backpropagates once. Honest count per
image: no extra forward (2N − 1 in all, the Heun step's own) and one backward per step (N in all). `torch.autograd.grad`
differentiates w.r.t. x_n only, so the frozen network's parameters never accumulate `.grad`; the loop detaches x after
every step, so nothing leaks into the next one.

Step sizes act on the EDM state x as method.md writes them. The reference codes apply theirs to a DDPM state x_VP =
x/√(1 + σ²), so their default values transfer only roughly and are meant to be tuned (`aid bench --tune`).
"""

from __future__ import annotations

import torch

from ..sampling.heun import Method, SamplerState


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension: [B, …] → [B]."""
    return t.flatten(1).sum(1)


def residual_norm(s: SamplerState, denoised: torch.Tensor) -> torch.Tensor:
    """‖y − M ⊙ D‖₂ per image (unsquared), = ‖M ⊙ (y − D)‖₂ since y = M ⊙ y; its gradient at a zero residual is 0."""
    return torch.linalg.vector_norm((s.task.M * (s.task.y - denoised)).flatten(1), dim=1)


class GradientAtStart(Method):
    """Base for methods whose correction is ∇_{x_n} of a loss on D(x_n; σ_n), reusing the Heun step's evaluation."""

    needs_grad = True

    def pre_step(self, s: SamplerState, n: int, x):
        x = x.detach().requires_grad_(True)
        s.extras["x_n"] = x
        return x

    def denoise(self, s: SamplerState, x, sigma):
        if x is s.extras.get("x_n"):  # the step's start: keep the graph for the gradient
            s.extras["D_n"] = s.D(x, sigma)
            return s.extras["D_n"].detach()
        with torch.no_grad():
            return s.D(x, sigma)

    def start_gradient(self, s: SamplerState, loss_fn) -> torch.Tensor:
        """∇_{x_n} of loss_fn(D(x_n; σ_n)) (a per-image loss [B]): one backward pass through the network."""
        x, denoised = s.extras.pop("x_n"), s.extras.pop("D_n")
        (g,) = torch.autograd.grad(loss_fn(denoised).sum(), x)
        s.backward += 1
        return g
