"""The estimators' losses (guidance/losses.py) and the rollouts they read (guidance/rollout.py): the policy's
log-density, TD residuals and λ-returns, the pathwise and backprop losses, and the sampler hook they go through."""

import numpy as np
import pytest
import torch

from aid_cli.guidance.config import TrainConfig
from aid_cli.guidance.losses import (actor_critic_losses, backprop_loss, exploration_gammas, lambda_advantages,
                                     log_policy, terminal_cost, terminal_loss)
from aid_cli.guidance.networks import Actor, Critic, PrivilegedCritic
from aid_cli.guidance.rollout import Trajectory, rollout
from aid_cli.methods import get_method
from aid_cli.methods.aid import AID
from aid_cli.sampling.heun import SamplerState, edm_sigmas, heun_step, sample, sample_generators
from aid_cli.task import Task

from .guidance_helpers import tiny_task


def test_log_prob_gradient_matches_autograd():
    """∇_φ log π(a|x) = ((a − μ)/γ)·∇_φ μ: the surrogate the trainer descends has exactly that gradient."""
    torch.manual_seed(0)
    actor = Actor(width=8).double()
    torch.nn.init.normal_(actor.out.weight, std=0.1)
    task, x = tiny_task(n=1)
    task, x = Task(y=task.y.double(), M=task.M.double()), x.double()
    sigma, gamma = torch.tensor([1.5], dtype=torch.float64), 0.3
    with torch.no_grad():
        a = actor(sigma, x, task.M, task.y) + gamma ** 0.5 * torch.randn_like(x)
    mu = actor(sigma, x, task.M, task.y)
    log_pi = -((a - mu) ** 2).sum() / (2 * gamma)
    g_auto = torch.autograd.grad(log_pi, list(actor.parameters()))
    mu = actor(sigma, x, task.M, task.y)
    g_formula = torch.autograd.grad(mu, list(actor.parameters()), grad_outputs=(a - mu.detach()) / gamma)
    for ga, gf in zip(g_auto, g_formula):
        assert torch.allclose(ga, gf, atol=1e-10, rtol=1e-10)
    # and the true Gaussian log-density differs from the surrogate only by a constant
    dist = torch.distributions.Normal(mu.detach(), gamma ** 0.5)
    const = dist.log_prob(a).sum() - (-((a - mu.detach()) ** 2).sum() / (2 * gamma))
    assert torch.isclose(const, torch.tensor(-0.5 * a.numel() * np.log(2 * np.pi * gamma), dtype=const.dtype), rtol=1e-5)


def test_td_residuals_use_terminal_target(tiny_net):
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, gamma=0.1)
    actor, critic = Actor(width=8), Critic(width=8)
    X, A, X_N, _ = rollout(tiny_net, actor, task, 3, cfg.gamma, sample_generators(0, 2))
    assert X.shape == (3, 2, 3, 16, 16) and A.shape == X.shape
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, edm_sigmas(3))
    with torch.no_grad():
        V = torch.stack([critic(edm_sigmas(3)[n].expand(2), X[n], task.M, task.y) for n in range(3)])
    r = 0.25 * ((A ** 2).mean(dim=(2, 3, 4)) - 0.1) / 3
    # the last residual closes on ℓ(X_N), the others on the next state's value
    assert torch.allclose(out["delta"][-1], out["terminal"] - V[-1] + r[-1], atol=1e-5)
    assert torch.allclose(out["delta"][0], V[1] - V[0] + r[0], atol=1e-5)


def test_pathwise_actor_loss_is_the_one_step_cost_to_go(tiny_net):
    """pathwise: Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, Heun(X_n) + μ_n·Δt), ℓ at the end; no gradient to the critic."""
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, gamma=0.1, estimator="pathwise")
    torch.manual_seed(0)
    actor, critic = Actor(width=8), Critic(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    sig = edm_sigmas(3)
    X, A, X_N, _ = rollout(tiny_net, actor, task, 3, cfg.gamma, sample_generators(0, 2))
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, sig)
    with torch.no_grad():  # the same quantity, written out step by step from a fresh deterministic step
        mu = [actor(sig[n].expand(2), X[n], task.M, task.y) for n in range(3)]
        nxt = [X[1], X[2], X_N]
        total = 0
        for n in range(3):
            x_hat = nxt[n] - A[n] / 3 + mu[n] / 3
            v = (critic(sig[n + 1].expand(2), x_hat, task.M, task.y) if n < 2
                 else 1.0 * (task.M * (x_hat - x0) ** 2).mean(dim=(1, 2, 3))
                 + 0.5 * ((1 - task.M) * (x_hat - x0) ** 2).mean(dim=(1, 2, 3)))
            total = total + 0.25 * (mu[n] ** 2).mean(dim=(1, 2, 3)) / 3 + v
    assert torch.allclose(out["actor_loss"], total.mean(), rtol=1e-5)
    out["actor_loss"].backward()
    assert all(p.grad is None for p in critic.parameters())  # the critic is held fixed in the actor's loss
    assert sum(p.grad.abs().sum() for p in actor.parameters() if p.grad is not None) > 0


