"""`aid pretrain` (an EDM backbone) and `aid train` (the AID guidance module): options → a config → the trainer."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from . import options
from .console import err, log, model_file, parse_ints, run_folder


class Crop(str, Enum):
    """How `aid pretrain` makes its training images (data/datasets.py)."""
    auto = "auto"
    resize = "resize"
    random = "random"


def pretrain(
    dataset: Path = typer.Option(..., "--dataset", help="Folder of images or EDM-layout zip."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (created); holds checkpoints, stats.jsonl, "
                                       "sample grids. Default: a new numbered folder aid-runs/NNNNN-pretrain-DATA "
                                       "($AID_RUNS instead of ./aid-runs)."),
    resolution: int = typer.Option(64, help="Training resolution."),
    crop: Crop = typer.Option("auto", "--crop", case_sensitive=False, help="How training images are made: resize (each image's centred "
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

    Example: [bold]aid pretrain --dataset cats64/train.zip --out runs/cats64[/]
    """
    precision, crop = options.value(precision), options.value(crop)
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

class Estimator(str, Enum):
    """The actor's gradient (guidance/trainer.py); proxy is the paper's name for backprop."""
    backprop = "backprop"
    score = "score"
    pathwise = "pathwise"
    proxy = "proxy"


class Explore(str, Enum):
    constant = "constant"
    scaled = "scaled"


class CriticKind(str, Enum):
    plain = "plain"
    privileged = "privileged"


DATA, MODEL, OPTIM = "Data", "Model and loss", "Optimisation"
BACKPROP, ACTOR_CRITIC = "Estimator: backprop", "Estimator: score/pathwise"
VALIDATION, RUN, RECIPE = "Validation", "Run", "Recipe"


