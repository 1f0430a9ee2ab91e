"""`aid train`: learn the guidance module with the continuous-time actor–critic (method.md §4–§6, Algorithm 1).

One iteration, for a batch of tasks:
  1. x0 from the training split, M from the free-form brush distribution, y = M ⊙ x0, X_0 ~ N(0, σmax² I).
  2. Roll out the controlled ODE (the same sampler loop and `aid` method as deployment) with sampled actions
     a_n = μ_φ(t_n, X_n; ξ) + √γ ε_n, no gradient through the backbone.
  3. Running costs r_n = (β/2)(‖a_n‖²/d − γ)·Δt  (centred, eq. 5; means over the d pixels, as ℓ).
     Terminal target ℓ(X_N) = (λ_vis/2)·mean(M ⊙ (X_N − x0))² + (λ_hole/2)·mean(M̄ ⊙ (X_N − x0))²   (eq. 2)
     (+ λ_lpips·LPIPS and λ_ssim·(1 − SSIM) of the completed image with --lambda-lpips / --lambda-ssim, options
     beyond the paper: terminal_cost).
     TD residuals δ_n = V_θ(t_{n+1}, X_{n+1}) − V_θ(t_n, X_n) + r_n, with V_θ(T, X_N) replaced by ℓ(X_N).
  4. Critic (eq. 10): descend Σ_n δ_n²/2 with the next-state value detached (semi-gradient TD).
  5. Actor (eq. 11): φ ← φ − α_φ Σ_n δ_n ∇_φ log π_φ(a_n | t_n, X_n), ∇_φ log π = ((a_n − μ_n)/γ)·∇_φ μ_n,
     i.e. descend Σ_n sg(δ_n)·log π_φ(a_n) with log π = −‖a_n − μ_n‖²/(2γ) + const.
  6. Adam for both, constant learning rates, gradient-norm clipping.
  7. With `--ema-halflife H` (an option beyond the paper): the module saved and validated is an exponential moving
     average of the actor's weights, φ̄ ← κ·φ̄ + (1 − κ)·φ after every step, κ = 0.5^(1/H) (torch's AveragedModel);
     the optimiser keeps training φ itself. A constant learning rate leaves φ wandering ±0.2–0.3 dB between
     checkpoints; the average keeps what the wandering shares.
Pixel sums vs means: ℓ and the running cost both use means over the d = C·H·W entries (recorded in the config);
log π is the true Gaussian log-density (a sum over entries).

`--estimator` chooses the actor's gradient; the critic's update (eq. 10) is the same for score and pathwise:
  backprop  the exact gradient of J (the default): no critic, no sampled actions; backpropagate
            ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt through the whole deterministic frozen solve (every backbone evaluation
            gets a backward pass). The dynamics are deterministic and known, so this is J's true gradient for the
            sampled tasks; the paper calls it the "supervised proxy" ablation (`proxy` is kept as an alias). On this
            problem it is the estimator that learns: the others estimate the same gradient with far more noise.
  score     the paper's eq. 11 above (faithful).
  pathwise  a one-step pathwise gradient through the critic (method.md §6's variant, DDPG/SVG(0)-style). The control
            enters the step additively, X_{n+1} = Heun(X_n) + a_n·Δt, so with X̂_{n+1} = X_{n+1} − a_n·Δt the actor
            descends Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, X̂_{n+1} + μ_n·Δt), with V_θ(T, ·) = ℓ exactly, the critic's
            weights held fixed: ∇_a of the one-step cost-to-go, no backbone gradient.

Data (held out from the benchmark by default): validation reads `val_n` images of `--val` after its first `val_offset`
(100: the benchmark protocol uses val.zip's first 100 images and `aid bench --tune` its first 16), each with a fixed
mask of the three evaluation families in turn (freeform, center, strip). Training masks come from a bank of
`mask_bank` masks drawn once per run from the training stream (never an evaluation mask's seed); each iteration picks
its masks from the bank with the iteration's generator, so a resumed run sees the same masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.utils.checkpoint
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..backbones.checkpoint import load_backbone
from ..backbones.edm import count_parameters
from ..backbones.spaces import model_space
from ..data.datasets import load_image_set, load_photo_set, whole_photos
from ..data.masks import FAMILIES, VALIDATION_MASK_SEED, eval_masks, training_mask_bank, training_masks
from ..devices import prepare_backbone, training_precision
from ..errors import UserError
from ..fileio import atomic_write_text, sha256_file
from ..inpainter import Inpainter, trained_multiscale
from ..plots import training_curves
from ..methods.aid import AID
from ..metrics.lpips import MIN_SIZE, LPIPSUnavailable, load_lpips
from ..metrics.quality import SSIM_MIN_SIZE, hole_texture, psnr_hole, ssim_01, texture_ratio
from ..sampling.heun import SamplerState, edm_sigmas, heun_step, sample, sample_generators
from ..task import Task, one_hot
from ..training import (GracefulStop, gather_to_rank0, init_distributed, load_state, prepare_run, read_jsonl,
                        run_lock, save_state, skip_reporter, step_generator)
from .checkpoint import load_guidance, save_guidance
from .networks import Actor, Critic, PrivilegedCritic
from .photo_tasks import VALIDATION_TASKS, photo_tasks

STATE_FILE = "training-state.safetensors"
DIAG_SEED_OFFSET = 0x646961  # "dia": the diagnostic's tasks come from a generator of their own
GUIDANCE_FILE = "guidance.safetensors"
SNAPSHOT_DIR = "modules"  # guidance-NNNNNN.safetensors: the module at each checkpoint
CURVES_FILE = "curves.png"
ESTIMATORS = ("backprop", "score", "pathwise")
ESTIMATOR_ALIASES = {"proxy": "backprop"}  # the paper's name for the exact-gradient ablation
TRAIN_MASK_FAMILIES = ("freeform", "box", "strip")


def canonical_estimator(name: str) -> str:
    """`proxy` → `backprop`; anything else unchanged (checked by `train`)."""
    return ESTIMATOR_ALIASES.get(name, name)


@dataclass
class TrainConfig:
    # settings whose default changed: a run saved without the key was made under this value and keeps it on --resume
    LEGACY_DEFAULTS: ClassVar[dict] = {"val_mask_seed": 0}

    dataset: str
    out: str
    backbone: str
    steps: int = 18  # N of the training rollouts
    batch: int = 16
    iters: int = 2000
    beta: float = 0.1  # running-cost weight β (value lost in the paper: tuned)
    gamma: float = 0.01  # exploration temperature γ (value lost: tuned)
    lambda_vis: float = 2.0  # pixel EDM values of the paper
    lambda_hole: float = 1.0
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    clip: float = 1.0  # gradient-norm clipping of each network
    hole_min: float = 0.2
    hole_max: float = 0.6
    width: int = 16  # actor/critic width C
    critic_width: int = 32
    seed: int = 0
    val_every: int = 100  # iterations between validation PSNRs
    val_n: int = 64  # fixed val images (masks: the evaluation families in turn, v1, val_mask_seed) for validation
    val_offset: int = 100  # skip the benchmark's images: the protocol uses val.zip's first 100, --tune its first 16
    val_mask_seed: int = VALIDATION_MASK_SEED  # validation's masks: not the protocol's seed 0 (runs made before
    #                                         this setting validated on seed 0 and keep it on --resume: LEGACY_DEFAULTS)
    checkpoint_every: int = 50  # iterations between resumable states
    val_dataset: str | None = None
    vae: str | None = None  # latent backbones: a local diffusers VAE folder instead of the pinned hub VAE
    class_label: int | None = None  # class-conditional backbones: this class for every image (else dataset.json)
    estimator: str = "backprop"  # actor gradient: backprop (exact) | score (eq. 11) | pathwise (module docstring)
    precision: str = "auto"  # the frozen backbone's autocast in rollouts (devices.training_precision); nets stay fp32
    compile: bool = False  # torch.compile the frozen backbone
    recompute: bool = True  # backprop: recompute each step's activations in the backward pass (memory of one step)
    denoised_input: bool = False  # the actor also reads D(X_n; σ_n) and M ⊙ (y − D) (networks.py; an option)
    lambda_lpips: float = 0.0  # an option beyond the paper: ℓ + λ·LPIPS of the completed image (terminal_cost)
    lambda_ssim: float = 0.0  # an option beyond the paper: ℓ + λ·(1 − SSIM) of the completed image (terminal_cost)
    init: str | None = None  # warm start: the actor's weights from this guidance module (same backbone, same actor)
    init_sha256: str | None = None  # its sha256, recorded for provenance
    mask_bank: int = 4096  # training masks drawn once per run; 0 = draw each iteration's masks afresh
    explore: str = "constant"  # exploration: constant γ (the paper) | scaled: γ_n = γ·c_u(σ_n)² (actor's output units)
    critic: str = "plain"  # plain: V(t, x; M, y) (the paper) | privileged: also x0 and D(x; σ), ℓ(D) baseline
    td_lambda: float = 0.0  # λ of the critic's λ-return and the actor's advantages: 0 = TD(0) (eq. 10/11), 1 = Monte Carlo
    normalize_advantage: bool = False  # the actor's weights Â_n standardised over the batch
    diag_every: int = 0  # iterations between gradient diagnostics (cosines to the exact gradient); 0 = never
    diag_batch: int = 0  # tasks of a diagnostic (0: --batch)
    train_masks: str = "freeform"  # families of the training masks, comma-separated: freeform, box, strip
    mix_steps: int = 0  # backprop: every odd iteration's solve at this N instead of `steps` (0 = never; e.g. 12 beside 18)
    holdout: int = 0  # whole photos: every holdout-th photo of --dataset (by name) is kept out of training and
    #                   validates instead of --val (0: none), so modules are picked on photos no benchmark uses
    ema_halflife: float | None = None  # iterations: the saved, validated module is the actor's EMA (0: the actor
    #                                  itself); None = not given: a new run 0, a resumed run its own (prepare_run)
    reductions: str = "mean over C·H·W in both the terminal loss and the running cost"

    def actor_kwargs(self, channels: int) -> dict:
        kw = dict(channels=channels, width=self.width, emb_dim=16)
        if self.denoised_input:  # recorded only when on: modules without it keep their metadata (and sha256)
            kw["denoised_input"] = True
        return kw

    def critic_kwargs(self, channels: int) -> dict:
        return dict(channels=channels, width=self.critic_width, emb_dim=16)

    def make_critic(self, channels: int):
        """The training-only critic: the paper's V(t, x; M, y), or the privileged V(t, x; x0, M, y, D)."""
        if self.critic == "privileged":
            return PrivilegedCritic(**self.critic_kwargs(channels), lambda_vis=self.lambda_vis,
                                    lambda_hole=self.lambda_hole)
        return Critic(**self.critic_kwargs(channels))


