"""The costs and the actor's and critic's losses of AID training (method.md §4–§6, Algorithm 1).

Costs, means over the d = C·H·W entries of a state (as ℓ):
  running   r_n = (β/2)(‖a_n‖²/d − γ_n)·Δt  (eq. 5, centred: E[r_n] = (β/2)·mean(μ_n²)·Δt)
  terminal  ℓ(X_N) = (λ_vis/2)·mean(M ⊙ (X_N − x0))² + (λ_hole/2)·mean(M̄ ⊙ (X_N − x0))²   (eq. 2),
            + λ_lpips·LPIPS and λ_ssim·(1 − SSIM) of the completed image, + λ_tex·texture match and λ_gram·Gram
            distance of its hole (options beyond the paper: terminal_cost, texture.py).
log π is the true Gaussian log-density (a sum over entries), up to its constant.

The actor's gradient, by estimator:
  backprop  J's exact gradient (the default; the paper's "supervised proxy" ablation, alias `proxy`): no critic, no
            sampled actions; backpropagate ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt through the whole deterministic frozen
            solve. The dynamics are deterministic and known, so this is J's true gradient for the sampled tasks.
  score     eq. 11: descend Σ_n sg(Â_n)·log π_φ(a_n | t_n, X_n), Â_n the TD residual
            δ_n = V_θ(t_{n+1}, X_{n+1}) − V_θ(t_n, X_n) + r_n (V_θ(T, X_N) = ℓ(X_N)) or its λ-return.
  pathwise  a one-step pathwise gradient through the critic (method.md §6's variant, DDPG/SVG(0)-style): the control
            enters the step additively, X_{n+1} = Heun(X_n) + a_n·Δt, so with X̂_{n+1} = X_{n+1} − a_n·Δt descend
            Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, X̂_{n+1} + μ_n·Δt), V_θ(T, ·) = ℓ, the critic's weights held fixed.
The critic (score and pathwise): eq. 10's semi-gradient TD, V_θ(t_n, X_n) regressing on sg(V_n + Â_n).
"""

from __future__ import annotations

import torch

from ..metrics.quality import ssim_01
from ..task import Task
from .config import TrainConfig
from .networks import Actor
from .rollout import differentiable_solve
from .texture import gram_cost, texture_cost


def terminal_loss(x: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, lambda_vis: float, lambda_hole: float):
    """ℓ(x; x0, M) per image, means over all entries (eq. 2)."""
    err2 = (x - x0) ** 2
    return (lambda_vis / 2) * (M * err2).mean(dim=(1, 2, 3)) + (lambda_hole / 2) * ((1 - M) * err2).mean(dim=(1, 2, 3))


def terminal_cost(cfg: TrainConfig, x: torch.Tensor, x0: torch.Tensor, task: Task, lpips=None) -> torch.Tensor:
    """The run's terminal cost per image: ℓ of eq. 2, plus, with --lambda-lpips / --lambda-ssim (options beyond the
    paper, which the theory allows: any terminal cost g(X_N) of the final state), λ_lpips·LPIPS(M ⊙ y + M̄ ⊙ x, x0),
    the perceptual distance of the completed image, and λ_ssim·(1 − SSIM(M ⊙ y + M̄ ⊙ x, x0)), its structural
    dissimilarity (the SSIM aid reports, `metrics.quality.ssim_01`). The L2 terms alone reward the smooth mean of the
    plausible fills. --lambda-texture / --lambda-gram add λ_tex·log²((T(x̂) + ε)/(T(x0) + ε)), the completed image's
    hole texture against the truth's, and λ_gram·the relative Gram distance of the LPIPS trunk's features around
    the hole (texture.py): terms that reward the truth's texture rather than closeness to it."""
    ell = terminal_loss(x, x0, task.M, cfg.lambda_vis, cfg.lambda_hole)
    if cfg.lambda_lpips:
        if lpips is None:
            raise ValueError("lambda_lpips > 0 needs the LPIPS model")
        ell = ell + cfg.lambda_lpips * lpips(task.complete(x), x0)
    if cfg.lambda_ssim:
        ell = ell + cfg.lambda_ssim * (1 - ssim_01(task.complete(x), x0))
    if cfg.lambda_texture:
        ell = ell + cfg.lambda_texture * texture_cost(task.complete(x), x0, task.M)
    if cfg.lambda_gram:
        if lpips is None:
            raise ValueError("lambda_gram > 0 needs the LPIPS model (its AlexNet trunk)")
        ell = ell + cfg.lambda_gram * gram_cost(lpips, task.complete(x), x0, task.M)
    return ell


