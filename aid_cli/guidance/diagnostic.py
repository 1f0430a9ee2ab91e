"""The gradient diagnostic (--diag-every): how well each estimator's actor gradient points along J's exact one."""

from __future__ import annotations

import torch

from ..sampling.heun import sample_generators
from ..task import Task
from .config import TrainConfig
from .losses import actor_critic_losses, backprop_loss
from .rollout import rollout


def _grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    """∇_φ loss, flattened (parameters the loss does not reach count as zeros); the graph is kept for more calls."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-30))


def gradient_diagnostic(cfg: TrainConfig, backbone, actor, critic, task: Task, x0, seed: int, sigmas, lpips=None,
                        sizes=None, actor_critic: bool = True) -> dict:
    """How well each estimator's actor gradient points along J's exact gradient, on the same tasks and initial noise.

    g*_k: the backprop gradient of J over the first k tasks (deterministic solve); ĝ_k: an estimator's gradient over
    the first k tasks' sampled rollouts (score, eq. 11 with this run's exploration, critic and advantages; pathwise
    with a plain critic). Returns diag_cos_{estimator}_b{k} = cos(ĝ_k, g*_k) and diag_cos_backprop_b{k} =
    cos(g*_k, g*_B) (how far k tasks' exact gradient already is from the whole batch's) for k = 1, 2, 4, …, B.
    Nothing accumulates into the optimisers' gradients. Cost: one backprop solve and one rollout of B tasks."""
    B = x0.shape[0]
    sizes = sizes or [k for k in (2 ** i for i in range(20)) if k < B] + [B]
    params = [p for p in actor.parameters()]
    exact = backprop_loss(cfg, backbone, actor, task, x0, sample_generators(seed, B), lpips)["per_task"]
    g_star = {k: _grad(exact[:k].mean(), params) for k in sizes}
    rec = {f"diag_cos_backprop_b{k}": _cos(g_star[k], g_star[B]) for k in sizes}
    rec["diag_exact_grad_norm"] = float(g_star[B].norm())
    if not actor_critic:  # a backprop run trains no critic: only the exact gradients' agreement across batch sizes
        return rec
    with torch.no_grad():
        X, A, X_N, D = rollout(backbone, actor, task, cfg.steps, cfg.gamma, sample_generators(seed, B),
                               cfg.explore == "scaled")
    privileged = getattr(critic, "privileged", False)
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, sigmas, D, lpips,
                              estimators=("score",) if privileged else ("score", "pathwise"))
    for name, per_task in out["per_task"].items():
        for k in sizes:
            rec[f"diag_cos_{name}_b{k}"] = _cos(_grad(per_task[:k].mean(), params), g_star[k])
    return rec