def terminal_loss(x: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, lambda_vis: float, lambda_hole: float):
    """ℓ(x; x0, M) per image, means over all entries (eq. 2)."""
    err2 = (x - x0) ** 2
    return (lambda_vis / 2) * (M * err2).mean(dim=(1, 2, 3)) + (lambda_hole / 2) * ((1 - M) * err2).mean(dim=(1, 2, 3))


def terminal_cost(cfg: TrainConfig, x: torch.Tensor, x0: torch.Tensor, task: Task, lpips=None) -> torch.Tensor:
    """The run's terminal cost per image: ℓ of eq. 2, plus, with --lambda-lpips / --lambda-ssim (options beyond the
    paper, which the theory allows: any terminal cost g(X_N) of the final state), λ_lpips·LPIPS(M ⊙ y + M̄ ⊙ x, x0),
    the perceptual distance of the completed image, and λ_ssim·(1 − SSIM(M ⊙ y + M̄ ⊙ x, x0)), its structural
    dissimilarity (the SSIM aid reports, `metrics.quality.ssim_01`). The L2 terms alone reward the smooth mean of the
    plausible fills."""
    ell = terminal_loss(x, x0, task.M, cfg.lambda_vis, cfg.lambda_hole)
    if cfg.lambda_lpips:
        if lpips is None:
            raise ValueError("lambda_lpips > 0 needs the LPIPS model")
        ell = ell + cfg.lambda_lpips * lpips(task.complete(x), x0)
    if cfg.lambda_ssim:
        ell = ell + cfg.lambda_ssim * (1 - ssim_01(task.complete(x), x0))
    return ell


