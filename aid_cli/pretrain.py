"""`aid pretrain`: train an EDM backbone (SongUNet DDPM++ + EDMPrecond) with the EDM loss.

Readable top to bottom, nanoGPT-style: a config dataclass, the training state, one loop.

- Loss: EDM (ln σ ~ N(−1.2, 1.2²), σ_data = 0.5, λ(σ) weighting), summed over pixels, averaged over the batch.
- Adam with a linear learning-rate warm-up, an EMA of the weights with EDM's half-life ramp-up, x-flip augmentation.
- Randomness of step k comes from generators seeded by (seed, k) alone, so `--resume` continues bit-exactly: the state file
  holds model, EMA, optimizer moments and step; the RNG state of step k is re-derived from the step.
- Under `torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and trains on its slice through DDP; rank 0 writes.
- Files in the run folder: `config.json`, `stats.jsonl`, `training-state.safetensors` (resume), `network-snapshot-KIMG.safetensors`
  (EMA weights, loadable with `--model`), `samples-KIMG.png`. All written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones.checkpoint import save_backbone
from .backbones.edm import build_precond, count_parameters
from .backbones.evaluate import validation_loss
from .backbones.loss import EDMLoss
from .data.datasets import load_image_set, load_photo_set, random_crops
from .plots import save_grid
from .devices import training_precision
from .errors import UserError
from .fileio import atomic_write_text, portable_record
from .sampling.heun import sample
from .task import Task
from .training import (GracefulStop, init_distributed, load_state, prepare_run, run_lock, save_state, skip_reporter,
                       step_generator)

STATE_FILE = "training-state.safetensors"
VAL_CROP_SEED = 12345  # the fixed validation crops of a photo backbone (--val), the same for every run


@dataclass
class PretrainConfig:
    dataset: str
    out: str
    resolution: int = 64
    model_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    dropout: float = 0.0
    batch: int = 32
    lr: float = 5e-4
    lr_rampup_kimg: float = 10.0
    ema_halflife_kimg: float = 10.0
    ema_rampup_ratio: float = 0.05
    duration_kimg: float = 500.0
    snapshot_kimg: float = 10.0  # EMA snapshot + sample grid every this many thousand images
    checkpoint_minutes: float = 10.0  # resumable state at least this often
    xflip: bool = True
    seed: int = 0
    grad_clip: float = 0.0  # 0 = off (EDM does not clip; NaN/inf gradients are zeroed as in the official code)
    precision: str = "auto"  # auto|fp32|bf16 autocast of the forward pass (devices.training_precision)
    compile: bool = False  # torch.compile the training forward
    # How training images are made: resize = each image's centred square at the resolution, once (aligned sets such
    # as cats64, EDM's dataset_tool); random = random windows of the photos at their own size, side log-uniform in
    # [crop_min, crop_max] source pixels (0: the resolution / the photo's short side), resized to the resolution
    # (whole photos); auto = resize when every image is a square of one size, else random.
    crop: str = "auto"
    crop_min: int = 0
    crop_max: int = 0
    val: str | None = None  # held-out images: EDM loss of the EMA every val_kimg (random crops: fixed crops of them)
    val_n: int = 256
    val_kimg: float = 0.0  # validate every this many thousand images (0: at every snapshot)

    LEGACY_DEFAULTS = {"crop": "resize"}  # runs made before `crop` existed trained on centred squares

    def network_kwargs(self) -> dict:
        """`_init_kwargs` in the official layout: DDPM++ (positional embedding, standard encoder/decoder, [1,1] filter)."""
        return dict(img_resolution=self.resolution, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                    embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                    resample_filter=[1, 1], model_channels=self.model_channels, channel_mult=list(self.channel_mult),
                    num_blocks=self.num_blocks, attn_resolutions=list(self.attn_resolutions), dropout=self.dropout,
                    augment_dim=0)


@torch.no_grad()
def update_ema(ema, net, beta: float) -> None:
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


def sample_grid(net, resolution: int, n: int = 64, seed: int = 0, num_steps: int = 18) -> torch.Tensor:
    """Unconditional samples (empty mask) with the same sampler loop as inpainting."""
    device = next(net.parameters()).device
    task = Task(y=torch.zeros(n, 3, resolution, resolution, device=device), M=torch.zeros(n, 1, resolution, resolution,
                                                                                            device=device))
    return sample(net, task, num_steps=num_steps, seed=seed).completed


def pretrain(cfg: PretrainConfig, resume: bool = False, device: str | torch.device = "cpu", max_steps: int | None = None,
             progress: bool = True, log=print) -> Path:
    """Train until `duration_kimg` (or `max_steps` optimizer steps, for tests); returns the run folder. The run folder
    is held (training.run_lock) while it trains."""
    with run_lock(Path(cfg.out)):
        return _pretrain(cfg, resume, device, max_steps, progress, log)


def _pretrain(cfg: PretrainConfig, resume: bool, device, max_steps: int | None, progress: bool, log) -> Path:
    rank, world, device = init_distributed(torch.device(device))
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} is not divisible by the {world} processes")
    run = Path(cfg.out)
    state_path = run / STATE_FILE
    cfg = prepare_run(cfg, run, STATE_FILE, resume, log=log,
                      free=("dataset", "out", "duration_kimg", "snapshot_kimg", "checkpoint_minutes", "precision",
                            "compile", "val", "val_n", "val_kimg"))
    amp = torch.bfloat16 if training_precision(cfg.precision, device) == "bf16" else None  # autocast dtype

    # Data.
    on_skip = skip_reporter(log, rank)
    if cfg.crop not in ("auto", "resize", "random"):
        raise UserError(f"--crop must be auto, resize or random, not {cfg.crop!r}")
    photos = None
    if cfg.crop == "resize":
        data = load_image_set(cfg.dataset, resolution=cfg.resolution, on_skip=on_skip)
    else:
        photos = load_photo_set(cfg.dataset, on_skip=on_skip)
        if cfg.crop == "auto":
            cfg = dataclasses.replace(cfg, crop="random" if photos.same_square() is None else "resize")
        data = photos.as_image_set(cfg.resolution) if cfg.crop == "resize" else photos
        photos = photos if cfg.crop == "random" else None
    images = data.images if photos is None else None  # uint8; on a GPU moved there once (15,000 64×64: 184 MB)
    if images is not None and device.type == "cuda":
        images = images.to(device)
    val_set = None
    if cfg.val and rank == 0:
        val_set = load_photo_set(cfg.val).crops(cfg.val_n, cfg.resolution, seed=VAL_CROP_SEED,
                                                min_side=cfg.crop_min or None, max_side=cfg.crop_max or None) \
            if photos is not None else load_image_set(cfg.val, resolution=cfg.resolution, limit=cfg.val_n)

    # Networks, optimizer, EMA.
    torch.manual_seed(cfg.seed)
    # NHWC convolution weights: the layout oneDNN and cuDNN run fastest (devices.prepare_backbone).
    net = build_precond("EDMPrecond", cfg.network_kwargs()).train().to(device, memory_format=torch.channels_last)
    ema = build_precond("EDMPrecond", cfg.network_kwargs()).eval().requires_grad_(False).to(
        device, memory_format=torch.channels_last)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    step, nimg, elapsed = 0, 0, 0.0
    if resume:
        meta = load_state(state_path, {"net": net, "ema": ema}, {"opt": opt}, device=device)
        step, nimg, elapsed = meta["step"], meta["nimg"], meta["elapsed_s"]
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else net
    model = torch.compile(ddp) if cfg.compile else ddp
    loss_fn = EDMLoss()

    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        how = (f"random crops of {cfg.crop_min or cfg.resolution}-{cfg.crop_max or 'short side'} px at "
               f"{cfg.resolution}x{cfg.resolution}") if photos is not None else f"{cfg.resolution}x{cfg.resolution}"
        log(f"{'resuming' if resume else 'training'} {count_parameters(net):,}-parameter EDM backbone on {len(data):,} images "
            f"({how}, {len(data.skipped)} skipped) on {device}"
            f"{', bf16 autocast' if amp else ''}{', compiled' if cfg.compile else ''} → {run}")

    total = int(cfg.duration_kimg * 1000)
    last_ckpt = time.time()
    last_snapshot_kimg = nimg // int(cfg.snapshot_kimg * 1000) if cfg.snapshot_kimg > 0 else 0
    val_every = int((cfg.val_kimg or cfg.snapshot_kimg) * 1000)
    last_val = nimg // val_every if val_every > 0 else 0
    tick_start, tick_nimg, tick_loss, tick_n = time.time(), nimg, 0.0, 0
    batch_local = cfg.batch // world

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]pretrain"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} img"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
                   TimeRemainingColumn(), disable=not progress or rank != 0, transient=False)
    stats_path = run / "stats.jsonl"
    with bar, GracefulStop() as stop:
        ptask = bar.add_task("pretrain", total=total, completed=nimg, loss=float("nan"), ips=0.0)
        while nimg < total and (max_steps is None or step < max_steps):
            t0 = time.time()
            g = step_generator(cfg.seed, step)
            sl = slice(rank * batch_local, (rank + 1) * batch_local)
            if photos is None:
                idx = torch.randint(len(data), (cfg.batch,), generator=g)
                flip = torch.rand(cfg.batch, generator=g) < 0.5 if cfg.xflip else \
                    torch.zeros(cfg.batch, dtype=torch.bool)
                y = images[idx[sl].to(images.device)].to(device, torch.float32) / 127.5 - 1
                y = torch.where(flip[sl, None, None, None].to(device), y.flip(-1), y)
            else:  # the global batch's crops, identical on every rank; this rank trains on its slice
                y = random_crops(photos, cfg.batch, cfg.resolution, g, cfg.crop_min or None, cfg.crop_max or None,
                                 xflip=cfg.xflip)[sl].to(device, torch.float32) / 127.5 - 1
            sigma, z = loss_fn.draw((cfg.batch, 3, cfg.resolution, cfg.resolution), g)  # the global batch's
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model, y, sigma[sl], z[sl]).sum() / batch_local  # DDP averages over ranks
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"loss is {loss.item()} at step {step}; the last checkpoint in {run} is intact")
            for g_ in opt.param_groups:
                g_["lr"] = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            nimg += cfg.batch
            step += 1
            halflife = min(cfg.ema_halflife_kimg * 1000, nimg * cfg.ema_rampup_ratio) if cfg.ema_rampup_ratio else \
                cfg.ema_halflife_kimg * 1000
            update_ema(ema, net, 0.5 ** (cfg.batch / max(halflife, 1e-8)))
            elapsed += time.time() - t0

            tick_loss += loss.item()
            tick_n += 1
            stopping = stop.agreed(world, device)
            done = nimg >= total or (max_steps is not None and step >= max_steps) or stopping
            if rank == 0:
                dt = time.time() - tick_start
                ips = (nimg - tick_nimg) / max(dt, 1e-9)
                bar.update(ptask, completed=min(nimg, total), loss=tick_loss / tick_n, ips=ips)
                if dt >= 60 or done:
                    rec = {"step": step, "kimg": nimg / 1000, "loss": tick_loss / tick_n, "img_per_s": ips,
                           "lr": opt.param_groups[0]["lr"], "elapsed_s": elapsed, "processes": world,
                           "time": time.time()}
                    with open(stats_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    tick_start, tick_nimg, tick_loss, tick_n = time.time(), nimg, 0.0, 0
                snap = nimg // int(cfg.snapshot_kimg * 1000) if cfg.snapshot_kimg > 0 else 0
                snapshot_due = snap > last_snapshot_kimg or done
                if snapshot_due:
                    last_snapshot_kimg = snap
                    # a stop writes the weights at once; the sample grid waits for a scheduled snapshot
                    write_snapshot(run, cfg, ema, nimg, elapsed, data.source, grid=not stopping)
                val_k = nimg // val_every if val_every > 0 else 0
                if val_set is not None and (val_k > last_val or done and not stopping):
                    last_val = val_k
                    val = validation_loss(ema, val_set, seed=0, batch=64, device=device)
                    with open(stats_path, "a") as f:
                        f.write(json.dumps({"step": step, "kimg": nimg / 1000, "elapsed_s": elapsed, "processes": world,
                                            "val_edm_loss": val["edm_loss"],
                                            "val_mse_at_sigma": val["mse_at_sigma"], "val_images": val["images"],
                                            "time": time.time()}) + "\n")
                if snapshot_due or time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
                    save_state(state_path, {"net": net, "ema": ema}, {"opt": opt},
                               {"config": dataclasses.asdict(cfg), "step": step, "nimg": nimg, "elapsed_s": elapsed})
                    last_ckpt = time.time()
            if stopping:
                if rank == 0:
                    log(f"stopped at {nimg / 1000:.1f} kimg; state and snapshot saved; continue with --resume")
                break
    if world > 1:
        torch.distributed.barrier()
    return run


def write_snapshot(run: Path, cfg: PretrainConfig, ema, nimg: int, elapsed: float, source: str,
                   grid: bool = True) -> Path:
    """EMA weights as a backbone checkpoint (usable with `--model`) and, with `grid`, a grid of samples from them."""
    kimg = nimg // 1000
    # whole kimg as in EDM; a fractional --snapshot-kimg (0.4) names by kimg to 3 decimals, so no snapshot
    # overwrites the one before it
    tag = f"{kimg:06d}" if float(cfg.snapshot_kimg).is_integer() else f"{nimg / 1000:010.3f}"
    path = run / f"network-snapshot-{tag}.safetensors"
    provenance = portable_record({"trained_by": "aid pretrain", "dataset": source, "images_seen": nimg,
                                  "train_seconds": round(elapsed, 1), "config": dataclasses.asdict(cfg)}, run)
    save_backbone(path, ema, "EDMPrecond", cfg.network_kwargs(), provenance=provenance)
    if grid:
        with torch.random.fork_rng():
            save_grid(run / f"samples-{tag}.png", sample_grid(ema, cfg.resolution, n=64, seed=0), cols=8)
    return path