def test_backprop_differentiates_the_whole_solve(tiny_net):
    """backprop: the loss is ℓ of the deterministic AID solve plus the control energy, and its gradient reaches the
    actor."""
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, estimator="backprop")
    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    out = backprop_loss(cfg, tiny_net, actor, task, x0, sample_generators(0, 2))
    with torch.no_grad():
        ref = sample(tiny_net, task, get_method("aid", actor=actor), num_steps=3, generators=sample_generators(0, 2))
    assert torch.allclose(out["terminal"], terminal_loss(ref.x, x0, task.M, 2.0, 1.0), rtol=1e-5)
    out["actor_loss"].backward()
    assert actor.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_net.parameters())  # the backbone stays frozen


def test_scaled_exploration_log_prob_gradient_matches_autograd(tiny_net):
    """γ_n = γ·c_u(σ_n)²: the trainer's log π (log_policy) has the gradient of the true Gaussian log-density
    N(a_n; μ_n, γ_n I) at every step, and the rollout's noise has that variance (in the actor's output units)."""
    torch.manual_seed(0)
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, gamma=0.05, explore="scaled")
    sigmas = edm_sigmas(3)
    gammas = exploration_gammas(cfg, sigmas, 3).double()
    assert torch.allclose(gammas.float(), 0.05 * (sigmas[:3] ** 2 + 0.25))
    actor = Actor(width=8).double()
    torch.nn.init.normal_(actor.out.weight, std=0.1)
    task, x = tiny_task(n=2)
    M, y, x = task.M.double(), task.y.double(), x.double()
    X = torch.stack([x + s * torch.randn_like(x) for s in sigmas[:3].double()])
    sig = sigmas[:3].double().repeat_interleave(2)
    with torch.no_grad():
        mu0 = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
        A = mu0 + gammas.sqrt()[:, None, None, None, None] * torch.randn_like(mu0)
    mu = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
    ours = torch.autograd.grad(log_policy(A, mu, gammas).sum(), list(actor.parameters()))
    mu = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
    dist = torch.distributions.Normal(mu, gammas.sqrt()[:, None, None, None, None].expand_as(mu))
    auto = torch.autograd.grad(dist.log_prob(A).sum(), list(actor.parameters()))
    for g1, g2 in zip(ours, auto):
        assert torch.allclose(g1, g2, atol=1e-9, rtol=1e-9)
    # the rollout draws a_n − μ_n with standard deviation √γ·c_u(σ_n), as the log-density assumes
    policy = get_method("aid", actor=Actor(width=8), gamma=0.05, scaled_exploration=True)
    assert torch.allclose(policy.exploration_std(sigmas[0]), (0.05 * (80.0 ** 2 + 0.25)) ** 0.5 * torch.ones(()))
    task, _ = tiny_task(n=64)
    trajectory = Trajectory()
    sample(tiny_net, task, policy, num_steps=3, on_step=trajectory)
    noise = trajectory.stacked()[1]  # the actor is zero: a_n is the noise itself
    assert torch.allclose(noise.std(dim=(1, 2, 3, 4)), gammas.float().sqrt(), rtol=0.02)


def test_monte_carlo_returns_are_the_summed_costs(tiny_net):
    """λ = 1: the critic's target at step n is G_n = Σ_{k≥n} r_k + ℓ(X_N), exactly, whatever the critic says; λ = 0
    keeps eq. 10/11's TD(0) residuals."""
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=4, beta=0.5, gamma=0.1, estimator="score", td_lambda=1.0)
    actor, critic = Actor(width=8), Critic(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    X, A, X_N, D = rollout(tiny_net, actor, task, 4, cfg.gamma, sample_generators(0, 2))
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, edm_sigmas(4), D)
    r = 0.25 * ((A ** 2).mean(dim=(2, 3, 4)) - 0.1) / 4
    G = torch.stack([r[n:].sum(0) + out["terminal"] for n in range(4)])
    with torch.no_grad():
        V = torch.stack([critic(edm_sigmas(4)[n].expand(2), X[n], task.M, task.y) for n in range(4)])
    assert torch.allclose(V + lambda_advantages(out["delta"], 1.0), G, atol=1e-5)
    assert torch.allclose(lambda_advantages(out["delta"], 0.0), out["delta"])
    # the critic regresses on G: its loss is ½ Σ_n (G_n − V_n)², batch mean
    assert torch.isclose(out["critic_loss"], 0.5 * ((G - V) ** 2).sum(0).mean(), atol=1e-5)