def rollout(backbone, actor: Actor, task: Task, steps: int, gamma: float, generators,
            scaled_exploration: bool = False) -> tuple[torch.Tensor, ...]:
    """Sampled-action rollout through the ordinary sampler loop: (X [N,B,...], A [N,B,...], X_N [B,...], D), where D
    [N,B,...] stacks the steps' D(X_n; σ_n) (read by a `denoised_input` actor and by the privileged critic)."""
    policy = AID(actor=actor, gamma=gamma, record=True, scaled_exploration=scaled_exploration)
    result = sample(backbone, task, policy, num_steps=steps, generators=generators)
    X = torch.stack([x for _, x, _, _ in policy.trajectory])
    A = torch.stack([a for _, _, a, _ in policy.trajectory])
    D = torch.stack([d for *_, d in policy.trajectory])
    return X, A, result.x, D


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
    """The TD residuals, the advantages and both losses of one batch of rollouts (steps 3–5 above).

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


def rollout_steps(cfg: TrainConfig, it: int) -> int:
    """N of the solve of the step taken from `it` completed iterations (so the logged iteration it + 1): `steps`, or
    with --mix-steps M every other one M, so that one module learns both operating points (the actor reads σ, not n:
    aid-18 and aid-12 share it; its field enters as u·Δt, Δt = 1/N)."""
    return cfg.mix_steps if cfg.mix_steps and it % 2 else cfg.steps


def backprop_loss(cfg: TrainConfig, backbone, actor, task: Task, x0, generators, lpips=None,
                  steps: int | None = None) -> dict:
    """J of the sampled tasks, ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt (eqs. 2, 5 with γ = 0), through the whole deterministic
    solve, backbone included: its gradient is J's exact gradient (estimator backprop; the paper's supervised proxy).
    `steps`: N of the solve (default cfg.steps)."""
    N = steps or cfg.steps
    energy = []

    class Recorded(AID):
        def drift(self, s, n, x, denoised):
            u = super().drift(s, n, x, denoised)
            energy.append((u ** 2).mean(dim=(1, 2, 3)))
            return u

    s = SamplerState(net=backbone, task=task, sigmas=edm_sigmas(N, device=x0.device), generators=generators)
    policy = Recorded(actor=actor, gamma=0.0)
    x = s.randn_like(task.y) * s.sigmas[0]
    for n in range(N):
        if cfg.recompute:  # each step's activations are recomputed in the backward pass: memory of one step
            x = torch.utils.checkpoint.checkpoint(heun_step, s, policy, n, x, use_reentrant=False)
        else:  # all N steps' activations kept: a quarter less compute, N times the memory
            x = heun_step(s, policy, n, x)
    ell = terminal_cost(cfg, x, x0, task, lpips)
    E = torch.stack(energy).sum(0) * s.dt
    J = ell + (cfg.beta / 2) * E
    return {"actor_loss": J.mean(), "per_task": J, "terminal": ell.detach(), "energy": E.detach()}


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


@torch.no_grad()
def validation_per_image(inpainter: Inpainter, actor, images: torch.Tensor, M: torch.Tensor, steps: int,
                         batch: int = 64, labels: torch.Tensor | None = None, lpips=None,
                         first: int = 0) -> dict[str, torch.Tensor]:
    """Each image's hole PSNR (on pixels), SSIM, LPIPS (where the model is given) and hole texture of the fill and of
    the truth, the deterministic actor (the policy's mean) completing them as `aid inpaint` does. `first`: the index
    of `images[0]` in the whole validation set, whose noise seed it keeps (image i: seed i), so a share of the set
    scored by one process reads as it does in the whole (SSIM only for images of at least 11 × 11 pixels, the size
    its window needs)."""
    policy = AID(actor=actor, gamma=0.0)
    parts: dict[str, list[torch.Tensor]] = {"psnr_hole": [], "ssim": [], "lpips": [], "texture": [],
                                            "texture_truth": []}
    for i in range(0, len(images), batch):
        x0, m = images[i:i + batch], M[i:i + batch]
        completed, _ = inpainter.complete(x0, m, policy, steps, sample_generators(0, len(x0), offset=first + i),
                                          None if labels is None else labels[i:i + batch])
        parts["psnr_hole"].append(psnr_hole(completed, x0, m))
        if min(x0.shape[-2:]) >= SSIM_MIN_SIZE:
            parts["ssim"].append(ssim_01(completed, x0))
        if lpips is not None:
            parts["lpips"].append(lpips(completed, x0))
        parts["texture"].append(hole_texture(completed, m))
        parts["texture_truth"].append(hole_texture(x0, m))
    return {k: torch.cat(v) for k, v in parts.items() if v}


def summarize_validation(per_image: dict[str, torch.Tensor], by_family: bool = False) -> dict[str, float]:
    """The means of `validation_per_image`'s values over the whole set (image i in order: mask family
    FAMILIES[i % 3] of `validation_masks`); `by_family`: also each family's means, as `psnr_hole_freeform`,
    `lpips_strip`, …; `texture_ratio`: the fills' hole texture over the truth's (`metrics.quality.hole_texture`,
    summed over the images; below 1: fills smoother than the originals)."""
    per_image = dict(per_image)
    fill, truth = (per_image.pop(k) for k in ("texture", "texture_truth"))
    family = torch.arange(len(fill)) % len(FAMILIES)
    scores = {}
    for k, values in per_image.items():
        scores[k] = float(values.mean())
        if by_family:
            scores.update({f"{k}_{f}": float(values[family == j].mean())
                           for j, f in enumerate(FAMILIES) if (family == j).any()})
    for suffix, rows in [("", slice(None))] + ([(f"_{f}", family == j) for j, f in enumerate(FAMILIES)
                                                 if (family == j).any()] if by_family else []):
        if (ratio := texture_ratio(fill[rows], truth[rows])) is not None:  # None: flat originals
            scores[f"texture_ratio{suffix}"] = ratio
    return scores


def validation_scores(inpainter: Inpainter, actor, images: torch.Tensor, M: torch.Tensor, steps: int, batch: int = 64,
                      labels: torch.Tensor | None = None, lpips=None, by_family: bool = False) -> dict[str, float]:
    """Mean hole PSNR, SSIM, LPIPS (where the model is given) and texture ratio of the deterministic actor on fixed
    images and masks (`validation_per_image`, `summarize_validation`)."""
    return summarize_validation(validation_per_image(inpainter, actor, images, M, steps, batch, labels, lpips),
                                by_family)


def validation_masks(n: int, resolution, seed: int = VALIDATION_MASK_SEED) -> torch.Tensor:
    """The fixed masks of validation: image i gets mask i of the evaluation family FAMILIES[i % 3] (v1, `seed`), so
    checkpoints are chosen on all three families the benchmark reports, by default on masks of a seed of their own
    (the protocol's are seed 0: center is the same square in every seed)."""
    per_family = {f: eval_masks(f, n, resolution, seed=seed) for f in FAMILIES}
    return torch.stack([per_family[FAMILIES[i % len(FAMILIES)]][i] for i in range(n)]) if n else \
        eval_masks("freeform", 0, resolution)


def mask_families(spec: str) -> tuple[str, ...]:
    """`--train-masks freeform,box,strip` → the families' names (checked by the mask bank)."""
    return tuple(f.strip() for f in spec.split(",") if f.strip())


def one_hot_labels(data, label_dim: int, class_label: int | None, what: str) -> torch.Tensor | None:
    """float [N, label_dim] class labels of a dataset for a class-conditional backbone (None for an unconditional one):
    `--class N` for every image, else the dataset's dataset.json labels."""
    if not label_dim:
        if class_label is not None:
            raise UserError("--class: this backbone is not class-conditional; drop --class")
        return None
    if class_label is not None:
        labels = torch.full((len(data),), int(class_label), dtype=torch.int64)
    elif data.labels is None:
        raise UserError(f"{what}: the backbone is class-conditional ({label_dim} classes) and the dataset has no "
                        f"dataset.json labels: pass --class N")
    else:
        labels = data.labels
    if int(labels.min()) < 0 or int(labels.max()) >= label_dim:
        raise UserError(f"{what}: class labels lie outside the backbone's classes 0..{label_dim - 1}")
    return one_hot(labels, label_dim)


def warm_start(actor: Actor, path, actor_kwargs: dict, backbone_sha: str) -> None:
    """Load a saved module's weights into the fresh actor (e.g. to fine-tune it at another N or β). The module must
    come from the same backbone and have the same architecture; the critic and the optimisers start fresh."""
    init, info = load_guidance(path, backbone_sha)
    if info["actor"] != actor_kwargs:
        raise UserError(f"--init {path}: its actor {info['actor']} differs from this run's {actor_kwargs}; "
                        f"pass the same --width and --denoised-input")
    actor.load_state_dict(init.state_dict())


def backbone_lambda_vis(backbone, vae: str | None, lambda_vis: float | None) -> float:
    """`--lambda-vis`, or the paper's value for this backbone when it is not given: 2 on pixels (EDM), 1 on latents
    (EDM2). A `--vae` for a pixel backbone is refused here, before anything is loaded."""
    from ..backbones.checkpoint import read_metadata
    from ..errors import CheckpointError

    try:
        latent = "aid.encoder" in read_metadata(backbone)
    except CheckpointError:
        latent = False  # the trainer's load_backbone says what is wrong with the file
    if vae is not None and not latent:
        raise UserError("--vae: this backbone works on pixels and uses no VAE; drop --vae")
    return (1.0 if latent else 2.0) if lambda_vis is None else lambda_vis


def check_config(cfg: TrainConfig, world: int) -> TrainConfig:
    """The options that must agree with each other, checked before anything is loaded (one-line errors)."""
    cfg = dataclasses.replace(cfg, estimator=canonical_estimator(cfg.estimator))
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"unknown --estimator {cfg.estimator!r}: choose one of {', '.join(ESTIMATORS)} "
                        f"(proxy = backprop)")
    if cfg.explore not in ("constant", "scaled"):
        raise UserError(f"unknown --explore {cfg.explore!r}: choose constant or scaled")
    if cfg.critic not in ("plain", "privileged"):
        raise UserError(f"unknown --critic {cfg.critic!r}: choose plain or privileged")
    if not 0 <= cfg.td_lambda <= 1:
        raise UserError(f"--td-lambda must lie in [0, 1], got {cfg.td_lambda}")
    if cfg.critic == "privileged" and cfg.estimator == "pathwise":
        raise UserError("--critic privileged reads D(x; σ), whose derivative in x needs the backbone's backward pass; "
                        "the pathwise estimator differentiates V in x: use --critic plain with pathwise")
    if cfg.critic == "privileged" and (cfg.lambda_lpips or cfg.lambda_ssim):
        raise UserError("--critic privileged: its baseline ℓ(D) is the L2 loss of eq. 2; drop --lambda-lpips and "
                        "--lambda-ssim")
    families = mask_families(cfg.train_masks)
    if not families or any(f not in TRAIN_MASK_FAMILIES for f in families):
        raise UserError(f"--train-masks {cfg.train_masks!r}: give families from {', '.join(TRAIN_MASK_FAMILIES)}, "
                        f"comma-separated")
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} is not divisible by the {world} processes")
    if cfg.mix_steps and cfg.estimator != "backprop":
        raise UserError("--mix-steps alternates the backprop solve's N; the actor-critic estimators roll out at --steps "
                        "(drop --mix-steps or use --estimator backprop)")
    if cfg.mix_steps == 1:
        raise UserError("--mix-steps must be at least 2 grid steps (or 0: never)")
    return cfg


