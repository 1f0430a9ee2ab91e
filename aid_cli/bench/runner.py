"""Running a benchmark: the backbone, images, masks and metric models of one process (`Runner`), cells through the
Inpainter (the methods of one mask family and seed interleaved batch by batch, so their timings share the machine's
drift), cells saved as they finish, resumable, sharded under torchrun; `run_bench` is the whole run."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.datasets import load_image_set
from ..data.masks import FAMILIES, MASKS_VERSION, describe, eval_masks
from ..errors import UserError
from ..fileio import atomic_write_text, utc_now
from ..inpainter import Inpainter
from ..plots import to_uint8
from ..resolve import MethodSpec, check_method_names, resolve_method
from ..task import one_hot
from ..training import gather_to_rank0
from .cells import CELLS_FILE, append_cell, cell_key, read_cells, same_run, save_cell_features
from .measure import PeakMemory, device_name, peak_memory_kind, synchronize
from .plan import expected_total, plan_text, recorded_seconds, seconds_per_evaluation
from .report import METRIC_DEFINITIONS, save_examples, write_grids, write_reports

RUN_FILE = "run.json"


SEED_STRIDE = 2 ** 20  # generator of image i under noise seed s: s·2²⁰ + i (distinct in torch's 32 seed bits)


MAX_SEED = 2 ** 32 // SEED_STRIDE - 1  # 4095


MAX_IMAGES = SEED_STRIDE


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
    churn: float | None = None  # AID's EDM churn S_churn (None: each module's own; recorded in its cells' params)
    class_label: int | None = None  # --class N (class-conditional backbones; default: the dataset's labels)
    vae: str | None = None  # latent backbones: a local VAE folder instead of the pinned hub VAE
    precision: str = "auto"  # the backbone's (devices.prepare_backbone)
    compile: bool = False  # torch.compile the backbone
    fit: str = "auto"  # photo families: how each hole reaches the backbone (fill.fit_hole)
    offset: int = 0  # skip the dataset's first images (the protocol's 100: select on images it never uses)
    realism: bool = True  # FID and KID of the completions against the originals (TF-Inception features)
    lpips_vgg: bool = True  # LPIPS with the VGG16 trunk beside AlexNet's


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
    """The cat protocol's families (images at the model's resolution) or the photo families (whole photos), not both."""
    from ..data.photo_masks import PHOTO_FAMILIES

    for f in families:
        if f not in FAMILIES and f not in PHOTO_FAMILIES:
            raise UserError(f"unknown mask family {f!r} (at the model's resolution: {', '.join(FAMILIES)}; on whole "
                            f"photos: {', '.join(PHOTO_FAMILIES)})")
    if any(f in PHOTO_FAMILIES for f in families) and any(f in FAMILIES for f in families):
        raise UserError(f"--masks mixes families of whole photos ({', '.join(PHOTO_FAMILIES)}) with those at the "
                        f"model's resolution ({', '.join(FAMILIES)}); benchmark them in separate runs")
    return families


def on_photos(families: list[str]) -> bool:
    """True for the photo families: the benchmark on whole photos (bench/photos.py)."""
    from ..data.photo_masks import PHOTO_FAMILIES

    return all(f in PHOTO_FAMILIES for f in families)


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


class Runner:
    """The backbone, images, masks and metric models of one benchmark process, and how to run one cell."""

    def __init__(self, checkpoint: Path | None, dataset: str, n: int, families: list[str], mask_seed: int,
                 device, log: Callable[[str], None] = print, lpips_offline: bool | None = None,
                 progress: Callable[[int, str], None] | None = None, class_label: int | None = None,
                 vae: str | None = None, precision: str = "auto", compile: bool = False, realism: bool = False,
                 lpips_vgg: bool = False, offset: int = 0):
        from ..fileio import sha256_file
        from ..models.catalogue import resolve_backbone
        from ..task import class_labels
        from ..training import init_distributed

        self.rank, self.world, self.device = init_distributed(torch.device(device))
        self.log = log if self.rank == 0 else (lambda m: None)
        self.progress = progress if self.rank == 0 else None
        self.checkpoint = resolve_backbone(checkpoint)
        self.sha256 = sha256_file(self.checkpoint)
        self.precision, self.compile = precision, compile

        def check(info: dict) -> None:  # --class checked against the backbone (one-line errors)
            if info.get("label_dim", 0) == 0 or class_label is not None:
                class_labels(class_label, info.get("label_dim", 0), 1)

        self.inpainter = Inpainter.load(self.checkpoint, self.device, vae=vae, precision=precision, compile=compile,
                                        notice=self.log, check=check)
        self.net, self.info, self.space = self.inpainter.net, self.inpainter.info, self.inpainter.space
        self.resolution = self.inpainter.resolution  # pixels (latent backbones: the VAE's 8x)
        self.n, self.offset = n, offset  # the n images after the dataset's first `offset`
        self._load_data(dataset, n, families, mask_seed, class_label)
        self.indices = list(range(n))[self.rank::self.world]  # this process's shard
        self.warmed: set[tuple] = set()  # (method, steps) already warmed up in this process
        self.batch_scale: float | None = None  # Runner._batch_scale, measured once
        self.session = uuid.uuid4().hex[:12]
        self.mem_kind = peak_memory_kind(self.device)
        self._notes: set[str] = set()
        from ..metrics.bundle import load_lpips_models

        # LPIPS-VGG: a perceptual metric outside AID's loss
        self.lpips_model, self.lpips_vgg_model = load_lpips_models(self.device, lpips_offline, lpips_vgg, self.note)
        self.lpips_source = getattr(self.lpips_model, "source", None)
        self.lpips_vgg_source = getattr(self.lpips_vgg_model, "source", None)
        self.inception = None  # the TF-Inception of FID and KID (metrics/fid.py), when `realism`
        if realism:
            from ..metrics.fid import load_inception

            try:
                self.inception = load_inception(self.device)
            except UserError as e:
                self.note(f"{e}; fid and kid are null")

    masks_version = MASKS_VERSION
    metric_definitions = METRIC_DEFINITIONS

    def describe_mask(self, family: str) -> str:
        return describe(family)

    def hole_fraction(self, family: str) -> float:
        return round(float(1 - self.masks[family].mean()), 4)

    def _load_data(self, dataset: str, n: int, families: list[str], mask_seed: int, class_label: int | None) -> None:
        """The n images at the model's resolution, their class labels, and each family's fixed masks."""
        label_dim = self.info.get("label_dim", 0)
        skipped = []
        self.data = load_image_set(dataset, resolution=self.resolution,
                                   channels=3 if self.space.latent else self.info["channels"], limit=n,
                                   offset=self.offset, on_skip=lambda name, why: skipped.append(name))
        if skipped:
            self.log(f"note: skipped {len(skipped)} unreadable image(s) of {dataset}, e.g. {skipped[0]}")
        if len(self.data) < n:
            after = f" after the first {self.offset}" if self.offset else ""
            raise UserError(f"--n {n}, but {dataset} has only {len(self.data)} readable images{after}")
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

    def write_grids(self, out: Path, specs: list, families: list[str], k: int) -> list[Path]:
        return write_grids(out, self, specs, families, k)

    def note(self, message: str) -> None:
        """A notice, once per run."""
        if message not in self._notes:
            self._notes.add(message)
            self.log(message)

    # -- distributed helpers (no-ops for one process)
    def gather(self, obj) -> list | None:
        return gather_to_rank0(obj, self.rank, self.world)

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _metrics(self, completed: torch.Tensor, x0: torch.Tensor, M: torch.Tensor, label: str) -> dict[str, list]:
        """Per-image PSNR-hole, SSIM, LPIPS, LPIPS-VGG (metrics/bundle.py) of completed images (on CPU) against x0, and
        their Inception features; null for non-finite images."""
        from ..metrics.bundle import inpainting_metrics, per_image

        finite = torch.isfinite(completed).flatten(1).all(1)
        visible = M.expand_as(x0) > 0.5
        for b in torch.nonzero(finite).flatten().tolist():  # visible pixels exactly kept, every method
            if not torch.equal(completed[b][visible[b]], x0[b][visible[b]]):
                raise RuntimeError(f"{label} changed visible pixels of a completed image (a bug in the method)")
        safe = torch.where(finite[:, None, None, None], completed, x0)  # keep kernels away from nan; masked below
        scores = inpainting_metrics(safe, x0, M, self.lpips_model, self.lpips_vgg_model, note=self.note)
        ph, ss, ll, lv = (per_image(scores, k, len(safe)) for k in ("psnr_hole", "ssim", "lpips", "lpips_vgg"))
        feats = [None] * len(ph)
        if self.inception is not None:  # the TF-Inception's pool_3 features, for the cell's FID and KID
            from ..metrics.fid import inception_features

            feats = list(inception_features(safe, batch=len(safe), model=self.inception).astype(np.float32))
        keep = finite.tolist()
        return {"psnr_hole": [p if k else float("nan") for p, k in zip(ph, keep)],
                "ssim": [s if k and s is not None else None for s, k in zip(ss, keep)],
                "lpips": [v if k and v is not None else None for v, k in zip(ll, keep)],
                "lpips_vgg": [v if k and v is not None else None for v, k in zip(lv, keep)],
                "features": [f if k else None for f, k in zip(feats, keep)],
                "finite": keep}

    def original_features(self, batch: int = 50) -> np.ndarray | None:
        """float32 [n, 2048] TF-Inception features of the n original images (None without the network)."""
        if self.inception is None:
            return None
        from ..metrics.fid import inception_features

        parts = [inception_features(self.data.as_float(list(range(i, min(i + batch, self.n)))), batch=batch,
                                    model=self.inception) for i in range(0, self.n, batch)]
        return np.concatenate(parts).astype(np.float32)

    def _batches(self, batch: int):
        for start in range(0, len(self.indices), batch):
            yield self.indices[start:start + batch]

    def _run_batch(self, method, spec: MethodSpec, family: str, seed: int, idx: list[int],
                   mem: PeakMemory | None = None):
        """(sampler result, completed pixels, seconds, x0, M) of one batch; latent backbones' VAE calls are timed."""
        x0 = self.data.as_float(idx)
        M = self.masks[family][idx]
        labels = one_hot(self.labels[idx], self.info["label_dim"]).to(self.device) if self.labels is not None else None
        extras = {"x0": x0.to(self.device)} if method.sees_truth else None  # only `copy` sees the ground truth
        x0_d, M_d = x0.to(self.device), M.to(self.device)
        with mem.measure() if mem else contextlib.nullcontext():
            synchronize(self.device)
            t0 = time.perf_counter()  # latent backbones: the VAE's encoding and decoding inside the timed window
            completed, result = self.inpainter.complete(x0_d, M_d, method, spec.steps, bench_generators(seed, idx),
                                                        labels, extras=extras)
            synchronize(self.device)
            dt = time.perf_counter() - t0
        return result, completed, dt, x0, M

    def _warm_indices(self, batch: int) -> list[int]:
        """The images of a warm-up call: one, or under --compile the first batch (whose shape the compiled backbone
        must have seen before a timed call)."""
        return self.indices[:batch] if self.compile else self.indices[:1]

    def _trial(self, spec: MethodSpec, method, family: str, seed: int, idx: list[int]) -> tuple[float, float]:
        """(seconds of the method, seconds of its metrics) of one call on the images idx, discarded."""
        _, completed, dt, x0, M = self._run_batch(method, spec, family, seed, idx)
        t0 = time.perf_counter()
        self._metrics(completed.detach().to("cpu", torch.float32), x0, M, spec.label)
        return dt, time.perf_counter() - t0

    def _batch_scale(self, images: int, batch: int) -> float:
        """A batch of `batch` images' cost per image over that of `images` images, from the backbone's forward pass
        (which this also warms up at the cells' batch shape)."""
        batch = min(batch, len(self.indices))
        if images >= batch:
            return 1.0
        return seconds_per_evaluation(self, batch) / seconds_per_evaluation(self, images)

    def warm_up(self, specs: list[MethodSpec], family: str, seed: int, batch: int, timed=frozenset(),
                done_before: int = 0) -> tuple[dict[str, float], float | None]:
        """Each method's first call in this process, untimed and discarded (`_warm_indices`), so that the cells'
        timed windows hold none of its one-time costs; for the labels in `timed`, one more call, timed, for the plan.
        Returns ({label: its estimated seconds per image at --batch}, seconds per image of the metrics or None)."""
        idx = self._warm_indices(batch)
        seconds, metric_seconds = {}, None
        if not idx:
            return seconds, metric_seconds
        for spec in specs:
            key = (spec.method, spec.steps)
            if key in self.warmed and spec.label not in timed:
                continue
            if self.batch_scale is None:
                self.batch_scale = self._batch_scale(len(idx), batch)
            method = spec.build()
            if self.progress:
                self.progress(done_before, f"warm-up: {spec.label} on {len(idx)} image(s), untimed / {family}")
            if key not in self.warmed:
                self._trial(spec, method, family, seed, idx)
                self.warmed.add(key)
            if spec.label in timed:
                if self.progress:
                    self.progress(done_before, f"warm-up: {spec.label}, timing {len(idx)} image(s) for the plan")
                dt, dm = self._trial(spec, method, family, seed, idx)
                seconds[spec.label] = dt / len(idx) * self.batch_scale
                metric_seconds = dm / len(idx) if metric_seconds is None else metric_seconds
        return seconds, metric_seconds

    def cell(self, spec: MethodSpec, family: str, seed: int, batch: int, examples: int = 0,
             done_before: int = 0) -> dict | None:
        """Run one (method, mask family, seed) cell on this process's shard; the merged record on rank 0, else None.

        `examples`: keep the completions of images 0..examples−1 (for the grids). `done_before`: images already
        finished in this run, for the progress callback.
        """
        return self.cells([spec], family, seed, batch, examples, done_before)[0]

    def cells(self, specs: list[MethodSpec], family: str, seed: int, batch: int, examples: int = 0,
              done_before: int = 0) -> list[dict | None]:
        """Run the cells of several methods on one (mask family, seed), interleaved: each batch of images goes through
        every method in turn before the next batch, so a machine whose speed drifts (a shared CPU, a GPU warming up)
        slows every method's timed window alike and their seconds per image stay comparable. The numbers are those
        of `cell` run method by method (same images, masks and noise). Records on rank 0, else Nones."""
        self.warm_up(specs, family, seed, batch, done_before=done_before)  # (methods not yet warmed up)
        methods = [spec.build() for spec in specs]
        if self.progress:
            self.progress(done_before, f"{' + '.join(s.label for s in specs)} / {family} / seed {seed}")
        acc = [{"images": {}, "seconds": 0.0, "nfe": 0.0, "backward": 0.0, "mem": PeakMemory(self.device),
                "examples": {}} for _ in specs]
        done = 0
        for idx in self._batches(batch):
            for spec, method, a in zip(specs, methods, acc):
                result, completed, dt, x0, M = self._run_batch(method, spec, family, seed, idx, a["mem"])
                a["seconds"] += dt
                a["nfe"] += result.nfe * len(idx)
                a["backward"] += result.backward * len(idx)
                completed = completed.detach().to("cpu", torch.float32)
                del result
                m = self._metrics(completed, x0, M, spec.label)
                for j, i in enumerate(idx):
                    a["images"][i] = {k: v[j] for k, v in m.items()}
                    if i < examples:
                        a["examples"][i] = to_uint8(completed[j])
                done += len(idx)
                if self.progress:
                    self.progress(done_before + min(done * self.world, self.n * len(specs)),
                                  f"{' + '.join(s.label for s in specs)} / {family} / seed {seed}")
        return [self._record(spec, family, seed, batch, a) for spec, a in zip(specs, acc)]

    def _record(self, spec: MethodSpec, family: str, seed: int, batch: int, a: dict) -> dict | None:
        """The cell's record, merged over the ranks (rank 0; None elsewhere)."""
        parts = self.gather({"images": a["images"], "seconds": a["seconds"], "nfe": a["nfe"],
                             "backward": a["backward"], "peak": a["mem"].mib, "examples": a["examples"]})
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
            "lpips_vgg": [images[i]["lpips_vgg"] for i in order],
            "batch": batch, "world_size": self.world, "device": device_name(self.device), "session": self.session,
            "precision": self.precision, "compile": self.compile,
            "date": utc_now(),
        }
        rec["_examples"] = [examples_out[i] for i in sorted(examples_out)]
        feats = [images[i]["features"] for i in order]
        rec["_features"] = None if any(f is None for f in feats) else np.stack(feats)
        return rec


