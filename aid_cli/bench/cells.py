"""The benchmark's records: one JSON line per finished cell (method × mask family × seed) in OUT/cells.jsonl, the
TF-Inception features of its completed images in OUT/features/ (one .npy per cell, named by the record, and
originals.npy for the n original images), and the table rows aggregated from them (per seed the mean over images,
then mean ± std over seeds; FID and KID per seed from the features, KID's std a bootstrap over images)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..resolve import MethodSpec

CELLS_FILE = "cells.jsonl"
FEATURES_DIR = "features"
ORIGINALS_FILE = "originals.npy"  # in FEATURES_DIR: the n original images' features, shared by every cell
PER_IMAGE = ("psnr_hole", "ssim", "lpips", "lpips_vgg")  # per-image values kept in a record


def safe_name(label: str) -> str:
    """A method label as a file name part (aid-18:NAME → aid-18_NAME)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


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
        for k in PER_IMAGE:
            rec[k] = [None if v is None else _dec(v) for v in rec.get(k, [])]
        cells.append(rec)
    return cells


def append_cell(out: Path, rec: dict) -> None:
    """Append one finished cell and fsync, so an interruption never loses it."""
    rec = dict(rec)
    for k in PER_IMAGE:
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


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_cell_features(out: Path, rec: dict, features: np.ndarray | None) -> None:
    """Write a cell's float32 [n, 2048] features to OUT/features/ and name the file in the record (`features`: a path
    relative to OUT, None without features); call it before `append_cell`, so that no record names a missing file."""
    rec["features"] = None
    if features is not None:
        name = f"{FEATURES_DIR}/{safe_name(rec['method'])}__{rec['mask']}__{rec['seed']}.npy"
        _save_npy(Path(out) / name, np.asarray(features, dtype=np.float32))
        rec["features"] = name


def load_cell_features(out: Path, rec: dict) -> np.ndarray | None:
    """The features a record names ([n, D] float32), or None: none kept, the file gone, or not one row per image."""
    name = rec.get("features")
    path = Path(out) / name if name else None
    if path is None or not path.is_file():
        return None
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return f if f.ndim == 2 and len(f) == rec["n"] else None


def original_features(out: Path, n: int, compute) -> np.ndarray | None:
    """OUT/features/originals.npy, made by `compute()` (→ [n, D] or None) when missing or not of n images."""
    path = Path(out) / FEATURES_DIR / ORIGINALS_FILE
    if path.is_file():
        f = load_cell_features(out, {"features": f"{FEATURES_DIR}/{ORIGINALS_FILE}", "n": n})
        if f is not None:
            return f
    f = compute()
    if f is not None:
        _save_npy(path, np.asarray(f, dtype=np.float32))
    return f


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


def realism_stats(features: list[np.ndarray | None], reference: np.ndarray | None) -> dict:
    """FID and KID of a row's cells (their features, one set per seed) against the originals' features: per seed, and
    {"fid": mean ± sample std over seeds, "kid": mean over seeds ± the std of that mean over a paired bootstrap of the
    images (metrics/realism.py)}; all null when a cell has no features (realism off, a diverged image)."""
    from ..metrics.fid import fid_from_features
    from ..metrics.realism import BOOTSTRAP_MAX, kid, kid_bootstrap

    if reference is None or len(reference) < 2 or not features or any(f is None or f.shape != reference.shape
                                                                      for f in features):
        return {"fid": _mean_std([]), "kid": _mean_std([]), "per_seed": [{"fid": None, "kid": None}
                                                                           for _ in features]}
    fids = [fid_from_features(f, reference) for f in features]
    kids = [kid(f, reference) for f in features]
    std = float(kid_bootstrap(features, reference).std(ddof=1)) if len(reference) <= BOOTSTRAP_MAX else None
    return {"fid": _mean_std(fids), "kid": {"mean": float(np.mean(kids)), "std": std},
            "per_seed": [{"fid": f, "kid": k} for f, k in zip(fids, kids)]}


def aggregate(cells: list[dict], features: list[np.ndarray | None] | None = None,
              reference: np.ndarray | None = None) -> dict:
    """One table row from a method × mask's cells (one per seed); `features` (one per cell, `load_cell_features`) and
    the originals' `reference` features give its FID and KID (null without them)."""
    first = cells[0]
    real = realism_stats(features if features is not None else [None] * len(cells), reference)
    per_seed = [{"seed": c["seed"], "psnr_hole": json_number(image_mean(c["psnr_hole"])), "ssim": json_number(image_mean(c["ssim"])),
                 "lpips": json_number(image_mean(c["lpips"])),
                 "lpips_vgg": json_number(image_mean(c.get("lpips_vgg", []))), **r,
                 "sec_per_image": c["sec_per_image"], "nfe": c["nfe"]}
                for c, r in zip(cells, real["per_seed"])]
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
        "lpips_vgg": _mean_std([image_mean(c.get("lpips_vgg", [])) for c in cells]),
        "fid": real["fid"], "kid": real["kid"],
        "peak_memory_mib": max(peaks) if peaks else None,
        "images": first["n"], "seeds": [c["seed"] for c in cells],
        "images_nonfinite": sum(c.get("images_nonfinite", 0) for c in cells),
        "method_name": first["method_name"], "params": first["params"], "steps": first["steps"],
        "per_seed": per_seed,
    }
