"""An image of any size filled by the backbone (design.md, "The path of one image", its middle): the hole fitted to
the model's resolution (a box around it, the whole image, or windows at native scale), the sampler called through the
Inpainter (inpainter.py), and the completion composited back at the image's own size, every visible pixel exact.

`aid inpaint` (jobs.py: files in, files out), `aid serve` (fill) and `aid bench` on photos (fill_items) all fill
through here. Latent backbones (EDM2) take the same path through their space (backbones/spaces.py): the fit is
planned at the pixel resolution the VAE maps to the network's latent grid (8 × 64 = 512 for img512).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .data.images import (INVERTED_WARNING_FRACTION, composite, grow, choose_fit, mask_stats, plan_fit,
                          plan_native_crop, plan_windows, to_task_tensors)
from .inpainter import Inpainter
from .resolve import MethodSpec
from .sampling.heun import sample_generators


@dataclass
class InpaintOptions:
    method: str = "replace"
    steps: int = 18
    seed: int = 0
    samples: int = 1
    invert_mask: bool = False
    resize_mask: bool = False
    fit: str = "auto"  # auto|crop|resize|native (fit_hole)
    params: dict = field(default_factory=dict)  # method params as recorded (resolve.py: tuned ones, AID's module)
    class_label: int | None = None  # --class N of a class-conditional backbone (recorded; the one-hot goes to the net)
    method_default: bool = False  # the method was chosen by default, not given (recorded)
    dilate: int = 0  # grow the hole by this many pixels first (--dilate)
    feather: int = 0  # blend the fill into this many pixels around the hole (--feather)


@dataclass
class Prepared:
    """One input fitted for the sampler: the image, its hole, how it was fitted, and x, M at that resolution; `job`:
    the files it came from (jobs.Job; None for `aid serve`'s uploads)."""

    job: object  # jobs.Job; None for an image in memory
    img: object
    hole: object
    fit: object
    x: torch.Tensor
    M: torch.Tensor


def fit_input(img, hole, resolution: int, opts: InpaintOptions, notice: Callable[[str], None],
              full_resolution: bool = False, multiscale: bool = False, job=None) -> Prepared | None:
    """An image and its hole, already loaded, made ready for fill_items as `opts` says (--dilate, then fit_hole);
    None when there is nothing to fill. A hole over 90 % of the image gets a warning through `notice`."""
    if opts.dilate:
        hole = grow(hole, opts.dilate)
    fraction = mask_stats(hole)
    if fraction == 0:
        return None
    if fraction > INVERTED_WARNING_FRACTION:
        notice(f"{job.mask.name if job else 'mask'}: {fraction:.0%} of the image is to be filled; if white was meant "
               f"to be kept, pass --invert-mask")
    return fit_hole(job, img, hole, resolution, opts, full_resolution, multiscale)


def fit_hole(job, img, hole, resolution: int, opts: InpaintOptions, full_resolution: bool = False,
             multiscale: bool = False) -> Prepared:
    """How the hole reaches the method (design.md: file → Task): a box around it at native scale for methods that
    work at any size; else `opts.fit` (auto: choose_fit's per-hole choice where the backbone is `multiscale`, crop
    otherwise): windows at the model's own scale along the hole (native), a box around it (crop), the whole image
    (resize)."""
    covered = grow(hole, opts.feather) if opts.feather else hole  # the fit covers the feathered ring
    if full_resolution:
        fit = plan_native_crop(covered)
    else:
        mode = opts.fit
        if mode == "auto":
            mode = choose_fit(covered, resolution) if multiscale else "crop"
        if mode == "native" and not opts.feather:  # filled one after another (fill_windows); nothing to batch
            return Prepared(job, img, hole, plan_windows(hole, resolution), None, None)
        fit = plan_fit(covered, resolution, mode="crop" if mode == "native" else mode)
    x, M = to_task_tensors(img, hole, fit)
    return Prepared(job, img, hole, fit, x, M)


@dataclass
class Filled:
    """A prepared input completed: its K results at the image's own size (only hole pixels changed) and their cost."""

    item: Prepared
    pixels: list  # K arrays like item.img.pixels
    nfe: int  # network evaluations per sample (windows: all of them)
    backward: int
    seconds: float  # per sample
    how: str  # what the fit did, in words
    space: str


def fill_windows(inpainter: Inpainter, item: Prepared, opts: InpaintOptions, method,
                 class_labels: torch.Tensor | None = None, progress: Callable[[int], None] | None = None) -> Filled:
    """Native fit: fill the hole window by window at the model's own scale (plan_windows), each window seeing the
    fills before it; the K samples of the image run side by side, sample k drawing its noise, window after window, from
    its own generator seeded seed + k."""
    import dataclasses

    K, windows, device = opts.samples, item.fit, inpainter.device
    labels = class_labels.expand(K, -1).to(device) if class_labels is not None else None
    generators = sample_generators(opts.seed, K)
    pixels = [item.img.pixels.copy() for _ in range(K)]
    unfilled = item.hole.copy()
    nfe = backward = 0
    t0 = time.perf_counter()
    for fit, fills in windows:
        views = [dataclasses.replace(item.img, pixels=p) for p in pixels]
        tensors = [to_task_tensors(v, unfilled, fit) for v in views]  # every unfilled hole pixel is unknown
        x = torch.cat([t[0] for t in tensors]).to(device)
        M = torch.cat([t[1] for t in tensors]).to(device)
        completed, result = inpainter.complete(x, M, method, opts.steps, generators, labels, progress=progress)
        nfe, backward = nfe + result.nfe, backward + result.backward
        pixels = [composite(v, fills, fit, completed[k:k + 1]) for k, v in enumerate(views)]
        unfilled &= ~fills
    seconds = (time.perf_counter() - t0) / K
    side = windows[0][0].resolution
    how = f"{len(windows)} window(s) of {side}x{side} at native scale"
    return Filled(item, pixels, nfe, backward, seconds, how, inpainter.space.for_method(method).describe())


def fill_items(inpainter: Inpainter, items: list[Prepared], opts: InpaintOptions, method,
               class_labels: torch.Tensor | None = None,
               progress: Callable[[int], None] | None = None) -> list[Filled]:
    """Complete prepared inputs, K samples each: boxes fitted to the model in one sampler call, windows and
    native-scale boxes (each at its own size) one after another. What `aid inpaint`, `aid bench` on photos and
    every other caller fill with.

    Sample k of an image uses the generator seeded seed + k whatever the batch, so its noise does not depend on it.
    `class_labels`: one-hot [1, label_dim] for class-conditional nets. `progress(k)`: told the NFE of every network
    evaluation."""
    done: dict[int, Filled] = {}
    batched = []
    for i, p in enumerate(items):
        if isinstance(p.fit, list):
            done[i] = fill_windows(inpainter, p, opts, method, class_labels, progress)
        elif method.full_resolution and len(items) > 1:
            done[i] = fill_items(inpainter, [p], opts, method, class_labels, progress)[0]
        else:
            batched.append(i)
    if batched:
        K, device = opts.samples, inpainter.device
        x = torch.cat([items[i].x.repeat(K, 1, 1, 1) for i in batched]).to(device)
        M = torch.cat([items[i].M.repeat(K, 1, 1, 1) for i in batched]).to(device)
        labels = class_labels.expand(len(x), -1).to(device) if class_labels is not None else None
        t0 = time.perf_counter()
        completed, result = inpainter.complete(x, M, method, opts.steps,
                                               [g for _ in batched for g in sample_generators(opts.seed, K)], labels,
                                               progress=progress)
        seconds = (time.perf_counter() - t0) / len(x)
        space = inpainter.space.for_method(method).describe()
        for j, i in enumerate(batched):
            p = items[i]
            pixels = [composite(p.img, p.hole, p.fit, completed[j * K + k:j * K + k + 1], feather=opts.feather)
                      for k in range(K)]
            done[i] = Filled(p, pixels, result.nfe, result.backward, seconds, p.fit.describe(), space)
    return [done[i] for i in range(len(items))]


def fill(inpainter: Inpainter, img, hole, opts: InpaintOptions, spec: MethodSpec,
         class_labels: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
         notice: Callable[[str], None] = lambda message: None,
         expected: Callable[[int], None] | None = None) -> Filled | None:
    """Fill one image already in memory (`aid serve`): the same fit (fit_input → fit_hole) and the same sampler call
    and compositing (fill_items) as `aid inpaint` gives the same image and mask files, so the pixels are the same for
    the same model, method, options and seed. None for an empty hole (nothing to fill). `expected(n)`: told the NFE
    the fill will take (a progress bar's total) before it starts."""
    method = spec.build()
    item = fit_input(img, hole, inpainter.resolution, opts, notice, full_resolution=method.full_resolution,
                     multiscale=inpainter.multiscale)
    if item is None:
        return None
    if expected is not None:
        expected(method.expected_nfe(opts.steps) * expected_calls(item))
    return fill_items(inpainter, [item], opts, method, class_labels, progress)[0]


def expected_calls(item: Prepared) -> int:
    """Sampler calls a prepared input costs: one per window (native fit), else one."""
    return len(item.fit) if isinstance(item.fit, list) else 1


__all__ = ["InpaintOptions", "Prepared", "Filled", "fit_input", "fit_hole", "fill_windows", "fill_items", "fill",
           "expected_calls"]
