"""`aid train`: learn the guidance module with the continuous-time actor–critic (method.md §4–§6, Algorithm 1).

One iteration, for a batch of tasks:
  1. x0 from the training split, M from the free-form brush distribution, y = M ⊙ x0, X_0 ~ N(0, σmax² I).
  2. Roll out the controlled ODE (the same sampler loop and `aid` method as deployment) with sampled actions
     a_n = μ_φ(t_n, X_n; ξ) + √γ ε_n, no gradient through the backbone.
  3. Running costs r_n = (β/2)(‖a_n‖²/d − γ)·Δt  (centred, eq. 5; means over the d pixels, as ℓ).
     Terminal target ℓ(X_N) = (λ_vis/2)·mean(M ⊙ (X_N − x0))² + (λ_hole/2)·mean(M̄ ⊙ (X_N − x0))²   (eq. 2)
     (+ λ_lpips·LPIPS of the completed image with --lambda-lpips, an option beyond the paper: terminal_cost).
     TD residuals δ_n = V_θ(t_{n+1}, X_{n+1}) − V_θ(t_n, X_n) + r_n, with V_θ(T, X_N) replaced by ℓ(X_N).
  4. Critic (eq. 10): descend Σ_n δ_n²/2 with the next-state value detached (semi-gradient TD).
  5. Actor (eq. 11): φ ← φ − α_φ Σ_n δ_n ∇_φ log π_φ(a_n | t_n, X_n), ∇_φ log π = ((a_n − μ_n)/γ)·∇_φ μ_n,
     i.e. descend Σ_n sg(δ_n)·log π_φ(a_n) with log π = −‖a_n − μ_n‖²/(2γ) + const.
  6. Adam for both, constant learning rates, gradient-norm clipping.
Pixel sums vs means: ℓ and the running cost both use means over the d = C·H·W entries (recorded in the config);
log π is the true Gaussian log-density (a sum over entries).

`--estimator` chooses the actor's gradient; the critic's update (eq. 10) is the same for the first two:
  score     the paper's eq. 11 above (faithful; the default).
  pathwise  a one-step pathwise gradient through the critic (method.md §6's variant, DDPG/SVG(0)-style). The control
            enters the step additively, X_{n+1} = Heun(X_n) + a_n·Δt, so with X̂_{n+1} = X_{n+1} − a_n·Δt the actor
            descends Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, X̂_{n+1} + μ_n·Δt), with V_θ(T, ·) = ℓ exactly, the critic's
            weights held fixed: ∇_a of the one-step cost-to-go, no backbone gradient.
  proxy     the "supervised proxy" ablation: no critic, no sampled actions; backpropagate
            ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt through the whole deterministic frozen solve (every backbone evaluation
            gets a backward pass).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

from ..backbones.checkpoint import load_backbone, sha256_file
from ..backbones.latent import PixelSpace, model_space
from ..data.datasets import load_image_set
from ..data.masks import eval_masks, training_masks
from ..devices import prepare_backbone, training_precision
from ..errors import UserError
from ..fileio import atomic_write_text
from ..methods.aid import AID
from ..metrics.lpips import MIN_SIZE, LPIPSUnavailable, load_lpips
from ..metrics.quality import psnr_hole
from ..sampling.heun import SamplerState, edm_sigmas, heun_step, sample, sample_generators
from ..task import Task
from ..training import GracefulStop, init_distributed, load_state, prepare_run, save_state, step_generator
from .checkpoint import load_guidance, save_guidance
from .curves import read_stats, training_curves
from .networks import Actor, Critic, count_parameters

STATE_FILE = "training-state.safetensors"
GUIDANCE_FILE = "guidance.safetensors"
SNAPSHOT_DIR = "modules"  # guidance-NNNNNN.safetensors: the module at each checkpoint
CURVES_FILE = "curves.png"
ESTIMATORS = ("score", "pathwise", "proxy")


@dataclass
class TrainConfig:
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
    val_n: int = 32  # fixed val images (free-form masks v1, seed 0) for the validation PSNR
    checkpoint_every: int = 50  # iterations between resumable states
    val_dataset: str | None = None
    vae: str | None = None  # latent backbones: a local diffusers VAE folder instead of the pinned hub VAE
    class_label: int | None = None  # class-conditional backbones: this class for every image (else dataset.json)
    estimator: str = "score"  # actor gradient: score (eq. 11) | pathwise | proxy (see the module docstring)
    precision: str = "auto"  # the frozen backbone's autocast in rollouts (devices.training_precision); nets stay fp32
    compile: bool = False  # torch.compile the frozen backbone
    denoised_input: bool = False  # the actor also reads D(X_n; σ_n) and M ⊙ (y − D) (networks.py; an option)
    lambda_lpips: float = 0.0  # an option beyond the paper: ℓ + λ·LPIPS of the completed image (terminal_cost)
    init: str | None = None  # warm start: the actor's weights from this guidance module (same backbone, same actor)
    init_sha256: str | None = None  # its sha256, recorded for provenance
    reductions: str = "mean over C·H·W in both the terminal loss and the running cost"

    def actor_kwargs(self, channels: int) -> dict:
        kw = dict(channels=channels, width=self.width, emb_dim=16)
        if self.denoised_input:  # recorded only when on: modules without it keep their metadata (and sha256)
            kw["denoised_input"] = True
        return kw

    def critic_kwargs(self, channels: int) -> dict:
        return dict(channels=channels, width=self.critic_width, emb_dim=16)


def terminal_loss(x: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, lambda_vis: float, lambda_hole: float):
    """ℓ(x; x0, M) per image, means over all entries (eq. 2)."""
    err2 = (x - x0) ** 2
    return (lambda_vis / 2) * (M * err2).mean(dim=(1, 2, 3)) + (lambda_hole / 2) * ((1 - M) * err2).mean(dim=(1, 2, 3))


def terminal_cost(cfg: TrainConfig, x: torch.Tensor, x0: torch.Tensor, task: Task, lpips=None) -> torch.Tensor:
    """The run's terminal cost per image: ℓ of eq. 2, plus, with --lambda-lpips (an option beyond the paper, which
    the theory allows: any terminal cost g(X_N) of the final state), λ_lpips·LPIPS(M ⊙ y + M̄ ⊙ x, x0), the
    perceptual distance of the completed image. The L2 terms alone reward the smooth mean of the plausible fills."""
    ell = terminal_loss(x, x0, task.M, cfg.lambda_vis, cfg.lambda_hole)
    if cfg.lambda_lpips:
        if lpips is None:
            raise ValueError("lambda_lpips > 0 needs the LPIPS model")
        ell = ell + cfg.lambda_lpips * lpips(task.complete(x), x0)
    return ell


def rollout(backbone, actor: Actor, task: Task, steps: int, gamma: float, generators) -> tuple[torch.Tensor, ...]:
    """Sampled-action rollout through the ordinary sampler loop: (X [N,B,...], A [N,B,...], X_N [B,...], D), where D
    [N,B,...] stacks the steps' D(X_n; σ_n) for an actor that reads them (`denoised_input`), else None."""
    policy = AID(actor=actor, gamma=gamma, record=True)
    result = sample(backbone, task, policy, num_steps=steps, generators=generators)
    X = torch.stack([x for _, x, _, _ in policy.trajectory])
    A = torch.stack([a for _, _, a, _ in policy.trajectory])
    D = torch.stack([d for *_, d in policy.trajectory]) if actor.denoised_input else None
    return X, A, result.x, D


