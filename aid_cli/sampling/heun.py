"""The EDM σ-grid and the controlled Heun loop that every method runs on (method.md §2, §3, §10).

One loop serves every method: a method is a small object whose hooks the loop calls at fixed points of each step, so
inpainting methods differ only in what they do at those points. The loop itself is the official EDM sampler
(Heun on every step, Euler on the last), in float32 so it also runs on MPS; a method may carry EDM's churn (`Churn`,
Algorithm 2 of Karras et al. 2022), which makes its solve stochastic.

Hooks, in the order the loop calls them for the step n: σ_n → σ_{n+1}:

    x, σ ← Churn(x, σ_n)                          only for a method with `churn`: x̂ = x + √(σ̂² − σ_n²)·S_noise·ε,
                                                  σ̂ = (1 + γ_n)σ_n; the step then runs from σ̂ (σ = σ_n otherwise)
    x ← method.pre_step(s, n, x)                  state correction before the step (RePaint, CoPaint; DPS, MCG and
                                                  GradPaint make x_n an autograd leaf here)
    D ← method.denoise(s, x, σ)                   every network evaluation goes through here (combine-image; the gradient
                                                  methods keep the graph of D(x_n; σ_n) and reuse it, no extra NFE)
    x' ← Heun(x, σ → σ_{n+1})
    x' ← x' + method.drift(s, n, x, D, σ)·Δt      the control u of eq. 1 (AID), held constant over the step
    x' ← method.post_step(s, n, x, x')            state correction after the step (replacement, DPS, MCG, GradPaint)
    on_step(n, x, D, u)                           what a caller records of the step (training: the trajectory of a
                                                  rollout, the control energy of a differentiable solve)

and `method.schedule(N)` lists the grid indices the loop visits: plain methods go 0, 1, …, N; RePaint's time travel goes back
up the grid, where the loop re-noises x ← x + √(σ_a² − σ_b²)·z. Oracles (`oracle = True`: copy, greyfill) skip the loop:
`method.fill(s)` gives x̂ directly, at 0 NFE. `finish` pastes the visible pixels back for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint

from ..task import Task

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def edm_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
               device=None) -> torch.Tensor:
    """σ_i = (σmax^{1/ρ} + i/(N−1)·(σmin^{1/ρ} − σmax^{1/ρ}))^ρ for i = 0..N−1, then σ_N = 0 (method.md §2).

    Computed in float64 (as the official sampler does) and returned as float32.
    """
    if num_steps < 2:
        raise ValueError("the EDM grid needs at least 2 steps")
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(torch.float32).to(device)


def nfe_of_grid(num_steps: int) -> int:
    """Heun on every step but the last: NFE = 2N − 1."""
    return 2 * num_steps - 1


def sample_generators(seed: int, batch_size: int, offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample (seed + index), so results do not depend on batch size or device."""
    return [torch.Generator().manual_seed(int(seed) + offset + i) for i in range(batch_size)]


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; method.md §2's grid): before the step from σ_n, when
    S_tmin ≤ σ_n ≤ S_tmax, raise the noise level to σ̂_n = (1 + γ_n)·σ_n, γ_n = min(S_churn/N, √2 − 1), by adding fresh
    noise x̂_n = x_n + √(σ̂_n² − σ_n²)·S_noise·ε_n, then take the Heun step from σ̂_n to σ_{n+1}. S_churn = 0 is the
    deterministic ODE. The noise ε_n comes from each sample's own generator, so a solve is reproducible per seed."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        if not (self.s_churn >= 0 and self.s_noise >= 0 and 0 <= self.s_tmin <= self.s_tmax):
            raise ValueError(f"churn needs S_churn ≥ 0, S_noise ≥ 0 and 0 ≤ S_tmin ≤ S_tmax, got {self}")

    def gamma(self, sigma: float, num_steps: int) -> float:
        """γ_n of the step from σ_n (0 outside [S_tmin, S_tmax] and on the final σ = 0)."""
        if self.s_churn <= 0 or not self.s_tmin <= sigma <= self.s_tmax or sigma <= 0:
            return 0.0
        return min(self.s_churn / num_steps, math.sqrt(2) - 1)

    def record(self) -> dict:
        """JSON-safe parameters (S_tmax = ∞ is written as null)."""
        return {"s_churn": self.s_churn, "s_tmin": self.s_tmin,
                "s_tmax": None if math.isinf(self.s_tmax) else self.s_tmax, "s_noise": self.s_noise}

    @classmethod
    def of(cls, value) -> "Churn | None":
        """A Churn from a number (S_churn, the other settings EDM's defaults), a `record()` dict or a Churn; None or
        0 gives None (the deterministic solve)."""
        if value is None or isinstance(value, Churn):
            return value if value is None or value.s_churn > 0 else None
        if isinstance(value, dict):
            kw = dict(value)
            if kw.get("s_tmax") is None:
                kw.pop("s_tmax", None)
            value = cls(**kw)
            return value if value.s_churn > 0 else None
        return cls(s_churn=float(value)) if float(value) > 0 else None