@dataclass
class Run:
    """Everything one training process holds (built by `setup`): the config, the frozen backbone and its space, the
    data, the networks and their optimisers, and where the loop stands."""

    cfg: TrainConfig
    folder: Path
    rank: int
    world: int
    device: torch.device
    log: object
    backbone_net: torch.nn.Module  # the checkpoint's network (its parameters are counted)
    backbone: object  # the denoiser the rollouts call: NHWC, autocast where asked, compiled where asked
    backbone_sha: str
    space: object  # PixelSpace or LatentSpace (backbones/spaces.py)
    res: int  # pixels
    data: object
    labels: torch.Tensor | None  # one-hot class labels of the training images (class-conditional backbones)
    val: object | None
    val_images: torch.Tensor | None
    val_M: torch.Tensor | None
    val_labels: torch.Tensor | None
    inpainter: Inpainter  # validation completes images as `aid inpaint` does
    lpips: object | None  # in the terminal cost (--lambda-lpips)
    val_lpips: object | None  # reported by validation where its weights are at hand
    actor: Actor
    critic: torch.nn.Module
    opt_actor: torch.optim.Optimizer
    opt_critic: torch.optim.Optimizer
    actor_ema: AveragedModel | None  # φ̄, the EMA of the actor's weights (--ema-halflife), or None
    actor_t: torch.nn.Module  # the actor and the critic as trained (DDP-wrapped under torchrun)
    critic_t: torch.nn.Module
    sigmas: torch.Tensor
    bank: torch.Tensor | None  # the run's training masks, drawn once (bool, 1 = known)
    paired: bool = False  # the bank's mask k belongs to image k (tasks on whole photos), not drawn apart
    it: int = 0
    elapsed: float = 0.0

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def module(self) -> Actor:
        """The actor as deployed, validated and saved: the EMA φ̄ with --ema-halflife, else φ itself."""
        return self.actor if self.actor_ema is None else self.actor_ema.module