def actor_critic_losses(cfg: TrainConfig, actor, critic, X, A, X_N, x0, task: Task, sigmas, D=None,
                        lpips=None) -> dict:
    """The TD residuals and both losses of one batch of rollouts (steps 3–5 above)."""
    N, B = X.shape[:2]
    dt = 1.0 / N
    M, y = task.M, task.y
    flat = lambda t: t.reshape(N * B, *t.shape[2:])  # noqa: E731
    rep = lambda t: t.unsqueeze(0).expand(N, *t.shape).reshape(N * B, *t.shape[1:])  # noqa: E731
    sig = sigmas[:N].to(X.device).repeat_interleave(B)
    r = (cfg.beta / 2) * ((A ** 2).mean(dim=(2, 3, 4)) - cfg.gamma) * dt  # [N, B]
    ell = terminal_cost(cfg, X_N, x0, task, lpips)  # [B]
    V = critic(sig, flat(X), rep(M), rep(y)).reshape(N, B)
    V_next = torch.cat([V[1:].detach(), ell[None]], dim=0)
    delta = V_next - V + r
    critic_loss = 0.5 * (delta ** 2).sum(0).mean()
    mu = actor(sig, flat(X), rep(M), rep(y), denoised=None if D is None else flat(D)).reshape(A.shape)
    if cfg.estimator == "pathwise":
        actor_loss = pathwise_actor_loss(cfg, critic, X, A, X_N, mu, x0, task, sigmas, lpips)
    else:  # eq. 11: Σ_n sg(δ_n)·log π_φ(a_n | t_n, X_n)
        log_pi = -((A - mu) ** 2).sum(dim=(2, 3, 4)) / (2 * cfg.gamma)  # up to a constant
        actor_loss = (delta.detach() * log_pi).sum(0).mean()
    target = V_next.detach() + r  # what V_θ(t_n, X_n) regresses on; explained variance = 1 − var(δ)/var(target)
    return {"critic_loss": critic_loss, "actor_loss": actor_loss, "delta": delta.detach(), "terminal": ell.detach(),
            "energy": (A ** 2).mean(dim=(2, 3, 4)).sum(0).mul(dt).detach(), "V0": V[0].detach(),
            "critic_ev": (1 - delta.detach().var() / target.var().clamp_min(1e-12)).item()}