def train(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", rich_help_panel=DATA,
                                help="Folder, EDM zip, or a name: cats, ffhq, afhqv2, imagenet."),
    holdout: int = typer.Option(0, "--holdout", min=0, rich_help_panel=DATA,
                                help="Whole photos: keep every Nth photo of --dataset out of training and validate "
                                     "on it instead of --val (0: none)."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0, rich_help_panel=DATA,
                                              help="Class-conditional backbones: class N for every image (default: "
                                                   "the labels in the dataset's dataset.json)."),
    hole_range: str = typer.Option("0.2-0.6", "--hole-range", rich_help_panel=DATA,
                                   help="Missing fraction of training masks, MIN-MAX."),
    train_masks: str = typer.Option("freeform", "--train-masks", rich_help_panel=DATA,
                                    help="Training mask families, comma-separated: freeform, box, strip."),
    mask_bank: int = typer.Option(4096, "--mask-bank", min=0, rich_help_panel=DATA,
                                  help="Training masks drawn once per run (0: draw each iteration's afresh)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", rich_help_panel=MODEL,
                                           help="Backbone: a file or a model name; default: the embedded one."),
    vae: Optional[str] = typer.Option(None, "--vae", rich_help_panel=MODEL,
                                      help="Latent backbones: a local diffusers VAE folder instead of the pinned "
                                           "stabilityai/sd-vae-ft-mse."),
    width: int = typer.Option(16, "--width", rich_help_panel=MODEL, help="Actor width C."),
    denoised_input: bool = typer.Option(False, "--denoised-input", rich_help_panel=MODEL,
                                        help="The actor also reads the step's own denoiser estimate D(x; σ) and its "
                                             "residual M ⊙ (y − D) (no extra NFE; an option beside the paper's actor)."),
    steps: int = typer.Option(18, "--steps", min=2, rich_help_panel=MODEL, help="Grid steps N of the training solves."),
    beta: float = typer.Option(0.1, "--beta", rich_help_panel=MODEL,
                               help="Running-cost weight β (control energy penalty)."),
    lambda_vis: Optional[float] = typer.Option(None, "--lambda-vis", rich_help_panel=MODEL,
                                               help="Terminal-loss weight on visible pixels (default: 2 for pixel "
                                                    "backbones, 1 for latent ones, as the paper)."),
    lambda_hole: float = typer.Option(1.0, "--lambda-hole", rich_help_panel=MODEL,
                                      help="Terminal-loss weight on hole pixels."),
    lambda_lpips: float = typer.Option(0.0, "--lambda-lpips", min=0.0, rich_help_panel=MODEL,
                                       help="Terminal loss + this × LPIPS (AlexNet) of the completed image "
                                            "(beyond the paper; ≥ 31 px)."),
    lambda_ssim: float = typer.Option(0.0, "--lambda-ssim", min=0.0, rich_help_panel=MODEL,
                                      help="Terminal loss + this × (1 − SSIM) of the completed image "
                                           "(beyond the paper; ≥ 11 px)."),
    churn: float = typer.Option(0.0, "--churn", min=0.0, metavar="S", rich_help_panel=BACKPROP,
                                help="EDM's churn S_churn on the solves, trained through; the module "
                                     "deploys with it (0: the paper's ODE)."),
    lambda_texture: float = typer.Option(0.0, "--lambda-texture", min=0.0, rich_help_panel=MODEL,
                                         help="Terminal loss + this × log² of the hole texture ratio "
                                              "(beyond the paper)."),
    lambda_gram: float = typer.Option(0.0, "--lambda-gram", min=0.0, rich_help_panel=MODEL,
                                      help="Terminal loss + this × a Gram distance of AlexNet features "
                                           "around the hole (beyond the paper; ≥ 31 px)."),
    estimator: Estimator = typer.Option(Estimator.backprop, "--estimator", case_sensitive=False,
                                        rich_help_panel=OPTIM,
                                        help="Actor gradient: backprop (J's exact gradient through the frozen "
                                             "solve; proxy is the paper's name for it), score (the paper's "
                                             "actor-critic, eq. 11), pathwise (one-step gradient through the "
                                             "critic). Options of another estimator are refused."),
    batch: int = typer.Option(16, "--batch", min=1, rich_help_panel=OPTIM,
                              help="Tasks per iteration (split across torchrun processes)."),
    iters: int = typer.Option(2000, "--iters", min=1, rich_help_panel=OPTIM,
                              help="Training iterations (with --recipe: of every stage)."),
    lr_actor: float = typer.Option(1e-4, "--lr-actor", rich_help_panel=OPTIM, help="Adam learning rate of the actor."),
    clip: float = typer.Option(1.0, "--clip", rich_help_panel=OPTIM, help="Gradient-norm clipping of each network."),
    ema_halflife: Optional[float] = typer.Option(None, "--ema-halflife", min=0.0, rich_help_panel=OPTIM,
                                                 help="Save and validate an exponential moving average of the "
                                                      "actor's weights with this half-life in iterations (0: the "
                                                      "actor itself; default: 0, or a resumed run's own)."),
    init: Optional[Path] = typer.Option(None, "--init", rich_help_panel=OPTIM,
                                        help="Warm start: begin from this guidance module's actor (same actor "
                                             "options; a module of another backbone, e.g. an earlier snapshot, is "
                                             "a warm start only), e.g. to fine-tune it at another --steps."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=OPTIM, help="Seed of initialisation and of every iteration."),
    diag_every: int = typer.Option(0, "--diag-every", min=0, rich_help_panel=OPTIM,
                                   help="Every K iterations, log the cosine between each estimator's actor gradient "
                                        "and J's exact gradient, against batch size (0: never)."),
    diag_batch: int = typer.Option(0, "--diag-batch", min=0, rich_help_panel=OPTIM,
                                   help="Tasks of a gradient diagnostic (0: --batch)."),
    recompute: bool = typer.Option(True, "--recompute/--no-recompute", rich_help_panel=BACKPROP,
                                   help="Recompute each step's activations in the backward pass (memory of one "
                                        "step) or keep all N (a quarter less compute)."),
    mix_steps: int = typer.Option(0, "--mix-steps", min=0, rich_help_panel=BACKPROP,
                                  help="Every other iteration's solve at this N instead of --steps (e.g. 12 beside "
                                       "18: one module for aid-18 and aid-12; 0: never)."),
    gamma: float = typer.Option(0.01, "--gamma", rich_help_panel=ACTOR_CRITIC,
                                help="Exploration temperature γ: the policy's variance."),
    explore: Explore = typer.Option(Explore.constant, "--explore", case_sensitive=False, rich_help_panel=ACTOR_CRITIC,
                                    help="constant γ (the paper) or scaled, γ_n = γ·c_u(σ_n)² (noise in the actor's "
                                         "output units)."),
    critic: CriticKind = typer.Option(CriticKind.plain, "--critic", case_sensitive=False, rich_help_panel=ACTOR_CRITIC,
                                      help="plain V(t, x; M, y) (the paper) or privileged, which also reads x0 and "
                                           "D(x; σ) with ℓ(D) as a baseline (training only)."),
    critic_width: Optional[int] = typer.Option(None, "--critic-width", min=1, rich_help_panel=ACTOR_CRITIC,
                                               help="Critic width (default: 2C)."),
    lr_critic: float = typer.Option(1e-3, "--lr-critic", rich_help_panel=ACTOR_CRITIC,
                                    help="Adam learning rate of the critic."),
    td_lambda: float = typer.Option(0.0, "--td-lambda", min=0.0, max=1.0, rich_help_panel=ACTOR_CRITIC,
                                    help="λ of the critic's λ-return and the actor's advantages: 0 = TD(0) (the "
                                         "paper), 1 = Monte Carlo."),
    normalize_advantage: bool = typer.Option(False, "--normalize-advantage", rich_help_panel=ACTOR_CRITIC,
                                             help="score: standardise the actor's advantages over the batch."),
    val: Optional[Path] = typer.Option(None, "--val", rich_help_panel=VALIDATION,
                                       help="Validation images (folder or zip): PSNR-hole, SSIM, LPIPS at N = 18, 12."),
    val_every: int = typer.Option(100, "--val-every", rich_help_panel=VALIDATION,
                                  help="Iterations between validations."),
    val_n: int = typer.Option(64, "--val-n", min=1, rich_help_panel=VALIDATION,
                              help="Validation images: N of --val after --val-offset, masks of the three evaluation "
                                   "families in turn (fixed)."),
    val_offset: int = typer.Option(100, "--val-offset", min=0, rich_help_panel=VALIDATION,
                                   help="Skip this many --val images: the benchmark's (the protocol uses val.zip's "
                                        "first 100, --tune its first 16)."),
    val_mask_seed: Optional[int] = typer.Option(None, "--val-mask-seed", min=0, rich_help_panel=VALIDATION,
                                                help="Seed of validation's masks (default: validation's own, "
                                                     "masks.VALIDATION_MASK_SEED; the protocol draws seed 0)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", rich_help_panel=RECIPE,
                                         help="Run a shipped recipe's stages (cats64: the shipped module) into "
                                              "OUT/stage-K, each from the module the one before selected. Options "
                                              "given beside it apply to every stage (--iters: per stage, and as "
                                              "many more for a stage's continuation); --init: the first stage's."),
    config: Optional[Path] = typer.Option(None, "--config", rich_help_panel=RECIPE,
                                          help="Run your own recipe file (TOML, as guidance/recipes/*.toml)."),
    out: Optional[Path] = typer.Option(None, "--out", rich_help_panel=RUN,
                                       help="Run folder (created): config, stats.jsonl, checkpoints, guidance. "
                                            "Default: a new numbered folder aid-runs/NNNNN-train-DATA."),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=RUN,
                                help="Continue the run in --out where it left off (a recipe: its running stage)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, rich_help_panel=RUN,
                                         help="Iterations between checkpoints."),
    device: str = options.device(panel=RUN),
    precision: options.TrainPrecision = options.train_precision(" The frozen backbone's; the networks train in "
                                                                "float32.", panel=RUN),
    compile_net: bool = options.compile_net("torch.compile the frozen backbone.", panel=RUN),
    threads: Optional[int] = options.threads(panel=RUN),
):
    """Learn the AID guidance module for a frozen backbone.

    Default: J's exact gradient through the frozen solve (backprop); score, pathwise: the paper's actor-critic.

    The module, OUT/guidance.safetensors: [bold]aid inpaint --method aid --guidance OUT/guidance.safetensors[/]

    Example: [bold]aid train --dataset DATA/cats64/train.zip --val DATA/cats64/val.zip --out runs/aid-cats[/]

    The shipped module's stages: [bold]aid train --recipe cats64 --dataset DATA/cats64/train.zip --val DATA/cats64/val.zip --out runs/cats64[/]
    """
    from ..threads import apply_threads

    apply_threads(threads)
    if recipe is not None or config is not None:
        return _train_recipe(ctx)
    check_estimator_options(ctx.params, _given(ctx))
    from ..guidance.recipe import PLAN_FILE

    if resume and out is not None and (out / PLAN_FILE).is_file():
        raise UserError(f"{out} holds a recipe's stages: resume it with the command that started it (--recipe or "
                        f"--config) and --resume")
    params = dict(ctx.params, out=run_folder(out, resume, "train", dataset))
    cfg = train_config(params, check_data=True)
    _run_train(cfg, resume, device)


