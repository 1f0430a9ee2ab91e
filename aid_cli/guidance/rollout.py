"""Training rollouts: solves of the controlled ODE through the sampler's own loop (`sampling.heun.sample`) and the
`aid` method, with a step hook that records what a loss needs.

  rollout             sampled actions a_n = μ_φ(t_n, X_n; ξ) + √γ_n ε_n, no gradient: the states, actions and
                      D(X_n; σ_n) of every step (the actor–critic estimators).
  differentiable_solve  the deterministic solve a_n = μ_φ(t_n, X_n; ξ) kept in autograd's graph, backbone included,
                      with its control energy Σ_n mean(u_n²)·Δt (the backprop estimator).
"""

from __future__ import annotations

import torch

from ..methods.aid import AID
from ..sampling.heun import sample
from ..task import Task
from .config import TrainConfig
from .networks import Actor


class Trajectory:
    """Step hook: (X_n, a_n, D(X_n; σ_n)) of every step, detached."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, n: int, x: torch.Tensor, denoised: torch.Tensor, u: torch.Tensor | None) -> None:
        self.steps.append((x.detach(), u.detach(), denoised.detach()))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X, A, D, each [N, B, ...]."""
        return tuple(torch.stack(parts) for parts in zip(*self.steps))


class ControlEnergy:
    """Step hook: mean(u_n²) per image of every step, in autograd's graph (eq. 5's running cost with γ = 0).

    Written by step index, so a step recomputed in the backward pass (`recompute`) rewrites its own entry."""

    def __init__(self, steps: int):
        self.per_step: list[torch.Tensor | None] = [None] * steps

    def __call__(self, n: int, x: torch.Tensor, denoised: torch.Tensor, u: torch.Tensor | None) -> None:
        self.per_step[n] = (u ** 2).mean(dim=(1, 2, 3))

    def total(self) -> torch.Tensor:
        """Σ_n mean(u_n²)·Δt per image, Δt = 1/N."""
        return torch.stack(self.per_step).sum(0) * (1.0 / len(self.per_step))


def rollout(backbone, actor: Actor, task: Task, steps: int, gamma: float, generators,
            scaled_exploration: bool = False) -> tuple[torch.Tensor, ...]:
    """Sampled-action rollout: (X [N,B,...], A [N,B,...], X_N [B,...], D [N,B,...]), D stacking the steps'
    D(X_n; σ_n) (read by a `denoised_input` actor and by the privileged critic)."""
    trajectory = Trajectory()
    policy = AID(actor=actor, gamma=gamma, scaled_exploration=scaled_exploration)
    result = sample(backbone, task, policy, num_steps=steps, generators=generators, on_step=trajectory)
    X, A, D = trajectory.stacked()
    return X, A, result.x, D


def differentiable_solve(backbone, actor: Actor, task: Task, steps: int, generators,
                         recompute: bool = True, churn: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_N, Σ_n mean(μ_n²)·Δt) of the deterministic AID solve, both differentiable in the actor's parameters through
    every step (the frozen backbone's weights take no gradient). `recompute`: each step's activations are recomputed
    in the backward pass (memory of one step), else all N steps' are kept (a quarter less compute). `churn`: EDM's
    S_churn, its noise drawn from `generators` (reparameterised: the gradient flows through x̂_n = x_n + c_n·ε_n)."""
    energy = ControlEnergy(steps)
    result = sample(backbone, task, AID(actor=actor, churn=churn), num_steps=steps, generators=generators, on_step=energy,
                    differentiable=True, recompute=recompute)
    return result.x, energy.total()


def rollout_steps(cfg: TrainConfig, it: int) -> int:
    """N of the solve of the step taken from `it` completed iterations (so the logged iteration it + 1): `steps`, or
    with --mix-steps M every other one M, so that one module learns both operating points (the actor reads σ, not n:
    aid-18 and aid-12 share it; its field enters as u·Δt, Δt = 1/N)."""
    return cfg.mix_steps if cfg.mix_steps and it % 2 else cfg.steps