def _frozen(net):
    """`net` as a function of its input only: its weights enter as constants (no gradient to them, DDP or not)."""
    module = getattr(net, "module", net)
    params = {k: v.detach() for k, v in module.named_parameters()}
    return lambda *args: torch.func.functional_call(module, params, args)


def pathwise_actor_loss(cfg: TrainConfig, critic, X, A, X_N, mu, x0, task: Task, sigmas, lpips=None) -> torch.Tensor:
    """Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, X̂_{n+1} + μ_n·Δt), V_θ(T, ·) = ℓ; mean over the batch (estimator pathwise)."""
    N, B = X.shape[:2]
    dt = 1.0 / N
    X_next_hat = torch.cat([X[1:], X_N[None]]) - A * dt  # Heun(X_n): the step without its control
    X_next = X_next_hat + mu * dt
    V = _frozen(critic)
    values = [V(sigmas[n + 1].to(X.device).expand(B), X_next[n], task.M, task.y) for n in range(N - 1)]
    values.append(terminal_cost(cfg, X_next[-1], x0, task, lpips))
    running = (cfg.beta / 2) * (mu ** 2).mean(dim=(2, 3, 4)) * dt
    return (running + torch.stack(values)).sum(0).mean()


def proxy_loss(cfg: TrainConfig, backbone, actor, task: Task, x0, generators, lpips=None) -> dict:
    """The supervised proxy: ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt through the whole deterministic solve (backbone included)."""
    energy = []

    class Recorded(AID):
        def drift(self, s, n, x, denoised):
            u = super().drift(s, n, x, denoised)
            energy.append((u ** 2).mean(dim=(1, 2, 3)))
            return u

    s = SamplerState(net=backbone, task=task, sigmas=edm_sigmas(cfg.steps, device=x0.device), generators=generators)
    policy = Recorded(actor=actor, gamma=0.0)
    x = s.randn_like(task.y) * s.sigmas[0]
    for n in range(cfg.steps):  # each step's activations are recomputed in the backward pass: memory of one step
        x = torch.utils.checkpoint.checkpoint(heun_step, s, policy, n, x, use_reentrant=False)
    ell = terminal_cost(cfg, x, x0, task, lpips)
    E = torch.stack(energy).sum(0) * s.dt
    return {"actor_loss": (ell + (cfg.beta / 2) * E).mean(), "terminal": ell.detach(), "energy": E.detach()}


