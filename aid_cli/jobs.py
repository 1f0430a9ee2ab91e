"""`aid inpaint` as a library: files in, files out (inpaint_files).

image and mask files (paired by stem for folders) → output paths, claimed or checked before anything slow → the
backbone and the method, loaded once → each image read, filled (fill.py) and written atomically → one record per output.

Nothing at this module's top imports torch or Pillow: a missing file or a taken output is reported before they load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data.folders import OUTPUT_FORMATS
from .errors import UserError
from .fileio import check_writable_dir


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
    from .data.folders import pair_inputs

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


def check_outputs(jobs: list[Job], create: list[Path] = (), overwrite: bool = False) -> None:
    """Fail before any work when an output can't be written: unknown format, missing/read-only folder, over an input,
    or (without `overwrite`) over a file that exists: nothing is replaced unless asked for.

    `create`: output folders that do not exist yet (made once this has passed): their parent must be writable."""
    inputs = {p.resolve() for j in jobs for p in (j.image, j.mask)}
    pending = {f.resolve() for f in create}
    taken = []
    for job in jobs:
        for path in job.outputs:
            if path.suffix.lower() not in OUTPUT_FORMATS:
                raise UserError(f"cannot tell the output format from {path.name!r}; use .png, .jpg, .webp, .tif or .bmp")
            folder = path.resolve().parent
            check_writable_dir(folder if folder in pending else path)
            if path.resolve() in inputs:
                raise UserError(f"refusing to write over an input file: {path}")
            if not overwrite and path not in job.claimed and _taken(path):
                taken.append(path)
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise UserError(f"{taken[0]}{more} exists; pass --overwrite to replace, or choose another -o")


@dataclass
class InpaintSettings:
    """What `aid inpaint`'s options say beyond the files; the defaults are the command's."""

    model: str | Path | None = None  # a .safetensors file or a model name (`aid models list`); None: the default
    method: str | None = None  # a name parse_method takes; None: the backbone's default (resolve.default_method)
    steps: int | None = None  # N; None: the operating point's (aid-12: 12), else 18
    guidance: str | Path | None = None  # AID's module, a file or a name; None: the one at hand for the backbone
    churn: float | None = None  # AID's EDM churn S_churn; None: its module's own (0 unless trained with churn)
    seed: int = 0
    samples: int = 1
    batch: int = 1  # images per sampler call (results do not depend on it)
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    fit: str = "auto"  # auto|crop|resize|native
    invert_mask: bool = False
    resize_mask: bool = False
    dilate: int = 0
    feather: int = 0
    class_label: int | None = None
    vae: str | None = None  # latent backbones: a local diffusers VAE folder
    offline: bool = False
    cache: Path | None = None
    overwrite: bool = False  # -o: replace outputs that exist (never without it)
    threads: int | None = None  # torch's CPU threads (None: as they are)


class _NoBar:
    """No progress display: what inpaint_files tells a bar goes nowhere."""

    def images_done(self, n: int) -> None:
        pass

    def sampling(self, description: str, total: int):
        import contextlib

        return contextlib.nullcontext(None)


@dataclass
class InpaintHooks:
    """What inpaint_files tells its caller as it goes (each optional): `notice(line)` the notes and warnings;
    `ready(run)` once the backbone and the method are loaded, before any image is read; `written(records)` the outputs
    of each sampler call once they are on disk; `skipped(job, error)` an image of several that could not be read;
    `download(file, done, total)` a model fetched by name; `bar`: images_done(n) and sampling(description, NFE total),
    a context whose value is the sampler's progress callback."""

    notice: Callable[[str], None] = lambda line: None
    ready: Callable[["InpaintRun"], None] = lambda run: None
    written: Callable[[list[dict]], None] = lambda records: None
    skipped: Callable[[Job, UserError], None] = lambda job, error: None
    download: Callable | None = None
    bar: object = field(default_factory=_NoBar)


