"""`aid inpaint`: the path of one image, file to file (design.md).

file + mask file → Task at model resolution (+ the Fit that says how) → sampler loop with one method → completed tensor →
composited back at the original resolution (visible pixels bit-exact) → file, written atomically.

The middle of the path, tensors to completed tensors, is the Inpainter's (inpainter.py), as for `aid bench` and `aid
train`. Latent backbones (EDM2) take the same path through their space (backbones/spaces.py): the fit is planned at the
pixel resolution the VAE maps to the network's latent grid (8 × 64 = 512 for img512), the Task lives on the latent
grid, the completion is decoded and its visible pixels pasted back before compositing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .data.images import (INVERTED_WARNING_FRACTION, OUTPUT_FORMATS, composite, grow, load_image, load_mask,
                          choose_fit, mask_stats, plan_fit, plan_native_crop, plan_windows, save_image,
                          to_task_tensors)
from .errors import UserError
from .fileio import check_writable_dir
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
class Job:
    """One input pair and the output path(s) it will write (one per sample)."""

    image: Path
    mask: Path
    outputs: list[Path]
    claimed: list[Path] = field(default_factory=list)  # default names this run took (empty until written)


def plan_outputs(pairs: list[tuple[Path, Path]], out: Path, samples: int, folder_mode: bool) -> list[Job]:
    """Output paths: a file for one input (``name-K.ext`` per sample when K > 1), ``OUT/<stem>[-K].png`` for folders."""
    jobs = []
    for image, mask in pairs:
        base = out / f"{image.stem}.png" if folder_mode else out
        jobs.append(Job(image=image, mask=mask, outputs=sample_paths(base, samples)))
    return jobs


def sample_paths(base: Path, samples: int) -> list[Path]:
    """The output of each sample: `base` itself for one, ``stem-K.ext`` for K > 1."""
    if samples == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{k}{base.suffix}") for k in range(samples)]


FILLED = "-filled"


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def default_output(image: Path, samples: int) -> tuple[Path, list[Path]]:
    """Where an image's result goes without -o: beside it, as ``STEM-filled.png`` (PNG keeps the visible pixels
    exact), or ``STEM-filled-2.png``, ``-3``, … when that name (or one of its sample files) is taken: never over
    anything that exists. The names are claimed (created empty, create-exclusive), so two runs at once never pick the
    same one; returns (the base name, the files claimed), for `release_claims` should they never be written."""
    from .fileio import claim_new, release_claims

    n = 1
    while True:
        base = image.with_name(f"{image.stem}{FILLED}{'' if n == 1 else f'-{n}'}.png")
        outputs = sample_paths(base, samples)
        if not any(_taken(p) for p in [base, *outputs]):
            claimed = []
            for p in outputs:
                if not claim_new(p):
                    break
                claimed.append(p)
            else:
                return base, claimed
            release_claims(claimed)  # another run took one of them meanwhile: the next number
        n += 1


def default_folder(folder: Path) -> Path:
    """Where a folder's results go without -o: a new folder beside it, ``NAME-filled`` (``-2``, … when taken)."""
    if folder.name in ("", ".", ".."):
        folder = folder.resolve()
    n = 1
    while True:
        out = folder.with_name(f"{folder.name}{FILLED}{'' if n == 1 else f'-{n}'}")
        if not _taken(out):
            return out
        n += 1


