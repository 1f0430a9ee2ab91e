"""Every picture aid draws, with Pillow only: tensors ↔ uint8 images, PNGs written atomically, image grids (training
samples, the benchmark's labelled grids), and the two plots: quality against speed (`aid bench`, the paper's Figure 1)
and the training curves of an `aid train` run (from its stats.jsonl).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_write

GRID_TILE_MIN = 64  # labelled grid tiles are scaled up (nearest) to at least this many pixels


# ------------------------------------------------------------------------------------------------ images and grids

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] or [N, C, H, W] float in [−1, 1] → uint8 HWC / NHWC (round to nearest, clip)."""
    x = ((x.detach().to(torch.float32).cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()


def make_grid(images: torch.Tensor, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [−1, 1] into one uint8 HWC array."""
    n, c, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(to_uint8(images)):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return grid


def to_image(arr: np.ndarray) -> Image.Image:
    """uint8 HWC (C = 1 or 3) → a Pillow image (greyscale for one channel)."""
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def save_png(path: str | Path, im: Image.Image | np.ndarray) -> Path:
    """A Pillow image (or a uint8 HWC array) as a PNG, written atomically."""
    im = to_image(im) if isinstance(im, np.ndarray) else im
    return atomic_write(path, lambda p: im.save(p, format="PNG"))


def save_grid(path: str | Path, images: torch.Tensor, cols: int | None = None, scale: int = 1) -> Path:
    """[N, C, H, W] images in [−1, 1] tiled (make_grid) into one PNG (sample grids of training runs, FID samples)."""
    im = to_image(make_grid(images, cols))
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return save_png(path, im)


def save_labelled_grid(path: Path, rows: list[tuple[str, list[np.ndarray]]], res: int) -> None:
    """Rows of uint8 HWC tiles with a label column on the left; tiles scaled up (nearest) to ≥ GRID_TILE_MIN px."""
    from PIL import Image, ImageDraw

    scale = max(1, math.ceil(GRID_TILE_MIN / res))
    tile, pad = res * scale, 2
    font12 = font(12)
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lbl, font=font12)) for lbl, _ in rows)
    cols = max(len(tiles) for _, tiles in rows)
    im = Image.new("RGB", (label_w + cols * (tile + pad) + pad, len(rows) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(im)
    for r, (lbl, tiles) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((4, y + tile // 2), lbl, fill="black", font=font12, anchor="lm")
        for c, t in enumerate(tiles):
            t = to_image(t).convert("RGB")
            im.paste(t.resize((tile, tile), Image.NEAREST), (label_w + pad + c * (tile + pad), y))
    save_png(path, im)


# ----------------------------------------------------------------------------------------------------------- plots

def font(size: int):
    """Pillow's default font at `size` points (older Pillow: its one bitmap size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 × a power of ten apart) covering [lo, hi]."""
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
    big, small = font(14), font(11)
    d.text((W // 2, 12), title, fill="black", font=big, anchor="mt")
    x0, x1, y0, y1 = left, W - right, H - bottom, top
    d.rectangle((x0, y1, x1, y0), outline="black")
    d.text(((x0 + x1) // 2, H - 12), "seconds per image (log scale)", fill="black", font=small, anchor="mb")
    ylabel = Image.new("RGB", (200, 16), "white")  # the y label, rotated
    ImageDraw.Draw(ylabel).text((100, 8), "PSNR-hole dB (± std over seeds)", fill="black", font=small, anchor="mm")
    ylabel = ylabel.rotate(90, expand=True)
    im.paste(ylabel, (6, (y0 + y1) // 2 - ylabel.height // 2))
    if not pts:
        d.text(((x0 + x1) // 2, (y0 + y1) // 2), "no method with a finite PSNR-hole", fill="grey", font=big,
               anchor="mm")
        save_png(path, im)
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
    for t in nice_ticks(lo_y, hi_y):
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
    save_png(path, im)
    return path


# Training curves: four panels against the iteration: the validation hole-PSNR of the deterministic actor at N = 18 and
# N = 12 (with the unguided start at iteration 0), the terminal loss ℓ(X_N), the critic's TD loss, and the control
# energy ∫‖u‖²dt. Noisy per-iteration series are drawn raw (light) and as a running mean (dark).

PANELS = (
    ("validation PSNR-hole (dB)", (("val_psnr_hole_18", "N = 18 (35 NFE)"), ("val_psnr_hole_12", "N = 12 (23 NFE)"))),
    ("terminal loss l(X_N)", (("terminal", None),)),
    ("critic TD loss: sum of delta^2 / 2", (("critic_loss", None),)),
    ("control energy: integral of |u|^2 dt", (("control_energy", None),)),
)
LPIPS_PANEL = ("validation LPIPS (lower is better)", (("val_lpips_18", "N = 18 (35 NFE)"),
                                                     ("val_lpips_12", "N = 12 (23 NFE)")))
COLOURS = ((31, 119, 180), (255, 127, 14))


def curve_panels(stats: list[dict]) -> tuple:
    """The four panels of a run: one without a critic (backprop) shows validation LPIPS in the critic's place."""
    if not any("critic_loss" in s for s in stats) and any("val_lpips_18" in s for s in stats):
        return PANELS[:2] + (LPIPS_PANEL,) + PANELS[3:]
    return PANELS


def curve_series(stats: list[dict], key: str, label: str | None) -> list[tuple[str | None, list, list]]:
    """(label, iterations, values) of one key. A per-iteration series of a run whose iterations solve at two N
    (`aid train --mix-steps`: the "steps" of each line) is split into one series per N, so the curve of each is not
    a zig-zag between them; validation keys and one-N runs give one series."""
    recs = [s for s in stats if key in s and s[key] is not None]
    steps = sorted({s["steps"] for s in recs if "steps" in s}, reverse=True)
    if key.startswith("val_") or len(steps) < 2:
        return [(label, [s["iteration"] for s in recs], [float(s[key]) for s in recs])]
    return [(f"N = {n}" if label is None else f"{label}, N = {n}",
             [s["iteration"] for s in recs if s.get("steps") == n], [float(s[key]) for s in recs if s.get("steps") == n])
            for n in steps]


def running_mean(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _panel(d, box, title, series, big, small):
    """One panel: axes in `box` = (x0, y_top, x1, y_bottom), series = [(label, xs, ys, colour, smooth)]."""
    x0, y1, x1, y0 = box
    d.text(((x0 + x1) // 2, y1 - 6), title, fill="black", font=big, anchor="mb")
    d.rectangle((x0, y1, x1, y0), outline="black")
    pts = [(x, y) for _, xs, ys, _, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        d.text(((x0 + x1) // 2, (y0 + y1) // 2), "not recorded", fill="grey", font=small, anchor="mm")
        return
    lo_x, hi_x = min(p[0] for p in pts), max(p[0] for p in pts)
    lo_y, hi_y = min(p[1] for p in pts), max(p[1] for p in pts)
    hi_x = hi_x if hi_x > lo_x else lo_x + 1
    pad = 0.05 * (hi_y - lo_y) or 0.5 * abs(hi_y) or 1.0
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def X(v):
        return x0 + (v - lo_x) / (hi_x - lo_x) * (x1 - x0)

    def Y(v):
        return y0 - (v - lo_y) / (hi_y - lo_y) * (y0 - y1)

    for t in nice_ticks(lo_y, hi_y, 4):
        d.line((x0, Y(t), x1, Y(t)), fill=(232, 232, 232))
        d.text((x0 - 5, Y(t)), f"{t:.4g}", fill="black", font=small, anchor="rm")
    for t in nice_ticks(lo_x, hi_x, 4):
        d.line((X(t), y0, X(t), y0 + 4), fill="black")
        d.text((X(t), y0 + 6), f"{t:g}", fill="black", font=small, anchor="mt")
    for k, (label, xs, ys, colour, smooth) in enumerate(series):
        xy = [(X(x), Y(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if smooth:
            light = tuple(int(c + 0.65 * (255 - c)) for c in colour)
            if len(xy) > 1:
                d.line(xy, fill=light, width=1)
            ys_s = running_mean([y for y in ys if math.isfinite(y)], max(1, len(xy) // 25))
            xy = [(p[0], Y(v)) for p, v in zip(xy, ys_s)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for p in xy if not smooth else []:
            d.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=colour)
        if label:
            d.text((x0 + 8, y1 + 6 + 14 * k), label, fill=colour, font=small)


def cpu_hours(stats: list[dict]) -> list[float]:
    """The compute a run had spent at each of its log's records, in CPU-hours: the training loop's seconds since the
    record before, times the processes that ran them (one where not logged), summed. A run resumed with another number
    of processes is counted piece by piece."""
    out, total, last = [], 0.0, 0.0
    for rec in stats:
        elapsed = float(rec.get("elapsed_s", last))
        total += max(elapsed - last, 0.0) * int(rec.get("processes", 1))
        last = elapsed
        out.append(total / 3600)
    return out


def pretrain_curves(runs: dict[str, list[dict]], path: Path, title: str, x: str = "cpu_hours") -> Path:
    """Backbone runs side by side (`aid pretrain`'s stats.jsonl each): the EMA's validation EDM loss and the training
    loss against CPU-hours (`x="cpu_hours"`) or thousands of images (`x="kimg"`); one colour per run."""
    from PIL import ImageDraw

    W, H = 960, 400
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    big, small = font(14), font(11)
    d.text((W // 2, 8), title, fill="black", font=big, anchor="mt")
    pw = W // 2
    for i, (name, key, smooth) in enumerate((("validation EDM loss (EMA)", "val_edm_loss", False),
                                             ("training loss", "loss", True))):
        box = (i * pw + 70, 68, (i + 1) * pw - 20, H - 40)
        series = []
        for k, (label, stats) in enumerate(runs.items()):
            stats = [s for s in stats if "elapsed_s" in s]
            xs = cpu_hours(stats) if x == "cpu_hours" else [float(s["kimg"]) for s in stats]
            pts = [(xv, float(s[key])) for xv, s in zip(xs, stats) if s.get(key) is not None]
            series.append((label, [p[0] for p in pts], [p[1] for p in pts], COLOURS[k % len(COLOURS)], smooth))
        _panel(d, box, name, series, big, small)
        d.text(((box[0] + box[2]) // 2, box[3] + 22), "CPU-hours" if x == "cpu_hours" else "thousands of images",
               fill="black", font=small, anchor="mt")
    save_png(path, im)
    return path


def training_curves(stats: list[dict], path: Path, title: str) -> Path:
    """Write the four-panel PNG of a run's stats to `path` (atomically)."""
    from PIL import ImageDraw

    W, H = 960, 640
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    big, small = font(14), font(11)
    d.text((W // 2, 8), title, fill="black", font=big, anchor="mt")
    pw, ph = W // 2, (H - 40) // 2
    for i, (name, keys) in enumerate(curve_panels(stats)):
        col, row = i % 2, i // 2
        box = (col * pw + 70, 40 + row * ph + 28, (col + 1) * pw - 20, 40 + (row + 1) * ph - 30)
        series = []
        for key, label in keys:
            for shown, xs, ys in curve_series(stats, key, label):
                series.append((shown, xs, ys, COLOURS[len(series) % len(COLOURS)], not key.startswith("val_")))
        _panel(d, box, name, series, big, small)
        d.text(((box[0] + box[2]) // 2, box[3] + 22), "iteration", fill="black", font=small, anchor="mt")
    save_png(path, im)
    return path
