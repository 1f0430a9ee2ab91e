"""The settings of one `aid train` run (TrainConfig) and the checks of options that must agree with each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..data.masks import VALIDATION_MASK_SEED
from ..errors import UserError
from .networks import Critic, PrivilegedCritic

ESTIMATORS = ("backprop", "score", "pathwise")
ESTIMATOR_ALIASES = {"proxy": "backprop"}  # the paper's name for the exact-gradient ablation
TRAIN_MASK_FAMILIES = ("freeform", "box", "strip")


def canonical_estimator(name: str) -> str:
    """`proxy` → `backprop`; anything else unchanged (checked by `check_config`)."""
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
    estimator: str = "backprop"  # actor gradient: backprop (exact) | score (eq. 11) | pathwise (losses.py)
    precision: str = "auto"  # the frozen backbone's autocast in rollouts (devices.training_precision); nets stay fp32
    compile: bool = False  # torch.compile the frozen backbone
    recompute: bool = True  # backprop: recompute each step's activations in the backward pass (memory of one step)
    denoised_input: bool = False  # the actor also reads D(X_n; σ_n) and M ⊙ (y − D) (networks.py; an option)
    lambda_lpips: float = 0.0  # an option beyond the paper: ℓ + λ·LPIPS of the completed image (terminal_cost)
    lambda_ssim: float = 0.0  # an option beyond the paper: ℓ + λ·(1 − SSIM) of the completed image (terminal_cost)
    churn: float = 0.0  # EDM's S_churn on the training solves (sampling/heun.py Churn); the module deploys with it
    # texture terms, options beyond the paper (texture.py): ℓ + λ·log² of the hole-texture ratio, + λ·the relative
    # Gram distance of the LPIPS trunk's features around the hole
    lambda_texture: float = 0.0
    lambda_gram: float = 0.0
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


def mask_families(spec: str) -> tuple[str, ...]:
    """`--train-masks freeform,box,strip` → the families' names (checked by `check_config`)."""
    return tuple(f.strip() for f in spec.split(",") if f.strip())


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
    if cfg.critic == "privileged" and (cfg.lambda_texture or cfg.lambda_gram):
        raise UserError("--critic privileged: its baseline ℓ(D) is the L2 loss of eq. 2; drop --lambda-texture and "
                        "--lambda-gram")
    families = mask_families(cfg.train_masks)
    if not families or any(f not in TRAIN_MASK_FAMILIES for f in families):
        raise UserError(f"--train-masks {cfg.train_masks!r}: give families from {', '.join(TRAIN_MASK_FAMILIES)}, "
                        f"comma-separated")
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} is not divisible by the {world} processes")
    if cfg.mix_steps and cfg.estimator != "backprop":
        raise UserError("--mix-steps alternates the backprop solve's N; the actor-critic estimators roll out at --steps "
                        "(drop --mix-steps or use --estimator backprop)")
    if cfg.churn < 0:
        raise UserError(f"--churn must be at least 0, got {cfg.churn}")
    if cfg.churn and cfg.estimator != "backprop":
        raise UserError("--churn adds noise inside the backprop solve; the actor-critic estimators' rollouts have "
                        "their own exploration (drop --churn or use --estimator backprop)")
    if cfg.mix_steps == 1:
        raise UserError("--mix-steps must be at least 2 grid steps (or 0: never)")
    return cfg