Denoiser = Callable[..., torch.Tensor]
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None]  # (n, X_n, D(X_n; σ_n), u_n)


@dataclass
class SamplerState:
    """What a method's hooks see: the frozen denoiser, the task, the grid, per-sample noise, and the NFE counters."""

    net: Denoiser
    task: Task
    sigmas: torch.Tensor  # [N+1] float32, σ_N = 0
    generators: list[torch.Generator]
    nfe: int = 0  # network evaluations per image (forward passes)
    backward: int = 0  # backward passes through the network per image
    extras: dict = field(default_factory=dict)  # per-method scratch space; the benchmark puts the oracles' "x0" here
    progress: Callable[[int], None] | None = None  # told the NFE per image of every network evaluation (a progress bar)
    on_step: StepHook | None = None  # told (n, X_n, D(X_n; σ_n), u_n) after each step's control (None without one)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def dt(self) -> float:
        """Control time Δt = 1/N: the step index read as time t_n = n/N, T = 1 (method.md §3)."""
        return 1.0 / self.num_steps

    @property
    def device(self):
        return self.task.y.device

    def D(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """One network evaluation D(x; σ) for the whole batch (counted once per image)."""
        self.nfe += 1
        if self.progress is not None:
            self.progress(1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return self.net(x, sigma, self.task.class_labels)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like x, drawn on CPU from each sample's own generator."""
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators])
        return z.to(device=x.device, dtype=x.dtype)