def make_ema(actor: Actor, halflife: float) -> AveragedModel | None:
    """φ̄ with κ = 0.5^(1/halflife) per step (None for 0): its first update copies φ, later ones lerp toward it."""
    if not halflife:
        return None
    return AveragedModel(actor, multi_avg_fn=get_ema_multi_avg_fn(0.5 ** (1 / halflife)), use_buffers=True)


def setup(cfg: TrainConfig, resume: bool, device, log) -> Run:
    """Check the options, load the backbone, its space and the data, build (or restore) the actor, the critic and
    their optimisers; rank 0 writes the run's config.json and says what it trains."""
    rank, world, device = init_distributed(torch.device(device))
    cfg = check_config(cfg, world)
    run = Path(cfg.out)
    cfg = prepare_run(cfg, run, STATE_FILE, resume, log=log,
                      free=("dataset", "out", "iters", "val_dataset", "checkpoint_every", "val_every", "precision",
                            "compile", "diag_every", "diag_batch", "recompute"),
                      free_if_given=("ema_halflife",))  # a run can start averaging part-way (step 7)
    cfg = dataclasses.replace(cfg, ema_halflife=cfg.ema_halflife or 0.0)  # not given and never set: none
    cfg = dataclasses.replace(cfg, estimator=canonical_estimator(cfg.estimator))  # a run saved as `proxy`
    families = mask_families(cfg.train_masks)  # the run's own on --resume

    backbone_net, binfo = load_backbone(cfg.backbone, device=device)
    # The denoiser the rollouts call: NHWC, autocast to bf16 where asked (float32 out), compiled where asked.
    backbone = prepare_backbone(backbone_net, device, training_precision(cfg.precision, device), cfg.compile,
                                notice=log)
    backbone_sha = sha256_file(cfg.backbone)
    if cfg.init and not resume:
        if not Path(cfg.init).is_file():
            raise UserError(f"--init {cfg.init}: no such guidance module")
        cfg = dataclasses.replace(cfg, init_sha256=sha256_file(cfg.init))
    # Latent (EDM2) backbones: images, masks and validation live on pixels; the task, the state, the actor and the
    # terminal loss on the VAE's latent grid (x0 ← E(x0), M ← the conservative latent mask, y = E(M ⊙ x0)).
    space = model_space(binfo, cfg.vae, device=device)
    C, res = binfo["channels"], binfo["resolution"] * space.factor  # res: pixels
    # Whole photos (any size): tasks made as `aid inpaint` presents a hole (photo_tasks), drawn once; else an aligned
    # set at the model's resolution with masks of its own (the bank below).
    photo_bank, held = None, None
    on_skip = skip_reporter(log, rank)
    if whole_photos(cfg.dataset):
        if space.latent or binfo.get("label_dim", 0):
            raise UserError(f"--dataset {cfg.dataset}: tasks on whole photos are made for unconditional pixel "
                            f"backbones")
        photos = load_photo_set(cfg.dataset, on_skip=on_skip)
        held = split_holdout(photos, cfg.holdout)
        data, photo_bank = photo_tasks(photos, cfg.mask_bank or 4096, res, cfg.seed,
                                       multiscale=trained_multiscale(binfo))
    else:
        if cfg.holdout:
            raise UserError("--holdout takes photos out of a dataset of whole photos; an aligned set (one square "
                            "size) validates on --val")
        data = load_image_set(cfg.dataset, resolution=res, on_skip=on_skip)
    labels = one_hot_labels(data, binfo.get("label_dim", 0), cfg.class_label, cfg.dataset)
    val, val_M = None, None
    if photo_bank is not None and held is not None:
        val, val_M = photo_tasks(held, cfg.val_n, res, cfg.val_mask_seed, VALIDATION_TASKS,
                                 multiscale=trained_multiscale(binfo))
        val_M = val_M.to(torch.float32)
    elif cfg.val_dataset:
        try:
            if photo_bank is not None:
                val, val_M = photo_tasks(load_photo_set(cfg.val_dataset, offset=cfg.val_offset), cfg.val_n, res,
                                         cfg.val_mask_seed, VALIDATION_TASKS, multiscale=trained_multiscale(binfo))
                val_M = val_M.to(torch.float32)
            else:
                val = load_image_set(cfg.val_dataset, resolution=res, limit=cfg.val_n, offset=cfg.val_offset)
        except UserError:
            raise UserError(f"--val {cfg.val_dataset}: no images after its first {cfg.val_offset} (validation skips "
                            f"the benchmark's images; pass --val-offset 0 for a set of its own)") from None
    if val is not None and val_M is None:
        val_M = validation_masks(len(val), res, cfg.val_mask_seed)
    val_M = val_M.to(device) if val is not None else None
    val_images = val.as_float(slice(None)).to(device) if val else None
    val_labels = one_hot_labels(val, binfo.get("label_dim", 0), cfg.class_label, cfg.val_dataset) if val else None
    val_labels = val_labels.to(device) if val_labels is not None else None
    # the perceptual / structural terms compare completed pixel images (terminal_cost)
    for option, weight, metric, what, min_size in (
            ("--lambda-lpips", cfg.lambda_lpips, "LPIPS", "LPIPS (AlexNet)", MIN_SIZE),
            ("--lambda-ssim", cfg.lambda_ssim, "SSIM", "SSIM's window", SSIM_MIN_SIZE)):
        if weight and space.latent:
            raise UserError(f"{option}: a latent backbone's terminal loss compares latents; {metric} needs a pixel "
                            f"backbone")
        if weight and res < min_size:
            raise UserError(f"{option}: {what} needs images of at least {min_size}x{min_size} pixels; this backbone "
                            f"makes {res}x{res}")
    # frozen; LPIPSUnavailable says in one line how to get its weights
    lpips = load_lpips(device, notice=log) if cfg.lambda_lpips else None
    # validation also reports LPIPS of the completed images when its weights are at hand (never downloaded for it)
    val_lpips = lpips
    if val_lpips is None and val is not None and res >= MIN_SIZE:  # every process scores a share
        try:
            val_lpips = load_lpips(device, offline=True)
        except LPIPSUnavailable:
            val_lpips = None

    torch.manual_seed(cfg.seed)
    actor = Actor(**cfg.actor_kwargs(C)).to(device)
    critic = cfg.make_critic(C).to(device)
    opt_actor = torch.optim.Adam(actor.parameters(), lr=cfg.lr_actor)
    opt_critic = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic)
    it, elapsed = 0, 0.0
    if cfg.init and not resume:  # a resumed run's own state already holds the warm-started actor
        warm_start(actor, cfg.init, cfg.actor_kwargs(C), backbone_sha)
    actor_ema = make_ema(actor, cfg.ema_halflife)
    if resume:
        # a state saved without φ̄ (a run that starts averaging now) leaves it fresh: its first update copies φ
        meta = load_state(run / STATE_FILE, {"actor": actor, "critic": critic,
                                             **({"actor_ema": actor_ema} if actor_ema is not None else {})},
                          {"opt_actor": opt_actor, "opt_critic": opt_critic}, device=device, optional=("actor_ema",))
        it, elapsed = meta["iteration"], meta["elapsed_s"]
    ddp = (lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)) \
        if world > 1 else (lambda m: m)
    # the run's training masks, drawn once (bool, 1 = known); each iteration indexes it with its own generator
    if photo_bank is not None:  # task k's mask belongs to its image (draw_tasks indexes both alike)
        bank = photo_bank
    else:
        bank = training_mask_bank(cfg.mask_bank, res, cfg.seed, families, (cfg.hole_min, cfg.hole_max)) \
            if cfg.mask_bank else None
    r = Run(cfg=cfg, folder=run, rank=rank, world=world, device=device, log=log, backbone_net=backbone_net,
            backbone=backbone, backbone_sha=backbone_sha, space=space, res=res, data=data, labels=labels, val=val,
            paired=photo_bank is not None,
            val_images=val_images, val_M=val_M, val_labels=val_labels,
            inpainter=Inpainter(backbone, binfo, space, device, Path(cfg.backbone)), lpips=lpips, val_lpips=val_lpips,
            actor=actor, critic=critic, opt_actor=opt_actor, opt_critic=opt_critic, actor_ema=actor_ema,
            actor_t=ddp(actor), critic_t=ddp(critic), sigmas=edm_sigmas(cfg.steps, device=device), bank=bank, it=it,
            elapsed=elapsed)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        n_actor, n_backbone = count_parameters(actor), count_parameters(backbone_net)
        log(f"{'resuming' if resume else 'training'} AID guidance: actor {n_actor:,} parameters "
            f"({100 * n_actor / n_backbone:.2f} % of the {n_backbone:,}-parameter backbone), critic "
            f"{count_parameters(critic):,}; {len(data):,} training images → {run}"
            + (f"; the module saved is the actor's EMA (half-life {cfg.ema_halflife:g} iterations)"
               if actor_ema is not None else ""))
    return r


