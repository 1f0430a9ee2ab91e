"""Tensor ↔ uint8 conversion and image grids (sample grids of training runs, benchmark grids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_write


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


def save_grid(path: str | Path, images: torch.Tensor, cols: int | None = None, scale: int = 1) -> Path:
    arr = make_grid(images, cols)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return atomic_write(path, lambda p: im.save(p, format="PNG"))
