"""The edges of `aid inpaint`: image and mask files → tensors at model resolution → composited result → file.

    load_image, load_mask  → plan_fit → to_task_tensors → [sampler] → composite → save_image

Conventions (design.md):
- Mask files: WHITE = FILL (IOPaint, diffusers); `invert=True` (`--invert-mask`) for white = keep. A mask is read as
  greyscale (Pillow's "L" conversion, alpha ignored) and thresholded: ≥ 128 is white (16-bit masks: ≥ 32768).
  In this module a mask is a bool array `hole`, True = pixel to fill; the model-side tensor M is 1 = known.
- EXIF orientation is applied to image and mask alike, so both are in the orientation a viewer shows.
- Every pixel outside the hole is copied from the original array, never recomputed: the output's visible pixels equal the
  input's exactly, in its own bit depth (8 or 16 bits) and channel layout; an alpha channel passes through untouched.
- Fit: "crop" takes a square box around the hole (with margin) so small holes are inpainted at native scale; "resize" takes
  the whole image. Where the square is larger than the image, it is completed by reflection padding (numpy "reflect").
- Resampling: bicubic with antialiasing (torch), in both directions, on float data in [0, 1]. The hole is brought to model
  resolution conservatively: a model pixel is known only if every original pixel it overlaps is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from ..fileio import atomic_write, check_writable_dir
from .folders import OUTPUT_FORMATS

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's RGB → L


@dataclass(frozen=True)
class Upload:
    """The bytes of an image that never was a file here (`aid serve`'s uploads), read by the same loaders as files;
    `label` names it in messages and is never used as a path."""

    data: bytes
    label: str = "upload"


# ---------------------------------------------------------------------------------------------------------------- reading

@dataclass
class LoadedImage:
    """An image file after EXIF orientation, with its pixels kept at native dtype for exact compositing."""

    path: Path | None  # None: an Upload's bytes (`aid serve`), never a file here
    pixels: np.ndarray  # HxW ("L", "I;16") or HxWxC ("LA", "RGB", "RGBA"); uint8, or uint16 for "I;16"
    mode: str  # Pillow mode of `pixels`, and of the output: "L", "LA", "RGB", "RGBA" or "I;16"
    source_mode: str  # the file's own mode before conversion ("P", "CMYK", "I;16B", …)
    format: str | None = None  # file format as Pillow names it ("PNG", "JPEG", …)
    icc_profile: bytes | None = None  # colour profile, written back with the output
    notes: list[str] = field(default_factory=list)  # conversions the user should know about

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow."""
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def max_value(self) -> int:
        return 65535 if self.pixels.dtype == np.uint16 else 255

    @property
    def is_grey(self) -> bool:
        return self.mode in ("L", "LA", "I;16")

    def rgb01(self, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Float view of the colour channels in [0, 1], HxWx3 float32 (greyscale replicated), optionally of a box."""
        left, top, right, bottom = box or (0, 0, *self.size)
        a = self.pixels[top:bottom, left:right]
        if self.mode in ("L", "I;16"):
            a = a[:, :, None]
        a = a[:, :, :1] if self.mode == "LA" else a[:, :, :3]
        return np.broadcast_to(a, a.shape[:2] + (3,)).astype(np.float32) / self.max_value


def _open(path: str | os.PathLike | Upload, what: str, max_pixels: int | None = None) -> tuple[Image.Image, bool]:
    """Open, fully decode and EXIF-orient an image file, or the bytes of an upload (and say if it is 16-bit colour
    that Pillow reads as 8-bit).

    Every failure is a one-line UserError naming the file (an upload: its label). `max_pixels`: a lower limit than
    Pillow's decompression-bomb one, checked on the header's size before anything is decoded (`aid serve`).
    """
    if isinstance(path, Upload):
        source, label = io.BytesIO(path.data), path.label
        if not path.data:
            raise UserError(f"{what} is empty: {label}")
    else:
        path = Path(path)
        source, label = path, path
        if not path.exists():
            raise UserError(f"{what} not found: {path}")
        if path.is_dir():
            raise UserError(f"{what} is a folder, not a file: {path}")
        if not path.is_file():
            raise UserError(f"{what} is not a regular file (a device, pipe or socket): {path}")
        if path.stat().st_size == 0:
            raise UserError(f"{what} is an empty file: {path}")
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every decoder warning is seen here, then told once per kind
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_IMAGE_PIXELS decides (below)
            out, wide_colour, frames = _decode_file(source, what, label, max_pixels)
    except UnidentifiedImageError:
        raise UserError(f"{what} is not an image Pillow can read: {label}") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{what} is too large to decode safely: {label} ({e})") from None
    except PermissionError:
        raise UserError(f"{what} cannot be read (permission denied): {label}") from None
    except UserError:
        raise
    except Exception as e:  # untrusted bytes: every way a decoder can fail on them is the file's fault
        detail = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} is truncated or damaged: {label} ({detail})") from None
    if out.width == 0 or out.height == 0:
        raise UserError(f"{what} has zero size: {label}")
    _warn_once_per_kind(caught, Path(str(label)))
    if frames > 1:
        warnings.warn(f"{Path(str(label)).name}: {frames} frames (an animated or multi-page {out.format or 'image'}); "
                      f"only the first is used", UserWarning, stacklevel=3)
    return out, wide_colour


def _warn_once_per_kind(caught: list, path: Path) -> None:
    """Repeat the decoder's warnings one per kind (the message with its numbers taken out), with how many more of that
    kind there were: an EXIF directory of 65,535 broken entries is one line, not 65,535."""
    import re
    import warnings

    kinds: dict[tuple, list] = {}
    for w in caught:
        text = str(w.message).splitlines()[0] if str(w.message).strip() else w.category.__name__
        kinds.setdefault((w.category, re.sub(r"\d+", "N", text)), []).append(text)
    for (category, _), texts in kinds.items():
        more = f" ({len(texts) - 1:,} more like it)" if len(texts) > 1 else ""
        warnings.warn(f"{path.name}: {texts[0][:200]}{more}", category if issubclass(category, Warning) else
                      UserWarning, stacklevel=4)


# What one image may cost: `aid inpaint` holds ~48 bytes per pixel of the photo at its peak (the decoded pixels, the
# oriented copy, the working array, float crops and the composited output; a 4000x4000 RGB photo peaks 770 MB above
# the interpreter's own), and an image gets a budget of 2 GiB: 44.7 M pixels (8192x5460). Larger ones are refused from
# their header, before a single row is decoded (Pillow's own limit, 179 M pixels, lets a 13000x13000 PNG of 0.5 MB
# through, to a 2.1 GB peak).
IMAGE_MEMORY_BUDGET = 2 << 30
BYTES_PER_PIXEL = 48
MAX_IMAGE_PIXELS = IMAGE_MEMORY_BUDGET // BYTES_PER_PIXEL


@contextlib.contextmanager
def native_stderr_silenced(active: bool = True):
    """Keep what a C library prints straight to the process's stderr (libtiff: "Using code not yet in table.") off
    the user's terminal while it decodes: the file's problems reach the user as one line, or not at all."""
    import sys
    import tempfile

    if not active:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _decode_file(source, what: str = "image", label=None, max_pixels: int | None = None) -> tuple[Image.Image, bool, int]:
    """(the decoded, EXIF-oriented first frame, whether it is 16-bit colour read as 8-bit, how many frames the file
    has); an image over MAX_IMAGE_PIXELS, or over `max_pixels` when given (`aid serve`), is refused from its header."""
    label = source if label is None else label
    with Image.open(source) as im, native_stderr_silenced(im.format == "TIFF"):
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise UserError(f"{what} is {w}x{h} ({w * h:,} pixels), more than the {MAX_IMAGE_PIXELS:,} aid can "
                            f"process in its {IMAGE_MEMORY_BUDGET >> 30} GiB memory budget per image (~{BYTES_PER_PIXEL} "
                            f"bytes a pixel): {label}; downscale it first")
        if max_pixels is not None and w * h > max_pixels:  # the header's claim, before any decoding
            raise UserError(f"{what} is too large: {label} is {w}x{h} = {w * h:,} pixels (the limit is "
                            f"{max_pixels:,})")
        frames = getattr(im, "n_frames", 1) or 1
        rawmodes = [t.args for t in im.tile or [] if isinstance(t.args, str)]
        wide_colour = im.mode in ("RGB", "RGBA") and any(";16" in m for m in rawmodes)
        im.load()  # force a full decode now: truncated files fail here, not half-way through a run
        out = ImageOps.exif_transpose(im)  # a new, oriented image (a copy when there is no orientation tag)
        out.format = im.format
    return out, wide_colour, frames


def _native(im: Image.Image, path: Path) -> tuple[np.ndarray, str, list[str], bool]:
    """Pixels in one of the working modes L/LA/RGB/RGBA/I;16, notes, and whether the colours were converted."""
    mode = im.mode
    if mode.startswith("I;16"):  # 16-bit greyscale, any byte order
        return np.asarray(im).astype(np.uint16), "I;16", [], False
    if mode == "I":  # 32-bit integer: accepted when it holds 16-bit values (older Pillow reads 16-bit PNGs so)
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise UserError(f"32-bit integer image with values outside 0..65535 is not supported: {path}")
        return a.astype(np.uint16), "I;16", [], False
    if mode == "F":
        raise UserError(f"floating-point images are not supported (convert to 8- or 16-bit PNG first): {path}")
    notes, converted = [], False
    if mode in ("L", "LA", "RGB", "RGBA"):
        target = mode
    elif mode == "1":
        target, notes = "L", ["1-bit image read as 8-bit greyscale (0/255)"]
    elif mode == "La":
        target = "LA"
    elif mode in ("RGBa", "PA"):
        target = "RGBA"
    elif mode == "P":
        transparent = getattr(im, "has_transparency_data", "transparency" in im.info)
        target = "RGBA" if transparent else "RGB"
        notes = [f"palette image expanded to {target}; the output is {target}"]
    else:  # CMYK, YCbCr, LAB, HSV, RGBX, …
        target, converted = "RGB", mode not in ("RGBX",)
        if converted:
            notes = [f"{mode} image converted to RGB (no colour management); the output is RGB"]
    if target != mode:
        try:
            im = im.convert(target)
        except Exception as e:  # e.g. a tRNS chunk with more entries than the palette
            raise UserError(f"image is damaged: its {mode} data cannot be converted to {target}: {path} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return np.asarray(im).copy(), target, notes, converted


def load_image(path: str | os.PathLike | Upload, max_pixels: int | None = None) -> LoadedImage:
    """Read any Pillow-readable image (a file, or an Upload's bytes), EXIF-oriented, keeping its native pixels for
    exact compositing. `max_pixels`: refuse larger images before decoding them (below Pillow's own bomb limit)."""
    upload = isinstance(path, Upload)
    path = path if upload else Path(path)
    im, wide_colour = _open(path, "image", max_pixels)
    pixels, mode, notes, converted = _native(im, path.label if upload else path)
    if wide_colour:
        notes.append("16-bit colour PNG: Pillow decodes it at 8 bits per channel, so the output is 8-bit")
    icc = None if converted else im.info.get("icc_profile")
    return LoadedImage(path=None if upload else path, pixels=pixels, mode=mode, source_mode=im.mode, format=im.format,
                       icc_profile=icc, notes=notes)


def load_mask(path: str | os.PathLike | Upload, size: tuple[int, int], invert: bool = False, resize: bool = False,
              notes: list[str] | None = None, max_pixels: int | None = None,
              resize_hint: str = "pass --resize-mask to scale it") -> np.ndarray:
    """Read a mask file as a bool HxW array, True = hole (white = fill; `invert` for white = keep), at image `size` (W, H).

    A mask drawn on a transparent layer (an alpha channel with both opaque and transparent pixels: strokes painted over
    nothing, as image editors export them) is read as drawn: its opaque pixels are the hole, whatever their colour; a
    note saying so goes to `notes`. A fully opaque (or alpha-less) mask is read by brightness, white = fill.
    `path`: a file, or an Upload's bytes (`aid serve`); `resize_hint`: what a size mismatch's message suggests."""
    upload = isinstance(path, Upload)
    path = path if upload else Path(path)
    name = path.label if upload else path.name
    im, _ = _open(path, "mask", max_pixels)
    path = path.label if upload else path
    alpha = _alpha(im)
    if alpha is not None and (alpha >= 128).any() and (alpha < 128).any():
        white = alpha >= 128
        if notes is not None:
            notes.append(f"{name}: read as strokes on a transparent layer: its opaque pixels "
                         f"({100 * white.mean():.0f}%) are the hole")
    elif im.mode.startswith("I;16") or im.mode == "I":
        white = np.asarray(im).astype(np.int64) >= 32768  # 16-bit: ≥ 128 on the 8-bit scale
    else:
        try:
            white = np.asarray(im.convert("L")) >= 128
        except Exception as e:  # a damaged palette or transparency chunk
            raise UserError(f"mask is damaged: its {im.mode} data cannot be read as greyscale: {path} "
                            f"({str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    if im.size != tuple(size):
        if not resize:
            hint = " (one of them may carry an EXIF rotation the other lacks)" if im.size == tuple(size)[::-1] else ""
            shown = "the mask" if upload else f"mask {path}"
            raise UserError(f"{shown} is {im.width}x{im.height} but image is {size[0]}x{size[1]}{hint}; "
                            f"{resize_hint}")
        white = np.asarray(Image.fromarray(white).resize(tuple(size), Image.NEAREST), dtype=bool)
    return ~white if invert else white


def _alpha(im: Image.Image) -> np.ndarray | None:
    """The 8-bit alpha channel of an image that has one (RGBA, LA, PA, or a palette/RGB/L with a transparent colour)."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(im.getchannel("A"))
    if "transparency" in im.info and im.mode in ("P", "RGB", "L"):
        try:
            return np.asarray(im.convert("RGBA").getchannel("A"))
        except (ValueError, OSError):  # a damaged transparency chunk (more entries than the palette): read by brightness
            return None
    return None


def grow(hole: np.ndarray, n: int) -> np.ndarray:
    """The hole grown by `n` pixels in every direction (a square of side 2n + 1: dilation in the chessboard distance)."""
    if n <= 0 or not hole.any():
        return hole.copy()
    t = torch.from_numpy(hole.astype(np.float32))[None, None]
    k = 2 * n + 1
    t = torch.nn.functional.max_pool2d(t, (k, 1), stride=1, padding=(n, 0))  # separable: rows, then columns
    t = torch.nn.functional.max_pool2d(t, (1, k), stride=1, padding=(0, n))
    return t[0, 0].numpy() > 0


def erode(hole: np.ndarray, n: int) -> np.ndarray:
    """The hole shrunk by `n` pixels (chessboard distance), the outside of the image counting as not hole: what is
    left lies deeper than n pixels inside it (nothing, for a stroke at most 2n px wide, even along the border)."""
    if n <= 0:
        return hole.copy()
    padded = np.pad(hole, n, constant_values=False)
    return ~grow(~padded, n)[n:-n, n:-n]


def feather_weights(hole: np.ndarray, n: int) -> np.ndarray:
    """How much of the fill each pixel takes: 1 in the hole, (n + 1 − d)/(n + 1) at chessboard distance d ≤ n outside
    it, 0 beyond: a linear ramp over the n pixels around the hole (`--feather n`)."""
    weights, cur = hole.astype(np.float32), hole
    for _ in range(n):
        cur = grow(cur, 1)
        weights += cur
    return weights / (n + 1)


INVERTED_WARNING_FRACTION = 0.9  # a mask that fills more than this may be inverted (white meant to be kept): say so


def mask_stats(hole: np.ndarray) -> float:
    """Fraction of pixels to fill (0: nothing to do; > INVERTED_WARNING_FRACTION: the mask may be inverted)."""
    return float(np.mean(hole)) if hole.size else 0.0


# ----------------------------------------------------------------------------------------------------------------- fitting

@dataclass(frozen=True)
class Fit:
    """Where the model's square input comes from: a box of the image, reflection padding, and a resize to `resolution`."""

    mode: str  # "crop" (a box around the hole) or "resize" (the whole image)
    image_size: tuple[int, int]  # (W, H) of the original, after EXIF orientation
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the image region used; right/bottom exclusive
    pad: tuple[int, int, int, int]  # reflection padding (left, top, right, bottom) that makes the region square
    resolution: int  # model side R

    @property
    def side(self) -> int:
        """Side of the padded square, in original pixels."""
        return self.box[2] - self.box[0] + self.pad[0] + self.pad[2]

    @property
    def scale(self) -> float:
        """Model pixels per original pixel (< 1: downscaled, 1: native scale)."""
        return self.resolution / self.side

    def describe(self) -> str:
        """One human sentence saying what was done."""
        left, top, right, bottom = self.box
        w, h, s, r = right - left, bottom - top, self.side, self.resolution
        padded = f", padded to {s}x{s} by reflection" if any(self.pad) else ""
        scaled = f"kept at native scale ({r}x{r})" if s == r else f"{'upscaled' if s < r else 'resized'} to {r}x{r}"
        if self.mode == "crop":
            return f"cropped a {w}x{h} box around the mask at ({left},{top}){padded}, {scaled}"
        return f"took the whole {w}x{h} image{padded}, {scaled}"


def _place(lo: int, hi: int, side: int, n: int) -> tuple[int, int, int, int]:
    """On one axis of length n: (start, stop, pad_before, pad_after) of a window of `side` centred on [lo, hi)."""
    if side >= n:  # the window covers the whole axis; the rest is reflection padding, split evenly
        return 0, n, (side - n) // 2, side - n - (side - n) // 2
    start = min(max(lo - (side - (hi - lo)) // 2, 0), n - side)
    return start, start + side, 0, 0


def plan_fit(hole: np.ndarray, resolution: int, mode: str = "crop", margin: float = 0.25) -> Fit:
    """Choose the square region the model sees: a box around the hole ("crop") or the whole image ("resize").

    crop: the hole's bounding box, made square, grown by `margin` × its side on every side, then at least `resolution`
    (so small holes are inpainted at native scale, never upsampled) and at most the image's longer side; centred on the
    hole and shifted to stay inside the image. Where it is wider than the image on an axis, that axis is reflection-padded.
    An empty hole falls back to "resize".
    """
    if mode not in ("crop", "resize"):
        raise UserError(f"fit mode must be 'crop' or 'resize', got {mode!r}")
    if margin < 0:
        raise UserError(f"crop margin must be ≥ 0, got {margin}")
    height, width = hole.shape
    if mode == "resize" or not hole.any():
        mode, (top, bottom), (left, right) = "resize", (0, height), (0, width)
        side = max(height, width)
    else:
        rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        hole_side = max(bottom - top, right - left)
        side = hole_side + 2 * math.ceil(margin * hole_side)
        side = min(max(side, resolution), max(height, width))
    x0, x1, pad_l, pad_r = _place(left, right, side, width)
    y0, y1, pad_t, pad_b = _place(top, bottom, side, height)
    return Fit(mode=mode, image_size=(width, height), box=(x0, y0, x1, y1), pad=(pad_l, pad_t, pad_r, pad_b),
               resolution=resolution)


def choose_fit(hole: np.ndarray, resolution: int, max_shrink: float = 2.0) -> str:
    """`--fit auto` for a backbone trained on photo windows at every scale: "crop" when the box around the hole
    reaches the model at most `max_shrink` times smaller (its detail survives), or when the hole is thick (an object:
    it needs the context a shrunk box gives); "native" (windows at the model's own scale along the hole) for a thin
    hole spread wide (a stroke, a scratch, text), whose every pixel lies within resolution/8 of its edge, so a
    window's inner half holds it with context on both sides."""
    if plan_fit(hole, resolution, mode="crop").scale * max_shrink >= 1:
        return "crop"
    return "crop" if erode(hole, max(resolution // 8, 1)).any() else "native"


def plan_native_crop(hole: np.ndarray, context: int = 64, margin: float = 0.25) -> Fit:
    """A box around the hole at the image's own scale, never resized: what methods that work at any size
    (`full_resolution`, the classical ones) are given. The box is plan_fit's crop (the hole's square grown by
    `margin`, at least `context` pixels, reflection-padded past the image's edges), its resolution its own side."""
    fit = plan_fit(hole, min(context, max(hole.shape)), mode="crop", margin=margin)
    return dataclasses.replace(fit, resolution=fit.side)


def plan_windows(hole: np.ndarray, resolution: int) -> list[tuple[Fit, np.ndarray]]:
    """Cover the hole with windows the model sees at native scale (side = `resolution`, no resizing), for
    `--fit native`: [(fit, the hole pixels that window fills)], in the order they are to be filled.

    Each window fills the still-unfilled hole pixels of its inner square (the window less a quarter of its side on every
    side, so every filled pixel has context around it): the topmost, then leftmost unfilled pixel starts the next one,
    so a long stroke is followed window by window, and each later window sees the fills of the earlier ones."""
    height, width = hole.shape
    margin = resolution // 4
    inner = max(resolution - 2 * margin, 1)
    remaining, windows = hole.copy(), []
    while remaining.any():
        flat = int(np.flatnonzero(remaining)[0])
        r, c = divmod(flat, width)
        # start the square at the leftmost unfilled pixel of its rows within reach of this one, so that a stroke
        # running right or down-left is followed without overlap
        lo = max(c - inner + 1, 0)
        cols = np.flatnonzero(remaining[r:r + inner, lo:c + 1].any(axis=0))
        top, left = r, min(lo + int(cols[0]), max(width - inner, 0))
        bottom, right = min(top + inner, height), min(left + inner, width)
        x0, x1, pad_l, pad_r = _place(left, right, resolution, width)
        y0, y1, pad_t, pad_b = _place(top, bottom, resolution, height)
        fills = np.zeros_like(hole)
        fills[top:bottom, left:right] = remaining[top:bottom, left:right]
        remaining &= ~fills
        windows.append((Fit(mode="native", image_size=(width, height), box=(x0, y0, x1, y1),
                            pad=(pad_l, pad_t, pad_r, pad_b), resolution=resolution), fills))
    return windows


def _pad(a: np.ndarray, fit: Fit) -> np.ndarray:
    """Reflection-pad a box-cropped HxW[xC] array to the fit's square."""
    if not any(fit.pad):
        return a
    left, top, right, bottom = fit.pad
    return np.pad(a, ((top, bottom), (left, right)) + ((0, 0),) * (a.ndim - 2), mode="reflect")


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic, antialiased resize of [N, C, h, w] in [0, 1] to side×side (identity when already that size)."""
    if x.shape[-2:] == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def downscale_hole(hole: np.ndarray, resolution: int) -> np.ndarray:
    """Square bool hole side×side → resolution², conservatively: a cell is a hole if ANY original pixel it overlaps is."""
    side = hole.shape[0]
    i = np.arange(resolution)
    start, stop = (i * side) // resolution, -((-(i + 1) * side) // resolution)  # floor / ceil of the cell's extent
    integral = np.zeros((side + 1, side + 1), dtype=np.int64)
    integral[1:, 1:] = hole.astype(np.int64).cumsum(0).cumsum(1)
    count = (integral[np.ix_(stop, stop)] - integral[np.ix_(start, stop)] - integral[np.ix_(stop, start)]
             + integral[np.ix_(start, start)])
    return count > 0


def to_task_tensors(img: LoadedImage, hole: np.ndarray, fit: Fit,
                    resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's view: (image [1, 3, R, R] in [−1, 1], M [1, 1, R, R] with 1 = known), ready for Task(y=…, M=…)."""
    r = fit.resolution
    if resolution is not None and resolution != r:
        raise ValueError(f"fit was planned for {r}x{r}, not {resolution}x{resolution}")
    if hole.shape != img.pixels.shape[:2]:
        raise ValueError(f"hole {hole.shape} does not match image {img.pixels.shape[:2]}")
    left, top, right, bottom = fit.box
    x = torch.from_numpy(np.ascontiguousarray(_pad(img.rgb01(fit.box), fit))).permute(2, 0, 1)[None]
    x = _resize(x, r) * 2 - 1
    known = ~downscale_hole(_pad(hole[top:bottom, left:right], fit), r)
    return x.contiguous(), torch.from_numpy(known.astype(np.float32))[None, None]


# ------------------------------------------------------------------------------------------------------------ compositing

def composite(img: LoadedImage, hole: np.ndarray, fit: Fit, completed: torch.Tensor, feather: int = 0) -> np.ndarray:
    """Paste the model's output into the hole at the original size; every other pixel is the original's, untouched.

    `feather` n > 0: the n pixels around the hole are blended too, linearly from the fill (next to the hole) to the
    original (n + 1 pixels away), to soften the seam; those pixels then change. The fit must cover them
    (plan it on grow(hole, n))."""
    if completed.ndim == 4:
        if completed.shape[0] != 1:
            raise ValueError("composite takes one completed image at a time")
        completed = completed[0]
    left, top, right, bottom = fit.box
    x = (completed.detach().to(torch.float32).cpu().clamp(-1, 1)[None] + 1) / 2
    x = _resize(x, fit.side)[0, :, fit.pad[1]:fit.pad[1] + bottom - top, fit.pad[0]:fit.pad[0] + right - left]
    x = x.permute(1, 2, 0).numpy()  # h×w×3 in [0, 1], the box at original scale
    if img.is_grey:
        x = x @ LUMA
    new = np.rint(x * img.max_value).clip(0, img.max_value).astype(img.pixels.dtype)
    out = img.pixels.copy()
    region = out[top:bottom, left:right]  # a view: writing into it writes into `out`
    colour = region if img.mode in ("L", "I;16") else region[..., 0] if img.mode == "LA" else region[..., :3]
    box_hole = hole[top:bottom, left:right]
    if feather <= 0:
        colour[box_hole] = new[box_hole]  # alpha (if any) is left as it was
        return out
    w = feather_weights(box_hole, feather)
    w = w[..., None] if colour.ndim == 3 else w
    old = colour.astype(np.float64)
    colour[...] = np.rint(old + w * (new.astype(np.float64) - old)).clip(0, img.max_value).astype(colour.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------- writing

def _same_file(a: Path, b: Path) -> bool:
    """True when two paths name the same file (symlinks and hard links included)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _encoded(array: np.ndarray, like: LoadedImage, fmt: str) -> tuple[Image.Image, dict, list[str]]:
    """`array` (pixels in `like`'s mode) as the Pillow image and save parameters of `fmt`, with warnings for the user."""
    warnings, mode = [], like.mode
    if mode == "I;16" and fmt not in ("PNG", "TIFF"):
        array, mode = np.rint(array / 257).astype(np.uint8), "L"
        warnings.append(f"{fmt} cannot hold 16 bits: saved as 8-bit (use .png or .tif to keep 16 bits)")
    if mode in ("LA", "RGBA") and fmt in ("JPEG", "BMP"):
        array, mode = array[..., :-1], mode[:-1]
        warnings.append(f"{fmt} cannot store transparency: the alpha channel was dropped (use .png to keep it)")
    im = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array))
    if im.mode != mode:
        raise ValueError(f"array of shape {array.shape} and dtype {array.dtype} is not a {mode} image")
    params = {}
    if like.icc_profile and fmt != "BMP":
        params["icc_profile"] = like.icc_profile
    if fmt == "JPEG":
        params.update(quality=95, subsampling=0)
        warnings.append("JPEG is lossy: the visible pixels will not stay bit-exact (use .png to keep them exactly)")
    elif fmt == "WEBP":
        params.update(lossless=True, exact=True)
    return im, params, warnings


def save_image(path: str | os.PathLike, array: np.ndarray, like: LoadedImage,
               protect: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Write `array` (pixels in `like`'s mode) atomically, format from the suffix; returns warnings for the user.

    Refuses to write over the input image or any path in `protect` (e.g. the mask). PNG and TIFF keep 16 bits and alpha;
    JPEG is lossy (visible pixels cannot stay bit-exact), WebP is written lossless.
    """
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the output format from {path.name!r}; use .png, .jpg, .webp, .tif or .bmp")
    for source in (like.path, *map(Path, protect)):
        if source is not None and _same_file(path, source):
            raise UserError(f"refusing to write over an input file: {path}")
    check_writable_dir(path)
    im, params, warnings = _encoded(array, like, fmt)
    atomic_write(path, lambda tmp: im.save(tmp, format=fmt, **params))
    return warnings


def encode_png(array: np.ndarray, like: LoadedImage) -> bytes:
    """`array` (pixels in `like`'s mode) as the bytes `save_image` writes to a .png file (`aid serve`'s results)."""
    im, params, _ = _encoded(array, like, "PNG")
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **params)
    return buffer.getvalue()