def test_privileged_critic_starts_at_the_loss_of_the_denoised_estimate():
    task, x0 = tiny_task()
    critic = PrivilegedCritic(width=8, lambda_vis=2.0, lambda_hole=1.0)
    D = x0 + 0.3 * torch.randn_like(x0)
    V = critic(torch.tensor([2.0, 0.5]), x0 + torch.randn_like(x0), task.M, task.y, x0, D)
    assert torch.allclose(V, terminal_loss(D, x0, task.M, 2.0, 1.0))


def test_rollouts_run_the_samplers_own_loop(tiny_net):
    """A training rollout is the deployed sampler's solve with each step recorded by its hook: with γ = 0 its X_N is
    `sample`'s, X_0 is σ_0·z of the same noise, D_n is D(X_n; σ_n) and a_n the actor's field at (σ_n, X_n)."""
    task, _ = tiny_task()
    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    sig = edm_sigmas(3)
    X, A, X_N, D = rollout(tiny_net, actor, task, 3, 0.0, sample_generators(0, 2))
    ref = sample(tiny_net, task, get_method("aid", actor=actor), num_steps=3, generators=sample_generators(0, 2))
    assert X.shape == A.shape == D.shape == (3, 2, 3, 16, 16) and torch.equal(X_N, ref.x)
    z = torch.stack([torch.randn(3, 16, 16, generator=g) for g in sample_generators(0, 2)])
    assert torch.equal(X[0], z * sig[0])
    with torch.no_grad():
        for n in range(3):
            assert torch.equal(D[n], tiny_net(X[n], sig[n].expand(2), None))
            mu = actor(sig[n].reshape(1), X[n], task.M, task.y)  # (the rollout's copy runs channels-last: rounding)
            torch.testing.assert_close(A[n], mu, rtol=1e-5, atol=1e-5 * float(mu.abs().max()))
    assert A.abs().max() > 0


def backprop_loss_by_hand(cfg, backbone, actor, task, x0, generators, steps):
    """J = ℓ(X_N) + (β/2)·Σ_n mean(u_n²)·Δt with the solve written out as a loop of `heun_step` and the energy recorded
    by a subclass of the method: the reference `backprop_loss` (through `sample` and its step hook) must equal."""
    energy = []

    class Recorded(AID):
        def drift(self, s, n, x, denoised, sigma):
            u = super().drift(s, n, x, denoised, sigma)
            energy.append((u ** 2).mean(dim=(1, 2, 3)))
            return u

    s = SamplerState(net=backbone, task=task, sigmas=edm_sigmas(steps), generators=generators)
    policy = Recorded(actor=actor, gamma=0.0)
    x = s.randn_like(task.y) * s.sigmas[0]
    for n in range(steps):
        if cfg.recompute:
            x = torch.utils.checkpoint.checkpoint(heun_step, s, policy, n, x, use_reentrant=False)
        else:
            x = heun_step(s, policy, n, x)
    E = torch.stack(energy).sum(0) * s.dt
    return terminal_cost(cfg, x, x0, task) + (cfg.beta / 2) * E


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("steps", [3, 2])
def test_backprop_loss_and_its_gradient_equal_the_hand_written_solve(recompute, steps, tiny_net):
    """backprop_loss goes through the sampler's own loop with a step hook for the control energy: its loss and its
    gradient in the actor's parameters equal those of the solve written out by hand, with per-step recomputation
    and without, at --steps and at a --mix-steps N; the frozen backbone takes no gradient."""
    for p in tiny_net.parameters():  # the network's output layer starts at zero: perturb it so the solve matters
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, recompute=recompute)
    torch.manual_seed(0)
    actor = Actor(width=8, denoised_input=True)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    params = list(actor.parameters())
    ours = backprop_loss(cfg, tiny_net, actor, task, x0, sample_generators(0, 2), steps=steps)
    ref = backprop_loss_by_hand(cfg, tiny_net, actor, task, x0, sample_generators(0, 2), steps)
    torch.testing.assert_close(ours["per_task"], ref, rtol=1e-6, atol=1e-7)
    g_ours = torch.autograd.grad(ours["actor_loss"], params)
    g_ref = torch.autograd.grad(ref.mean(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in g_ours) > 0
    assert all(p.grad is None for p in tiny_net.parameters())