class Method:
    """Base inpainting method: plain EDM Heun (the `unguided` method). Subclasses override hooks."""

    name = "unguided"
    needs_grad = False  # True for methods that backpropagate through the network
    oracle = False  # True: no sampling at all, `fill` gives x̂ directly (0 NFE)
    sees_truth = False  # True: `fill` reads the ground truth (the `copy` oracle; only the benchmark has it)
    full_resolution = False  # True: fitted at the image's own scale, never resized (classical methods)
    churn: Churn | None = None  # EDM's churn on this method's solve (None: the deterministic ODE)

    @classmethod
    def check_available(cls) -> None:
        """Raise a one-line UserError when something the method needs is not installed (an optional extra)."""

    def setup(self, s: SamplerState) -> None:
        """Called once before the loop."""

    def schedule(self, num_steps: int) -> Sequence[int]:
        """Grid indices visited, in order; going to a smaller index re-noises (time travel)."""
        return range(num_steps + 1)

    def denoise(self, s: SamplerState, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return s.D(x, sigma)

    def expected_nfe(self, num_steps: int) -> int:
        """Network evaluations per image the loop will spend (for a progress bar): two per Heun step of the schedule,
        one on the last (Euler) step. Methods that evaluate more override it; adaptive ones give their minimum."""
        if self.oracle:
            return 0
        order = list(self.schedule(num_steps))
        return sum(2 if b < num_steps else 1 for a, b in zip(order[:-1], order[1:]) if b == a + 1)

    def pre_step(self, s: SamplerState, n: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def drift(self, s: SamplerState, n: int, x: torch.Tensor, denoised: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor | None:
        """Control u(t_n, X_n; ξ) added to the step as u·Δt (eq. 1); None for no control. `sigma` is the noise level
        the step starts from (σ_n, or σ̂_n under churn), `denoised` the step's own evaluation `denoise(x_n; σ)` (no
        extra NFE)."""
        return None

    def post_step(self, s: SamplerState, n: int, x: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        return x_next

    def renoise(self, s: SamplerState, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
        """Undo denoising from σ_b up to σ_a: x ← x + √(σ_a² − σ_b²)·z (RePaint's time travel on the EDM grid)."""
        return x + (sigma_to ** 2 - sigma_from ** 2).sqrt() * s.randn_like(x)

    def fill(self, s: SamplerState) -> torch.Tensor:
        """An oracle's x̂; the loop calls it only for methods with `oracle = True`, which override it."""
        raise TypeError(f"{self.name} is not an oracle: it samples, it does not fill")

    def finish(self, s: SamplerState, x: torch.Tensor) -> torch.Tensor:
        """Completed image: visible pixels pasted back, M ⊙ y + M̄ ⊙ x̂."""
        return s.task.complete(x)


def heun_step(s: SamplerState, method: Method, n: int, x: torch.Tensor,
              sigma: torch.Tensor | None = None) -> torch.Tensor:
    """One step σ → σ_{n+1} of the probability-flow ODE dx/dσ = (x − D(x;σ))/σ: Heun, Euler when σ_{n+1} = 0.
    σ = σ_n, or the churned σ̂_n (`churn_step`)."""
    sigma = s.sigmas[n] if sigma is None else sigma
    sigma_next = s.sigmas[n + 1]
    x = method.pre_step(s, n, x)
    denoised = method.denoise(s, x, sigma)
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:
        d_prime = (x_next - method.denoise(s, x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_prime)
    u = method.drift(s, n, x, denoised, sigma)
    if u is not None:
        x_next = x_next + u * s.dt  # eq. 1: dX = [b + u] dt, u held constant over the step
    if s.on_step is not None:
        s.on_step(n, x, denoised, u)
    return method.post_step(s, n, x, x_next)


def churn_step(s: SamplerState, churn: Churn | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_n, σ̂_n) of `Churn` before the step from σ_n; (x_n, σ_n) when γ_n = 0. Drawn outside the step, so a step
    recomputed in the backward pass sees the same x̂_n (its noise is a constant of the graph)."""
    sigma = s.sigmas[n]
    gamma = churn.gamma(float(sigma), s.num_steps) if churn is not None else 0.0
    if gamma == 0.0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + (sigma_hat ** 2 - sigma ** 2).sqrt() * churn.s_noise * s.randn_like(x), sigma_hat


@dataclass
class SampleResult:
    x: torch.Tensor  # final state X_N (before pasting)
    completed: torch.Tensor  # M ⊙ y + M̄ ⊙ X_N
    nfe: int
    backward: int


def sample(net: Denoiser, task: Task, method: Method | None = None, num_steps: int = 18, seed: int = 0,
           generators: list[torch.Generator] | None = None, sigmas: torch.Tensor | None = None,
           latents: torch.Tensor | None = None, extras: dict | None = None,
           progress: Callable[[int], None] | None = None, on_step: StepHook | None = None,
           differentiable: bool = False, recompute: bool = False) -> SampleResult:
    """Inpaint `task` with `method` on the EDM grid of `num_steps` steps.

    X_0 = σ_0·z with z from each sample's generator (seed + index), unless unit-variance `latents` are given.
    `extras` seeds `SamplerState.extras`; only the benchmark passes the ground truth there (`{"x0": x0}`, for oracles).
    `progress(k)` is called with the NFE per image of every network evaluation as it happens; `on_step(n, x, D, u)`
    after each step's control (`SamplerState.on_step`).
    `differentiable`: the whole solve stays in autograd's graph (X_N can be backpropagated to X_0, the backbone and
    the method's parameters); `recompute` then recomputes each step's activations in the backward pass (memory of one
    step; its hooks run again there, so they must be deterministic: no noise drawn inside a step).
    """
    method = method or Method()
    device = task.y.device
    if sigmas is None:
        sigmas = edm_sigmas(num_steps, device=device)
    if generators is None:
        generators = sample_generators(seed, task.batch_size)
    s = SamplerState(net=net, task=task, sigmas=sigmas.to(device), generators=generators, extras=dict(extras or {}),
                     progress=progress, on_step=on_step)
    method.setup(s)
    if method.oracle:  # copy, greyfill: no network, no loop
        x = method.fill(s).to(device, torch.float32)
        return SampleResult(x=x, completed=method.finish(s, x), nfe=s.nfe, backward=s.backward)
    x = latents.to(device, torch.float32) if latents is not None else s.randn_like(task.y)
    x = x * s.sigmas[0]
    order = list(method.schedule(s.num_steps))
    if not order or order[0] != 0 or order[-1] != s.num_steps:
        raise ValueError(f"{method.name}: a schedule must start at 0 and end at {s.num_steps}")
    grad_ctx = torch.enable_grad() if method.needs_grad or differentiable else torch.no_grad()
    with grad_ctx:
        for a, b in zip(order[:-1], order[1:]):
            if b == a + 1:
                x, sigma = churn_step(s, method.churn, a, x)
            if b == a + 1 and differentiable and recompute:
                x = torch.utils.checkpoint.checkpoint(heun_step, s, method, a, x, sigma, use_reentrant=False)
            elif b == a + 1:
                x = heun_step(s, method, a, x, sigma)
            elif b < a:
                x = method.renoise(s, x, s.sigmas[a], s.sigmas[b])
            else:
                raise ValueError(f"{method.name}: schedule may only step forward by one or jump back ({a} → {b})")
            if not differentiable:
                x = x.detach()
        completed = method.finish(s, x)
    return SampleResult(x=x, completed=completed, nfe=s.nfe, backward=s.backward)
