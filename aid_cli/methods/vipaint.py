"""VIPaint (Agarwal et al., seed paper), method.md §10: fit a hierarchical posterior per image, then DPS at low noise.

Phase 1, the fit (once per image, at the start of step n_s): a Gaussian posterior over K noise levels s_1 = σ_e > … >
s_K = σ_s, q(z_1) = N(μ_1, τ_1²), q(z_k | z_{k−1}) = N(γ_k ⊙ m_k(z_{k−1}) + (1 − γ_k) ⊙ μ_k, τ_k²) with m_k the
prior's own DDIM step (paper eqs. 11, 12, in EDM's variance-exploding form), fitted by Adam on a Monte-Carlo estimate
of the β-weighted bound of eq. 13 (a Laplace reconstruction of the visible region at s_K, the diffusion loss above σ_e
(eq. 14) with q(z_1)'s entropy, and the analytic KLs between the levels).

Phase 2: z_K drawn from the fitted posterior replaces x at the grid level s_K = σ_{n_s}; from there the ordinary Heun
loop runs to σ = 0 with the `dps` rule. Steps above the posterior cost nothing (`denoise` returns x without calling the
network). Every network evaluation of both phases is counted:

    NFE      = I·P·(K + 1) + (K − 1) + 2(N − n_s) − 1
    backward = I·P·(K + 1) + (N − n_s)

(I iterations, P particles, N steps; defaults K = 2, I = 50, P = 5, σ_s = 0.6: 764 NFE and 757 backward at N = 18).
All randomness comes from each image's own generator. The derivation, every choice where the paper and its reference
code are vague, and the measurements behind the defaults: docs/vipaint.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..sampling.heun import SamplerState
from .base import register
from .gradient import GradientAtStart, per_sample, residual_norm

RHO = 7.0  # EDM's level spacing, for the levels between σ_e and σ_s
U_LO_FRACTION = 0.01  # u_lo = (σ_e / 100)²: where the diffusion loss's σ-range starts above σ_e


def hierarchy_levels(sigmas: torch.Tensor, levels: int, sigma_e: float, sigma_s: float) -> tuple[int, list[float]]:
    """(n_s, [s_1, …, s_K]): the grid index the loop resumes at, and the posterior's noise levels (s_K = σ_{n_s}).

    n_s is the grid level below σ_e nearest to σ_s in log σ (among 1 … N − 1: at least the final step is left to the
    loop); s_1 = σ_e and the levels in between are the ρ = 7 interpolation. K = 1: the single level σ_{n_s}.
    """
    N = len(sigmas) - 1
    below = [n for n in range(1, N) if float(sigmas[n]) < sigma_e]
    if not below:
        raise ValueError(f"vipaint: no grid level below sigma_e = {sigma_e:g}")
    n_s = min(below, key=lambda n: abs(math.log(float(sigmas[n]) / sigma_s)))
    s_K = float(sigmas[n_s])
    if levels == 1:
        return n_s, [s_K]
    a, b = sigma_e ** (1 / RHO), s_K ** (1 / RHO)
    return n_s, [(a + k / (levels - 1) * (b - a)) ** RHO for k in range(levels)]


def ancestral_std(a: float, b: float) -> float:
    """Standard deviation of the DDPM (ancestral) step σ = a → b in VE form: b·√(a² − b²)/a."""
    return b * math.sqrt(a * a - b * b) / a


@dataclasses.dataclass
class Posterior:
    """The variational parameters of a batch of images, each [B, *state] (lists over levels)."""

    mu: list[torch.Tensor]  # μ_1 … μ_K
    logvar: list[torch.Tensor]  # log τ_1² … log τ_K²
    logit: list[torch.Tensor]  # g_2 … g_K (γ = sigmoid(g))

    def parameters(self) -> list[torch.Tensor]:
        return [*self.mu, *self.logvar, *self.logit]


@register
class VIPaint(GradientAtStart):
    name = "vipaint"

    def __init__(self, levels: int = 2, sigma_e: float = 1.0, sigma_s: float = 0.6, iterations: int = 50,
                 particles: int = 5, beta: float = 100.0, recon_scale: float = 0.005, lr: float = 0.1,
                 lr_logvar: float = 1e-3, lr_gamma: float = 1e-2, eta: float = 0.2, var_scale: float = 0.7,
                 prior_logit: float = 5.0, mean_scale_top: float = 0.4, mean_scale: float = 1.0, zeta: float = 0.5):
        self.levels, self.iterations, self.particles = int(levels), int(iterations), int(particles)
        self.sigma_e, self.sigma_s = float(sigma_e), float(sigma_s)
        self.beta, self.recon_scale = float(beta), float(recon_scale)
        self.lr, self.lr_logvar, self.lr_gamma = float(lr), float(lr_logvar), float(lr_gamma)
        self.eta, self.var_scale, self.prior_logit = float(eta), float(var_scale), float(prior_logit)
        self.mean_scale_top, self.mean_scale, self.zeta = float(mean_scale_top), float(mean_scale), float(zeta)
        if self.levels < 1 or self.particles < 1 or self.iterations < 0:
            raise ValueError("vipaint: levels and particles must be at least 1, iterations at least 0")
        if not 0 < self.sigma_s < self.sigma_e:
            raise ValueError(f"vipaint: need 0 < sigma_s < sigma_e, got {self.sigma_s:g} and {self.sigma_e:g}")
        if not 0 < self.eta <= 1 or self.recon_scale <= 0:
            raise ValueError("vipaint: eta must be in (0, 1] and recon_scale positive")

    def expected_nfe(self, num_steps: int) -> int:
        """I·P·(K + 1) + (K − 1) + 2(N − n_s) − 1 (the cost in the module's docstring)."""
        from ..sampling.heun import edm_sigmas

        n_s, _ = hierarchy_levels(edm_sigmas(num_steps), self.levels, self.sigma_e, self.sigma_s)
        K = self.levels
        return self.iterations * self.particles * (K + 1) + (K - 1) + 2 * (num_steps - n_s) - 1

    # ---------------------------------------------------------------------------------------------- loop hooks

    def setup(self, s: SamplerState) -> None:
        n_s, levels = hierarchy_levels(s.sigmas, self.levels, self.sigma_e, self.sigma_s)
        if levels[0] >= float(s.sigmas[0]):
            raise ValueError(f"vipaint: sigma_e = {levels[0]:g} must lie below the grid's σ_max "
                             f"= {float(s.sigmas[0]):g}")
        s.extras["vipaint"] = {"n_s": n_s, "levels": levels, "n": 0}

    def pre_step(self, s: SamplerState, n: int, x):
        state = s.extras["vipaint"]
        state["n"] = n
        if n < state["n_s"]:  # above the posterior: an identity step, no network
            return x
        if n == state["n_s"]:
            with torch.enable_grad():
                posterior = self.fit(s, state["levels"])
            with torch.no_grad():
                x = self.draw(s, posterior, state["levels"])
        return super().pre_step(s, n, x)

    def denoise(self, s: SamplerState, x, sigma):
        if s.extras["vipaint"]["n"] < s.extras["vipaint"]["n_s"]:
            return x  # d = (x − x)/σ = 0: the Heun update leaves x exactly as it is
        return super().denoise(s, x, sigma)

    def post_step(self, s: SamplerState, n: int, x, x_next):
        if n < s.extras["vipaint"]["n_s"]:
            return x_next
        g = self.start_gradient(s, lambda d: residual_norm(s, d))
        return x_next.detach() - self.zeta * g

    # ------------------------------------------------------------------------------------------------ the model

    def prior_step(self, s: SamplerState, z, a: float, b: float):
        """(m, c): mean and standard deviation of the prior's step a → b from z (DDIM, variance fraction η). 1 NFE."""
        denoised = s.D(z, a)
        c = math.sqrt(self.eta) * ancestral_std(a, b)
        return denoised + math.sqrt(b * b - c * c) * (z - denoised) / a, c

    def init_posterior(self, s: SamplerState, levels: list[float]) -> Posterior:
        """The reference's `init`: means at the observation plus noise, τ from the prior's schedule, γ ≈ 1."""
        y = s.task.y
        mu = [y + self.mean_scale_top * s.randn_like(y)]
        logvar = [torch.full_like(y, 2 * math.log(levels[0]))]
        logit = []
        for a, b in zip(levels[:-1], levels[1:]):
            mu.append(y + self.mean_scale * b * s.randn_like(y))
            logvar.append(torch.full_like(y, 2 * math.log(self.var_scale * ancestral_std(a, b))))
            logit.append(torch.full_like(y, self.prior_logit))
        return Posterior(mu, logvar, logit)

    def diffusion_loss(self, ps: SamplerState, generators, z1, sigma_e: float, sigma_max: float):
        """L_diff(z_1) per row: the bound above σ_e at one log-uniform u per particle (stratified). 1 NFE."""
        P = self.particles
        u_lo, u_hi = (U_LO_FRACTION * sigma_e) ** 2, sigma_max ** 2 - sigma_e ** 2
        r0 = torch.stack([torch.rand((), generator=g) for g in generators])
        r = (r0.repeat_interleave(P) + torch.arange(P).repeat(len(generators)) / P) % 1.0
        span = math.log(u_hi / u_lo)
        u = torch.exp(math.log(u_lo) + r.double() * span).to(device=z1.device, dtype=z1.dtype)
        sigma = (sigma_e ** 2 + u).sqrt()
        view = (-1,) + (1,) * (z1.ndim - 1)
        z_sigma = z1 + u.sqrt().view(view) * ps.randn_like(z1)
        denoised = ps.D(z_sigma, sigma)
        z1_hat = z_sigma - (u / sigma ** 2).view(view) * (z_sigma - denoised)
        return 0.5 * span * per_sample((z1 - z1_hat) ** 2) / u

    def fit(self, s: SamplerState, levels: list[float]) -> Posterior:
        """Phase 1: I Adam iterations on the bound, P particles per image as P batch rows of one network call."""
        B, P = s.task.batch_size, self.particles
        posterior = self.init_posterior(s, levels)
        params = posterior.parameters()
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": posterior.mu, "lr": self.lr}, {"params": posterior.logvar, "lr": self.lr_logvar}]
        if posterior.logit:
            groups.append({"params": posterior.logit, "lr": self.lr_gamma})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
        rows = torch.arange(B).repeat_interleave(P)
        # the particles' state: P rows per image, each drawing from its image's generator; its counters count calls
        ps = dataclasses.replace(s, task=s.task[rows.to(s.device)], generators=[s.generators[i] for i in rows.tolist()],
                                 nfe=0, backward=0, extras={},
                                 progress=(lambda k: s.progress(k * P)) if s.progress is not None else None)
        M, y = ps.task.M, ps.task.y
        rep = lambda t: t.repeat_interleave(P, 0)  # noqa: E731  [B, …] → [B·P, …]
        for _ in range(self.iterations):
            tau = [rep((0.5 * lv).exp()) for lv in posterior.logvar]
            z = rep(posterior.mu[0]) + tau[0] * ps.randn_like(y)
            prior = self.diffusion_loss(ps, s.generators, z, levels[0], float(s.sigmas[0]))
            prior = prior - 0.5 * per_sample(rep(posterior.logvar[0]))  # − H(q(z_1)), up to a constant
            for k, (a, b) in enumerate(zip(levels[:-1], levels[1:]), start=1):
                m_p, c = self.prior_step(ps, z, a, b)
                gamma = torch.sigmoid(rep(posterior.logit[k - 1]))
                m_q = gamma * m_p + (1 - gamma) * rep(posterior.mu[k])
                kl = math.log(c) - 0.5 * rep(posterior.logvar[k]) + (tau[k] ** 2 + (m_q - m_p) ** 2) / (2 * c * c) - 0.5
                prior = prior + per_sample(kl)
                z = m_q + tau[k] * ps.randn_like(y)
            recon = per_sample(M * (y - ps.D(z, levels[-1])).abs()) / self.recon_scale
            loss = (recon + self.beta * prior).view(B, P).mean(1).sum()
            grads = torch.autograd.grad(loss, params)
            ps.backward += len(levels) + 1  # one backward pass through each of the K + 1 evaluations above
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        s.nfe += ps.nfe * P  # each of ps's calls evaluated the network on P rows per image
        s.backward += ps.backward * P
        for p in params:
            p.requires_grad_(False)
        return posterior

    def draw(self, s: SamplerState, posterior: Posterior, levels: list[float]) -> torch.Tensor:
        """Phase 2's start: z_1 ~ q(z_1), then the posterior's K − 1 ancestral steps to s_K. K − 1 NFE."""
        y = s.task.y
        z = posterior.mu[0] + (0.5 * posterior.logvar[0]).exp() * s.randn_like(y)
        for k, (a, b) in enumerate(zip(levels[:-1], levels[1:]), start=1):
            m_p, _ = self.prior_step(s, z, a, b)
            gamma = torch.sigmoid(posterior.logit[k - 1])
            z = gamma * m_p + (1 - gamma) * posterior.mu[k] + (0.5 * posterior.logvar[k]).exp() * s.randn_like(y)
        return z
