"""What `aid bench` says before its first cell: the cells and images to run, each method's network evaluations counted
on a stand-in network, and how long it will take, estimated from each method's measured seconds per image (timed in
the warm-up, or by this folder's finished cells) and the metrics'. `runner`: a bench.runner.Runner; `cfg`: its
BenchConfig."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..resolve import MethodSpec
from ..sampling.heun import nfe_of_grid
from .cells import CELLS_FILE, read_cells, same_run
from .measure import device_name, synchronize


def count_evaluations(spec: MethodSpec, channels: int, resolution: int) -> tuple[int, int]:
    """(NFE, backward passes) per image of one method, counted by running its loop on a stand-in network that costs
    nothing (exact but for CoPaint's adaptive retries, which depend on the real network)."""
    from ..sampling import heun  # a stand-in network: not the Inpainter, which counts and times the real runs
    from ..task import Task

    method = spec.build()
    if method.oracle:
        return 0, 0
    x0 = torch.zeros(1, channels, resolution, resolution)
    M = torch.ones(1, 1, resolution, resolution)
    M[..., resolution // 4: resolution // 2, resolution // 4: resolution // 2] = 0
    r = heun.sample(lambda x, sigma, labels=None: 0.5 * x, Task.from_image(x0, M), method, num_steps=spec.steps,
                    generators=[torch.Generator().manual_seed(0)])  # (image 0's generator under noise seed 0)
    return r.nfe, r.backward


def expected_total(cfg, out: Path, resume: bool) -> int:
    """Images to complete, before the backbone is loaded: every cell's, less those of cells already in `out` (with
    --resume; run_bench then checks them against the methods' settings)."""
    cells = {(m, f, s) for m in cfg.methods for f in cfg.masks for s in cfg.seeds}
    if resume and (out / CELLS_FILE).is_file():
        cells -= {(r.get("method"), r.get("mask"), r.get("seed")) for r in read_cells(out)}
    return len(cells) * cfg.n


def recorded_seconds(done: dict, specs: list[MethodSpec], runner, batch: int) -> dict[str, float]:
    """label → the mean seconds per image of its finished cells in OUT that were measured as these will be (same
    settings, device, --batch, processes and --compile): the plan's estimate on --resume, without timing it again."""
    device, seconds = device_name(runner.device), {}
    for spec in specs:
        found = [r["sec_per_image"] for r in done.values() if r.get("method") == spec.label and same_run(r, spec)
                 and (r.get("device"), r.get("batch"), r.get("world_size"), bool(r.get("compile"))) ==
                 (device, batch, runner.world, bool(runner.compile)) and r.get("sec_per_image") is not None]
        if found:
            seconds[spec.label] = float(np.mean(found))
    return seconds


def plan_text(runner, cfg, todo: list, seconds: dict[str, float] | None = None,
              metric_seconds: float | None = None, recorded: dict[str, float] | None = None) -> str:
    """What the run will do and roughly how long it will take, said before the first cell: cells, images, network
    evaluations, and an estimate from each method's seconds per image (`seconds`: timed in the warm-up; `recorded`:
    its finished cells in OUT) plus the metrics' (`metric_seconds`); a method with neither is estimated from one
    timed network evaluation at --batch (a backward pass counted as two)."""
    seconds, recorded = dict(seconds or {}), dict(recorded or {})
    channels, res = runner.info["channels"], runner.info["resolution"]
    counts = {}
    for spec, _, _ in todo:
        if spec.label not in counts:
            try:
                counts[spec.label] = count_evaluations(spec, channels, res)
            except Exception:  # a method the stand-in cannot run: no estimate for it, the run itself will say more
                counts[spec.label] = (nfe_of_grid(spec.steps), 0)
    per_image = {**seconds, **recorded}
    if any(s.label not in per_image for s, _, _ in todo):
        per_eval = seconds_per_evaluation(runner, min(cfg.batch, cfg.n))
        for label, (n, b) in counts.items():
            per_image.setdefault(label, (n + 2 * b) * per_eval)
    eta = sum(per_image[s.label] + (metric_seconds or 0.0) for s, _, _ in todo) * cfg.n / max(runner.world, 1)
    methods = ", ".join(f"{label} {n} NFE" + (f" + {b} backward" if b else "") for label, (n, b) in counts.items())
    by = {"a timed warm-up image": [m for m in counts if m in seconds and m not in recorded],
          "its finished cells": [m for m in counts if m in recorded],
          "one timed network evaluation": [m for m in counts if m not in seconds and m not in recorded]}
    sources = [f"{what} ({', '.join(labels)})" for what, labels in by.items() if labels]
    return (f"plan: {len(todo)} cell(s) × {cfg.n} images = {len(todo) * cfg.n:,} completions ({methods} per image); "
            f"about {_duration(eta)} on {runner.device} at --batch {cfg.batch} (estimated per method from "
            f"{'; '.join(sources)}" + ("; metrics included)" if metric_seconds is not None else ")"))


def seconds_per_evaluation(runner, batch: int) -> float:
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