def split_holdout(photos, every: int):
    """Keep every `every`-th photo (by name: indices every−1, 2·every−1, …) out of `photos` (changed in place) and
    return them as a PhotoSet of their own; None for every = 0."""
    if not every:
        return None
    if every < 2 or every > len(photos):
        raise UserError(f"--holdout {every}: keep every Nth photo out, 2 <= N <= {len(photos)}")
    out = [i for i in range(len(photos)) if i % every == every - 1]
    kept = [i for i in range(len(photos)) if i % every != every - 1]
    held = dataclasses.replace(photos, photos=[photos.photos[i] for i in out], names=[photos.names[i] for i in out],
                               skipped=[], source=f"{photos.source} (every {every}th photo, held out)")
    photos.photos, photos.names = [photos.photos[i] for i in kept], [photos.names[i] for i in kept]
    return held


def draw_tasks(r: Run, g: torch.Generator, batch: int, step: int, sl=slice(None)):
    """(task, x0, seed of the initial noise) of `batch` tasks drawn with `g`; this process's share `sl`."""
    cfg = r.cfg
    idx = torch.randint(len(r.data), (batch,), generator=g)
    if r.paired:
        M_all = r.bank[idx].to(torch.float32)
    elif r.bank is not None:
        M_all = r.bank[torch.randint(len(r.bank), (batch,), generator=g)].to(torch.float32)
    else:
        M_all = training_masks(batch, r.res, cfg.seed, step, hole_range=(cfg.hole_min, cfg.hole_max))
    x0 = r.data.as_float(idx[sl]).to(r.device)
    task = r.space.task(x0, M_all[sl].to(r.device), None if r.labels is None else r.labels[idx[sl]].to(r.device))
    if r.space.latent:
        x0 = r.space.encode(x0)  # the terminal loss compares latents (method.md §4: λ_vis = λ_hole = 1 there)
    return task, x0, int(torch.randint(2 ** 62, (1,), generator=g))


