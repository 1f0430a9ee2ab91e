"""`aid bench`: every method on the same images, the same fixed masks and the same noise; quality, cost and speed.

The path of an image is `aid inpaint`'s (design.md): `Task.from_image(x0, M)` → the one sampler loop (`sample`) with one
registered method → completed image M ⊙ y + M̄ ⊙ x̂. Nothing here re-implements a method or the loop. Latent backbones
(EDM2) take the same path through their space (backbones/latent.py): images and masks at the VAE's pixel resolution
(8 × the network's), the Task on the latent grid, the completion decoded and its visible pixels pasted back; metrics are
computed in pixel space as for every backbone, and the timing includes the VAE's encoding and decoding.
Class-conditional backbones get `--class N` for every image, or else each image's label from the dataset's dataset.json.

Protocol (method.md §9)
  * Images: the first `n` of the dataset (folder or EDM zip, sorted by name, as `load_image_set` reads them) at the
    backbone's resolution. Image i gets mask i of each evaluation family (`data/masks.py`, version `MASKS_VERSION`, mask
    seed `mask_seed`): the masks are fixed by seed and identical for every method and every noise seed.
  * Noise: one CPU generator per image, seeded `seed·2²⁰ + i` (i the image's index; torch's CPU generator keeps only the
    low 32 bits of a seed, hence seeds < 4096 and n ≤ 2²⁰), so results depend neither on the batch size nor on how
    images are sharded across processes (up to floating-point differences of batched kernels).
  * A cell is (method, mask family, seed). Per image: PSNR over the hole, SSIM and LPIPS of the completed image against
    x0 (metrics/quality.py, metrics/lpips.py). Per seed the mean over images; then mean ± std over seeds (sample std,
    ddof = 1; null for a single seed). PSNR-hole is +inf for an exact hole (the `copy` oracle): JSON null, "inf" in the
    table. A completion with non-finite values (a diverging step size) gets null metrics and is counted in
    `images_nonfinite`. Every finite completion is checked to keep the visible pixels exactly.
  * NFE and backward passes per image are the loop's own counts. Seconds per image: wall time of the `sample` calls
    (after a discarded warm-up batch of the same method, same device, same run; CUDA/MPS synchronised around each call),
    summed over batches (and processes), divided by the images; with `--batch B` that is a batch's time / B.
  * Peak memory per cell, over its sampler calls (metrics run outside the measured windows): CUDA:
    `torch.cuda.max_memory_allocated`, reset before each call (every tensor PyTorch holds on the device then, so the
    backbone's and LPIPS's weights too, ~10 MB for LPIPS; not the caching allocator's reserve). Elsewhere: the process's
    peak resident set size during the calls, sampled every 10 ms from /proc/self/statm (everything the process holds:
    Python, the backbone, the dataset, LPIPS, and memory freed but not returned to the OS; spikes shorter than the
    interval can be missed; on MPS, GPU allocations are not in it). Without /proc: `getrusage` ru_maxrss, the process's
    lifetime high-water mark, which never decreases from one cell to the next. The kind is recorded.
  * Torchrun: rank r takes images r::world; per-image metrics are gathered to rank 0, which alone writes.
  * Cells are appended to OUT/cells.jsonl as they finish (fsync'd); `--resume` skips cells already there with the same
    method params and steps. bench.json, bench.csv, the grids and the plot are rebuilt from the cells every time.

`aid bench --tune METHOD` runs `tune`: a grid of the method's step size on a few validation images (free-form masks, one
seed), best PSNR-hole (ties within 0.01 dB: lowest LPIPS), recorded beside the checkpoint (registry.write_tuned).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import inspect
import io
import json
import math
import os
import platform
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data.datasets import load_image_set
from .data.masks import FAMILIES, MASKS_VERSION, describe, eval_masks
from .errors import UserError
from .fileio import atomic_write, atomic_write_text
from .methods import METHODS, get_method
from .sampling.heun import sample

# Operating points: a name on the command line → (registered method, params, steps or None for --steps). AID is not
# registered yet; `aid-18` will run method `aid` with N = 18 once it is.
OPERATING_POINTS: dict[str, tuple[str, dict, int | None]] = {
    "aid-12": ("aid", {}, 12),
    "aid-18": ("aid", {}, 18),
}

# The step size `--tune` searches, per baseline, and the grid: the method's default × these factors (log-spaced,
# half a decade apart). VIPaint's is the scale of its likelihood (the balance of its fit: ζ of its DPS phase barely
# moves the result, methods/vipaint.py).
TUNABLE = {"dps": "zeta", "mcg": "alpha", "gradpaint": "alpha", "copaint": "lr", "vipaint": "recon_scale"}
TUNE_FACTORS = (0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)
TUNE_TIE_DB = 0.01
TUNE_MAX_EXTEND = 8  # grid points added beyond an edge that keeps winning

CELLS_FILE = "cells.jsonl"
RUN_FILE = "run.json"
SEED_STRIDE = 2 ** 20  # generator of image i under noise seed s: s·2²⁰ + i (distinct in torch's 32 seed bits)
MAX_SEED = 2 ** 32 // SEED_STRIDE - 1  # 4095
MAX_IMAGES = SEED_STRIDE
MEM_POLL_S = 0.01
GRID_TILE_MIN = 64  # grid tiles are scaled up (nearest) to at least this many pixels

METRIC_DEFINITIONS = {
    "psnr_hole": "10·log10(R²/MSE), MSE over the hole pixels (M = 0) × channels of the completed image vs x0, images "
                 "in [-1, 1] with R = 2 (= [0, 1] with R = 1); null in rows = +inf (hole reproduced exactly) unless "
                 "images_nonfinite > 0",
    "ssim": "Wang 2004 on [0, 1], data range 1, 11-tap Gaussian window sigma 1.5, K1 0.01, K2 0.03, population "
            "covariances, map averaged without a 5-pixel border, per channel then over channels (= skimage "
            "structural_similarity(gaussian_weights=True, use_sample_covariance=False))",
    "lpips": "LPIPS v0.1, AlexNet trunk + linear heads, inputs in [-1, 1], no resizing (needs >= 31x31); null when "
             "unavailable",
    "aggregation": "per seed: mean over the n images; then mean and sample std (ddof 1) over seeds (std null for one "
                   "seed)",
    "sec_per_image": "wall-clock seconds of the sampler calls per image, after a discarded warm-up batch, same "
                     "device and run, synchronised; with --batch B a batch's time / B; mean over seeds",
    "nfe": "network evaluations per image as counted by the sampler loop (backward: backward passes through it)",
}


@dataclass
class MethodSpec:
    """One benchmark row group: a name as the user wrote it, the registered method and params it runs with."""

    label: str
    method: str
    params: dict = field(default_factory=dict)  # constructor params, as recorded (JSON)
    steps: int = 18
    params_source: str = "defaults"
    resources: dict = field(default_factory=dict)  # what else a result depends on (the guidance module's sha256)
    runtime: dict = field(default_factory=dict)  # constructor arguments that are not recorded (backbone sha256)


@dataclass
class BenchConfig:
    dataset: str
    methods: list[str]
    masks: list[str] = field(default_factory=lambda: list(FAMILIES))
    n: int = 100
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 18
    batch: int = 16
    mask_seed: int = 0
    examples: int = 6  # images per grid
    lpips_offline: bool | None = None
    guidance: str | None = None  # AID's guidance module (default: the embedded one)
    guidances: dict = field(default_factory=dict)  # NAME → module, for the labels aid-18:NAME (variants side by side)
    class_label: int | None = None  # --class N (class-conditional backbones; default: the dataset's labels)
    vae: str | None = None  # latent backbones: a local VAE folder instead of the pinned hub VAE
    precision: str = "auto"  # the backbone's (devices.prepare_backbone)
    compile: bool = False  # torch.compile the backbone


# ------------------------------------------------------------------------------------------------------- resolution

def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{what} is empty")
    if len(set(items)) != len(items):
        raise UserError(f"{what} names something twice: {text!r}")
    return items


def parse_seeds(text: str) -> list[int]:
    """`3` → seeds 0, 1, 2; a comma list (`0,5,7`, or `7,` for the single seed 7) → exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(t) for t in text.split(",") if t.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise UserError(f"--seeds must be a count (3) or a comma list of seeds (0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 or s > MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name at least one distinct seed in 0..{MAX_SEED}, got {text!r}")
    return seeds


