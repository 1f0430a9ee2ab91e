"""CoPaint (Zhang et al. 2023, UCSB-NLP-Chang/CoPaint), method.md §10: before each step, G gradient steps on x_n itself.

Before the step σ_n → σ_{n+1}, from x° = x_n, G times (the reference's `O_DDIMSampler.p_sample`):

    L(x) = ‖M ⊙ (y − D(x; σ_n))‖² + λ_n·‖x − x°‖²        (sums over pixels, per image: masked error of x̂0 + proximity)
    x ← x − η_n·∇_x L(x)

then the ordinary Heun step from the optimised x, reusing its evaluation D(x; σ_n). No replacement. Reference defaults
(configs/celebahq.yaml, imagenet.yaml; 250 DDPM steps): G = 2, lr = 0.02, λ = 1e-4, both growing per step:

    η_n = lr·1.012^k·√ᾱ(σ_n),  λ_n = λ·1.01^k,   ᾱ(σ) = 1/(1 + σ²),  k = 250·n/N

(`lr_xt_decay`, `coef_xt_reg_decay`, `use_smart_lr_xt_decay`; k counts the reference's steps taken, read on our grid so
the total growth over a trajectory is the reference's, 1.012^250 ≈ 20 and 1.01^250 ≈ 12). Adaptive step
(`use_adaptive_lr_xt`, on): a trial whose loss does not decrease, or is NaN, is retried with η ← 0.8·η, and the shrunken
η holds for the rest of the step. Here per image (the reference compares the batch's summed loss) and with at most
`max_backtracks` retries, after which the last trial is kept (the reference retries without bound). Deviations: x̂0 is
not clamped to [−1, 1] (the EDM sampler never clamps; the reference's clip_denoised also zeroes the gradient wherever
the estimate overshoots), and the DDIM update is the Heun step. The rule is applied to the EDM state; the reference's
state is x/√(1 + σ²) (see gradient.py): tune lr. Time travel (CoPaint-TT, off by default): the RePaint schedule
(repaint.jump_schedule) with the reference's jump_length = 10, jump_n_sample = 2, without its extra optimisation before
each travel back (`optimize_before_time_travel`).

Counting: every trial point costs one forward, kept with its graph so that an accepted point's evaluation also gives the
next gradient and the Heun step's D(x; σ_n) (the reference evaluates an accepted point twice, without and with the
graph); every gradient one backward. NFE = (G + 2)·N − 1 + retries, backward = G·N; lr = 0 is exactly `unguided`, at
that cost.
"""

from __future__ import annotations

import math

import torch

from ..sampling.heun import Method, SamplerState
from .base import register
from .gradient import per_sample
from .repaint import jump_schedule


@register
class CoPaint(Method):
    name = "copaint"
    needs_grad = True

    def __init__(self, lr: float = 0.02, iterations: int = 2, reg: float = 1e-4, lr_growth: float = 1.012,
                 reg_growth: float = 1.01, reference_steps: int = 250, adaptive: bool = True, max_backtracks: int = 20,
                 time_travel: bool = False, jump_length: int = 10, jump_n_sample: int = 2):
        self.lr, self.iterations, self.reg = float(lr), int(iterations), float(reg)
        self.lr_growth, self.reg_growth, self.reference_steps = float(lr_growth), float(reg_growth), reference_steps
        self.adaptive, self.max_backtracks = bool(adaptive), int(max_backtracks)
        self.time_travel, self.jump_length, self.jump_n_sample = bool(time_travel), jump_length, jump_n_sample

    def schedule(self, num_steps: int):
        if self.time_travel:
            return jump_schedule(num_steps, self.jump_length, self.jump_n_sample)
        return range(num_steps + 1)

    def expected_nfe(self, num_steps: int) -> int:
        """(G + 2)·N − 1 on the plain grid: G more forwards per step than Heun; retries (adaptive) come on top."""
        order = list(self.schedule(num_steps))
        steps = sum(1 for a, b in zip(order[:-1], order[1:]) if b == a + 1)
        return super().expected_nfe(num_steps) + self.iterations * steps

    def _evaluate(self, s: SamplerState, x, origin, sigma, reg: float):
        """A trial point: (x as a grad leaf, D(x; σ) with its graph, L(x) per image). One forward."""
        x = x.detach().requires_grad_(True)
        denoised = s.D(x, sigma)
        loss = per_sample((s.task.M * (s.task.y - denoised)) ** 2) + reg * per_sample((x - origin) ** 2)
        return x, denoised, loss

    def pre_step(self, s: SamplerState, n: int, x):
        sigma = s.sigmas[n]
        k = self.reference_steps * n / s.num_steps
        eta = self.lr * self.lr_growth ** k / math.sqrt(1 + float(sigma) ** 2)
        lr = torch.full((x.shape[0],) + (1,) * (x.ndim - 1), eta, device=x.device, dtype=x.dtype)
        reg = self.reg * self.reg_growth ** k
        origin = x.detach()
        x, denoised, loss = self._evaluate(s, origin, origin, sigma, reg)
        for _ in range(self.iterations):
            (g,) = torch.autograd.grad(loss.sum(), x)
            s.backward += 1
            for retry in range(self.max_backtracks + 1):
                trial = self._evaluate(s, x - lr * g, origin, sigma, reg)
                better = torch.isfinite(trial[2]) & (trial[2] <= loss)
                if not self.adaptive or bool(better.all()) or retry == self.max_backtracks:
                    break
                lr = torch.where(better.view(-1, *([1] * (lr.ndim - 1))), lr, 0.8 * lr)
            x, denoised, loss = trial
        s.extras["x_n"], s.extras["D_n"] = x.detach(), denoised.detach()
        return s.extras["x_n"]

    def denoise(self, s: SamplerState, x, sigma):
        if x is s.extras.get("x_n"):  # the optimised start: its evaluation is already paid for
            del s.extras["x_n"]
            return s.extras.pop("D_n")
        with torch.no_grad():
            return s.D(x, sigma)
