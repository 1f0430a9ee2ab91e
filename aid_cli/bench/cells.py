"""The benchmark's records: one JSON line per finished cell (method × mask family × seed) in OUT/cells.jsonl, and the
table rows aggregated from them (per seed the mean over images, then mean ± std over seeds)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..resolve import MethodSpec

CELLS_FILE = "cells.jsonl"


def _enc(v):
    """Strict JSON for per-image values: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _dec(v):
    return float(v) if isinstance(v, str) else v


def json_number(v: float | None):
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


def cell_key(label: str, mask: str, seed: int) -> str:
    return f"{label}|{mask}|{seed}"


def same_run(rec: dict, spec: MethodSpec) -> bool:
    return (rec.get("method_name") == spec.method and rec.get("params") == spec.params
            and rec.get("steps") == spec.steps and rec.get("resources", {}) == spec.resources)


def image_mean(values: list) -> float:
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
    per_seed = [{"seed": c["seed"], "psnr_hole": json_number(image_mean(c["psnr_hole"])), "ssim": json_number(image_mean(c["ssim"])),
                 "lpips": json_number(image_mean(c["lpips"])), "sec_per_image": c["sec_per_image"], "nfe": c["nfe"]}
                for c in cells]
    nfe = float(np.mean([c["nfe"] for c in cells]))
    bwd = float(np.mean([c["backward"] for c in cells]))
    peaks = [c["peak_memory_mib"] for c in cells if c.get("peak_memory_mib") is not None]
    return {
        "method": first["method"], "mask": first["mask"],
        "nfe": _count(nfe), "backward": _count(bwd),
        "sec_per_image": float(np.mean([c["sec_per_image"] for c in cells])),
        "psnr_hole": _mean_std([image_mean(c["psnr_hole"]) for c in cells]),
        "ssim": _mean_std([image_mean(c["ssim"]) for c in cells]),
        "lpips": _mean_std([image_mean(c["lpips"]) for c in cells]),
        "peak_memory_mib": max(peaks) if peaks else None,
        "images": first["n"], "seeds": [c["seed"] for c in cells],
        "images_nonfinite": sum(c.get("images_nonfinite", 0) for c in cells),
        "method_name": first["method_name"], "params": first["params"], "steps": first["steps"],
        "per_seed": per_seed,
    }
