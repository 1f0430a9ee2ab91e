"""VIPaint (Agarwal et al., seed paper), method.md §10: fit a hierarchical posterior per image, then DPS at low noise.

The method has two phases. Both run inside the one sampler loop, and every network evaluation of both is counted.

Phase 1, the fit (once per image, at the start of step n_s). The posterior covers K noise levels s_1 = σ_e > … >
s_K = σ_s (paper eqs. 11 and 12, here in EDM's variance-exploding form, x_σ = x0 + σ·ε):

    q(z_1)           = N(μ_1, τ_1²)                                           (per element)
    q(z_k | z_{k−1}) = N(γ_k ⊙ m_k(z_{k−1}) + (1 − γ_k) ⊙ μ_k, τ_k²),   γ_k = sigmoid(g_k),   k = 2 … K

where m_k(z) is the mean of the prior's own step s_{k−1} → s_k: DDIM with a variance fraction η of the ancestral
(DDPM) step, as the reference's `prior_preds`:

    D = D(z; s_{k−1}),  p(z_k | z_{k−1}) = N(m_k, c_k²),  m_k = D + √(s_k² − c_k²)·(z − D)/s_{k−1},
    c_k² = η·a_k²,      a_k = s_k·√(s_{k−1}² − s_k²)/s_{k−1}   (the ancestral standard deviation)

The variational parameters λ = {μ_k, log τ_k², g_k} have the state's shape (any channels, pixels or latents). They
minimise, by Adam, a Monte-Carlo estimate over `particles` draws of the β-weighted bound of paper eq. 13 (sums over
the state's elements, per image):

    L = Σ_visible |y − D(z_K; s_K)| / b                        reconstruction (Tweedie at s_K, Laplace scale b)
      + β·[ L_diff(z_1) − H(q(z_1)) ]                          diffusion loss above σ_e (eq. 14), and q's entropy
      + β·Σ_{k≥2} KL( q(z_k | z_{k−1}) ‖ p(z_k | z_{k−1}) )     hierarchical loss (Gaussian KL, analytic)

The diffusion loss is the continuous-time form of eq. 14 for the sub-diffusion that starts at z_1: with
z_σ = z_1 + √u·ε, u = σ² − σ_e², and the model's estimate of z_1 implied by its denoiser,
ẑ_1 = E[z_1 | z_σ] = z_σ − (u/σ²)·(z_σ − D(z_σ; σ)),

    L_diff = ½ ∫ u⁻² ‖z_1 − ẑ_1‖² du  ≈  ½·log(u_hi/u_lo)·‖z_1 − ẑ_1‖²/u,   log u ~ U[log u_lo, log u_hi]

with u_hi = σ_max² − σ_e² and u_lo = (σ_e/100)², one u per particle, stratified across the particles of an image (the
reference's `sample_uniform`). Below u_lo only a q-independent constant is left out (its gradient vanishes as u → 0).

Phase 2, sampling. z_1 ~ q(z_1), then K − 1 ancestral steps of the fitted posterior give z_K at s_K = σ_{n_s}, a
grid level; from there the ordinary Heun loop runs to σ = 0 with DPS guidance (the `dps` rule, gradient.py:
x_{n+1} ← x_{n+1} − ζ·∇_{x_n}‖y − M ⊙ D(x_n; σ_n)‖₂). The loop's steps 0 … n_s − 1, above the posterior, are not
run: there `denoise` returns x itself without calling the network (0 NFE), so the Heun update is exactly the
identity, and the posterior's draw replaces x at the start of step n_s.

Cost per image (NFE and backward passes through the network, as the loop counts them). An Adam iteration evaluates
the network K + 1 times on each particle (one noise level above σ_e, K − 1 prior steps, the Tweedie estimate at s_K)
and backpropagates once through all of them. With I iterations, P particles, N steps:

    NFE      = I·P·(K + 1) + (K − 1) + 2(N − n_s) − 1
    backward = I·P·(K + 1) + (N − n_s)

Defaults (K = 2, I = 50, P = 5, σ_s = 0.6 → n_s = 11 at N = 18): 750 + 1 + 13 = 764 NFE and 750 + 7 = 757 backward
passes at N = 18; at N = 12 (n_s = 7) 750 + 1 + 9 = 760 NFE and 755 backward.

Choices where the paper (and its latent-only reference code, SakshiAgarwal/VIPaint) is vague or does not apply:
  * Levels. The reference's VIPaint-2 for ImageNet-256 uses DDPM times T_e = 550, T_s = 400 of the LDM schedule:
    σ = 1.92 and 1.16 on its unit-variance latents, i.e. σ_e ≈ 1.0 and σ_s ≈ 0.6 at σ_data = 0.5 (EDM and EDM2 both).
    σ_s is snapped to a grid level, s_K = σ_{n_s}, the one nearest to `sigma_s` in log σ among the levels below σ_e
    (0.585 at N = 18, 0.658 at N = 12); the K levels in between are EDM's ρ = 7 interpolation from σ_e to s_K.
    K = 1 is the reference's single-level ("gauss") posterior at s_K.
  * Hyperparameters from the reference's hierarchical ImageNet config and code: 50 iterations, 5 particles, β = 100
    (its beta_1 = beta_2), η = 0.2, Adam (betas 0.9, 0.99) with lr 0.1 for the means, 1e-3 for log τ², 1e-2 for the
    γ logits; its StepLR decay (×0.99 every 10 iterations, ×0.95 by iteration 50) is left out. Initialisation as
    its `init`: μ_1 = y + 0.4·ε (its mean_scale_top 0.8 on unit-variance latents, scaled to σ_data = 0.5), τ_1 = σ_e;
    μ_k = y + s_k·ε (mean_scale 1), τ_k = 0.7·a_k (var_scale), g_k = 5 (prior_scale: γ ≈ 0.993).
  * VE form. The reference works in DDPM coordinates (z = √ᾱ·x0 + √(1−ᾱ)·ε); here z = x0 + σ·ε, so its √ᾱ factors
    on μ are 1. Its estimate of z_1 from z_σ treats the model's noise prediction as the sub-diffusion's noise; here
    ẑ_1 is the conditional mean E[z_1 | z_σ] that the denoiser implies (above), and the diffusion loss is the
    continuous-time bound sampled in log u, where the reference draws one of its ρ-spaced DDPM steps above T_e, skips
    the two nearest, and weights the step's KL by (1000 − T_e)/2.
  * Entropy. The bound's top level is the KL of q(z_1) to the prior, so its entropy H(q(z_1)) = Σ log τ_1 + const is
    included (the reference leaves it out; it changes only τ_1's gradient). The lower levels' entropies are in their
    KLs.
    The prior term at σ_max (gradient z_1/σ_max² ≈ 1.6e-4·z_1) is left out.
  * Reconstruction. The reference compares the decoded Tweedie estimate to y with the autoencoder's L1 + LPIPS, summed
    over pixels / 1000, against per-element means of its KLs. Here the state is compared to y where the mask is
    visible, on the state's own grid (pixels, or latents for a latent backbone; no decoder, no LPIPS), with a Laplace
    likelihood of scale b = `recon_scale` and sums throughout, so the balance does not depend on the resolution.
    b = 0.005 keeps the reference's balance per optimised element at its ImageNet-256 setting: its loss
    Σ_pixels |r|/1000 + β·mean_latents(KL), times its 12,288 latent elements, weighs each element's 16 of the
    196,608 pixel values by 12,288/1000 against β·KL: 196.6 ≈ 1/b. Adam sees only the product β·b (the loss's scale
    does not change its steps). Measured on the embedded cats64 backbone (6 validation images, free-form masks,
    seed 0, N = 18, hole PSNR): β·b = 0.05, 0.5 (the default), 0.8, 8, 80 gave 11.84, 13.41, 13.46, 12.82, 12.47 dB
    (ddnm 11.23, replace 10.91, dps 9.87 on the same images). `aid bench --tune vipaint` searches b per backbone
    (0.1× to 10×).
  * Sampling. The reference's phase 2 is DDIM (its η) with DPS on the same reconstruction loss, scale 2; here it is
    the Heun loop with aid's `dps` rule and its default ζ = 0.5 (on the cats64 run above, ζ = 0, 0.5, 2 gave 12.80,
    12.82, 12.89 dB: the fit, not this phase, carries the method).
  * One fit per batch row: `--samples K` fits K posteriors (the reference fits once and draws many samples).
  * Particles: the P draws of an image are evaluated as P batch rows in one network call; that call counts P network
    evaluations per image, and a backward pass through it P backward passes. Memory: the fit holds the autograd
    graphs of P·(K + 1) evaluations per image (15 DPS steps' worth at the defaults); lower `--batch` if need be.
All randomness comes from each image's own generator, so a result depends on the seed, not on the batch.
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