@dataclass
class InpaintRun:
    """What runs, as `ready` is told it: the jobs, the loaded Inpainter, the method (resolve.InpaintMethod), the
    backbone's catalogue entry (None for a file the catalogue does not know) and the one-hot of --class."""

    jobs: list[Job]
    inpainter: object
    method: object
    model: object
    labels: object = None


def inpaint_files(images: list[Path], mask: Path, output: Path | None = None,
                  settings: InpaintSettings | None = None, hooks: InpaintHooks | None = None) -> list[dict]:
    """Fill the holes of `mask` (a file, or a folder paired by stem) in `images` (files or folders) and write the
    results (`output`: a file or folder as `aid inpaint -o`; None: new names beside the inputs); one record per
    output, in order.

    Paths are checked first, before torch loads. An image of several that cannot be read is skipped (told to
    `hooks.skipped`) and the others are written; then a UserError says how many failed. Interrupted or failed, no
    output is left half-written and no default name stays claimed."""
    settings, hooks = settings or InpaintSettings(), hooks or InpaintHooks()
    s = settings
    if s.fit == "native" and s.feather:
        raise UserError("--feather does not combine with --fit native (its windows are filled at native scale)")
    jobs, create = plan_jobs(images, mask, output, s.samples)  # paths first: nothing slow is imported yet
    try:
        check_outputs(jobs, create, overwrite=s.overwrite)
        from .resolve import check_inpaint_method

        check_inpaint_method(s.method, s.steps, s.guidance, s.churn)  # a bad name or --steps fails before anything loads
        from .threads import apply_threads

        apply_threads(s.threads)
        run = _load(jobs, s, hooks)
        hooks.ready(run)
        for folder in create:
            folder.mkdir(exist_ok=True)  # only once everything that can fail has passed (a parallel job may beat us)
        records: list[dict] = []

        def written(batch: list[dict]) -> None:
            records.extend(batch)
            hooks.written(batch)

        failed = _fill_jobs(run, s, hooks, written)
        if failed:
            raise UserError(f"{len(failed)} of {len(jobs)} images could not be inpainted (each named above); the other "
                            f"{len(jobs) - len(failed)} were written")
        return records
    finally:
        release_jobs(jobs)  # default names claimed and never written (a failure, Ctrl-C) are given back


def _load(jobs: list[Job], s: InpaintSettings, hooks: InpaintHooks) -> InpaintRun:
    """The device, the backbone (--class checked against it before a latent backbone's VAE is fetched) and the
    method, each once."""
    from .devices import check_precision, resolve_device
    from .inpainter import Inpainter
    from .models.catalogue import default_backbone, lookup_model, resolve_backbone
    from .resolve import inpaint_method
    from .task import class_labels

    device = resolve_device(s.device)
    check_precision(s.precision, device)
    offline = True if s.offline else None
    fetch = {"progress": hooks.download, "log": hooks.notice} if s.model is not None else {}
    checkpoint = resolve_backbone(s.model, cache=s.cache, offline=offline, **fetch)
    labels = []

    def check(info: dict) -> None:  # --class against the backbone, before a latent backbone's VAE is fetched
        labels.append(class_labels(s.class_label, info["label_dim"], 1))

    inpainter = Inpainter.load(checkpoint, device, vae=s.vae, precision=s.precision, compile=s.compile,
                               notice=hooks.notice, check=check)
    chosen = inpaint_method(s.method, s.steps, checkpoint, s.guidance, cache=s.cache, offline=offline,
                            notice=hooks.notice, churn=s.churn)
    entry = default_backbone() if s.model is None else lookup_model(str(s.model))
    return InpaintRun(jobs, inpainter, chosen, entry, labels[0])


