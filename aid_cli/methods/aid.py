"""AID: the learned guidance field u = μ_φ(t, x; ξ) added to the frozen backbone's drift (eq. 1, method.md §3–§5).

    X_{n+1} = Heun(X_n, σ_n → σ_{n+1}) + a_n·Δt,    Δt = 1/N,
    a_n = μ_φ(σ_n, X_n; M, y)                   at deployment (the policy's mean, Theorems 3.2/3.3),
    a_n = μ_φ(σ_n, X_n; M, y) + √γ_n·ε_n         in training rollouts (Gaussian policy N(μ, γ_n I)),

with γ_n = γ (the paper's constant temperature) or, with `scaled` exploration, γ_n = γ·c_u(σ_n)²: the noise is added in
the actor's output units, before its scale c_u(σ) = √(σ² + σ_data²) (guidance/networks.py), so the score-function
weight (a_n − μ_n)/γ_n·∇μ_n = ε_n/√γ·∇F_n is the same at every noise level.

With `churn` (EDM's S_churn, sampling/heun.py `Churn`) the solve is stochastic: before each step fresh noise lifts
X_n to σ̂_n = (1 + γ_n)σ_n and the actor reads σ̂_n; a module trained with churn (`aid train --churn`) records it and
is deployed with it unless `--churn` says otherwise. Each sample's noise comes from its own seed.

Nothing else changes: no replacement, no gradients through the backbone; visible pixels are pasted back at the end like
every method. The actor sees σ, not n, so one module serves N = 18 (35 NFE) and N = 12 (23 NFE).

The actor's conditioning stem reads only the task ξ = (M, y), which is fixed along a solve: without gradients it runs
once per solve, not once per step (same numbers, a third less actor compute). An actor built with `denoised_input`
also reads the step's own D(X_n; σ_n) (guidance/networks.py), which the Heun step has already computed.

On CPU, without gradients, the actor runs in channels-last layout (a copy of it, made per solve; its inputs converted,
its field returned as NCHW): oneDNN's NCHW kernels are slow for convolutions this narrow (16 channels). The backbone
and the solve's own tensors stay as they are; the numbers agree to float rounding.
"""

from __future__ import annotations

import copy
import math

import torch

from ..sampling.heun import Churn, Method, SamplerState
from .base import register


@register
class AID(Method):
    """Amortized guidance: a small learned actor steers the ODE (needs a guidance module for the backbone)."""

    name = "aid"

    def __init__(self, actor, gamma: float = 0.0, scaled_exploration: bool = False, churn=None):
        self.actor = actor  # μ_φ: a loaded guidance module (resolve.py finds, checks and loads the file)
        self.gamma = gamma  # exploration temperature γ; 0 = deterministic (deployment)
        self.scaled_exploration = scaled_exploration  # γ_n = γ·c_u(σ_n)² instead of γ
        self.churn = Churn.of(churn)  # S_churn (a number or Churn.record()); None / 0: the deterministic ODE
        self._solve = None

    def setup(self, s: SamplerState) -> None:
        self.actor.to(s.device)
        self._solve = None  # without gradients: what stays fixed along this solve (`_deployed`, at the first step)

    def drift(self, s: SamplerState, n: int, x: torch.Tensor, denoised: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(1)  # the noise level the step starts from (σ_n, σ̂_n under churn), shared by the batch
        D = denoised if self.actor.denoised_input else None  # D(x_n; σ_n) of this step, for actors that read it
        if torch.is_grad_enabled():  # backprop training: the stem stays in each step's graph
            a = self.actor(sigma, x, s.task.M, s.task.y, None, D)
        else:
            a = self._deployed(sigma, x, s.task.M, s.task.y, D)
        if self.gamma > 0:
            a = a + self.exploration_std(sigma[0]) * s.randn_like(x)
        return a

    def _deployed(self, sigma, x, M, y, D) -> torch.Tensor:
        """μ_φ without gradients. Once per solve: the actor in the layout it runs in (a channels-last copy on CPU,
        module docstring), the task (M, y) in that layout and the task's part of its first layer."""
        if self._solve is None:
            layout = torch.channels_last if x.device.type == "cpu" and x.dim() == 4 else torch.contiguous_format
            actor = copy.deepcopy(self.actor).to(memory_format=layout) if layout is torch.channels_last else self.actor
            M, y = M.contiguous(memory_format=layout), y.contiguous(memory_format=layout)
            self._solve = (actor, layout, M, y, actor.condition(M, y))
        actor, layout, M, y, cond = self._solve
        x, D = (t if t is None else t.contiguous(memory_format=layout) for t in (x, D))
        return actor(sigma, x, M, y, cond, D).contiguous()

    def exploration_std(self, sigma: torch.Tensor) -> torch.Tensor:
        """√γ_n of the policy at noise level σ (a scalar tensor)."""
        scale = self.actor.output_scale(sigma) if self.scaled_exploration else torch.ones_like(sigma)
        return math.sqrt(self.gamma) * scale
