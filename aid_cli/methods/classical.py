"""Classical inpainting, the baselines a photo backbone has to beat: no network, no sampling, 0 NFE.

- `biharmonic`: scikit-image's `restoration.inpaint_biharmonic` (Damelin & Hoang 2018): each hole region solved as
  the biharmonic equation with the visible pixels around it as boundary values; channels independently.
- `telea`: OpenCV's `cv2.inpaint(..., cv2.INPAINT_TELEA)` (Telea 2004): fast marching from the hole's edge inwards,
  each pixel a weighted average of the known pixels within `radius`.
- `ns`: OpenCV's `cv2.inpaint(..., cv2.INPAINT_NS)` (Bertalmío, Bertozzi & Sapiro 2001): Navier–Stokes transport of
  the image's isophotes into the hole.

They run on the photo at its own scale (`full_resolution`: the fit is a box around the hole that is never resized,
data/images.plan_native_crop), through the same fit → complete → composite path as every other method, so only hole
pixels change. Their libraries are an optional extra: `pip install "aid-inpaint[classical]"`; a missing one is a
one-line user error before anything is loaded.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from ..errors import UserError
from ..sampling.heun import Method, SamplerState
from .base import register

EXTRA = "pip install \"aid-inpaint[classical]\""


class Classical(Method):
    oracle = True  # no network and no loop: `fill` gives x̂ directly (sampling/heun.py)
    full_resolution = True  # fitted at the image's own scale, never resized (fill.fit_hole)
    module, package = "", ""  # the library it calls: import name, PyPI name

    @classmethod
    def check_available(cls) -> None:
        try:
            importlib.import_module(cls.module)
        except ImportError:
            raise UserError(f"method {cls.name} needs {cls.package}, which is not installed: {EXTRA}") from None

    def fill(self, s: SamplerState) -> torch.Tensor:
        y, hole = s.task.y, s.task.M[:, 0] < 0.5
        out = [self.fill_one(((y[b].permute(1, 2, 0).double().cpu().numpy() + 1) / 2).clip(0, 1),
                             hole[b].cpu().numpy()) for b in range(y.shape[0])]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(y.device, torch.float32) * 2 - 1

    def fill_one(self, rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The filled image, HxWx3 float64 in [0, 1], of `rgb` (HxWx3 in [0, 1]) with `hole` (HxW bool) unknown; each
        registered classical method gives its own (this base class is never registered)."""
        raise TypeError(f"{type(self).__name__} is not a registered classical method: it has no fill of its own")


@register
class Biharmonic(Classical):
    name = "biharmonic"
    module, package = "skimage", "scikit-image"

    def fill_one(self, rgb, hole):
        from skimage.restoration import inpaint_biharmonic

        if not hole.any():
            return rgb
        return inpaint_biharmonic(rgb, hole, channel_axis=-1).clip(0, 1)


class _OpenCV(Classical):
    module, package = "cv2", "OpenCV (opencv-python-headless)"
    flag = ""

    def __init__(self, radius: float = 3.0):
        self.radius = float(radius)  # inpaintRadius: the neighbourhood each filled pixel averages, in pixels

    def fill_one(self, rgb, hole):
        import cv2

        u8 = np.rint(rgb * 255).astype(np.uint8)  # cv2.inpaint takes 8-bit colour images
        out = cv2.inpaint(np.ascontiguousarray(u8), hole.astype(np.uint8), self.radius, getattr(cv2, self.flag))
        return out.astype(np.float64) / 255


@register
class Telea(_OpenCV):
    name = "telea"
    flag = "INPAINT_TELEA"


@register
class NavierStokes(_OpenCV):
    name = "ns"
    flag = "INPAINT_NS"


CLASSICAL = ("biharmonic", "telea", "ns")

__all__ = ["CLASSICAL", "Classical", "Biharmonic", "Telea", "NavierStokes"]
