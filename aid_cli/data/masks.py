"""Mask generators (method.md §8): free-form brush strokes for training and evaluation, and the evaluation families
(freeform, center, strip).

Every mask is float32 M [N, 1, H, W], 1 = known, 0 = hole (as `Task.M`), drawn with numpy and Pillow from a seeded
`np.random.Generator`, never from global state. Evaluation sets are deterministic and versioned: mask i of a family
depends only on (MASKS_VERSION, family, seed, i) and the resolution; any change to what a generator draws must bump
MASKS_VERSION, which benchmark records carry.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

MASKS_VERSION = "v1"
SUPPORTED_VERSIONS = ("v1",)
FAMILIES = ("freeform", "center", "strip")
DEFAULT_HOLE_RANGE = (0.2, 0.6)

# Seed streams: mask i of an evaluation set comes from default_rng([EVAL_STREAM, family, seed, i]), training masks
# from default_rng([TRAIN_STREAM, seed, step]). SeedSequence hashes the whole list and the first word differs, so no
# training draw reuses an evaluation mask's seed, whatever seeds either side uses.
EVAL_STREAM = 0x6576616C  # "eval": first word of every evaluation mask's seed
VALIDATION_MASK_SEED = 0x76616C  # "val": the evaluation families' mask seed that training validation draws (the
#                                  protocol draws seed 0, so checkpoints are never picked on the benchmark's masks)
TRAIN_STREAM = 0x74726169  # "trai": first word of every training mask's seed
_FAMILY_CODE = {"freeform": 1, "center": 2, "strip": 3}

_REFERENCE_SIDE = 256  # brush widths are given at 256²


def _size(resolution) -> tuple[int, int]:
    """(H, W) from an int or an (H, W) pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------------------- free-form