@torch.no_grad()
def validation_scores(backbone, actor, images: torch.Tensor, M: torch.Tensor, steps: int, batch: int = 64,
                      space=None, labels: torch.Tensor | None = None, lpips=None) -> dict[str, float]:
    """Mean hole PSNR (on pixels) of the deterministic actor (the policy's mean) on fixed images and masks, and the
    completed images' mean LPIPS when the model is given."""
    space = space or PixelSpace()
    policy = AID(actor=actor, gamma=0.0)
    psnr, perceptual = [], []
    for i in range(0, len(images), batch):
        x0, m = images[i:i + batch], M[i:i + batch]
        task = space.task(x0, m, None if labels is None else labels[i:i + batch])
        out = sample(backbone, task, policy, num_steps=steps, generators=sample_generators(0, len(x0), offset=i))
        completed = space.to_pixels(x0, m, out.completed)
        psnr.append(psnr_hole(completed, x0, m))
        if lpips is not None:
            perceptual.append(lpips(completed, x0))
    scores = {"psnr_hole": float(torch.cat(psnr).mean())}
    if lpips is not None:
        scores["lpips"] = float(torch.cat(perceptual).mean())
    return scores


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
    return torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)


def warm_start(actor: Actor, path, actor_kwargs: dict, backbone_sha: str) -> None:
    """Load a saved module's weights into the fresh actor (e.g. to fine-tune it at another N or β). The module must
    come from the same backbone and have the same architecture; the critic and the optimisers start fresh."""
    init, info = load_guidance(path, backbone_sha)
    if info["actor"] != actor_kwargs:
        raise UserError(f"--init {path}: its actor {info['actor']} differs from this run's {actor_kwargs}; "
                        f"pass the same --width and --denoised-input")
    actor.load_state_dict(init.state_dict())


