"""Masks as users draw them on whole photos, at the photo's own scale: the photo benchmark's evaluation families
(stroke, blob, box, text; version PHOTO_MASKS_VERSION) and the photo backbone's training masks.

Every mask is a bool hole [H, W] (True = fill) of the photo's size, drawn with numpy and Pillow from a seeded
`np.random.Generator`. Sizes are in pixels of a 481×321 photo; other sizes scale by √(HW / (481·321)). Mask i of an
evaluation set depends only on (version, family, seed, i) and the photo's size; any change to what a generator draws
must bump PHOTO_MASKS_VERSION.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .masks import EVAL_STREAM, TRAIN_STREAM, box_known

PHOTO_MASKS_VERSION = "photo-v1"
PHOTO_FAMILIES = ("stroke", "blob", "box", "text")
PHOTO_FAMILY_CODE = {"stroke": 11, "blob": 12, "box": 13, "text": 14}  # apart from masks.py's codes 1–3
_REFERENCE_AREA = 481 * 321  # sizes below are for a BSDS500 photo; others scale by √(area ratio)


def _scale(height: int, width: int) -> float:
    return math.sqrt(height * width / _REFERENCE_AREA)


def _canvas(height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (width, height), 0)
    return im, ImageDraw.Draw(im)


def _hole(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8) > 0


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: int) -> None:
    """A line through `points` of `width` px with round joints and ends."""
    draw.line(points, fill=1, width=width, joint="curve")
    r = width / 2
    for x, y in (points[0], points[-1]):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=1)


def stroke_hole(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1–3 thin strokes of 0.3–0.9 × the diagonal in all, width U(2, 15) px (× the photo's scale)."""
    im, draw = _canvas(height, width)
    s, diagonal = _scale(height, width), math.hypot(height, width)
    n = int(rng.integers(1, 4))
    total = rng.uniform(0.3, 0.9) * diagonal
    for k in range(n):
        length = total / n
        w = max(1, int(round(rng.uniform(2, 15) * s)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        angle, turn = rng.uniform(0, 2 * math.pi), rng.normal(0, 0.05)
        step = max(2.0, 4 * s)
        points = [(x, y)]
        for _ in range(int(length / step)):
            turn = 0.9 * turn + rng.normal(0, 0.04)  # the curvature drifts: a hand's stroke, not a zigzag
            angle += turn
            x, y = x + step * math.cos(angle), y + step * math.sin(angle)
            if not (0 <= x < width and 0 <= y < height):  # bounce off the edges, staying inside
                angle += math.pi / 2 + rng.uniform(0, math.pi / 2)
                x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
            points.append((x, y))
        _polyline(draw, points, w)
    return _hole(im)


def blob_hole(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One smooth closed shape of 2–10 % of the photo's area: r(θ) = r0·(1 + Σ_k a_k cos(kθ + φ_k)), k = 2..5."""
    area = rng.uniform(0.02, 0.10) * height * width
    a = rng.uniform(0, 0.25, size=4) / np.arange(2, 6) * 2  # smaller wiggles at higher harmonics
    phi = rng.uniform(0, 2 * math.pi, size=4)
    theta = np.linspace(0, 2 * math.pi, 180, endpoint=False)
    shape = 1 + (a[:, None] * np.cos(np.arange(2, 6)[:, None] * theta + phi[:, None])).sum(0)
    r0 = math.sqrt(area / (math.pi * float(np.mean(shape ** 2))))  # polar area = ½∮r² dθ = π r0² mean(shape²)
    sx, sy = r0 * shape * np.cos(theta), r0 * shape * np.sin(theta)
    cx = rng.uniform(-sx.min(), width - sx.max()) if width > sx.max() - sx.min() else width / 2
    cy = rng.uniform(-sy.min(), height - sy.max()) if height > sy.max() - sy.min() else height / 2
    im, draw = _canvas(height, width)
    draw.polygon([(float(cx + u), float(cy + v)) for u, v in zip(sx, sy)], fill=1)
    return _hole(im)


def box_hole(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An axis-aligned rectangle of 2–10 % of the area, aspect (w/h) log-uniform in [1/2, 2], inside the photo: the
    cat protocol's training box (masks.box_known) at an object's size."""
    return ~box_known(rng, height, width, (0.02, 0.10))


_GRID = [(gx / 2, gy / 2) for gy in range(3) for gx in range(3)]  # a glyph's anchor points, in units of its cell


def text_hole(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """1–3 lines of glyph-like marks (text, a watermark): each glyph 2–4 strokes between points of a 3×3 grid of its
    cell, glyph height U(12, 40) px, stroke width ⌈height/8⌉, words of 2–8 glyphs."""
    im, draw = _canvas(height, width)
    s = _scale(height, width)
    glyph_h = rng.uniform(12, 40) * s
    glyph_w, gap = 0.6 * glyph_h, 0.25 * glyph_h
    w = max(1, math.ceil(glyph_h / 8))
    lines = int(rng.integers(1, 4))
    line_len = int(rng.integers(6, 20))  # glyphs and spaces per line
    x0 = rng.uniform(0, max(width - line_len * (glyph_w + gap), 1))
    y0 = rng.uniform(0, max(height - lines * 1.5 * glyph_h, 1))
    for line in range(lines):
        x, y = x0, y0 + line * 1.5 * glyph_h
        word = int(rng.integers(2, 9))
        for _ in range(line_len):
            if word == 0:  # a space between words
                word = int(rng.integers(2, 9))
                x += glyph_w + gap
                continue
            for _ in range(int(rng.integers(2, 5))):
                i, j = rng.choice(len(_GRID), size=2, replace=False)
                a, b = _GRID[int(i)], _GRID[int(j)]
                _polyline(draw, [(x + a[0] * glyph_w, y + a[1] * glyph_h), (x + b[0] * glyph_w, y + b[1] * glyph_h)],
                          w)
            x += glyph_w + gap
            word -= 1
    return _hole(im)


DRAW = {"stroke": stroke_hole, "blob": blob_hole, "box": box_hole, "text": text_hole}


def photo_eval_rng(family: str, seed: int, index: int) -> np.random.Generator:
    """A stream no cat-protocol mask and no training mask uses (masks.EVAL_STREAM, family codes apart)."""
    return np.random.default_rng([EVAL_STREAM, PHOTO_FAMILY_CODE[family], int(seed), int(index)])


def photo_eval_hole(family: str, seed: int, index: int, size: tuple[int, int],
                    version: str = PHOTO_MASKS_VERSION) -> np.ndarray:
    """The hole of photo `index` of an evaluation set, bool [H, W] at the photo's `size` (H, W); deterministic."""
    if version != PHOTO_MASKS_VERSION:
        raise ValueError(f"photo mask version {version!r} is not drawn by this aid (it draws {PHOTO_MASKS_VERSION})")
    if family not in DRAW:
        raise ValueError(f"unknown photo mask family {family!r} (known: {', '.join(PHOTO_FAMILIES)})")
    if seed < 0:
        raise ValueError("mask seeds must be non-negative")
    height, width = size
    hole = DRAW[family](photo_eval_rng(family, seed, index), int(height), int(width))
    return hole if hole.any() else box_hole(photo_eval_rng(family, seed, index), int(height), int(width))


_PHOTO_TRAIN_TAG = 0x70686F74  # "phot": training masks on photos, a stream of their own


def photo_training_hole(seed: int, step: int, k: int, size: tuple[int, int],
                        families=PHOTO_FAMILIES) -> tuple[str, np.ndarray]:
    """(family, hole) of training task k of step `step`: a family chosen uniformly from `families`, drawn at the
    photo's `size`, on the training stream (never an evaluation mask's seed)."""
    rng = np.random.default_rng([TRAIN_STREAM, _PHOTO_TRAIN_TAG, int(seed), int(step), int(k)])
    family = families[int(rng.integers(len(families)))]
    hole = DRAW[family](rng, *size)
    return family, hole if hole.any() else box_hole(rng, *size)


def describe_photo(family: str) -> str:
    """One line saying what a family's masks are (for benchmark records)."""
    return {
        "stroke": "1-3 thin strokes (width 2-15 px, 0.3-0.9 x the diagonal in all) at the photo's scale",
        "blob": "one smooth closed shape of 2-10 % of the photo's area (an object to remove)",
        "box": "one rectangle of 2-10 % of the photo's area, aspect 1/2-2",
        "text": "1-3 lines of glyph-like marks 12-40 px high (text, watermarks)",
    }[family] + f" ({PHOTO_MASKS_VERSION})"


__all__ = ["PHOTO_MASKS_VERSION", "PHOTO_FAMILIES", "stroke_hole", "blob_hole", "box_hole", "text_hole",
           "photo_eval_hole", "photo_training_hole", "describe_photo"]
