"""`aid inpaint`: files and options → jobs → the Inpainter (inpainter.py, inpaint.py) → `wrote` lines and JSON records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserError
from . import options
from .console import err, log, model_file


def inpaint(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="Image files or folders of images; several in one "
                                        "call pay the start-up (~2 s) once."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask file (white = fill) for every image, or a folder of masks "
                              "paired by stem."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (PNG keeps visible pixels exact), "
                                          "or a folder (for several images or folders: created). Default: beside each "
                                          "image as STEM-filled.png (a folder's in FOLDER-filled/), never over an "
                                          "existing file."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: a .safetensors file or a model name (`aid "
                                        "models list`; downloaded on first use); default: the embedded one."),
    method: Optional[str] = typer.Option(None, "--method", help="Inpainting method (see `aid methods`). Default: aid "
                                         "where a guidance module for the backbone is at hand (the embedded backbone "
                                         "ships one, or --guidance), else repaint, the best training-free method in "
                                         "the benchmark; the `wrote` line says which."),
    steps: int = typer.Option(18, "--steps", min=2, help="EDM grid steps N; NFE = 2N-1 (18: 35 NFE, 12: 23 NFE)."),
    seed: int = typer.Option(0, "--seed", help="Seed of sample 0; sample k uses seed + k."),
    samples: int = typer.Option(1, "--samples", min=1, help="Completions per image (outputs get -0, -1, ... suffixes)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per sampler call (folders; results do not depend on it)."),
    device: str = options.device(),
    precision: options.Precision = options.precision(),
    compile_net: bool = options.compile_net(),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="Masks are white = keep (RePaint convention)."),
    resize_mask: bool = typer.Option(False, "--resize-mask", help="Scale a mask whose size differs from the image's."),
    dilate: int = typer.Option(0, "--dilate", min=0, metavar="N", help="Grow the hole by N pixels first (covers the "
                               "halo a loose selection leaves; those pixels are filled too)."),
    feather: int = typer.Option(0, "--feather", min=0, metavar="N", help="Blend the fill into the N pixels around the "
                                "hole, to soften hard seams (those pixels change; default 0: only hole pixels do)."),
    guidance: Optional[Path] = typer.Option(None, "--guidance", help="AID's guidance module (default: the one shipped "
                                            "for the backbone; implies --method aid)."),
    fit: options.Fit = options.fit(),
    class_label: Optional[int] = typer.Option(None, "--class", min=0,
                                              help="Class N for a class-conditional backbone (e.g. ImageNet)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse from the Hugging Face cache/hub."),
    offline: bool = options.offline(),
    cache_dir: Optional[Path] = options.cache_dir(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per output on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no `wrote` lines (warnings and "
                               "errors still show; --json records still print)."),
    threads: Optional[int] = options.threads(),
):
    """Fill the white region of MASK in each IMAGE; every other pixel of the output equals the input's.

    Latent backbones (EDM2 img512) inpaint at 512x512 pixels through the Stable Diffusion VAE (pip install
    "aid-inpaint\\[latent]"); the visible pixels are still pasted back exactly.

    Examples:
      [bold]aid inpaint photo.png --mask mask.png[/]                  (writes photo-filled.png)
      [bold]aid inpaint photo.png --mask mask.png -o filled.png --method dps[/]
      [bold]aid inpaint *.png --mask masks/ -o filled/[/]            (one start-up for many images)
      [bold]aid inpaint photos/ --mask masks/ -o filled/ --samples 4 --json[/]
      [bold]aid inpaint dog.png --mask hole.png -o out.png --model img512-xs.safetensors --class 207[/]
      [bold]aid inpaint face.png --mask mask.png -o filled.png --model edm-ffhq-64 --device cuda --precision fp16[/]
    """
    precision, fit = options.value(precision), options.value(fit)
    from ..devices import check_precision, resolve_device
    from ..inpaint import InpaintOptions, check_outputs, inpaint_jobs, plan_jobs, release_jobs
    from ..inpainter import Inpainter
    from ..methods.base import check_method_name
    from ..models.catalogue import resolve_backbone
    from ..resolve import inpaint_method
    from ..task import class_labels
    from ..threads import apply_threads

    if fit == "native" and feather:
        raise UserError("--feather does not combine with --fit native (its windows are filled at native scale)")
    apply_threads(threads)
    if method is not None:
        check_method_name(method)  # unknown names fail before any loading
    jobs, create = plan_jobs(images, mask, output, samples)
    try:
        dev = resolve_device(device)
        check_precision(precision, dev)
        checkpoint = resolve_backbone(model_file(model, cache_dir, offline))
        # --class is checked against the backbone before a latent backbone's VAE is fetched
        inpainter = Inpainter.load(checkpoint, dev, vae=vae, precision=precision, compile=compile_net, notice=log,
                                   check=lambda info: class_labels(class_label, info["label_dim"], 1))
        labels = class_labels(class_label, inpainter.info["label_dim"], 1)
        chosen = inpaint_method(method, steps, checkpoint, guidance, cache=cache_dir,
                                offline=True if offline else None, notice=lambda m: err.print(escape(m), soft_wrap=True))
        method, spec, params, why = chosen.name, chosen.spec, chosen.params, chosen.why
        if chosen.tuned and not quiet:
            err.print(f"{method}: this backbone's tuned params {escape(json.dumps(chosen.tuned))} (aid bench --tune)")
        check_outputs(jobs, create)
        for folder in create:
            folder.mkdir(exist_ok=True)  # only once everything that can fail has passed (a parallel job may beat us)
        opts = InpaintOptions(method=method, steps=steps, seed=seed, samples=samples, invert_mask=invert_mask,
                              resize_mask=resize_mask, fit=fit, params=params, class_label=class_label,
                              method_default=bool(why), dilate=dilate, feather=feather)
        def report(records: list[dict]) -> None:
            for rec in records:
                where = f"; {rec['space']}" if inpainter.space.latent and rec["space"] != "pixels" else ""
                if not quiet:
                    err.print(f"wrote {escape(rec['path'])} ({rec['method']}{escape(why + ';' if why else ',')} "
                              f"{rec['nfe']} NFE, seed {rec['seed']}, {rec['seconds']:.2f} s; "
                              f"{escape(rec['fit'] + where)})", soft_wrap=True)
                if json_out:
                    print(json.dumps(rec), flush=True)

        def skipped(job, e: UserError) -> None:  # a batch job goes on: one line per bad file, a count, exit 2 at the end
            err.print(f"[bold red]skipped[/] {escape(job.image.name)}: {escape(str(e))}", soft_wrap=True)
            if json_out:
                print(json.dumps({"image": str(job.image), "mask": str(job.mask), "error": str(e)}), flush=True)

        with InpaintBar(err, images=len(jobs), show=err.is_terminal and not quiet) as bar:
            failed = inpaint_jobs(inpainter, jobs, opts, spec, batch, lambda m: err.print(escape(m)), labels, report,
                                  skipped, bar)
        if failed:
            raise UserError(f"{len(failed)} of {len(jobs)} images could not be inpainted (each named above); the other "
                            f"{len(jobs) - len(failed)} were written")
    finally:
        release_jobs(jobs)  # default names claimed and never written (a failure, Ctrl-C) are given back


class InpaintBar:
    """`aid inpaint`'s progress on a terminal: the network evaluations of the sampler call under way (NFE done / total,
    per image) and, for several images, the images done. Nothing at all on a pipe or a log file, or with --quiet."""

    def __init__(self, console: Console, images: int, show: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        # redirect_stdout=False: on a terminal, Progress would otherwise route print() through `console`, sending the
        # --json records to stderr instead of stdout
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=True, disable=not show, redirect_stdout=False)
        self.images = self.bar.add_task("images", total=images, unit="images", visible=images > 1)
        self.nfe = self.bar.add_task("", total=1, unit="NFE", visible=False)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def images_done(self, n: int) -> None:
        self.bar.advance(self.images, n)

    def sampling(self, description: str, total: int):
        """A context whose value is the sampler's progress callback; the NFE row shows while it is open."""
        import contextlib

        bar, task, done = self.bar, self.nfe, [0]
        bar.reset(task, total=max(total, 1), description=escape(description[:60]), visible=total > 0)

        def progress(k: int) -> None:
            done[0] += k
            if done[0] > bar.tasks[task].total:  # an adaptive method's retries: the total was its minimum
                bar.update(task, total=done[0])
            bar.advance(task, k)

        @contextlib.contextmanager
        def context():
            try:
                yield progress
            finally:
                bar.update(task, visible=False)

        return context()
