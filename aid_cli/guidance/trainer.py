"""`aid train`: learn the guidance module (method.md §4–§6, Algorithm 1): set-up, the step, logging, checkpoints and
the loop. The pieces: config.py (the settings), rollout.py (solves through the sampler's loop), losses.py (the costs
and the estimators' losses), validate.py, diagnostic.py.

One iteration, for a batch of tasks:
  1. x0 from the training split, M from the run's mask bank, y = M ⊙ x0, X_0 ~ N(0, σmax² I).
  2. Roll out the controlled ODE (the sampler loop and `aid` method of deployment): with backprop the deterministic
     solve in autograd's graph, else sampled actions a_n = μ_φ(t_n, X_n; ξ) + √γ_n ε_n without gradients.
  3. The losses of the estimator (losses.py); for score and pathwise also the critic's (eq. 10).
  4. Adam for both networks, constant learning rates, gradient-norm clipping.
  5. With --ema-halflife H (beyond the paper): the module saved and validated is the EMA φ̄ ← κ·φ̄ + (1 − κ)·φ of the
     actor's weights, κ = 0.5^(1/H); the optimiser keeps training φ itself.

Data (held out from the benchmark by default): validation reads `val_n` images of --val after its first `val_offset`
(the benchmark protocol uses val.zip's first 100, `aid bench --tune` its first 16), each with a fixed mask of the three
evaluation families in turn. Training masks come from a bank of `mask_bank` masks drawn once per run (never an
evaluation mask's seed); each iteration picks from it with its own generator, so a resumed run sees the same masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..backbones.checkpoint import load_backbone
from ..backbones.edm import count_parameters
from ..backbones.spaces import model_space
from ..data.datasets import load_image_set, load_photo_set, whole_photos
from ..data.masks import training_mask_bank, training_masks
from ..devices import prepare_backbone, training_precision
from ..errors import UserError
from ..fileio import atomic_write_text, sha256_file
from ..inpainter import Inpainter, trained_multiscale
from ..metrics.lpips import MIN_SIZE, LPIPSUnavailable, load_lpips
from ..metrics.quality import SSIM_MIN_SIZE
from ..plots import training_curves
from ..sampling.heun import edm_sigmas, sample_generators
from ..task import one_hot
from ..training import (GracefulStop, gather_to_rank0, init_distributed, load_state, prepare_run, read_jsonl,
                        run_lock, save_state, skip_reporter, step_generator)
from .checkpoint import load_guidance, save_guidance
from .config import (ESTIMATOR_ALIASES, ESTIMATORS, TRAIN_MASK_FAMILIES, TrainConfig, backbone_lambda_vis,
                     canonical_estimator, check_config, mask_families)
from .diagnostic import gradient_diagnostic
from .losses import actor_critic_losses, backprop_loss
from .networks import Actor
from .photo_tasks import VALIDATION_TASKS, photo_tasks
from .rollout import rollout, rollout_steps
from .validate import summarize_validation, validation_masks, validation_per_image, validation_scores

# the settings' and validation's names stay importable from here (the command line and scripts import them)
__all__ = ["ESTIMATOR_ALIASES", "ESTIMATORS", "TRAIN_MASK_FAMILIES", "TrainConfig", "backbone_lambda_vis",
           "canonical_estimator", "check_config", "mask_families", "validation_masks", "validation_scores",
           "STATE_FILE", "GUIDANCE_FILE", "SNAPSHOT_DIR", "CURVES_FILE", "Run", "setup", "step", "validate", "train",
           "split_holdout"]

STATE_FILE = "training-state.safetensors"
DIAG_SEED_OFFSET = 0x646961  # "dia": the diagnostic's tasks come from a generator of their own
GUIDANCE_FILE = "guidance.safetensors"
SNAPSHOT_DIR = "modules"  # guidance-NNNNNN.safetensors: the module at each checkpoint
CURVES_FILE = "curves.png"


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


def warm_start(actor: Actor, path, actor_kwargs: dict, backbone_sha: str, log=lambda line: None) -> None:
    """Load a saved module's weights into the fresh actor (e.g. to fine-tune it at another N or β, or for a newer
    snapshot of a backbone still in training). The module must have the same architecture; one trained on another
    backbone is a warm start only, and the run says so. The critic and the optimisers start fresh."""
    init, info = load_guidance(path)
    if info["backbone_sha256"] != backbone_sha:
        log(f"--init {Path(path).name} was trained on another backbone ({info['backbone_sha256'][:12]}…): a warm "
            f"start; this run's module is for {backbone_sha[:12]}…")
    if info["actor"] != actor_kwargs:
        raise UserError(f"--init {path}: its actor {info['actor']} differs from this run's {actor_kwargs}; "
                        f"pass the same --width and --denoised-input")
    actor.load_state_dict(init.state_dict())


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
                      free_if_given=("ema_halflife",))  # a run can start averaging part-way (step 5)
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
            ("--lambda-ssim", cfg.lambda_ssim, "SSIM", "SSIM's window", SSIM_MIN_SIZE),
            ("--lambda-texture", cfg.lambda_texture, "the hole's luminance texture", "", 0),
            ("--lambda-gram", cfg.lambda_gram, "the Gram term (AlexNet features)", "AlexNet's trunk", MIN_SIZE)):
        if weight and space.latent:
            raise UserError(f"{option}: a latent backbone's terminal loss compares latents; {metric} needs a pixel "
                            f"backbone")
        if weight and res < min_size:
            raise UserError(f"{option}: {what} needs images of at least {min_size}x{min_size} pixels; this backbone "
                            f"makes {res}x{res}")
    # frozen; LPIPSUnavailable says in one line how to get its weights
    lpips = load_lpips(device, notice=log) if cfg.lambda_lpips or cfg.lambda_gram else None  # --lambda-gram: its trunk
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
        warm_start(actor, cfg.init, cfg.actor_kwargs(C), backbone_sha, log if rank == 0 else (lambda line: None))
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
    """One iteration (the module docstring's steps 1–5) on this process's share of the batch: the losses, the
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
        r.actor_ema.update_parameters(r.actor)  # φ̄ ← κ·φ̄ + (1 − κ)·φ (step 5)
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
                                                             first=lo, churn=r.cfg.churn).items()}
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


def bar_figures(rec: dict) -> str:
    """The progress bar's figures of an iteration's record: the critic's TD loss where the estimator trains a critic,
    and the terminal cost ℓ."""
    td = f"TD {rec['critic_loss']:.4f}  " if "critic_loss" in rec else ""
    return f"{td}ℓ {rec['terminal']:.4f}"


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
                   TextColumn("{task.fields[figures]}"), TimeRemainingColumn(), disable=not progress or r.rank != 0)
    with bar, GracefulStop() as stop:
        ptask = bar.add_task("train", total=cfg.iters, completed=r.it, figures="")
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
            bar.update(ptask, completed=r.it, figures=bar_figures(rec))
            if stopping or r.it % cfg.checkpoint_every == 0 or r.it == cfg.iters or \
                    (max_iters is not None and r.it >= max_iters):
                save_checkpoint(r)
            if stopping:
                log(f"stopped at iteration {r.it}; state and module saved; continue with --resume")
                break
    if r.world > 1:
        torch.distributed.barrier()
    return r.folder