def check_masks(families: list[str]) -> list[str]:
    for f in families:
        if f not in FAMILIES:
            raise UserError(f"unknown mask family {f!r} (available: {', '.join(FAMILIES)})")
    return families


def split_variant(label: str) -> tuple[str, str | None]:
    """`aid-18:pathwise` → ("aid-18", "pathwise"): an AID operating point with the guidance module named `pathwise`."""
    base, sep, variant = label.partition(":")
    return base, (variant if sep else None)


def check_method_names(labels: list[str], guidances: dict | None = None) -> None:
    """Fail fast, before anything is loaded, on a name that is neither a method nor an operating point."""
    for label in labels:
        label, variant = split_variant(label)
        if variant is not None:
            if label not in OPERATING_POINTS and label != "aid":
                raise UserError(f"only AID takes a guidance variant (aid-18:NAME), got {label}:{variant}")
            if guidances is not None and variant not in guidances:
                raise UserError(f"no guidance module named {variant!r}: add --guidance {variant}=PATH")
        if label in OPERATING_POINTS:
            name = OPERATING_POINTS[label][0]
            if name not in METHODS:
                raise UserError(f"method {label!r} needs the method {name!r}, which this version of aid does not have "
                                f"yet")
        elif label not in METHODS:
            known = sorted(METHODS) + sorted(OPERATING_POINTS)
            raise UserError(f"unknown method {label!r} (available: {', '.join(known)})")


def resolve_method(label: str, steps: int, checkpoint: Path | None = None, sha256: str | None = None,
                   notice: Callable[[str], None] | None = None,
                   guidance: str | os.PathLike | None = None, guidances: dict | None = None) -> MethodSpec:
    """A command-line method name → what runs: an operating point (aid-18: method `aid` at 18 steps), or a registered
    method with the backbone's tuned params (registry.tuned_params) when it has them, else the method's defaults.
    AID gets its guidance module (`guidance`, default: the embedded one; `aid-18:NAME` takes `guidances[NAME]`),
    checked against the backbone here."""
    from .registry import tuned_entries

    check_method_names([label], guidances)
    base, variant = split_variant(label)
    if variant is not None:
        guidance = guidances[variant]
    if base in OPERATING_POINTS:
        name, params, point_steps = OPERATING_POINTS[base]
        spec = MethodSpec(label, name, dict(params), point_steps or steps, "operating point")
    else:
        entry = tuned_entries(checkpoint, sha256, notice).get(label) if checkpoint is not None else None
        if entry and isinstance(entry.get("params"), dict):
            spec = MethodSpec(label, label, dict(entry["params"]), steps,
                              f"tuned: {entry.get('record', '?')} ({entry.get('date', 'undated')})")
        else:
            spec = MethodSpec(label, base, {}, steps, "defaults")
    if spec.method == "aid":
        from .backbones.checkpoint import sha256_file
        from .guidance.checkpoint import load_guidance
        from .registry import resolve_guidance

        path = resolve_guidance(guidance)
        load_guidance(path, backbone_sha256=sha256)  # a module for another backbone fails here, in one line
        spec.params["guidance"] = str(Path(path).resolve())
        spec.resources["guidance_sha256"] = sha256_file(path)
        spec.runtime["backbone_sha256"] = sha256
    return spec


# `aid bench` without --dataset: a small benchmark on images the backbone draws itself. Their seeds lie far from the
# benchmark's noise seeds (0, 1, 2, …): no fill may start from the very noise its reference image came from.
SAMPLES_SEED = 1_000_000
SAMPLES_N = 8


def backbone_samples(checkpoint: Path | None, folder: Path, n: int, steps: int = 18, device="cpu",
                     log: Callable[[str], None] = print) -> Path:
    """n images of the backbone's own distribution for a benchmark without --dataset: its unconditional samples by
    the benchmark's Heun ODE (`steps` grid steps, image i seeded with SAMPLES_SEED + i), written once into `folder`
    as PNGs (each atomically; a folder that already holds them is reused, so --resume sees the same images). An easy
    test set by construction (in-distribution for this backbone, no dataset's licence to mind), for a first look; numbers
    to report come from a held-out dataset (--dataset)."""
    from PIL import Image

    from .backbones.checkpoint import load_backbone
    from .backbones.evaluate import generate
    from .registry import resolve_backbone

    folder = Path(folder)
    names = [f"sample-{SAMPLES_SEED + i}.png" for i in range(n)]
    if all((folder / name).is_file() for name in names):
        return folder
    checkpoint = resolve_backbone(checkpoint)
    net, info = load_backbone(checkpoint, device=device)
    if info.get("encoder") is not None or info.get("label_dim", 0):
        raise UserError("aid bench without --dataset draws its images from a pixel-space unconditional backbone; "
                        "this one is latent or class-conditional: pass --dataset (e.g. a validation split)")
    log(f"no --dataset: drawing {n} images from the backbone itself ({steps}-step Heun ODE, seeds {SAMPLES_SEED}…"
        f"{SAMPLES_SEED + n - 1}) into {folder}; in-distribution by construction, an easy test: pass --dataset for "
        f"numbers to report")
    images = generate(net, n, info["resolution"], steps=steps, seed=SAMPLES_SEED, batch=min(n, 32), device=device)
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images.permute(0, 2, 3, 1).numpy()):
        atomic_write(folder / name, lambda tmp, a=image: Image.fromarray(a).save(tmp, format="PNG"))
    return folder


def method_default(method: str, param: str) -> float:
    """The default value of a method's constructor argument."""
    sig = inspect.signature(METHODS[method].__init__)
    return float(sig.parameters[param].default)


def tune_grid(method: str) -> tuple[str, list[float]]:
    """(parameter, values): the default × TUNE_FACTORS, rounded to 4 significant digits."""
    if method not in TUNABLE:
        raise UserError(f"--tune takes one of {', '.join(TUNABLE)}, got {method!r}")
    param = TUNABLE[method]
    d = method_default(method, param)
    return param, [float(f"{d * f:.4g}") for f in TUNE_FACTORS]


def bench_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed·2²⁰ + image index (independent of batching and sharding).

    torch's CPU generator (mt19937) uses only the low 32 bits of its seed, so the pair (seed, index) is packed into
    them: seeds 0..4095, indices below 2²⁰; distinct pairs never share noise. Seed 0 gives image i the noise of
    `aid inpaint --seed i`."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise UserError(f"noise seeds must lie in 0..{MAX_SEED}, got {seed}")
    if any(not 0 <= int(i) < MAX_IMAGES for i in indices):
        raise UserError(f"a benchmark takes at most {MAX_IMAGES} images")
    return [torch.Generator().manual_seed(int(seed) * SEED_STRIDE + int(i)) for i in indices]