def random_brush(rng: np.random.Generator, max_tries: int, height: int, width: int, min_num_vertex: int = 4,
                 max_num_vertex: int = 18, mean_angle: float = 2 * math.pi / 5, angle_range: float = 2 * math.pi / 15,
                 min_width: float = 12, max_width: float = 48) -> np.ndarray:
    """Co-Mod-GAN's `RandomBrush`: up to max_tries − 1 strokes; bool [H, W], True = stroke (hole)."""
    H, W = height, width
    average_radius = math.sqrt(H * H + W * W) / 8
    width_scale = math.sqrt(H * W) / _REFERENCE_SIDE
    canvas = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(max(max_tries, 1)))):
        num_vertex = int(rng.integers(min_num_vertex, max_num_vertex))  # 4..17
        angle_min = mean_angle - rng.uniform(0, angle_range)
        angle_max = mean_angle + rng.uniform(0, angle_range)
        angles = [2 * math.pi - rng.uniform(angle_min, angle_max) if i % 2 == 0 else rng.uniform(angle_min, angle_max)
                  for i in range(num_vertex)]
        vertex = [(int(rng.integers(0, W)), int(rng.integers(0, H)))]
        for angle in angles:
            r = float(np.clip(rng.normal(loc=average_radius, scale=average_radius // 2), 0, 2 * average_radius))
            x = float(np.clip(vertex[-1][0] + r * math.cos(angle), 0, W))
            y = float(np.clip(vertex[-1][1] + r * math.sin(angle), 0, H))
            vertex.append((int(x), int(y)))
        w = max(1, int(rng.uniform(min_width, max_width) * width_scale))
        draw.line(vertex, fill=1, width=w)
        for vx, vy in vertex:  # round joints
            draw.ellipse((vx - w // 2, vy - w // 2, vx + w // 2, vy + w // 2), fill=1)
    stroke = np.asarray(canvas, dtype=np.uint8) > 0
    if rng.random() > 0.5:
        stroke = stroke[::-1, :]
    if rng.random() > 0.5:
        stroke = stroke[:, ::-1]
    return np.ascontiguousarray(stroke)


# MAT / Co-Mod-GAN `RandomMask`: a few rectangles plus `RandomBrush` strokes, redrawn until the hole ratio lies in
# `hole_range` (inclusive). Brush: 4–17 vertices per stroke, turning angles 2π/5 ± U(0, 2π/15) (alternately mirrored,
# as the reference), segment lengths N(r, r//2) clipped to [0, 2r] with r = √(H² + W²)/8, stroke width U(12, 48) px at
# 256² scaled by √(HW)/256 (at least 1 px), round joints, random flips of the whole mask. Rectangles: up to int(5c) of
# at most half the side and int(3c) of at most the full side, c = min(lo + hi, 1); strokes: up to int(9c). (The
# reference's per-stroke flips are no-ops there, `mask.transpose` without assignment, and are left out here.)
def free_form_known(rng: np.random.Generator, height: int, width: int, hole_range=DEFAULT_HOLE_RANGE,
                    max_attempts: int = 10_000) -> np.ndarray:
    """Co-Mod-GAN's `RandomMask`: rectangles and brush strokes, redrawn until lo ≤ hole ratio ≤ hi; True = known."""
    lo, hi = float(hole_range[0]), float(hole_range[1])
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"hole_range must satisfy 0 <= lo <= hi <= 1, got {hole_range}")
    coef = min(lo + hi, 1.0)
    H, W = height, width
    for _ in range(max_attempts):
        known = np.ones((H, W), dtype=bool)

        def fill(max_h: int, max_w: int) -> None:  # one rectangle, possibly cut by the border
            w, h = int(rng.integers(max(max_w, 1))), int(rng.integers(max(max_h, 1)))
            ww, hh = w // 2, h // 2
            x, y = int(rng.integers(-ww, W - w + ww + 1)), int(rng.integers(-hh, H - h + hh + 1))
            known[max(y, 0): min(y + h, H), max(x, 0): min(x + w, W)] = False

        for max_tries, (mh, mw) in ((int(5 * coef), (H // 2, W // 2)), (int(3 * coef), (H, W))):
            for _ in range(int(rng.integers(max(max_tries, 1)))):
                fill(mh, mw)
        known &= ~random_brush(rng, int(9 * coef), H, W)
        ratio = 1 - known.mean()
        if lo <= ratio <= hi:
            return known
    raise RuntimeError(f"no free-form mask with a hole ratio in [{lo}, {hi}] at {H}x{W} after {max_attempts} draws")


def free_form_masks(n: int, resolution, rng: np.random.Generator, hole_range=DEFAULT_HOLE_RANGE) -> torch.Tensor:
    """n free-form masks from one generator (training): float32 [n, 1, H, W], 1 = known."""
    H, W = _size(resolution)
    return _stack([free_form_known(rng, H, W, hole_range) for _ in range(n)], H, W)


def training_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of training step `step`'s masks; its stream never meets an evaluation mask's (module doc)."""
    return np.random.default_rng([TRAIN_STREAM, int(seed), int(step)])


def training_masks(n: int, resolution, seed: int, step: int, hole_range=DEFAULT_HOLE_RANGE) -> torch.Tensor:
    """The free-form masks of training step `step`: float32 [n, 1, H, W], 1 = known."""
    return free_form_masks(n, resolution, training_rng(seed, step), hole_range)


# ------------------------------------------------------------------------------------------------ evaluation families

def center_known(height: int, width: int) -> np.ndarray:
    """A centred square hole of side ⌊min(H, W)/2⌋ (a 25 % hole for even sides); bool, True = known."""
    side = min(height, width) // 2
    top, left = (height - side) // 2, (width - side) // 2
    known = np.ones((height, width), dtype=bool)
    known[top:top + side, left:left + side] = False
    return known


def strip_known(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A band of thickness ⌊side/4⌋ right across the image, horizontal or vertical at a random offset; True = known."""
    known = np.ones((height, width), dtype=bool)
    if rng.random() < 0.5:  # horizontal band: rows [o, o + t)
        t = max(1, height // 4)
        o = int(rng.integers(0, height - t + 1))
        known[o:o + t, :] = False
    else:  # vertical band: columns [o, o + t)
        t = max(1, width // 4)
        o = int(rng.integers(0, width - t + 1))
        known[:, o:o + t] = False
    return known


def eval_rng(family: str, seed: int, index: int) -> np.random.Generator:
    """The generator of mask `index` of an evaluation set (its own stream: see EVAL_STREAM)."""
    return np.random.default_rng([EVAL_STREAM, _FAMILY_CODE[family], int(seed), int(index)])


def eval_masks(family: str, n: int, resolution, seed: int = 0, version: str = MASKS_VERSION,
               hole_range=DEFAULT_HOLE_RANGE) -> torch.Tensor:
    """The fixed evaluation masks of `family` (freeform, center, strip): float32 [n, 1, H, W], 1 = known.

    Mask i depends only on (version, family, seed, i, resolution); `version` must be one this code draws (v1).
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"mask set version {version!r} is not drawn by this aid (it draws "
                         f"{', '.join(SUPPORTED_VERSIONS)})")
    if family not in _FAMILY_CODE:
        raise ValueError(f"unknown mask family {family!r} (known: {', '.join(FAMILIES)})")
    if seed < 0:
        raise ValueError("mask seeds must be non-negative")
    H, W = _size(resolution)
    if family == "center":
        return _stack([center_known(H, W)] * n, H, W)
    if family == "strip":
        return _stack([strip_known(eval_rng(family, seed, i), H, W) for i in range(n)], H, W)
    return _stack([free_form_known(eval_rng(family, seed, i), H, W, hole_range) for i in range(n)], H, W)


def describe(family: str, version: str = MASKS_VERSION, hole_range=DEFAULT_HOLE_RANGE) -> str:
    """One line saying what a family's masks are (for benchmark records)."""
    return {
        "freeform": f"MAT/Co-Mod-GAN RandomMask (rectangles + brush strokes), hole ratio in [{hole_range[0]}, "
                    f"{hole_range[1]}], evaluation seed stream",
        "center": "centred square of side floor(min(H, W)/2) (25% hole)",
        "strip": "band of thickness floor(side/4) across the image, horizontal or vertical at a seeded offset "
                 "(25% hole)",
    }[family] + f" ({version})"


# ------------------------------------------------------------------------------------------------ training mask bank

TRAIN_FAMILIES = ("freeform", "box", "strip")
_BANK_TAG = 0x62616E6B  # "bank"


def box_known(rng: np.random.Generator, height: int, width: int, hole_range=DEFAULT_HOLE_RANGE) -> np.ndarray:
    """One axis-aligned rectangular hole anywhere in the image, its area a fraction U(hole_range) of the image and its
    aspect ratio (w/h) log-uniform in [1/2, 2] (clipped to the image); True = known. A training family: the evaluation
    `center` hole is one such box."""
    lo, hi = float(hole_range[0]), float(hole_range[1])
    area = rng.uniform(lo, hi) * height * width
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
    w = int(np.clip(round(area / h), 1, width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    known = np.ones((height, width), dtype=bool)
    known[top:top + h, left:left + w] = False
    return known


def band_known(rng: np.random.Generator, height: int, width: int, hole_range=DEFAULT_HOLE_RANGE) -> np.ndarray:
    """A band right across the image, horizontal or vertical, of thickness a fraction U(hole_range) of its side, at a
    random offset; True = known. A training family: the evaluation `strip` is such a band of thickness 1/4."""
    lo, hi = float(hole_range[0]), float(hole_range[1])
    known = np.ones((height, width), dtype=bool)
    horizontal = rng.random() < 0.5
    side = height if horizontal else width
    t = int(np.clip(round(rng.uniform(lo, hi) * side), 1, side))
    o = int(rng.integers(0, side - t + 1))
    if horizontal:
        known[o:o + t, :] = False
    else:
        known[:, o:o + t] = False
    return known


def training_mask_bank(n: int, resolution, seed: int, families=("freeform",),
                       hole_range=DEFAULT_HOLE_RANGE) -> torch.Tensor:
    """`n` training masks drawn once for a run, each of a family chosen uniformly from `families` (freeform, box,
    strip): bool [n, 1, H, W], True = known (a bank of 4096 64×64 masks holds 16 MiB). Its stream is the training
    stream's (never an evaluation mask's seed), tagged apart from the per-step masks of `training_rng`."""
    unknown = [f for f in families if f not in TRAIN_FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown training mask family {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(TRAIN_FAMILIES)}")
    H, W = _size(resolution)
    rng = np.random.default_rng([TRAIN_STREAM, int(seed), _BANK_TAG])
    draw = {"freeform": free_form_known, "box": box_known, "strip": band_known}
    known = [draw[families[int(rng.integers(len(families)))]](rng, H, W, hole_range) for _ in range(n)]
    return torch.from_numpy(np.stack(known)[:, None]) if known else torch.ones(0, 1, H, W, dtype=torch.bool)


def _stack(known: list[np.ndarray], H: int, W: int) -> torch.Tensor:
    if not known:
        return torch.ones(0, 1, H, W)
    return torch.from_numpy(np.stack(known)[:, None].astype(np.float32))


__all__ = ["MASKS_VERSION", "VALIDATION_MASK_SEED", "FAMILIES", "DEFAULT_HOLE_RANGE", "random_brush", "free_form_known",
           "free_form_masks", "training_rng", "training_masks", "TRAIN_FAMILIES", "box_known", "band_known",
           "training_mask_bank", "center_known", "strip_known", "eval_rng", "eval_masks", "describe"]
