"""Training curves of an `aid train` run, drawn from its stats.jsonl into one PNG (Pillow only, like the bench plot).

Four panels against the iteration: the validation hole-PSNR of the deterministic actor at N = 18 and N = 12 (with the
unguided start at iteration 0), the terminal loss ℓ(X_N), the critic's TD loss, and the control energy ∫‖u‖²dt.
Noisy per-iteration series are drawn raw (light) and as a running mean (dark).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..bench import _nice_ticks
from ..fileio import atomic_write

PANELS = (
    ("validation PSNR-hole (dB)", (("val_psnr_hole_18", "N = 18 (35 NFE)"), ("val_psnr_hole_12", "N = 12 (23 NFE)"))),
    ("terminal loss l(X_N)", (("terminal", None),)),
    ("critic TD loss: sum of delta^2 / 2", (("critic_loss", None),)),
    ("control energy: integral of |u|^2 dt", (("control_energy", None),)),
)
COLOURS = ((31, 119, 180), (255, 127, 14))


def read_stats(path: Path, notice=None) -> list[dict]:
    """The records of a stats.jsonl log. A line that is not a JSON object (a last line cut off by a crash or a full
    disk while appending) is dropped, with a notice, instead of failing every later checkpoint."""
    from ..training import read_jsonl

    return read_jsonl(path, notice)


def running_mean(values: list[float], k: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _panel(d, box, title, series, font, small):
    """One panel: axes in `box` = (x0, y_top, x1, y_bottom), series = [(label, xs, ys, colour, smooth)]."""
    x0, y1, x1, y0 = box
    d.text(((x0 + x1) // 2, y1 - 6), title, fill="black", font=font, anchor="mb")
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

    for t in _nice_ticks(lo_y, hi_y, 4):
        d.line((x0, Y(t), x1, Y(t)), fill=(232, 232, 232))
        d.text((x0 - 5, Y(t)), f"{t:.4g}", fill="black", font=small, anchor="rm")
    for t in _nice_ticks(lo_x, hi_x, 4):
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


def training_curves(stats: list[dict], path: Path, title: str) -> Path:
    """Write the four-panel PNG of a run's stats to `path` (atomically)."""
    from PIL import Image, ImageDraw

    from ..bench import _font

    W, H = 960, 640
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font, small = _font(14), _font(11)
    d.text((W // 2, 8), title, fill="black", font=font, anchor="mt")
    pw, ph = W // 2, (H - 40) // 2
    for i, (name, keys) in enumerate(PANELS):
        col, row = i % 2, i // 2
        box = (col * pw + 70, 40 + row * ph + 28, (col + 1) * pw - 20, 40 + (row + 1) * ph - 30)
        series = []
        for k, (key, label) in enumerate(keys):
            recs = [s for s in stats if key in s and s[key] is not None]
            series.append((label, [s["iteration"] for s in recs], [float(s[key]) for s in recs], COLOURS[k],
                           not key.startswith("val_")))
        _panel(d, box, name, series, font, small)
        d.text(((box[0] + box[2]) // 2, box[3] + 22), "iteration", fill="black", font=small, anchor="mt")
    atomic_write(path, lambda p: im.save(p, format="PNG"))
    return path