def _run_train(cfg, resume: bool, device: str, done: bool = True) -> None:
    from ..devices import resolve_device
    from ..guidance.trainer import train as run_train

    run = run_train(cfg, resume=resume, device=resolve_device(device), log=log)
    if done:
        err.print(f"done: {run / 'guidance.safetensors'}")


def _given(ctx) -> set[str]:
    """The parameters the command line (or the environment) gave, not left at their defaults."""
    return {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


AC_ESTIMATORS = ("score", "pathwise")
ESTIMATOR_OPTIONS = {"gamma": AC_ESTIMATORS, "explore": AC_ESTIMATORS, "critic": AC_ESTIMATORS,
                     "critic_width": AC_ESTIMATORS, "lr_critic": AC_ESTIMATORS, "td_lambda": AC_ESTIMATORS,
                     "normalize_advantage": ("score",), "recompute": ("backprop",), "mix_steps": ("backprop",),
                     "churn": ("backprop",)}
DIAGNOSTIC_OPTIONS = ("recompute", "normalize_advantage")  # the gradient diagnostic also runs backprop and score


def check_estimator_options(params: dict, given: set[str], where: str = "") -> None:
    """Refuse, in one line, an option given for another estimator than the run's (it would change nothing)."""
    from ..guidance.trainer import canonical_estimator

    est = canonical_estimator(options.value(params["estimator"]))
    for name in sorted(given):
        owners = ESTIMATOR_OPTIONS.get(name)
        if owners is None or est in owners:
            continue
        if params.get("diag_every") and est != "backprop" and name in DIAGNOSTIC_OPTIONS:
            continue
        raise UserError(f"{where}--{name.replace('_', '-')} acts only under --estimator {' or '.join(owners)}; "
                        f"drop it under --estimator {est}")


def train_config(p: dict, check_data: bool = False):
    """The TrainConfig of `aid train`'s parameters `p` (with p["out"] the run folder): ranges checked, the backbone
    and dataset resolved (`check_data`: and checked against each other)."""
    from ..data.datasets import resolve_dataset
    from ..guidance.data_check import check_dataset
    from ..guidance.trainer import TrainConfig, backbone_lambda_vis
    from ..models.catalogue import resolve_backbone

    try:
        lo, hi = (float(v) for v in p["hole_range"].split("-"))
    except ValueError:
        raise UserError(f"--hole-range must look like 0.2-0.6, got {p['hole_range']!r}") from None
    if not 0 < lo <= hi < 1:
        raise UserError(f"--hole-range must satisfy 0 < MIN <= MAX < 1, got {p['hole_range']}")
    backbone_path = resolve_backbone(model_file(p["backbone"], None, False))
    dataset = resolve_dataset(p["dataset"])
    if check_data:
        check_dataset(p["dataset"], dataset, backbone_path, log)
    val, init = p["val"], p["init"]
    return TrainConfig(
        dataset=str(dataset), out=str(p["out"]), backbone=str(backbone_path), steps=p["steps"], batch=p["batch"],
        iters=p["iters"], beta=p["beta"], gamma=p["gamma"],
        lambda_vis=backbone_lambda_vis(backbone_path, p["vae"], p["lambda_vis"]), lambda_hole=p["lambda_hole"],
        lr_actor=p["lr_actor"], lr_critic=p["lr_critic"], clip=p["clip"], hole_min=lo, hole_max=hi, width=p["width"],
        critic_width=p["critic_width"] or 2 * p["width"], seed=p["seed"], val_every=p["val_every"], val_n=p["val_n"],
        val_offset=p["val_offset"], checkpoint_every=p["checkpoint_every"],
        estimator=options.value(p["estimator"]), val_dataset=str(val) if val else None, vae=p["vae"],
        class_label=p["class_label"], holdout=p["holdout"], precision=options.value(p["precision"]),
        compile=p["compile_net"], denoised_input=p["denoised_input"], lambda_lpips=p["lambda_lpips"],
        lambda_ssim=p["lambda_ssim"], churn=p["churn"], init=str(init) if init else None, mask_bank=p["mask_bank"],
        train_masks=p["train_masks"], explore=options.value(p["explore"]), critic=options.value(p["critic"]),
        td_lambda=p["td_lambda"], normalize_advantage=p["normalize_advantage"], diag_every=p["diag_every"],
        diag_batch=p["diag_batch"], recompute=p["recompute"], mix_steps=p["mix_steps"],
        ema_halflife=p["ema_halflife"],
        lambda_texture=p["lambda_texture"], lambda_gram=p["lambda_gram"],
        **({} if p["val_mask_seed"] is None else {"val_mask_seed": p["val_mask_seed"]}))


def _option_params(command) -> dict:
    """Recipe key (the long option without its dashes) → the command's parameter."""
    return {param.opts[0].lstrip("-"): param for param in command.params
            if getattr(param, "opts", None) and param.opts[0].startswith("--")}


def _train_recipe(ctx) -> None:
    """`aid train --recipe NAME | --config FILE`: the recipe's stages, the command line's options over each."""
    from ..guidance.recipe import COMMAND_ONLY, apply_overrides, load_recipe, recipe_file, run_recipe

    p = ctx.params
    if p["recipe"] is not None and p["config"] is not None:
        raise UserError("--recipe and --config: give one recipe")
    if p["out"] is None:
        raise UserError("--recipe / --config need --out FOLDER: the stages go to FOLDER/stage-K")
    if p["init"] is not None and not Path(p["init"]).is_file():
        raise UserError(f"--init {p['init']}: no such guidance module")
    keyed = _option_params(ctx.command)
    name_of = {param.name: key for key, param in keyed.items()}
    path = recipe_file(p["recipe"]) if p["recipe"] is not None else p["config"]
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such recipe file")
    stages = load_recipe(path, set(keyed))
    plain = lambda v: str(v) if isinstance(v, Path) else options.value(v)  # noqa: E731
    overrides = {name_of[k]: plain(p[k]) for k in _given(ctx) if name_of[k] not in COMMAND_ONLY}
    stages = apply_overrides(stages, overrides)

    def stage_params(opts: dict, folder: Path, init: Path | None, where: str) -> dict:
        q = dict(p, out=folder, init=init, recipe=None, config=None)
        for key, value in opts.items():
            param = keyed[key]
            try:
                q[param.name] = param.process_value(ctx, value)
            except Exception as e:  # click's BadParameter and its kin: the recipe's value, in one line
                raise UserError(f"{where}{key} = {value!r}: {getattr(e, 'message', e)}") from None
        check_estimator_options(q, {keyed[k].name for k in opts}, where)
        return q

    for k, stage in enumerate(stages, 1):  # every stage's values checked before the first one trains
        where = f"recipe {Path(path).stem}, stage {k}: "
        for opts in stage.legs():
            q = stage_params(opts, Path(p["out"]), None, where)
        if stage.select != "last" and q["val"] is None and not q["holdout"]:
            raise UserError(f"{where}it selects its module on validation: give --val (or --holdout)")
    first = stage_params(stages[0].options, Path(p["out"]), None, "")
    train_config(dict(first, out=Path(p["out"]) / "stage-1"), check_data=True)  # the data against the backbone

    def run_stage(opts: dict, folder: Path, init: Path | None, resume: bool) -> None:
        _run_train(train_config(stage_params(opts, folder, init, "")), resume, p["device"], done=False)

    final = run_recipe(stages, Path(p["out"]), p["resume"], run_stage, log, init=p["init"])
    if final is None:
        err.print(f"stopped; continue with the same command and --resume")
    else:
        err.print(f"done: {final}")
