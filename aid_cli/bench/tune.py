"""`aid bench --tune METHOD`: a baseline's step size picked on validation images and recorded for the backbone
(models/tuned.py), so that `aid inpaint` and `aid bench` then use it."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable

from ..data.masks import MASKS_VERSION
from ..errors import UserError
from ..fileio import utc_now
from ..methods import METHODS
from ..resolve import MethodSpec
from .cells import image_mean, json_number
from .measure import aid_version, device_name
from .runner import Runner

# The step size `--tune` searches, per baseline, and the grid: the method's default × these factors (log-spaced,
# half a decade apart). VIPaint's is the scale of its likelihood (the balance of its fit: ζ of its DPS phase barely
# moves the result, methods/vipaint.py).
TUNABLE = {"dps": "zeta", "mcg": "alpha", "gradpaint": "alpha", "copaint": "lr", "vipaint": "recon_scale"}


TUNE_FACTORS = (0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)


TUNE_TIE_DB = 0.01


TUNE_MAX_EXTEND = 8  # grid points added beyond an edge that keeps winning


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
    from ..models.tuned import write_tuned

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
        scores.append({param: value, "psnr_hole": json_number(image_mean(rec["psnr_hole"])), "ssim": json_number(image_mean(rec["ssim"])),
                       "lpips": json_number(image_mean(rec["lpips"])), "images_nonfinite": rec["images_nonfinite"],
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
        "aid": aid_version(), "date": utc_now(),
    }
    if best_psnr == -math.inf:
        raise UserError(f"--tune {method}: every grid value diverged or gave no PSNR; nothing recorded")
    if write:
        entry["record"] = str(write_tuned(runner.checkpoint, method, {k: v for k, v in entry.items()}, runner.sha256))
    return entry