def exploration_gammas(cfg: TrainConfig, sigmas: torch.Tensor, N: int) -> torch.Tensor:
    """γ_n [N] of the Gaussian policy N(μ_n, γ_n I): γ (constant, the paper) or γ·c_u(σ_n)² (`--explore scaled`)."""
    s = sigmas[:N].to(torch.float32)
    return cfg.gamma * (Actor.output_scale(s) ** 2 if cfg.explore == "scaled" else torch.ones_like(s))


def log_policy(A: torch.Tensor, mu: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """log π_φ(a_n | t_n, X_n) [N, B] up to a constant: −‖a_n − μ_n‖²/(2γ_n), summed over entries (the Gaussian's
    true log-density less its normaliser, which does not depend on φ)."""
    return -((A - mu) ** 2).sum(dim=(2, 3, 4)) / (2 * gammas.to(A.device)[:, None])


def lambda_advantages(delta: torch.Tensor, lam: float) -> torch.Tensor:
    """Â_n = Σ_{k≥n} λ^{k−n} δ_k over the steps (dim 0; no discount: the horizon is finite). λ = 0 gives the TD(0)
    residual δ_n of eq. 11; λ = 1 the Monte-Carlo advantage G_n − V_n, G_n = Σ_{k≥n} r_k + ℓ(X_N) (telescoping sum)."""
    adv = torch.zeros_like(delta)
    running = torch.zeros_like(delta[0])
    for n in reversed(range(delta.shape[0])):
        running = delta[n] + lam * running
        adv[n] = running
    return adv


def critic_values(critic, sig, X, M, y, x0, D) -> torch.Tensor:
    """V_θ(t_n, X_n) for flattened [N·B] states; the privileged critic also reads x0 and D(X_n; σ_n)."""
    if getattr(getattr(critic, "module", critic), "privileged", False):
        return critic(sig, X, M, y, x0, D)
    return critic(sig, X, M, y)


def actor_critic_losses(cfg: TrainConfig, actor, critic, X, A, X_N, x0, task: Task, sigmas, D=None,
                        lpips=None, estimators: tuple[str, ...] | None = None) -> dict:
    """The TD residuals, the advantages and both losses of one batch of rollouts (eqs. 5, 10, 11).

    Running costs r_n = (β/2)(mean(a_n²) − γ_n)·Δt: centred exactly, E[r_n] = (β/2)·mean(μ_n²)·Δt.
    Critic: V_θ(t_n, X_n) regresses on the λ-return sg(V_n + Â_n) (λ = 0: the semi-gradient TD(0) of eq. 10).
    Actor: eq. 11 with Â_n in place of δ_n (λ = 0: exactly eq. 11), optionally normalised over the batch.
    `per_task` holds each of `estimators`' actor loss per task (default: the run's own; pathwise needs a plain critic)."""
    estimators = estimators or ((cfg.estimator,) if cfg.estimator in ("score", "pathwise") else ("score",))
    N, B = X.shape[:2]
    dt = 1.0 / N
    M, y = task.M, task.y
    flat = lambda t: t.reshape(N * B, *t.shape[2:])  # noqa: E731
    rep = lambda t: t.unsqueeze(0).expand(N, *t.shape).reshape(N * B, *t.shape[1:])  # noqa: E731
    sig = sigmas[:N].to(X.device).repeat_interleave(B)
    gammas = exploration_gammas(cfg, sigmas, N).to(X.device)
    r = (cfg.beta / 2) * ((A ** 2).mean(dim=(2, 3, 4)) - gammas[:, None]) * dt  # [N, B]
    ell = terminal_cost(cfg, X_N, x0, task, lpips)  # [B]
    V = critic_values(critic, sig, flat(X), rep(M), rep(y), rep(x0), None if D is None else flat(D)).reshape(N, B)
    V_next = torch.cat([V[1:].detach(), ell[None]], dim=0)
    delta = V_next - V + r
    adv = lambda_advantages(delta.detach(), cfg.td_lambda)
    critic_loss = 0.5 * ((V.detach() + adv - V) ** 2).sum(0).mean()
    mu = actor(sig, flat(X), rep(M), rep(y), denoised=flat(D) if actor_reads_denoised(actor) else None).reshape(A.shape)
    weight = adv
    if cfg.normalize_advantage:
        weight = (adv - adv.mean()) / adv.std().clamp_min(1e-12)
    per_task = {}
    if "score" in estimators:  # eq. 11: Σ_n sg(Â_n)·log π_φ(a_n | t_n, X_n)
        per_task["score"] = (weight * log_policy(A, mu, gammas)).sum(0)
    if "pathwise" in estimators:
        per_task["pathwise"] = pathwise_actor_loss(cfg, critic, X, A, X_N, mu, x0, task, sigmas, lpips)
    target = V.detach() + adv  # what V_θ(t_n, X_n) regresses on; explained variance = 1 − var(Â)/var(target)
    return {"critic_loss": critic_loss, "actor_loss": per_task[estimators[0]].mean(), "per_task": per_task,
            "delta": delta.detach(), "terminal": ell.detach(),
            "energy": (A ** 2).mean(dim=(2, 3, 4)).sum(0).mul(dt).detach(), "V0": V[0].detach(),
            "critic_ev": (1 - adv.var() / target.var().clamp_min(1e-12)).item()}


def actor_reads_denoised(actor) -> bool:
    return getattr(getattr(actor, "module", actor), "denoised_input", False)


def _frozen(net):
    """`net` as a function of its input only: its weights enter as constants (no gradient to them, DDP or not)."""
    module = getattr(net, "module", net)
    params = {k: v.detach() for k, v in module.named_parameters()}
    return lambda *args: torch.func.functional_call(module, params, args)


def pathwise_actor_loss(cfg: TrainConfig, critic, X, A, X_N, mu, x0, task: Task, sigmas, lpips=None) -> torch.Tensor:
    """Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, X̂_{n+1} + μ_n·Δt), V_θ(T, ·) = ℓ; per task [B] (estimator pathwise)."""
    N, B = X.shape[:2]
    dt = 1.0 / N
    X_next_hat = torch.cat([X[1:], X_N[None]]) - A * dt  # Heun(X_n): the step without its control
    X_next = X_next_hat + mu * dt
    V = _frozen(critic)
    values = [V(sigmas[n + 1].to(X.device).expand(B), X_next[n], task.M, task.y) for n in range(N - 1)]
    values.append(terminal_cost(cfg, X_next[-1], x0, task, lpips))
    running = (cfg.beta / 2) * (mu ** 2).mean(dim=(2, 3, 4)) * dt
    return (running + torch.stack(values)).sum(0)


def backprop_loss(cfg: TrainConfig, backbone, actor, task: Task, x0, generators, lpips=None,
                  steps: int | None = None) -> dict:
    """J of the sampled tasks, ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt (eqs. 2, 5 with γ = 0), through the whole deterministic
    solve, backbone included: its gradient is J's exact gradient (estimator backprop). `steps`: N of the solve
    (default cfg.steps)."""
    X_N, E = differentiable_solve(backbone, actor, task, steps or cfg.steps, generators, recompute=cfg.recompute,
                                  churn=cfg.churn)
    ell = terminal_cost(cfg, X_N, x0, task, lpips)
    J = ell + (cfg.beta / 2) * E
    return {"actor_loss": J.mean(), "per_task": J, "terminal": ell.detach(), "energy": E.detach()}