# ------------------------------------------------------------------------------------------------------ measurement

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "process_rss_peak_sampled" if _rss_bytes() is not None else "process_maxrss_lifetime"


PEAK_MEMORY_DEFINITIONS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated during the cell's sampler calls (every PyTorch "
                                 "tensor on the GPU, backbone and LPIPS weights included; not the caching allocator's "
                                 "reserve nor the CUDA context), MiB, max over processes",
    "process_rss_peak_sampled": "peak resident set size of the whole process during the cell's sampler calls, sampled "
                                "every 10 ms from /proc/self/statm (Python, backbone, dataset, LPIPS and memory freed "
                                "but kept by the allocator included; short spikes can be missed; GPU memory of MPS not "
                                "included), MiB, max over processes",
    "process_maxrss_lifetime": "getrusage ru_maxrss: the process's lifetime peak RSS at the end of the cell (never "
                               "decreases from cell to cell), MiB, max over processes",
}


class PeakMemory:
    """One cell's peak memory in MiB (`.mib`), of the kind `peak_memory_kind` names, over the sampler calls only:
    `with mem.measure(): sample(...)` for each batch; metrics computed between them are outside the windows."""

    def __init__(self, device: torch.device):
        self.device, self.kind, self.mib = device, peak_memory_kind(device), None
        self._peak = 0

    def _poll(self, stop: threading.Event):
        while not stop.wait(MEM_POLL_S):
            self._peak = max(self._peak, _rss_bytes() or 0)

    @contextlib.contextmanager
    def measure(self):
        stop, thread = threading.Event(), None
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_rss_peak_sampled":
            self._peak = max(self._peak, _rss_bytes() or 0)
            thread = threading.Thread(target=self._poll, args=(stop,), daemon=True)
            thread.start()
        try:
            yield self
        finally:
            if self.kind == "cuda_max_memory_allocated":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            elif self.kind == "process_rss_peak_sampled":
                stop.set()
                thread.join()
                peak = max(self._peak, _rss_bytes() or 0)
            else:
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = rss if platform.system() == "Darwin" else rss * 1024  # bytes on macOS, KiB on Linux
            self._peak = max(self._peak, peak)
            self.mib = round(self._peak / 2 ** 20, 1)


# ------------------------------------------------------------------------------------------------------- JSON lines