def _identity(runner: Runner, cfg: BenchConfig, dataset: str) -> dict:
    """What every cell of one OUT folder must share (a resumed run must match it)."""
    identity = {"dataset": str(Path(dataset).resolve()), "n": cfg.n, "model_sha256": runner.sha256,
                "resolution": runner.resolution, "masks_version": runner.masks_version, "mask_seed": cfg.mask_seed}
    if runner.space.latent:
        identity["space"] = runner.space.describe()
    if on_photos(cfg.masks):
        identity["fit"] = cfg.fit
    if runner.labels is not None:
        identity["class"] = runner.class_label if runner.class_label is not None else "dataset.json"
    if cfg.offset:  # (older runs have no key: 0)
        identity["offset"] = cfg.offset
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
        done[cell_key(rec["method"], rec["mask"], rec["seed"])] = rec  # the last record of a key wins
    return done, None


def run_bench(cfg: BenchConfig, out: Path, model: Path | None = None, device="cpu", resume: bool = False,
              log: Callable[[str], None] = print, progress: Callable[[int, int, str], None] | None = None,
              runner: Runner | None = None, report_only: bool = False) -> dict | None:
    """Run (or resume) a benchmark into `out`; returns the bench.json dict on rank 0 (None on other ranks).
    `report_only`: run nothing, rebuild the reports from the cells already in `out`."""
    check_masks(cfg.masks)
    check_method_names(cfg.methods, cfg.guidances)
    out = Path(out)
    state = {"total": 0 if report_only else expected_total(cfg, out, resume)}
    if progress:  # the total is known from the start (a --resume's finished cells are checked below)
        progress(0, state["total"], "loading the backbone, the images and the metric networks")
    if runner is None:
        kind, extra = (Runner, {}) if not on_photos(cfg.masks) else (_photo_runner(), {"fit": cfg.fit})
        runner = kind(model, cfg.dataset, cfg.n, cfg.masks, cfg.mask_seed, device, log=log,
                      lpips_offline=cfg.lpips_offline,
                      progress=(lambda done, desc: progress(done, state["total"], desc)) if progress else None,
                      class_label=cfg.class_label, vae=cfg.vae, precision=cfg.precision, compile=cfg.compile,
                      realism=cfg.realism, lpips_vgg=cfg.lpips_vgg, offset=cfg.offset, **extra)
    loaded: dict = {}  # each guidance module loaded once, whichever operating points use it (aid-12, aid-18)
    specs = [resolve_method(m, cfg.steps, runner.checkpoint, runner.sha256, runner.note, cfg.guidance, cfg.guidances,
                            loaded=loaded, churn=cfg.churn) for m in cfg.methods]
    identity = _identity(runner, cfg, cfg.dataset)
    done, error = _prepare_out(out, identity, resume) if runner.rank == 0 else ({}, None)
    done, error = runner.broadcast((done, error))
    if error:
        raise UserError(error)
    todo = []
    for spec in specs:
        for family in cfg.masks:
            for seed in cfg.seeds:
                rec = done.get(cell_key(spec.label, family, seed))
                if rec is None or not same_run(rec, spec):
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
    groups: dict[tuple[str, int], list[MethodSpec]] = {}  # the methods still to run on each (family, seed)
    for spec, family, seed in sorted(todo, key=lambda t: (cfg.masks.index(t[1]), cfg.seeds.index(t[2]))):
        groups.setdefault((family, seed), []).append(spec)  # stable sort: methods keep --methods' order
    if todo:  # warm-up: the methods with cells to run, on an image or two each; then the plan
        labels = {spec.label for spec, _, _ in todo}
        recorded = recorded_seconds(done, specs, runner, cfg.batch)
        family, seed = next(iter(groups))
        seconds, metric_seconds = runner.warm_up([s for s in specs if s.label in labels], family, seed, cfg.batch,
                                                 timed=labels - set(recorded))
        if runner.rank == 0:
            runner.log(plan_text(runner, cfg, todo, seconds, metric_seconds, recorded))
    finished = 0
    for (family, seed), group in groups.items():  # interleaved within a group: comparable timings (Runner.cells)
        recs = runner.cells(group, family, seed, cfg.batch, examples=cfg.examples if seed == cfg.seeds[0] else 0,
                            done_before=finished * cfg.n)
        finished += len(group)
        if runner.rank == 0:
            for rec in recs:
                save_examples(out, rec["method"], family, rec.pop("_examples"))
                save_cell_features(out, rec, rec.pop("_features"))  # before the record that names the file
                append_cell(out, rec)
    if runner.rank != 0:
        return None
    return write_reports(out, cfg, runner, specs)


RUNNERS: dict[str, type] = {}  # other kinds of benchmark: "photos" (bench/photos.py registers its PhotoRunner)


def _photo_runner():
    if "photos" not in RUNNERS:  # bench/__init__ imports bench.photos, which registers it
        raise RuntimeError("bench.photos is not loaded")
    return RUNNERS["photos"]