def step(r: Run, prev_grad: torch.Tensor | None) -> dict:
    """One iteration (the module docstring's steps 1–6) on this process's share of the batch: the losses, the
    gradient norms, the actor's gradient and its cosine to the previous one (≈ 0 when the estimator's noise swamps its
    signal)."""
    cfg, world = r.cfg, r.world
    B_local = cfg.batch // world
    sl = slice(r.rank * B_local, (r.rank + 1) * B_local)
    task, x0, noise_seed = draw_tasks(r, step_generator(cfg.seed, r.it), cfg.batch, r.it, sl)
    gens = sample_generators(noise_seed, cfg.batch)[sl]
    if cfg.estimator == "backprop":  # J's exact gradient through the whole frozen solve
        N = rollout_steps(cfg, r.it)
        out = backprop_loss(cfg, r.backbone, r.actor, task, x0, gens, r.lpips, steps=N)
        out["steps"] = N
        out["critic_loss"] = torch.zeros(())
    else:
        with torch.no_grad():
            X, A, X_N, D = rollout(r.backbone, r.actor, task, cfg.steps, cfg.gamma, gens, cfg.explore == "scaled")
        out = actor_critic_losses(cfg, r.actor_t, r.critic_t, X, A, X_N, x0, task, r.sigmas, D, r.lpips)
    if not (math.isfinite(out["critic_loss"].item()) and math.isfinite(out["actor_loss"].item())):
        raise RuntimeError(f"non-finite loss at iteration {r.it}; the last checkpoint in {r.folder} is intact")
    r.opt_critic.zero_grad(set_to_none=True)
    r.opt_actor.zero_grad(set_to_none=True)
    out["actor_loss"].backward()
    if cfg.estimator == "backprop":
        if world > 1:  # the raw actor ran N times in the loop: average its gradients by hand
            for p in r.actor.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    else:
        out["critic_loss"].backward()
    out["gn_critic"] = torch.nn.utils.clip_grad_norm_(r.critic.parameters(), cfg.clip)
    out["gn_actor"] = torch.nn.utils.clip_grad_norm_(r.actor.parameters(), cfg.clip)
    grad = torch.cat([p.grad.flatten() for p in r.actor.parameters() if p.grad is not None])
    out["grad_cos"] = float(torch.nn.functional.cosine_similarity(grad, prev_grad, dim=0)) \
        if prev_grad is not None and len(prev_grad) == len(grad) else None
    out["grad"] = grad
    r.opt_critic.step()
    r.opt_actor.step()
    if world > 1:
        whole_batch_statistics(out, world)
    if r.actor_ema is not None:
        r.actor_ema.update_parameters(r.actor)  # φ̄ ← κ·φ̄ + (1 − κ)·φ (step 7)
    return out


def whole_batch_statistics(out: dict, world: int) -> None:
    """Under torchrun, the logged statistics of the whole batch instead of this process's slice: the losses averaged
    over the processes (equal slices: the batch's means), the per-task and per-step tensors gathered along the batch
    (critic_ev stays rank 0's own)."""
    for k in ("actor_loss", "critic_loss"):
        v = out[k].detach().clone()
        torch.distributed.all_reduce(v)
        out[k] = v / world
    for k, dim in (("terminal", 0), ("energy", 0), ("V0", 0), ("delta", 1)):
        if k in out:
            parts = [torch.empty_like(out[k]) for _ in range(world)]
            torch.distributed.all_gather(parts, out[k].contiguous())
            out[k] = torch.cat(parts, dim=dim)


def validation_due(r: Run) -> bool:
    return r.val is not None and (r.it % r.cfg.val_every == 0 or r.it == r.cfg.iters)


def validate(r: Run) -> dict:
    """val_psnr_hole_{18,12}, val_ssim_{18,12}, val_lpips_{18,12} (where LPIPS is at hand) and
    val_texture_ratio_{18,12} (the fills' hole texture over the truth's), logged in one line. Every process calls
    it: under torchrun each scores a contiguous share of the images (with their own noise seeds, so the numbers are
    one process's) and rank 0 gathers the shares; the other ranks return {}."""
    n = len(r.val_images)
    lo, hi = r.rank * n // r.world, (r.rank + 1) * n // r.world
    labels = None if r.val_labels is None else r.val_labels[lo:hi]
    share = {N: {k: v.cpu() for k, v in validation_per_image(r.inpainter, r.module, r.val_images[lo:hi],
                                                             r.val_M[lo:hi], N, labels=labels, lpips=r.val_lpips,
                                                             first=lo).items()}
             for N in (18, 12)}
    shares = gather_to_rank0(share, r.rank, r.world)
    if r.rank != 0:
        return {}
    rec = {}
    for N in (18, 12):
        keys = next(s[N] for s in shares if s[N]).keys()  # a share without images holds no keys
        merged = {k: torch.cat([s[N][k] for s in shares if s[N]]) for k in keys}
        rec.update({f"val_{k}_{N}": v for k, v in summarize_validation(merged).items()})
    r.log(f"it {r.it}: val PSNR-hole {rec['val_psnr_hole_18']:.2f} dB (N=18), {rec['val_psnr_hole_12']:.2f} dB (N=12)"
          + (f"; SSIM {rec['val_ssim_18']:.3f} / {rec['val_ssim_12']:.3f}" if "val_ssim_18" in rec else "")
          + (f"; LPIPS {rec['val_lpips_18']:.3f} / {rec['val_lpips_12']:.3f}" if r.val_lpips is not None else "")
          + (f"; texture {rec['val_texture_ratio_18']:.2f} / {rec['val_texture_ratio_12']:.2f} of the truth's"
             if "val_texture_ratio_18" in rec else ""))
    return rec