def _enc(v):
    """Strict JSON for per-image values: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _dec(v):
    return float(v) if isinstance(v, str) else v


def _num(v: float | None):
    """A JSON number or null (non-finite)."""
    return v if v is not None and math.isfinite(v) else None


def read_cells(out: Path) -> list[dict]:
    """Every cell record in OUT/cells.jsonl (a torn last line, from a crash mid-write, is ignored)."""
    path = Path(out) / CELLS_FILE
    if not path.is_file():
        return []
    cells = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for k in ("psnr_hole", "ssim", "lpips"):
            rec[k] = [None if v is None else _dec(v) for v in rec.get(k, [])]
        cells.append(rec)
    return cells


def append_cell(out: Path, rec: dict) -> None:
    """Append one finished cell and fsync, so an interruption never loses it."""
    rec = dict(rec)
    for k in ("psnr_hole", "ssim", "lpips"):
        rec[k] = [None if v is None else _enc(v) for v in rec[k]]
    line = json.dumps(rec, allow_nan=False) + "\n"
    path = Path(out) / CELLS_FILE
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn last line (a crash mid-write): keep it apart from this record
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _cell_key(label: str, mask: str, seed: int) -> str:
    return f"{label}|{mask}|{seed}"


def _same_run(rec: dict, spec: MethodSpec) -> bool:
    return (rec.get("method_name") == spec.method and rec.get("params") == spec.params
            and rec.get("steps") == spec.steps and rec.get("resources", {}) == spec.resources)


# ------------------------------------------------------------------------------------------------------------ runner

class Runner:
    """The backbone, images, masks and metric models of one benchmark process, and how to run one cell."""

    def __init__(self, checkpoint: Path | None, dataset: str, n: int, families: list[str], mask_seed: int,
                 device, log: Callable[[str], None] = print, lpips_offline: bool | None = None,
                 progress: Callable[[int, str], None] | None = None, class_label: int | None = None,
                 vae: str | None = None, precision: str = "auto", compile: bool = False):
        from .backbones.checkpoint import load_backbone, sha256_file
        from .backbones.latent import class_labels, model_space
        from .devices import prepare_backbone
        from .registry import resolve_backbone
        from .training import init_distributed

        self.rank, self.world, self.device = init_distributed(torch.device(device))
        self.log = log if self.rank == 0 else (lambda m: None)
        self.progress = progress if self.rank == 0 else None
        self.checkpoint = resolve_backbone(checkpoint)
        self.sha256 = sha256_file(self.checkpoint)
        self.net, self.info = load_backbone(self.checkpoint, device=self.device)
        self.precision, self.compile = precision, compile
        self.net = prepare_backbone(self.net, self.device, precision, compile, notice=self.log)
        label_dim = self.info.get("label_dim", 0)
        if label_dim == 0 or class_label is not None:
            class_labels(class_label, label_dim, 1)  # --class checked against the backbone (one-line errors)
        self.space = model_space(self.info, vae, device=self.device)
        self.resolution = self.info["resolution"] * self.space.factor  # pixels (latent backbones: the VAE's 8x)
        skipped = []
        self.data = load_image_set(dataset, resolution=self.resolution,
                                   channels=3 if self.space.latent else self.info["channels"], limit=n,
                                   on_skip=lambda name, why: skipped.append(name))
        if skipped:
            self.log(f"note: skipped {len(skipped)} unreadable image(s) of {dataset}, e.g. {skipped[0]}")
        if len(self.data) < n:
            raise UserError(f"--n {n}, but {dataset} has only {len(self.data)} readable images")
        self.n = n
        self.class_label, self.labels = class_label, None  # labels: int64 [n] per image, class-conditional only
        if label_dim and class_label is not None:
            self.labels = torch.full((n,), int(class_label), dtype=torch.int64)
        elif label_dim:
            if self.data.labels is None:
                raise UserError(f"this backbone is class-conditional ({label_dim} classes) and {dataset} has no "
                                f"dataset.json labels: pass --class N")
            self.labels = self.data.labels[:n]
            if int(self.labels.min()) < 0 or int(self.labels.max()) >= label_dim:
                raise UserError(f"{dataset}: dataset.json labels lie outside the backbone's classes 0..{label_dim - 1}")
        self.masks = {f: eval_masks(f, n, self.resolution, mask_seed) for f in families}
        self.indices = list(range(n))[self.rank::self.world]  # this process's shard
        self.warmed: set[tuple] = set()  # (method, steps) already warmed up in this process
        self.session = uuid.uuid4().hex[:12]
        self.mem_kind = peak_memory_kind(self.device)
        self._notes: set[str] = set()
        self.lpips_model, self.lpips_source = None, None
        from .metrics.lpips import LPIPSUnavailable, load_lpips

        try:
            self.lpips_model = load_lpips(device=self.device, offline=lpips_offline, notice=self.note)
            self.lpips_source = self.lpips_model.source
        except LPIPSUnavailable as e:
            self.note(f"{e}; lpips is null")

    def note(self, message: str) -> None:
        """A notice, once per run."""
        if message not in self._notes:
            self._notes.add(message)
            self.log(message)

    # -- distributed helpers (no-ops for one process)
    def gather(self, obj) -> list | None:
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _metrics(self, completed: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, label: str) -> dict[str, list]:
        """Per-image PSNR-hole, SSIM, LPIPS of completed images (on CPU) against x0; null for non-finite images."""
        from .metrics.quality import psnr_hole, ssim_01

        finite = torch.isfinite(completed).flatten(1).all(1)
        visible = M.expand_as(x0) > 0.5
        for b in torch.nonzero(finite).flatten().tolist():  # visible pixels exactly kept, every method
            if not torch.equal(completed[b][visible[b]], x0[b][visible[b]]):
                raise RuntimeError(f"{label} changed visible pixels of a completed image (a bug in the method)")
        safe = torch.where(finite[:, None, None, None], completed, x0)  # keep kernels away from nan; masked below
        ph = psnr_hole(safe, x0, M).tolist()
        try:
            ss = ssim_01(safe, x0).tolist()
        except ValueError as e:
            self.note(f"note: ssim is null: {e}")
            ss = [None] * len(ph)
        ll = [None] * len(ph)
        if self.lpips_model is not None:
            try:
                with torch.no_grad():
                    ll = self.lpips_model(safe.to(self.device), x0.to(self.device)).cpu().double().tolist()
            except ValueError as e:
                self.note(f"note: lpips is null: {e}")
        keep = finite.tolist()
        return {"psnr_hole": [p if k else float("nan") for p, k in zip(ph, keep)],
                "ssim": [s if k and s is not None else None for s, k in zip(ss, keep)],
                "lpips": [v if k and v is not None else None for v, k in zip(ll, keep)],
                "finite": keep}

    def _batches(self, batch: int):
        for start in range(0, len(self.indices), batch):
            yield self.indices[start:start + batch]

    def _run_batch(self, method, spec: MethodSpec, family: str, seed: int, idx: list[int],
                   mem: PeakMemory | None = None):
        """(sampler result, completed pixels, seconds, x0, M) of one batch; latent backbones' VAE calls are timed."""
        x0 = self.data.as_float(idx)
        M = self.masks[family][idx]
        labels = (torch.nn.functional.one_hot(self.labels[idx], self.info["label_dim"]).to(torch.float32)
                  .to(self.device) if self.labels is not None else None)
        extras = {"x0": x0.to(self.device)} if method.oracle else None  # only oracles see the ground truth
        space = self.space.for_method(method)
        x0_d, M_d = x0.to(self.device), M.to(self.device)
        with mem.measure() if mem else contextlib.nullcontext():
            synchronize(self.device)
            t0 = time.perf_counter()
            task = space.task(x0_d, M_d, labels)  # latent backbones: encoded here, inside the timed window
            result = sample(self.net, task, method, num_steps=spec.steps, generators=bench_generators(seed, idx),
                            extras=extras)
            completed = space.to_pixels(x0_d, M_d, result.completed)
            synchronize(self.device)
            dt = time.perf_counter() - t0
        return result, completed, dt, x0, M

    def cell(self, spec: MethodSpec, family: str, seed: int, batch: int, examples: int = 0,
             done_before: int = 0) -> dict | None:
        """Run one (method, mask family, seed) cell on this process's shard; the merged record on rank 0, else None.

        `examples`: keep the completions of images 0..examples−1 (for the grids). `done_before`: images already
        finished in this run, for the progress callback.
        """
        method = get_method(spec.method, **spec.params, **spec.runtime)
        warm_key = (spec.method, spec.steps)
        if warm_key not in self.warmed and self.indices:  # warm-up: first batch, discarded, not timed
            self._run_batch(method, spec, family, seed, self.indices[:batch])
            self.warmed.add(warm_key)
        per_image: dict[int, dict] = {}
        seconds, nfe_sum, bwd_sum, kept = 0.0, 0.0, 0.0, {}
        mem = PeakMemory(self.device)
        for idx in self._batches(batch):
            result, completed, dt, x0, M = self._run_batch(method, spec, family, seed, idx, mem)
            seconds += dt
            nfe_sum += result.nfe * len(idx)
            bwd_sum += result.backward * len(idx)
            completed = completed.detach().to("cpu", torch.float32)
            del result
            m = self._metrics(completed, x0, M, spec.label)
            for j, i in enumerate(idx):
                per_image[i] = {k: v[j] for k, v in m.items()}
                if i < examples:
                    kept[i] = _to_uint8(completed[j])
            if self.progress:
                self.progress(done_before + min(len(per_image) * self.world, self.n),
                              f"{spec.label} / {family} / seed {seed}")
        parts = self.gather({"images": per_image, "seconds": seconds, "nfe": nfe_sum, "backward": bwd_sum,
                             "peak": mem.mib, "examples": kept})
        if self.rank != 0:
            return None
        images, examples_out = {}, {}
        for p in parts:
            images.update(p["images"])
            examples_out.update(p["examples"])
        order = sorted(images)
        assert order == list(range(self.n)), "every image is benchmarked exactly once"
        total_seconds = sum(p["seconds"] for p in parts)
        nfe, bwd = sum(p["nfe"] for p in parts) / self.n, sum(p["backward"] for p in parts) / self.n
        peaks = [p["peak"] for p in parts if p["peak"] is not None]
        rec = {
            "method": spec.label, "method_name": spec.method, "params": spec.params, "steps": spec.steps,
            "resources": spec.resources, "mask": family, "seed": seed, "n": self.n,
            "nfe": int(nfe) if nfe == int(nfe) else round(nfe, 3),
            "backward": int(bwd) if bwd == int(bwd) else round(bwd, 3),
            "seconds": round(total_seconds, 6), "sec_per_image": round(total_seconds / self.n, 6),
            "peak_memory_mib": max(peaks) if peaks else None, "peak_memory_kind": self.mem_kind,
            "images_nonfinite": sum(not images[i]["finite"] for i in order),
            "psnr_hole": [images[i]["psnr_hole"] for i in order],
            "ssim": [images[i]["ssim"] for i in order],
            "lpips": [images[i]["lpips"] for i in order],
            "batch": batch, "world_size": self.world, "device": device_name(self.device), "session": self.session,
            "precision": self.precision, "compile": self.compile,
            "date": _now(),
        }
        rec["_examples"] = [examples_out[i] for i in sorted(examples_out)]
        return rec


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [−1, 1] → uint8 HWC."""
    from .data.grid import to_uint8

    return to_uint8(x)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def _aid_version() -> str:
    try:
        from importlib.metadata import version

        return version("aid-inpaint")
    except Exception:
        return "unknown"


# ------------------------------------------------------------------------------------------------------- aggregation

def _mean(values: list) -> float:
    """Mean of per-image values; inf/nan propagate; all null → nan (metric unavailable)."""
    if not values or any(v is None for v in values):
        return float("nan")
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _mean_std(per_seed: list[float]) -> dict:
    arr = np.asarray(per_seed, dtype=np.float64)
    if len(arr) == 0 or not np.all(np.isfinite(arr)):
        return {"mean": None, "std": None, **({"value": "inf"} if len(arr) and np.all(arr == np.inf) else {})}
    std = float(np.std(arr, ddof=1)) if len(arr) > 1 else None
    return {"mean": float(arr.mean()), "std": std}


def _count(v: float) -> int | float:
    """A mean count (NFE, backward passes) as the table shows it: whole, or to one decimal (CoPaint's retries)."""
    return int(v) if v == int(v) else round(v, 1)


def aggregate(cells: list[dict]) -> dict:
    """One table row from a method × mask's cells (one per seed)."""
    first = cells[0]
    per_seed = [{"seed": c["seed"], "psnr_hole": _num(_mean(c["psnr_hole"])), "ssim": _num(_mean(c["ssim"])),
                 "lpips": _num(_mean(c["lpips"])), "sec_per_image": c["sec_per_image"], "nfe": c["nfe"]}
                for c in cells]
    nfe = float(np.mean([c["nfe"] for c in cells]))
    bwd = float(np.mean([c["backward"] for c in cells]))
    peaks = [c["peak_memory_mib"] for c in cells if c.get("peak_memory_mib") is not None]
    return {
        "method": first["method"], "mask": first["mask"],
        "nfe": _count(nfe), "backward": _count(bwd),
        "sec_per_image": float(np.mean([c["sec_per_image"] for c in cells])),
        "psnr_hole": _mean_std([_mean(c["psnr_hole"]) for c in cells]),
        "ssim": _mean_std([_mean(c["ssim"]) for c in cells]),
        "lpips": _mean_std([_mean(c["lpips"]) for c in cells]),
        "peak_memory_mib": max(peaks) if peaks else None,
        "images": first["n"], "seeds": [c["seed"] for c in cells],
        "images_nonfinite": sum(c.get("images_nonfinite", 0) for c in cells),
        "method_name": first["method_name"], "params": first["params"], "steps": first["steps"],
        "per_seed": per_seed,
    }


# ----------------------------------------------------------------------------------------------------------- reports

CSV_COLUMNS = ["method", "mask", "nfe", "backward", "sec_per_image", "psnr_hole_mean", "psnr_hole_std", "ssim_mean",
               "ssim_std", "lpips_mean", "lpips_std", "peak_memory_mib", "images", "seeds", "images_nonfinite"]


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        vals = []
        for c in CSV_COLUMNS:
            if c.endswith("_mean") or c.endswith("_std"):
                metric, stat = c.rsplit("_", 1)
                v = r[metric][stat]
                if v is None and stat == "mean" and r[metric].get("value") == "inf":
                    v = "inf"
            elif c == "seeds":
                v = " ".join(str(s) for s in r["seeds"])
            else:
                v = r[c]
            vals.append("" if v is None else v)
        w.writerow(vals)
    return buf.getvalue()


def format_stat(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "inf" if stat.get("value") == "inf" else "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def memory_header(kind: str) -> str:
    return {"cuda_max_memory_allocated": "peak alloc MiB", "process_rss_peak_sampled": "peak RSS MiB",
            "process_maxrss_lifetime": "max RSS MiB"}.get(kind, "peak MiB")


MEMORY_CAPTIONS = {
    "cuda_max_memory_allocated": "peak alloc: torch.cuda.max_memory_allocated during the sampler calls",
    "process_rss_peak_sampled": "peak RSS: the whole process's resident memory during the sampler calls (sampled)",
    "process_maxrss_lifetime": "max RSS: the process's lifetime peak resident memory (never decreases)",
}


def rich_table(result: dict):
    """The rows as a rich Table (method × mask; NFE, s/image, PSNR-hole, SSIM, LPIPS, peak memory)."""
    from rich.table import Table

    cfg = result["config"]
    kind = cfg["peak_memory"]["kind"]
    kinds = kind if isinstance(kind, list) else [kind]
    t = Table(title=f"aid bench: {cfg['n']} images × {len(cfg['seeds'])} seeds, {cfg['device']}; mean ± std over "
                    f"seeds", caption="; ".join(MEMORY_CAPTIONS.get(k, k) for k in kinds))
    for col, justify in (("method", "left"), ("mask", "left"), ("NFE", "right"), ("s/image", "right"),
                         ("PSNR-hole", "right"), ("SSIM", "right"), ("LPIPS", "right"),
                         (memory_header(kinds[0]), "right")):
        t.add_column(col, justify=justify)
    for r in result["rows"]:
        mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        nonfinite = f" ({r['images_nonfinite']} diverged)" if r["images_nonfinite"] else ""
        t.add_row(r["method"], r["mask"], str(r["nfe"]), f"{r['sec_per_image']:.3g}",
                  format_stat(r["psnr_hole"], 2) + nonfinite, format_stat(r["ssim"], 3), format_stat(r["lpips"], 3),
                  mem)
    return t


MD_START, MD_END = "<!-- aid bench: start -->", "<!-- aid bench: end -->"


def rows_markdown(result: dict) -> str:
    """The table as Markdown (what README shows), with the run's size, device and date in the caption."""
    cfg = result["config"]
    counts: dict[str, set[int]] = {}  # methods with fewer seeds than asked so far: their seed counts over the masks
    for r in result["rows"]:
        if len(r["seeds"]) < len(cfg["seeds"]):
            counts.setdefault(r["method"], set()).add(len(r["seeds"]))
    fewer = [f"{m} {min(c)}" + (f"–{max(c)}" if len(c) > 1 else "") for m, c in sorted(counts.items())]
    sessions = cfg.get("timing_sessions", 1)
    lines = [f"{cfg['n']} images of `{Path(cfg['dataset']).name}` × {len(cfg['seeds'])} seeds"
             + (f" (so far {', '.join(fewer)})" if fewer else "")
             + f", masks {cfg['masks']['version']}, {cfg['device']}, aid {cfg['aid']}, {cfg['date'][:10]}; mean ± std "
             f"over seeds; "
             + ("seconds per image measured in the same run." if sessions <= 1 else
                f"seconds per image measured in {sessions} runs (--resume), comparable only within one."),
             "",
             "| method | mask | NFE | backward | s/image | PSNR-hole dB ↑ | SSIM ↑ | LPIPS ↓ |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['mask']} | {r['nfe']} | {r['backward']} | {r['sec_per_image']:.3g} | "
                     f"{format_stat(r['psnr_hole'], 2)} | {format_stat(r['ssim'], 3)} | {format_stat(r['lpips'], 3)} |")
    return "\n".join(lines) + "\n"


def markdown_parts(path: Path) -> tuple[str, str]:
    """(text up to MD_START, text from MD_END on) of `path`, or one clear error when the markers are not there."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--markdown file not found: {path}")
    text = path.read_text()
    if text.count(MD_START) != 1 or text.count(MD_END) != 1 or text.index(MD_START) > text.index(MD_END):
        raise UserError(f"{path} needs one line '{MD_START}' and, below it, one '{MD_END}' to put the table between")
    head, rest = text.split(MD_START)
    return head + MD_START, MD_END + rest.split(MD_END)[1]


def splice_markdown(path: Path, table: str) -> None:
    """Replace what lies between the MD_START and MD_END markers of `path` (a README) with `table`, atomically."""
    head, tail = markdown_parts(path)
    atomic_write_text(Path(path), f"{head}\n{table}{tail}")


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    atomic_write(path, lambda p: im.save(p, format="PNG"))


def save_examples(out: Path, label: str, family: str, examples: list[np.ndarray]) -> None:
    """The first completions of a cell, side by side, for the grids (OUT/examples/<method>__<mask>.png)."""
    if examples:
        (out / "examples").mkdir(exist_ok=True)
        _save_png(out / "examples" / f"{_safe_name(label)}__{family}.png", np.concatenate(examples, axis=1))


def _load_examples(out: Path, label: str, family: str, res: int, k: int) -> list[np.ndarray] | None:
    from PIL import Image

    path = out / "examples" / f"{_safe_name(label)}__{family}.png"
    if not path.is_file():
        return None
    arr = np.asarray(Image.open(path))
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    n = min(k, arr.shape[1] // res)
    return [arr[:, i * res:(i + 1) * res] for i in range(n)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def save_grid_png(path: Path, rows: list[tuple[str, list[np.ndarray]]], res: int) -> None:
    """Rows of uint8 HWC tiles with a label column on the left; tiles scaled up (nearest) to ≥ GRID_TILE_MIN px."""
    from PIL import Image, ImageDraw

    scale = max(1, math.ceil(GRID_TILE_MIN / res))
    tile, pad = res * scale, 2
    font = _font(12)
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lbl, font=font)) for lbl, _ in rows)
    cols = max(len(tiles) for _, tiles in rows)
    im = Image.new("RGB", (label_w + cols * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(im)
    for r, (lbl, tiles) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((4, y + tile // 2), lbl, fill="black", font=font, anchor="lm")
        for c, t in enumerate(tiles):
            t = Image.fromarray(t[:, :, 0] if t.shape[2] == 1 else t).convert("RGB")
            im.paste(t.resize((tile, tile), Image.NEAREST), (label_w + pad + c * (tile + pad), y))
    atomic_write(path, lambda p: im.save(p, format="PNG"))


def write_grids(out: Path, runner: Runner, specs: list[MethodSpec], families: list[str], k: int) -> list[Path]:
    """grid-<mask>.png: input (hole grey), each method's completions (first seed), ground truth; k images."""
    from .data.grid import to_uint8

    k = min(k, runner.n)
    written = []
    for family in families:
        x0 = runner.data.as_float(list(range(k)))
        M = runner.masks[family][:k]
        rows = [("input", list(to_uint8(x0 * M)))]  # hole: 0 in [−1, 1], mid grey
        for spec in specs:
            tiles = _load_examples(out, spec.label, family, runner.resolution, k)
            if tiles:
                rows.append((spec.label, tiles))
        rows.append(("ground truth", list(to_uint8(x0))))
        path = out / f"grid-{family}.png"
        save_grid_png(path, rows, runner.resolution)
        written.append(path)
    return written


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / count)) if span > 0 else 1.0
    for m in (1, 2, 5, 10):
        if span / (step * m) <= count:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def quality_speed_plot(path: Path, rows: list[dict], family: str, title: str) -> Path:
    """PSNR-hole (± std over seeds) against seconds per image on a log axis, one labelled point per method, for one
    mask family (the paper's Figure 1). Oracles (0 NFE) and rows without a finite PSNR are left out. Pillow only."""
    from PIL import Image, ImageDraw

    pts = [r for r in rows if r["mask"] == family and r["nfe"] and r["sec_per_image"] > 0
           and r["psnr_hole"]["mean"] is not None]
    W, H, left, right, top, bottom = 720, 480, 80, 30, 40, 55
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font, small = _font(14), _font(11)
    d.text((W // 2, 12), title, fill="black", font=font, anchor="mt")
    x0, x1, y0, y1 = left, W - right, H - bottom, top
    d.rectangle((x0, y1, x1, y0), outline="black")
    d.text(((x0 + x1) // 2, H - 12), "seconds per image (log scale)", fill="black", font=small, anchor="mb")
    ylabel = Image.new("RGB", (200, 16), "white")  # the y label, rotated
    ImageDraw.Draw(ylabel).text((100, 8), "PSNR-hole dB (± std over seeds)", fill="black", font=small, anchor="mm")
    ylabel = ylabel.rotate(90, expand=True)
    im.paste(ylabel, (6, (y0 + y1) // 2 - ylabel.height // 2))
    if not pts:
        d.text(((x0 + x1) // 2, (y0 + y1) // 2), "no method with a finite PSNR-hole", fill="grey", font=font,
               anchor="mm")
        atomic_write(path, lambda p: im.save(p, format="PNG"))
        return path
    lx = [math.log10(r["sec_per_image"]) for r in pts]
    lo_x, hi_x = math.floor(min(lx) - 0.3), math.ceil(max(lx) + 0.3)
    ys = [r["psnr_hole"]["mean"] for r in pts]
    errs = [r["psnr_hole"]["std"] or 0.0 for r in pts]
    lo_y, hi_y = min(y - e for y, e in zip(ys, errs)), max(y + e for y, e in zip(ys, errs))
    margin = max(0.5, 0.1 * (hi_y - lo_y))
    lo_y, hi_y = lo_y - margin, hi_y + margin

    def X(v):  # log10 seconds → pixel
        return x0 + (v - lo_x) / (hi_x - lo_x) * (x1 - x0)

    def Y(v):
        return y0 - (v - lo_y) / (hi_y - lo_y) * (y0 - y1)

    for e in range(lo_x, hi_x + 1):  # decades, with 2× and 5× minor ticks
        d.line((X(e), y0, X(e), y0 + 6), fill="black")
        d.text((X(e), y0 + 8), f"{10.0 ** e:g}", fill="black", font=small, anchor="mt")
        for m in (2, 5):
            if e < hi_x:
                d.line((X(e + math.log10(m)), y0, X(e + math.log10(m)), y0 + 3), fill="black")
    for t in _nice_ticks(lo_y, hi_y):
        d.line((x0 - 6, Y(t), x0, Y(t)), fill="black")
        d.line((x0, Y(t), x1, Y(t)), fill=(230, 230, 230))
        d.text((x0 - 8, Y(t)), f"{t:g}", fill="black", font=small, anchor="rm")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far

    def free(box):
        return (box[0] >= x0 and box[2] <= x1 and box[1] >= y1 and box[3] <= y0
                and all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed))

    for i, (r, v, y, e) in enumerate(zip(pts, lx, ys, errs)):
        c = palette[i % len(palette)]
        px, py = X(v), Y(y)
        if e:
            d.line((px, Y(y - e), px, Y(y + e)), fill=c, width=2)
        d.ellipse((px - 5, py - 5, px + 5, py + 5), fill=c, outline="black")
        text = f"{r['method']} ({r['nfe']} NFE)"
        w, h = d.textlength(text, font=small), 12
        candidates = [(px + 8, py - 8 - h + dy) for dy in (0, 22, -14, 36, -28, 50)]
        candidates += [(px - 8 - w, py - 8 - h + dy) for dy in (0, 22, -14, 36, -28, 50)]
        boxes = [(bx, by, bx + w, by + h) for bx, by in candidates]
        box = next((b for b in boxes if free(b)), boxes[0])
        placed.append(box)
        d.text((box[0], box[1]), text, fill=c, font=small)
    atomic_write(path, lambda p: im.save(p, format="PNG"))
    return path


# ------------------------------------------------------------------------------------------------------------- bench

def _identity(runner: Runner, cfg: BenchConfig, dataset: str) -> dict:
    """What every cell of one OUT folder must share (a resumed run must match it)."""
    identity = {"dataset": str(Path(dataset).resolve()), "n": cfg.n, "model_sha256": runner.sha256,
                "resolution": runner.resolution, "masks_version": MASKS_VERSION, "mask_seed": cfg.mask_seed}
    if runner.space.latent:
        identity["space"] = runner.space.describe()
    if runner.labels is not None:
        identity["class"] = runner.class_label if runner.class_label is not None else "dataset.json"
    if cfg.precision != "auto":  # (older runs have no key: auto)
        identity["precision"] = cfg.precision
    return identity


def _prepare_out(out: Path, identity: dict, resume: bool) -> tuple[dict, str | None]:
    """(finished cells by key, error or None) — run on rank 0 only."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return {}, f"cannot create --out {out}: {e.strerror or e}"
    if not os.access(out, os.W_OK | os.X_OK):
        return {}, f"--out folder is not writable: {out}"
    cells_path, run_path = out / CELLS_FILE, out / RUN_FILE
    have_cells = cells_path.is_file() and cells_path.stat().st_size > 0
    if have_cells and not resume:
        return {}, f"{out} already holds benchmark cells; pass --resume to continue it, or choose another --out"
    if have_cells:
        try:
            old = json.loads(run_path.read_text())
        except (OSError, ValueError):
            old = {}
        diff = sorted(k for k in identity if not isinstance(old, dict) or old.get(k) != identity[k])
        if diff:
            return {}, (f"--resume: {out} holds a benchmark of a different setup ({', '.join(diff)} differ); "
                        f"use another --out")
    atomic_write_text(run_path, json.dumps(identity, indent=2) + "\n")
    done = {}
    for rec in read_cells(out):
        done[_cell_key(rec["method"], rec["mask"], rec["seed"])] = rec  # the last record of a key wins
    return done, None


def run_bench(cfg: BenchConfig, out: Path, model: Path | None = None, device="cpu", resume: bool = False,
              log: Callable[[str], None] = print, progress: Callable[[int, int, str], None] | None = None,
              runner: Runner | None = None, report_only: bool = False) -> dict | None:
    """Run (or resume) a benchmark into `out`; returns the bench.json dict on rank 0 (None on other ranks).
    `report_only`: run nothing, rebuild the reports from the cells already in `out`."""
    check_masks(cfg.masks)
    check_method_names(cfg.methods, cfg.guidances)
    out = Path(out)
    state = {"total": 0}
    runner = runner or Runner(model, cfg.dataset, cfg.n, cfg.masks, cfg.mask_seed, device, log=log,
                              lpips_offline=cfg.lpips_offline,
                              progress=(lambda done, desc: progress(done, state["total"], desc)) if progress else None,
                              class_label=cfg.class_label, vae=cfg.vae, precision=cfg.precision, compile=cfg.compile)
    specs = [resolve_method(m, cfg.steps, runner.checkpoint, runner.sha256, runner.note, cfg.guidance, cfg.guidances)
             for m in cfg.methods]
    identity = _identity(runner, cfg, cfg.dataset)
    done, error = _prepare_out(out, identity, resume) if runner.rank == 0 else ({}, None)
    done, error = runner.broadcast((done, error))
    if error:
        raise UserError(error)
    todo = []
    for spec in specs:
        for family in cfg.masks:
            for seed in cfg.seeds:
                rec = done.get(_cell_key(spec.label, family, seed))
                if rec is None or not _same_run(rec, spec):
                    todo.append((spec, family, seed))
    skipped = len(specs) * len(cfg.masks) * len(cfg.seeds) - len(todo)
    if report_only:
        if not skipped:
            raise UserError(f"--report-only: {out} holds no finished cell of these methods, masks and seeds")
        if todo:
            runner.log(f"report only: {len(todo)} cell(s) not run are left out of the table (rows show the seeds "
                       f"they have)")
        todo = []
    elif skipped:
        runner.log(f"resuming: {skipped} finished cell(s) skipped, {len(todo)} to run")
    state["total"] = len(todo) * cfg.n
    if todo and runner.rank == 0:
        runner.log(plan_text(runner, cfg, todo))
    for c, (spec, family, seed) in enumerate(todo):
        rec = runner.cell(spec, family, seed, cfg.batch, examples=cfg.examples if seed == cfg.seeds[0] else 0,
                          done_before=c * cfg.n)
        if runner.rank == 0:
            save_examples(out, spec.label, family, rec.pop("_examples"))
            append_cell(out, rec)
    if runner.rank != 0:
        return None
    return write_reports(out, cfg, runner, specs)


def count_evaluations(spec: MethodSpec, channels: int, resolution: int) -> tuple[int, int]:
    """(NFE, backward passes) per image of one method, counted by running its loop on a stand-in network that costs
    nothing (exact but for CoPaint's adaptive retries, which depend on the real network)."""
    from .sampling import heun  # (not this module's `sample`, which counts and times the real runs)
    from .task import Task

    method = get_method(spec.method, **spec.params, **spec.runtime)
    if method.oracle:
        return 0, 0
    x0 = torch.zeros(1, channels, resolution, resolution)
    M = torch.ones(1, 1, resolution, resolution)
    M[..., resolution // 4: resolution // 2, resolution // 4: resolution // 2] = 0
    r = heun.sample(lambda x, sigma, labels=None: 0.5 * x, Task.from_image(x0, M), method, num_steps=spec.steps,
                    generators=bench_generators(0, [0]))
    return r.nfe, r.backward


def plan_text(runner: Runner, cfg: BenchConfig, todo: list) -> str:
    """What the run will do and roughly how long it will take, said before it starts: cells, images, network
    evaluations, and an estimate from one timed network evaluation at --batch (a backward pass counted as two)."""
    channels, res = runner.info["channels"], runner.info["resolution"]
    counts = {}
    for spec, _, _ in todo:
        if spec.label not in counts:
            try:
                counts[spec.label] = count_evaluations(spec, channels, res)
            except Exception:  # a method the stand-in cannot run: no estimate for it, the run itself will say more
                counts[spec.label] = (spec.steps * 2 - 1, 0)
    images = len(todo) * cfg.n
    evals = sum((counts[s.label][0] + 2 * counts[s.label][1]) * cfg.n for s, _, _ in todo)
    per_eval = _seconds_per_evaluation(runner, min(cfg.batch, cfg.n))
    eta = evals * per_eval / max(runner.world, 1)
    methods = ", ".join(f"{label} {n} NFE" + (f" + {b} backward" if b else "") for label, (n, b) in counts.items())
    return (f"plan: {len(todo)} cell(s) × {cfg.n} images = {images:,} completions ({methods} per image); about "
            f"{_duration(eta)} on {runner.device} at --batch {cfg.batch} (an estimate from one timed network "
            f"evaluation; metrics and the VAE come on top)")


def _seconds_per_evaluation(runner: Runner, batch: int) -> float:
    """Seconds per image of one forward pass of the backbone at `batch`, after an untimed first call."""
    net, res, C = runner.net, runner.info["resolution"], runner.info["channels"]
    x = torch.zeros(batch, C, res, res, device=runner.device)
    sigma = torch.ones(batch, device=runner.device)
    labels = torch.zeros(batch, runner.info["label_dim"], device=runner.device) if runner.info["label_dim"] else None
    with torch.no_grad():
        net(x, sigma, labels)
        synchronize(runner.device)
        t0 = time.perf_counter()
        net(x, sigma, labels)
        synchronize(runner.device)
    return (time.perf_counter() - t0) / batch


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def write_reports(out: Path, cfg: BenchConfig, runner: Runner, specs: list[MethodSpec]) -> dict:
    """bench.json, bench.csv, grid-<mask>.png and quality-speed.png, rebuilt from OUT/cells.jsonl."""
    by_key = {}
    for rec in read_cells(out):
        by_key[_cell_key(rec["method"], rec["mask"], rec["seed"])] = rec
    rows, used = [], []
    for spec in specs:
        for family in cfg.masks:
            cells = [by_key.get(_cell_key(spec.label, family, s)) for s in cfg.seeds]
            cells = [c for c in cells if c is not None and _same_run(c, spec)]
            if cells:
                rows.append(aggregate(cells))
                used += cells
    kinds = sorted({c["peak_memory_kind"] for c in used}) or [runner.mem_kind]
    config = {
        "dataset": cfg.dataset, "n": cfg.n, "images": runner.data.names[:cfg.n], "seeds": cfg.seeds,
        "masks": {"families": cfg.masks, "version": MASKS_VERSION, "seed": cfg.mask_seed,
                  "definitions": {f: describe(f) for f in cfg.masks},
                  "hole_fraction": {f: round(float(1 - runner.masks[f].mean()), 4) for f in cfg.masks}},
        "model": {"path": str(Path(runner.checkpoint).resolve()), "sha256": runner.sha256,
                  "resolution": runner.resolution, "precond": runner.info.get("precond"),
                  "space": runner.space.describe(),
                  "class": (None if runner.labels is None else
                            runner.class_label if runner.class_label is not None else "dataset.json")},
        "methods": {s.label: {"method": s.method, "params": s.params, "params_source": s.params_source,
                              "steps": s.steps, **({"resources": s.resources} if s.resources else {})}
                    for s in specs},
        "steps": cfg.steps, "batch": cfg.batch, "device": device_name(runner.device), "world_size": runner.world,
        "precision": cfg.precision, "compile": cfg.compile,
        "noise": "one CPU torch.Generator per image, seeded seed * 2**20 + image index",
        "torch": torch.__version__, "aid": _aid_version(), "python": platform.python_version(),
        "metrics": dict(METRIC_DEFINITIONS, lpips_weights=runner.lpips_source),
        "peak_memory": {"kind": kinds[0] if len(kinds) == 1 else kinds,
                        "definition": "; ".join(PEAK_MEMORY_DEFINITIONS[k] for k in kinds)},
        "timing_sessions": len({c.get("session") for c in used}),
        "timing_note": "seconds compare only within one session on one device; timing_sessions > 1 means --resume "
                       "mixed runs",
        "date": _now(),
    }
    result = {"config": config, "rows": rows}
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "bench.csv", rows_csv(rows))
    atomic_write_text(out / "bench.md", rows_markdown(result))
    write_grids(out, runner, specs, cfg.masks, cfg.examples)
    family = "freeform" if "freeform" in cfg.masks else cfg.masks[0]
    quality_speed_plot(out / "quality-speed.png", rows, family,
                       f"quality vs speed, {family} masks, {cfg.n} images, {runner.resolution}px, "
                       f"{device_name(runner.device).split(' (')[0]}")
    return result


# -------------------------------------------------------------------------------------------------------------- tune

def tune(method: str, dataset: str, model: Path | None = None, n: int = 16, steps: int = 18, seed: int = 0,
         batch: int = 16, mask_seed: int = 0, device="cpu", log: Callable[[str], None] = print,
         progress: Callable[[int, int, str], None] | None = None, lpips_offline: bool | None = None,
         write: bool = True, class_label: int | None = None, vae: str | None = None, precision: str = "auto",
         compile: bool = False) -> dict | None:
    """Pick `method`'s step size on `dataset` (the validation split) and record it for the backbone.

    Grid: the method's default × (0.1, 0.316, 1, 3.16, 10), extended half a decade at a time (up to TUNE_MAX_EXTEND
    points) while the best value lies on its edge; n images, free-form masks (mask seed `mask_seed`), one noise seed. Criterion: the highest mean PSNR-hole; values within 0.01 dB of it are tied and the lowest LPIPS among them
    wins (without LPIPS: the first). A value whose completions diverge scores −inf. Returns the record entry (rank 0).
    """
    from .registry import write_tuned

    param, grid = tune_grid(method)
    state = {"total": len(grid) * n}
    runner = Runner(model, dataset, n, ["freeform"], mask_seed, device, log=log, lpips_offline=lpips_offline,
                    progress=(lambda done, desc: progress(done, state["total"], desc)) if progress else None,
                    class_label=class_label, vae=vae, precision=precision, compile=compile)
    scores = []

    def psnr_of(s):
        return s["psnr_hole"] if s["psnr_hole"] is not None and not s["images_nonfinite"] else -math.inf

    def evaluate(value):
        spec = MethodSpec(f"{method}[{param}={value:g}]", method, {param: value}, steps, "tune grid")
        rec = runner.cell(spec, "freeform", seed, batch, done_before=len(scores) * n)
        scores.append({param: value, "psnr_hole": _num(_mean(rec["psnr_hole"])), "ssim": _num(_mean(rec["ssim"])),
                       "lpips": _num(_mean(rec["lpips"])), "images_nonfinite": rec["images_nonfinite"],
                       "sec_per_image": rec["sec_per_image"], "nfe": rec["nfe"]} if runner.rank == 0 else None)

    for value in grid:
        evaluate(value)
    # a best value on the grid's edge is no optimum: step on, half a decade at a time, while it keeps winning
    for _ in range(TUNE_MAX_EXTEND):
        scores = runner.broadcast(scores)  # rank 0 holds the metrics; every rank must take the same branch
        ordered = sorted(scores, key=lambda s: s[param])
        best = max(ordered, key=psnr_of)
        if psnr_of(best) == -math.inf or best not in (ordered[0], ordered[-1]):
            break
        value = float(f"{best[param] * (TUNE_FACTORS[3] if best is ordered[-1] else TUNE_FACTORS[1]):.4g}")
        grid.append(value)
        state["total"] += n
        evaluate(value)
    if runner.rank != 0:
        return None
    scores.sort(key=lambda s: s[param])
    grid.sort()

    best_psnr = max(psnr_of(s) for s in scores)
    tied = [s for s in scores if psnr_of(s) >= best_psnr - TUNE_TIE_DB]
    best = min(tied, key=lambda s: s["lpips"] if s["lpips"] is not None else math.inf)
    entry = {
        "params": {param: best[param]}, "param": param, "grid": grid, "scores": scores,
        "criterion": f"max mean psnr_hole; within {TUNE_TIE_DB} dB: min lpips",
        "dataset": str(dataset), "n": n, "masks": f"freeform {MASKS_VERSION}", "mask_seed": mask_seed, "seed": seed,
        "steps": steps, "default": method_default(method, param), "device": device_name(runner.device),
        "aid": _aid_version(), "date": _now(),
    }
    if best_psnr == -math.inf:
        raise UserError(f"--tune {method}: every grid value diverged or gave no PSNR; nothing recorded")
    if write:
        entry["record"] = str(write_tuned(runner.checkpoint, method, {k: v for k, v in entry.items()}, runner.sha256))
    return entry


__all__ = ["OPERATING_POINTS", "TUNABLE", "BenchConfig", "MethodSpec", "Runner", "run_bench", "tune",
           "resolve_method", "parse_seeds", "parse_list", "rich_table", "aggregate", "bench_generators",
           "quality_speed_plot", "read_cells"]