def _fill_jobs(run: InpaintRun, s: InpaintSettings, hooks: InpaintHooks,
               written: Callable[[list[dict]], None]) -> list[Path]:
    """Fill every job, `s.batch` prepared images per sampler call, writing each output as its call finishes; returns
    the images that could not be read (a batch goes on without them). With a single job, its error is raised."""
    from .fill import InpaintOptions

    inpainter, chosen, jobs, bar = run.inpainter, run.method, run.jobs, hooks.bar
    opts = InpaintOptions(method=chosen.name, steps=chosen.steps, seed=s.seed, samples=s.samples,
                          invert_mask=s.invert_mask, resize_mask=s.resize_mask, fit=s.fit, params=chosen.params,
                          class_label=s.class_label, method_default=bool(chosen.why), dilate=s.dilate,
                          feather=s.feather)
    method = chosen.spec.build()
    expected = method.expected_nfe(opts.steps)
    pending, failed = [], []
    for i, job in enumerate(jobs):
        try:
            item = _prepare(job, inpainter.resolution, opts, hooks.notice, full_resolution=method.full_resolution,
                            multiscale=inpainter.multiscale)
        except UserError as e:
            if len(jobs) == 1:
                raise
            failed.append(job.image)
            hooks.skipped(job, e)
            bar.images_done(1)
            item = None
        if item is None:
            pass
        elif isinstance(item, list):  # an empty mask: copied through
            written(item)
            bar.images_done(1)
        else:
            pending.append(item)
        if pending and (len(pending) == s.batch or i == len(jobs) - 1):
            names = ", ".join(p.job.image.name for p in pending)
            windows = [p for p in pending if isinstance(p.fit, list)]  # a call per window; the boxes share one
            calls = sum(len(p.fit) for p in windows) + (len(windows) < len(pending))
            with bar.sampling(f"{opts.method} {names}", expected * calls) as progress:
                records = _fill_and_write(inpainter, pending, opts, method, run.labels, hooks.notice, progress)
            written(records)
            bar.images_done(len(pending))
            pending = []
    return failed


def _prepare(job: Job, resolution: int, opts, notice: Callable[[str], None], full_resolution: bool = False,
             multiscale: bool = False):
    """Load and fit one input (fill.fit_input); an empty mask is copied through at once (its records are returned
    instead).

    `resolution`: the pixel side the image is fitted to (the network's resolution × the space's factor);
    `full_resolution`: the method works at any size (classical ones); `multiscale`: the backbone was trained on photo
    windows at every scale (what `--fit auto` chooses by: fit_hole).
    """
    from .data.images import load_image, load_mask, save_image
    from .fill import fit_input

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


def _fill_and_write(inpainter, items: list, opts, method, labels, notice: Callable[[str], None],
                    progress: Callable[[int], None] | None = None) -> list[dict]:
    """Fill prepared inputs (fill.fill_items) and write their outputs; one record per output."""
    from .data.images import save_image
    from .fill import fill_items

    records = []
    for f in fill_items(inpainter, items, opts, method, labels, progress):
        for k, path in enumerate(f.item.job.outputs):
            for w in save_image(path, f.pixels[k], f.item.img, protect=[f.item.job.mask]):
                notice(f"{path.name}: {w}")
            records.append(_record(path, f.item.job, opts, k, f.nfe, f.backward, f.seconds, f.how, f.space))
    return records


def _record(path: Path, job: Job, opts, k: int, nfe: int, backward: int, seconds: float, fit: str,
            space: str = "pixels") -> dict:
    return {"path": str(path), "input": str(job.image), "mask": str(job.mask), "seed": opts.seed + k,
            "method": opts.method, "method_default": opts.method_default, "params": dict(opts.params),
            "steps": opts.steps, "nfe": nfe, "backward": backward, "dilate": opts.dilate, "feather": opts.feather,
            "seconds": round(seconds, 4), "fit": fit, "space": space, "class": opts.class_label}


__all__ = ["InpaintHooks", "InpaintRun", "InpaintSettings", "Job", "check_outputs", "default_output",
           "inpaint_files", "plan_jobs", "plan_outputs", "release_jobs"]