def plan_jobs(inputs: list[Path], mask: Path, output: Path | None, samples: int) -> tuple[list[Job], list[Path]]:
    """Pair every input (image files and folders) with its mask and give each output a path; also the folder to create
    once everything that can fail has passed.

    One image file and -o: that file (or OUT/STEM.png when OUT is an existing folder, or a name without a suffix). Several inputs or a folder and -o:
    OUT is a folder (created), results are OUT/STEM.png. No -o: each image's result beside it (default_output), each
    folder's in a new folder beside it (default_folder). Two inputs that would write the same file are refused.
    """
    from .data.images import pair_inputs

    single_file = len(inputs) == 1 and not inputs[0].is_dir()
    if output is not None and single_file and not output.exists() and output.suffix == "":
        single_file = False  # `-o out` (no image suffix) for one image: a folder, as `-o out/` means to a shell user
    if output is not None and not single_file:
        if output.exists() and not output.is_dir():
            raise UserError(f"{inputs[0]} is a folder, so -o must be a folder too (got the file {output})"
                            if len(inputs) == 1 else f"{len(inputs)} inputs: -o must be a folder (got the file {output})")
        if not output.exists() and not output.parent.is_dir():
            raise UserError(f"output folder's parent does not exist: {output.parent}")
    jobs, create = [], None
    try:
        for item in inputs:
            pairs = pair_inputs(item, mask)
            if output is None:
                if item.is_dir():
                    create = create or {}
                    folder = create.setdefault(item, default_folder(item))
                    jobs += plan_outputs(pairs, folder, samples, folder_mode=True)
                else:
                    for image, m in pairs:
                        if any(j.image.resolve() == image.resolve() for j in jobs):
                            raise UserError(f"{image} is given twice")
                        base, claimed = default_output(image, samples)
                        jobs.append(Job(image, m, sample_paths(base, samples), claimed))
            elif single_file and not output.is_dir():
                jobs += plan_outputs(pairs, output, samples, folder_mode=False)
            else:
                jobs += plan_outputs(pairs, output, samples, folder_mode=True)
        if not jobs:
            raise UserError(f"no images to fill: {', '.join(map(str, inputs))} are all masks (--mask {mask})")
        seen: dict[Path, Path] = {}
        for job in jobs:
            for path in job.outputs:
                key = path.resolve()
                if key in seen:
                    raise UserError(f"{job.image} is given twice" if seen[key].resolve() == job.image.resolve() else
                                    f"{seen[key]} and {job.image} would both be written to {path}; give them "
                                    f"different names or run them separately")
                seen[key] = job.image
    except BaseException:
        release_jobs(jobs)
        raise
    if output is None:
        folders = sorted((create or {}).values())
    else:
        folders = [] if single_file and not output.is_dir() else [output]
    return jobs, [f for f in folders if not f.exists()]


def release_jobs(jobs: list[Job]) -> None:
    """Give back the default names the jobs claimed and never wrote (a failed or interrupted run leaves none)."""
    from .fileio import release_claims

    release_claims(p for job in jobs for p in job.claimed)


def check_outputs(jobs: list[Job], create: list[Path] = ()) -> None:
    """Fail before any work when an output can't be written: unknown format, missing/read-only folder, over an input.

    `create`: output folders that do not exist yet (made once this has passed): their parent must be writable."""
    inputs = {p.resolve() for j in jobs for p in (j.image, j.mask)}
    pending = {f.resolve() for f in create}
    for job in jobs:
        for path in job.outputs:
            if path.suffix.lower() not in OUTPUT_FORMATS:
                raise UserError(f"cannot tell the output format from {path.name!r}; use .png, .jpg, .webp, .tif or .bmp")
            folder = path.resolve().parent
            check_writable_dir(folder if folder in pending else path)
            if path.resolve() in inputs:
                raise UserError(f"refusing to write over an input file: {path}")


@dataclass
class Prepared:
    """One input fitted for the sampler: the image, its hole, how it was fitted, and x, M at that resolution; `job`:
    the files it came from (None for `aid serve`'s uploads)."""

    job: Job | None
    img: object
    hole: object
    fit: object
    x: torch.Tensor
    M: torch.Tensor


def prepare(job: Job, resolution: int, opts: InpaintOptions, notice: Callable[[str], None],
            full_resolution: bool = False, multiscale: bool = False) -> Prepared | list[dict]:
    """Load and fit one input; an empty mask is copied through at once (its records are returned instead).

    `resolution`: the pixel side the image is fitted to (the network's resolution × the space's factor);
    `full_resolution`: the method works at any size (classical ones); `multiscale`: the backbone was trained on photo
    windows at every scale (what `--fit auto` chooses by: fit_hole).
    """
    img = load_image(job.image)
    notes: list[str] = []
    hole = load_mask(job.mask, img.size, invert=opts.invert_mask, resize=opts.resize_mask, notes=notes)
    for note in img.notes:
        notice(f"{job.image.name}: {note}")
    for note in notes:
        notice(note)
    item = fit_input(img, hole, resolution, opts, notice, full_resolution, multiscale, job)
    if item is None:
        notice(f"{job.mask.name}: the mask is empty (nothing to fill); {job.image.name} is copied through unchanged")
        records = []
        for path in job.outputs:
            for w in save_image(path, img.pixels, img, protect=[job.mask]):
                notice(f"{path.name}: {w}")
            records.append(_record(path, job, opts, k=len(records), nfe=0, backward=0, seconds=0.0, fit="copied"))
        return records
    return item