def train(cfg: TrainConfig, resume: bool = False, device="cpu", max_iters: int | None = None, progress: bool = True,
          log=print) -> Path:
    rank, world, device = init_distributed(torch.device(device))
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"unknown --estimator {cfg.estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} is not divisible by the {world} processes")
    run = Path(cfg.out)
    state_path = run / STATE_FILE
    cfg = prepare_run(cfg, run, STATE_FILE, resume, log=log,
                      free=("dataset", "out", "iters", "val_dataset", "checkpoint_every", "val_every", "precision",
                            "compile"))

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
    data = load_image_set(cfg.dataset, resolution=res)
    labels = one_hot_labels(data, binfo.get("label_dim", 0), cfg.class_label, cfg.dataset)
    val = load_image_set(cfg.val_dataset, resolution=res, limit=cfg.val_n) if cfg.val_dataset else None
    val_M = eval_masks("freeform", len(val), res, seed=0).to(device) if val else None
    val_labels = one_hot_labels(val, binfo.get("label_dim", 0), cfg.class_label, cfg.val_dataset) if val else None
    val_labels = val_labels.to(device) if val_labels is not None else None
    lpips = None
    if cfg.lambda_lpips:
        if space.latent:
            raise UserError("--lambda-lpips: a latent backbone's terminal loss compares latents; LPIPS needs a pixel "
                            "backbone")
        if res < MIN_SIZE:
            raise UserError(f"--lambda-lpips: LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels; "
                            f"this backbone makes {res}x{res}")
        lpips = load_lpips(device, notice=log)  # frozen; LPIPSUnavailable says in one line how to get its weights
    # validation also reports LPIPS of the completed images when its weights are at hand (never downloaded for it)
    val_lpips = lpips
    if val_lpips is None and val is not None and rank == 0 and res >= MIN_SIZE:
        try:
            val_lpips = load_lpips(device, offline=True)
        except LPIPSUnavailable:
            val_lpips = None

    torch.manual_seed(cfg.seed)
    actor = Actor(**cfg.actor_kwargs(C)).to(device)
    critic = Critic(**cfg.critic_kwargs(C)).to(device)
    opt_actor = torch.optim.Adam(actor.parameters(), lr=cfg.lr_actor)
    opt_critic = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic)
    it, elapsed = 0, 0.0
    if cfg.init and not resume:  # a resumed run's own state already holds the warm-started actor
        warm_start(actor, cfg.init, cfg.actor_kwargs(C), backbone_sha)
    if resume:
        meta = load_state(state_path, {"actor": actor, "critic": critic},
                          {"opt_actor": opt_actor, "opt_critic": opt_critic}, device=device)
        it, elapsed = meta["iteration"], meta["elapsed_s"]
    ddp = (lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)) \
        if world > 1 else (lambda m: m)
    actor_t, critic_t = ddp(actor), ddp(critic)
    sigmas = edm_sigmas(cfg.steps, device=device)

    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        n_actor, n_backbone = count_parameters(actor), count_parameters(backbone_net)
        log(f"{'resuming' if resume else 'training'} AID guidance: actor {n_actor:,} parameters "
            f"({100 * n_actor / n_backbone:.2f} % of the {n_backbone:,}-parameter backbone), critic "
            f"{count_parameters(critic):,}; {len(data):,} training images → {run}")

    def checkpoint():
        save_state(state_path, {"actor": actor, "critic": critic}, {"opt_actor": opt_actor, "opt_critic": opt_critic},
                   {"config": dataclasses.asdict(cfg), "iteration": it, "elapsed_s": elapsed})
        training_curves(read_stats(run / "stats.jsonl", notice=log), run / CURVES_FILE,
                        f"aid train ({cfg.estimator}): {run.name}, batch {cfg.batch}, N = {cfg.steps}")
        training = {**dataclasses.asdict(cfg), "iterations": it, "train_seconds": round(elapsed, 1),
                    "backbone": str(cfg.backbone)}
        save_guidance(run / GUIDANCE_FILE, actor, cfg.actor_kwargs(C), backbone_sha, training=training)
        # every checkpoint's module is kept (~35 k parameters each), so the best on validation can be picked later
        (run / SNAPSHOT_DIR).mkdir(exist_ok=True)
        save_guidance(run / SNAPSHOT_DIR / f"guidance-{it:06d}.safetensors", actor, cfg.actor_kwargs(C), backbone_sha,
                      training=training)

    def validate() -> dict:
        """val_psnr_hole_{18,12} (and val_lpips_{18,12} where LPIPS is at hand), logged in one line."""
        vx, rec = val.as_float(slice(None)).to(device), {}
        for N in (18, 12):
            for k, v in validation_scores(backbone, actor, vx, val_M, N, space=space, labels=val_labels,
                                          lpips=val_lpips).items():
                rec[f"val_{k}_{N}"] = v
        log(f"it {it}: val PSNR-hole {rec['val_psnr_hole_18']:.2f} dB (N=18), {rec['val_psnr_hole_12']:.2f} dB (N=12)"
            + (f"; LPIPS {rec['val_lpips_18']:.3f} / {rec['val_lpips_12']:.3f}" if val_lpips is not None else ""))
        return rec

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    B_local = cfg.batch // world
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} it"),
                   TextColumn("TD {task.fields[td]:.4f}  ℓ {task.fields[ell]:.4f}"), TimeRemainingColumn(),
                   disable=not progress or rank != 0)
    with bar, GracefulStop() as stop:
        ptask = bar.add_task("train", total=cfg.iters, completed=it, td=float("nan"), ell=float("nan"))
        if it == 0 and val is not None and rank == 0:  # the starting point: u ≡ 0 is the unguided sampler
            vx = val.as_float(slice(None)).to(device)
            rec = {"iteration": 0, **validate()}
            with open(run / "stats.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        prev_grad = None
        while it < cfg.iters and (max_iters is None or it < max_iters):
            t0 = time.time()
            g = step_generator(cfg.seed, it)
            idx = torch.randint(len(data), (cfg.batch,), generator=g)
            M_all = training_masks(cfg.batch, res, cfg.seed, it, hole_range=(cfg.hole_min, cfg.hole_max))
            sl = slice(rank * B_local, (rank + 1) * B_local)
            x0 = data.as_float(idx[sl]).to(device)
            task = space.task(x0, M_all[sl].to(device), None if labels is None else labels[idx[sl]].to(device))
            if space.latent:
                x0 = space.encode(x0)  # the terminal loss compares latents (method.md §4: λ_vis = λ_hole = 1 there)
            gens = sample_generators(int(torch.randint(2 ** 62, (1,), generator=g)), cfg.batch)[sl]
            if cfg.estimator == "proxy":  # the ablation: backpropagate through the whole frozen solve
                out = proxy_loss(cfg, backbone, actor, task, x0, gens, lpips)
                out["critic_loss"] = torch.zeros(())
            else:
                with torch.no_grad():
                    X, A, X_N, D = rollout(backbone, actor, task, cfg.steps, cfg.gamma, gens)
                out = actor_critic_losses(cfg, actor_t, critic_t, X, A, X_N, x0, task, sigmas, D, lpips)
            if not (math.isfinite(out["critic_loss"].item()) and math.isfinite(out["actor_loss"].item())):
                raise RuntimeError(f"non-finite loss at iteration {it}; the last checkpoint in {run} is intact")
            opt_critic.zero_grad(set_to_none=True)
            opt_actor.zero_grad(set_to_none=True)
            out["actor_loss"].backward()
            if cfg.estimator == "proxy":
                if world > 1:  # the raw actor ran N times in the loop: average its gradients by hand
                    for p in actor.parameters():
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            else:
                out["critic_loss"].backward()
            gn_critic = torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.clip)
            gn_actor = torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.clip)
            grad = torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])
            # cosine between successive actor-gradient estimates: ≈ 0 when the estimator's noise swamps its signal
            grad_cos = float(torch.nn.functional.cosine_similarity(grad, prev_grad, dim=0)) \
                if prev_grad is not None and len(prev_grad) == len(grad) else None
            prev_grad = grad
            opt_critic.step()
            opt_actor.step()
            it += 1
            elapsed += time.time() - t0
            stopping = stop.agreed(world, device)  # SIGINT/SIGTERM: finish this iteration, save, leave
            if rank != 0:
                if stopping:
                    break
                continue
            rec = {"iteration": it, "actor_loss": out["actor_loss"].item(), "actor_grad_norm": float(gn_actor),
                   "actor_grad_cos_prev": grad_cos,
                   "terminal": out["terminal"].mean().item(), "control_energy": out["energy"].mean().item(),
                   "seconds": round(time.time() - t0, 3)}
            if cfg.estimator != "proxy":
                d = out["delta"]
                rec.update({"critic_loss": out["critic_loss"].item(), "delta_mean": d.mean().item(),
                            "delta_std": d.std().item(), "critic_grad_norm": float(gn_critic),
                            "critic_ev": out["critic_ev"], "V0": out["V0"].mean().item()})
            if val is not None and (it % cfg.val_every == 0 or it == cfg.iters):
                rec.update(validate())
            with open(run / "stats.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(ptask, completed=it, td=rec.get("critic_loss", float("nan")), ell=rec["terminal"])
            if stopping or it % cfg.checkpoint_every == 0 or it == cfg.iters or \
                    (max_iters is not None and it >= max_iters):
                checkpoint()
            if stopping:
                log(f"stopped at iteration {it}; state and module saved; continue with --resume")
                break
    if world > 1:
        torch.distributed.barrier()
    return run