def diagnose(r: Run) -> dict:
    """The gradient diagnostic on tasks of its own (its own generator: training's draws are untouched)."""
    cfg = r.cfg
    task, x0, noise_seed = draw_tasks(r, step_generator(cfg.seed + DIAG_SEED_OFFSET, r.it), cfg.diag_batch or cfg.batch,
                                      -1 - r.it)
    rec = gradient_diagnostic(cfg, r.backbone, r.actor, r.critic, task, x0, noise_seed, r.sigmas, r.lpips,
                              actor_critic=cfg.estimator != "backprop")
    b = max(int(k.rsplit("_b", 1)[1]) for k in rec if k.startswith("diag_cos_backprop_b"))
    r.log(f"it {r.it}: gradient cosines to the exact gradient at batch {b}: "
          + ", ".join(f"{k[9:-len(f'_b{b}')]} {v:+.3f}" for k, v in rec.items()
                      if k.endswith(f"_b{b}") and "backprop" not in k))
    return rec


def log_record(r: Run, out: dict, seconds: float, val: dict) -> dict:
    """The iteration's line of stats.jsonl (rank 0), with validation's scores `val` and the diagnostic when due."""
    cfg = r.cfg
    rec = {"iteration": r.it, "actor_loss": out["actor_loss"].item(), "actor_grad_norm": float(out["gn_actor"]),
           "actor_grad_cos_prev": out["grad_cos"],
           "terminal": out["terminal"].mean().item(), "control_energy": out["energy"].mean().item(),
           "seconds": round(seconds, 3)}
    if r.world > 1:  # torchrun: the iteration's CPU (or GPU) time is `processes` × its seconds
        rec["processes"] = r.world
    if cfg.mix_steps:  # the solve's N alternates: its terminal loss and energy belong to this N
        rec["steps"] = out["steps"]
    if cfg.estimator != "backprop":
        d = out["delta"]
        rec.update({"critic_loss": out["critic_loss"].item(), "delta_mean": d.mean().item(),
                    "delta_std": d.std().item(), "critic_grad_norm": float(out["gn_critic"]),
                    "critic_ev": out["critic_ev"], "V0": out["V0"].mean().item()})
    rec.update(val)
    if cfg.diag_every and r.it % cfg.diag_every == 0:
        rec.update(diagnose(r))
    append_stats(r, rec)
    return rec


def append_stats(r: Run, rec: dict) -> None:
    with open(r.folder / "stats.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def save_checkpoint(r: Run) -> None:
    """The resumable state, the curves, and the module: guidance.safetensors and a numbered copy in modules/."""
    cfg, run, C = r.cfg, r.folder, r.actor.channels
    save_state(r.state_path, {"actor": r.actor, "critic": r.critic,
                              **({"actor_ema": r.actor_ema} if r.actor_ema is not None else {})},
               {"opt_actor": r.opt_actor, "opt_critic": r.opt_critic},
               {"config": dataclasses.asdict(cfg), "iteration": r.it, "elapsed_s": r.elapsed})
    training_curves(read_jsonl(run / "stats.jsonl", notice=r.log), run / CURVES_FILE,
                    f"aid train ({cfg.estimator}): {run.name}, batch {cfg.batch}, N = {cfg.steps}")
    training = {**dataclasses.asdict(cfg), "iterations": r.it, "train_seconds": round(r.elapsed, 1),
                "backbone": str(cfg.backbone)}
    save_guidance(run / GUIDANCE_FILE, r.module, cfg.actor_kwargs(C), r.backbone_sha, training=training)
    # every checkpoint's module is kept (~35 k parameters each), so the best on validation can be picked later
    (run / SNAPSHOT_DIR).mkdir(exist_ok=True)
    save_guidance(run / SNAPSHOT_DIR / f"guidance-{r.it:06d}.safetensors", r.module, cfg.actor_kwargs(C),
                  r.backbone_sha, training=training)


def train(cfg: TrainConfig, resume: bool = False, device="cpu", max_iters: int | None = None, progress: bool = True,
          log=print) -> Path:
    """Train the guidance module: setup, then step after step, each logged (rank 0) and checkpointed now and then,
    until --iters (or `max_iters`) or a SIGINT/SIGTERM, which finishes the step, saves and leaves."""
    with run_lock(Path(cfg.out)):  # one process (one torchrun job) at a time in a run folder
        return _train(cfg, resume, device, max_iters, progress, log)


def _train(cfg: TrainConfig, resume: bool, device, max_iters: int | None, progress: bool, log) -> Path:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    r = setup(cfg, resume, device, log)
    cfg = r.cfg
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} it"),
                   TextColumn(("TD {task.fields[td]:.4f}  " if cfg.estimator != "backprop" else "")  # no critic
                              + "ℓ {task.fields[ell]:.4f}"), TimeRemainingColumn(),
                   disable=not progress or r.rank != 0)
    with bar, GracefulStop() as stop:
        ptask = bar.add_task("train", total=cfg.iters, completed=r.it, td=float("nan"), ell=float("nan"))
        if r.it == 0 and r.val is not None:  # the starting point: u ≡ 0 is the unguided sampler
            val = validate(r)
            if r.rank == 0:
                append_stats(r, {"iteration": 0, **val})
        prev_grad = None
        while r.it < cfg.iters and (max_iters is None or r.it < max_iters):
            t0 = time.time()
            out = step(r, prev_grad)
            prev_grad = out["grad"]
            r.it += 1
            r.elapsed += time.time() - t0
            seconds = time.time() - t0
            stopping = stop.agreed(r.world, r.device)  # SIGINT/SIGTERM: finish this iteration, save, leave
            val = validate(r) if validation_due(r) else {}  # every process scores its share
            if r.rank != 0:
                if stopping:
                    break
                continue
            rec = log_record(r, out, seconds, val)
            bar.update(ptask, completed=r.it, td=rec.get("critic_loss", float("nan")), ell=rec["terminal"])
            if stopping or r.it % cfg.checkpoint_every == 0 or r.it == cfg.iters or \
                    (max_iters is not None and r.it >= max_iters):
                save_checkpoint(r)
            if stopping:
                log(f"stopped at iteration {r.it}; state and module saved; continue with --resume")
                break
    if r.world > 1:
        torch.distributed.barrier()
    return r.folder