def fit_input(img, hole, resolution: int, opts: InpaintOptions, notice: Callable[[str], None],
              full_resolution: bool = False, multiscale: bool = False, job: Job | None = None) -> Prepared | None:
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


def fit_hole(job: Job, img, hole, resolution: int, opts: InpaintOptions, full_resolution: bool = False,
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


def inpaint_batch(inpainter: Inpainter, items: list[Prepared], opts: InpaintOptions, spec: MethodSpec,
                  notice: Callable[[str], None], class_labels: torch.Tensor | None = None,
                  progress: Callable[[int], None] | None = None) -> list[dict]:
    """Fill prepared inputs (fill_items) and write their outputs; one record per output."""
    records = []
    for f in fill_items(inpainter, items, opts, spec.build(), class_labels, progress):
        for k, path in enumerate(f.item.job.outputs):
            for w in save_image(path, f.pixels[k], f.item.img, protect=[f.item.job.mask]):
                notice(f"{path.name}: {w}")
            records.append(_record(path, f.item.job, opts, k, f.nfe, f.backward, f.seconds, f.how, f.space))
    return records


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


class _NoBar:
    """No progress display: what `inpaint_jobs` tells a bar goes nowhere."""

    def images_done(self, n: int) -> None:
        pass

    def sampling(self, description: str, total: int):
        import contextlib

        return contextlib.nullcontext(None)


def inpaint_jobs(inpainter: Inpainter, jobs: list[Job], opts: InpaintOptions, spec: MethodSpec, batch: int,
                 notice: Callable[[str], None], class_labels: torch.Tensor | None = None,
                 report: Callable[[list[dict]], None] = lambda records: None,
                 skipped: Callable[[Job, UserError], None] = lambda job, error: None, bar=None) -> list[Path]:
    """Fill every job, `batch` prepared images per sampler call, writing each output as its call finishes (`report`
    gets their records); returns the images that could not be read, each told to `skipped` (a batch goes on without
    them). With a single job, its error is raised instead.

    `bar`: `images_done(n)`, and `sampling(description, NFE total)`, a context whose value is the sampler's progress
    callback (the CLI's progress bar); default: none."""
    bar = bar or _NoBar()
    method = spec.build()
    expected, full = method.expected_nfe(opts.steps), method.full_resolution
    pending, failed = [], []
    for i, job in enumerate(jobs):
        try:
            item = prepare(job, inpainter.resolution, opts, notice, full_resolution=full,
                           multiscale=inpainter.multiscale)
        except UserError as e:
            if len(jobs) == 1:
                raise
            failed.append(job.image)
            skipped(job, e)
            bar.images_done(1)
            item = None
        if item is None:
            pass
        elif isinstance(item, list):  # an empty mask: copied through
            report(item)
            bar.images_done(1)
        else:
            pending.append(item)
        if pending and (len(pending) == batch or i == len(jobs) - 1):
            names = ", ".join(p.job.image.name for p in pending)
            windows = [p for p in pending if isinstance(p.fit, list)]  # a call per window; the boxes share one
            calls = sum(len(p.fit) for p in windows) + (len(windows) < len(pending))
            with bar.sampling(f"{opts.method} {names}", expected * calls) as progress:
                records = inpaint_batch(inpainter, pending, opts, spec, notice, class_labels, progress)
            report(records)
            bar.images_done(len(pending))
            pending = []
    return failed


def _record(path: Path, job: Job, opts: InpaintOptions, k: int, nfe: int, backward: int, seconds: float,
            fit: str, space: str = "pixels") -> dict:
    return {"path": str(path), "input": str(job.image), "mask": str(job.mask), "seed": opts.seed + k,
            "method": opts.method, "method_default": opts.method_default, "params": dict(opts.params),
            "steps": opts.steps, "nfe": nfe, "backward": backward, "dilate": opts.dilate, "feather": opts.feather,
            "seconds": round(seconds, 4), "fit": fit, "space": space, "class": opts.class_label}


__all__ = ["InpaintOptions", "Job", "plan_outputs", "plan_jobs", "default_output", "release_jobs", "check_outputs",
           "prepare", "fit_input", "fit_hole", "Filled", "fill_items", "fill", "inpaint_batch", "inpaint_jobs"]
