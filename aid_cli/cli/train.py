"""`aid pretrain` (an EDM backbone) and `aid train` (the AID guidance module): options → a config → the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from . import options
from .console import err, log, model_file, parse_ints, run_folder


def pretrain(
    dataset: Path = typer.Option(..., "--dataset", help="Folder of images or EDM-layout zip."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (created); holds checkpoints, stats.jsonl, "
                                       "sample grids. Default: a new numbered folder aid-runs/NNNNN-pretrain-DATA "
                                       "($AID_RUNS instead of ./aid-runs)."),
    resolution: int = typer.Option(64, help="Training resolution."),
    crop: str = typer.Option("auto", "--crop", help="How training images are made: resize (each image's centred "
                             "square, resized to --resolution: aligned sets such as cat faces), random (random "
                             "windows of whole photos at random downscales: photos of any size), auto (resize when "
                             "every image is a square of one size, else random)."),
    crop_min: int = typer.Option(0, "--crop-min", min=0, help="random: smallest window side in source pixels "
                                 "(0: --resolution, the photo's own scale)."),
    crop_max: int = typer.Option(0, "--crop-max", min=0, help="random: largest window side in source pixels "
                                 "(0: the photo's short side). Sides are log-uniform between the two."),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out images (folder or zip): the EDM loss of the EMA "
                                       "at every snapshot, in stats.jsonl (random crops: fixed crops of them)."),
    val_n: int = typer.Option(256, "--val-n", min=1, help="Validation images (or crops) for --val."),
    val_kimg: float = typer.Option(0.0, "--val-kimg", min=0.0, help="Validate every this many thousand images "
                                   "(0: at every snapshot)."),
    width: int = typer.Option(32, "--width", help="SongUNet model_channels."),
    channel_mult: str = typer.Option("1,2,3,4", help="Channel multiplier per resolution level."),
    depth: int = typer.Option(1, "--depth", help="Residual blocks per resolution level (num_blocks)."),
    attn: str = typer.Option("16,8", help="Resolutions with self-attention."),
    dropout: float = typer.Option(0.0, help="Dropout probability."),
    batch: int = typer.Option(32, help="Global batch size (split across torchrun processes)."),
    lr: float = typer.Option(5e-4, help="Adam learning rate after warm-up."),
    lr_rampup_kimg: float = typer.Option(10.0, help="Linear learning-rate warm-up, thousands of images."),
    ema_halflife_kimg: float = typer.Option(10.0, help="EMA half-life, thousands of images."),
    duration_kimg: float = typer.Option(500.0, "--duration", help="Training length, thousands of images."),
    snapshot_kimg: float = typer.Option(10.0, help="EMA snapshot and sample grid every this many thousand images."),
    checkpoint_minutes: float = typer.Option(10.0, help="Write the resumable state at least this often."),
    seed: int = typer.Option(0, help="Seed of initialisation and of every training step."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its state left off."),
    device: str = options.device(),
    precision: options.TrainPrecision = options.train_precision(),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the training forward pass."),
    threads: Optional[int] = options.threads(),
):
    """Train an EDM backbone (SongUNet DDPM++ + EDMPrecond) with the EDM loss.

    Example: [bold]aid pretrain --dataset ../shared/data/cats64/train.zip --out ~/aid-runs/cats64[/]
    """
    precision = options.value(precision)
    from ..devices import resolve_device
    from ..pretrain import PretrainConfig
    from ..pretrain import pretrain as run_pretrain
    from ..threads import apply_threads

    apply_threads(threads)
    out = run_folder(out, resume, "pretrain", dataset)
    cfg = PretrainConfig(dataset=str(dataset), out=str(out), resolution=resolution, model_channels=width,
                         channel_mult=parse_ints(channel_mult, "--channel-mult"), num_blocks=depth,
                         attn_resolutions=parse_ints(attn, "--attn"), dropout=dropout, batch=batch, lr=lr,
                         lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                         duration_kimg=duration_kimg, snapshot_kimg=snapshot_kimg, checkpoint_minutes=checkpoint_minutes,
                         seed=seed, precision=precision, compile=compile_net, crop=crop, crop_min=crop_min,
                         crop_max=crop_max, val=str(val) if val else None, val_n=val_n,
                         val_kimg=val_kimg)
    run = run_pretrain(cfg, resume=resume, device=resolve_device(device), log=log)
    err.print(f"done: {run}")

def train(
    dataset: str = typer.Option(..., "--dataset", help="Folder, EDM zip, or a name: cats, ffhq, afhqv2, imagenet."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (created): config, stats.jsonl, checkpoints, "
                                       "guidance. Default: a new numbered folder aid-runs/NNNNN-train-DATA."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone: a file or a model name; default: "
                                           "the embedded one."),
    steps: int = typer.Option(18, "--steps", min=2, help="Grid steps N of the training rollouts."),
    batch: int = typer.Option(16, "--batch", min=1, help="Tasks per iteration (split across torchrun processes)."),
    iters: int = typer.Option(2000, "--iters", min=1, help="Actor-critic iterations."),
    beta: float = typer.Option(0.1, "--beta", help="Running-cost weight β (control energy penalty)."),
    gamma: float = typer.Option(0.01, "--gamma", help="Exploration temperature γ: the policy's variance."),
    lambda_vis: Optional[float] = typer.Option(None, "--lambda-vis", help="Terminal-loss weight on visible pixels "
                                               "(default: 2 for pixel backbones, 1 for latent ones, as the paper)."),
    lambda_hole: float = typer.Option(1.0, "--lambda-hole", help="Terminal-loss weight on hole pixels."),
    lambda_lpips: float = typer.Option(0.0, "--lambda-lpips", min=0.0, help="Add this weight times LPIPS "
                                       "(AlexNet) of the completed image to the terminal loss (an option beyond the "
                                       "paper's L2 loss, against smooth fills; pixel backbones of at least 31 px)."),
    lambda_ssim: float = typer.Option(0.0, "--lambda-ssim", min=0.0, help="Add this weight times 1 − SSIM of the "
                                      "completed image to the terminal loss (an option beyond the paper; pixel "
                                      "backbones of at least 11 px)."),
    lr_actor: float = typer.Option(1e-4, "--lr-actor", help="Adam learning rate of the actor."),
    lr_critic: float = typer.Option(1e-3, "--lr-critic", help="Adam learning rate of the critic."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clipping of each network."),
    hole_range: str = typer.Option("0.2-0.6", "--hole-range", help="Missing fraction of training masks, MIN-MAX."),
    width: int = typer.Option(16, "--width", help="Actor width C."),
    critic_width: Optional[int] = typer.Option(None, "--critic-width", min=1, help="Critic width (default: 2C)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation images for the periodic PSNR (folder or zip)."),
    holdout: int = typer.Option(0, "--holdout", min=0, help="Whole photos: keep every Nth photo of --dataset out of "
                                "training and validate on it instead of --val (0: none)."),
    val_every: int = typer.Option(100, "--val-every", help="Iterations between validation PSNRs."),
    val_n: int = typer.Option(64, "--val-n", min=1, help="Validation images: N of --val after --val-offset, masks of "
                              "the three evaluation families in turn (fixed)."),
    val_offset: int = typer.Option(100, "--val-offset", min=0, help="Skip this many --val images: the benchmark's "
                                   "(the protocol uses val.zip's first 100, --tune its first 16)."),
    val_mask_seed: int | None = typer.Option(None, "--val-mask-seed", min=0,
                                             help="Seed of validation's masks (the evaluation families'; default: "
                                                  "validation's own, masks.VALIDATION_MASK_SEED; the protocol draws "
                                                  "seed 0)."),
    estimator: str = typer.Option("backprop", "--estimator",
                                  help="Actor gradient: backprop (J's exact gradient through the frozen solve; alias "
                                       "proxy), score (the paper's eq. 11), pathwise (one-step gradient through the "
                                       "critic)."),
    explore: str = typer.Option("constant", "--explore", help="Exploration of score/pathwise rollouts: constant γ "
                                "(the paper) or scaled, γ_n = γ·c_u(σ_n)² (noise in the actor's output units)."),
    critic: str = typer.Option("plain", "--critic", help="Critic of score/pathwise: plain V(t, x; M, y) (the paper) "
                               "or privileged, which also reads x0 and D(x; σ) with ℓ(D) as a baseline (training only)."),
    td_lambda: float = typer.Option(0.0, "--td-lambda", min=0.0, max=1.0, help="λ of the critic's λ-return and the "
                                    "actor's advantages: 0 = TD(0) (the paper), 1 = Monte Carlo."),
    normalize_advantage: bool = typer.Option(False, "--normalize-advantage", help="Standardise the actor's "
                                             "advantages over the batch (score)."),
    diag_every: int = typer.Option(0, "--diag-every", min=0, help="Every K iterations, log the cosine between each "
                                   "estimator's actor gradient and J's exact gradient, against batch size (0: never)."),
    recompute: bool = typer.Option(True, "--recompute/--no-recompute", help="backprop: recompute each step's "
                                   "activations in the backward pass (memory of one step) or keep all N (a quarter "
                                   "less compute)."),
    diag_batch: int = typer.Option(0, "--diag-batch", min=0, help="Tasks of a gradient diagnostic (0: --batch)."),
    mask_bank: int = typer.Option(4096, "--mask-bank", min=0, help="Training masks drawn once per run (0: draw each "
                                  "iteration's afresh)."),
    mix_steps: int = typer.Option(0, "--mix-steps", min=0, help="backprop: every other iteration's solve at this N "
                                  "instead of --steps (e.g. 12 beside 18: one module for aid-18 and aid-12; 0: never)."),
    ema_halflife: Optional[float] = typer.Option(None, "--ema-halflife", min=0.0, help="Save and validate an "
                                                 "exponential moving average of the actor's weights with this "
                                                 "half-life in iterations (0: the actor itself; default: 0, or a "
                                                 "resumed run's own)."),
    train_masks: str = typer.Option("freeform", "--train-masks", help="Training mask families, comma-separated: "
                                    "freeform, box, strip."),
    denoised_input: bool = typer.Option(False, "--denoised-input", help="The actor also reads the step's own "
                                        "denoiser estimate D(x; σ) and its residual M ⊙ (y − D) (no extra NFE; an "
                                        "option beside the paper's actor)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Warm start: begin from this guidance module's actor "
                                        "(same backbone and actor options), e.g. to fine-tune it at another --steps; "
                                        "the critic starts fresh."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Iterations between checkpoints."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0, help="Class-conditional backbones: class N for "
                                              "every image (default: the labels in the dataset's dataset.json)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and of every iteration."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it left off."),
    device: str = options.device(),
    precision: options.TrainPrecision = options.train_precision(" Applies to the frozen backbone; the actor and critic train in float32."),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the frozen backbone."),
    threads: Optional[int] = options.threads(),
):
    """Learn the AID guidance module for a frozen backbone with the continuous-time actor-critic.

    The module (the actor's weights) is written to OUT/guidance.safetensors at every checkpoint; use it with
    [bold]aid inpaint --method aid --guidance OUT/guidance.safetensors[/].

    Example: [bold]aid train --dataset ../shared/data/cats64/train.zip --val ../shared/data/cats64/val.zip --out ~/aid-runs/aid-cats[/]
    """
    precision = options.value(precision)
    from ..devices import resolve_device
    from ..guidance.trainer import TrainConfig
    from ..guidance.trainer import train as run_train
    from ..threads import apply_threads

    apply_threads(threads)
    from ..models.catalogue import resolve_backbone
    from ..data.datasets import resolve_dataset

    try:
        lo, hi = (float(v) for v in hole_range.split("-"))
    except ValueError:
        raise UserError(f"--hole-range must look like 0.2-0.6, got {hole_range!r}") from None
    if not 0 < lo <= hi < 1:
        raise UserError(f"--hole-range must satisfy 0 < MIN <= MAX < 1, got {hole_range}")
    from ..guidance.trainer import backbone_lambda_vis

    backbone_path = resolve_backbone(model_file(backbone, None, False))
    lambda_vis = backbone_lambda_vis(backbone_path, vae, lambda_vis)
    out = run_folder(out, resume, "train", dataset)
    cfg = TrainConfig(dataset=str(resolve_dataset(dataset)), out=str(out), backbone=str(backbone_path),
                      steps=steps, batch=batch, iters=iters, beta=beta, gamma=gamma, lambda_vis=lambda_vis,
                      lambda_hole=lambda_hole, lr_actor=lr_actor, lr_critic=lr_critic, clip=clip, hole_min=lo,
                      hole_max=hi, width=width, critic_width=critic_width or 2 * width, seed=seed,
                      val_every=val_every, val_n=val_n, val_offset=val_offset, checkpoint_every=checkpoint_every,
                      estimator=estimator,
                      val_dataset=str(val) if val else None, vae=vae, class_label=class_label, holdout=holdout,
                      precision=precision, compile=compile_net, denoised_input=denoised_input, lambda_lpips=lambda_lpips,
                      lambda_ssim=lambda_ssim,
                      init=str(init) if init else None, mask_bank=mask_bank, train_masks=train_masks,
                      explore=explore, critic=critic, td_lambda=td_lambda, normalize_advantage=normalize_advantage,
                      diag_every=diag_every, diag_batch=diag_batch, recompute=recompute, mix_steps=mix_steps,
                      ema_halflife=ema_halflife,
                      **({} if val_mask_seed is None else {"val_mask_seed": val_mask_seed}))
    run = run_train(cfg, resume=resume, device=resolve_device(device), log=log)
    err.print(f"done: {run / 'guidance.safetensors'}")
