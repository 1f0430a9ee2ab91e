"""`aid inpaint`: options → the library's inpaint_files (jobs.py) → `wrote` lines and JSON records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..models.catalogue import default_backbone
from . import options
from .console import DownloadBar, err


def _knows(entry) -> str:
    """What a catalogue backbone was trained on, as `-h` and the `wrote` line say it."""
    return f"{entry.name} knows {entry.knows}" if entry is not None and entry.knows else ""


def inpaint(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="Image files or folders of images; several in one "
                                        "call pay the start-up (~2 s) once."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask file (white = fill) for every image, or a folder of masks "
                              "paired by stem."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (PNG keeps visible pixels exact), "
                                          "or a folder (for several images or folders: created). Default: beside each "
                                          "image as STEM-filled.png (a folder's in FOLDER-filled/). Nothing is ever "
                                          "replaced: an output of -o that exists is refused before any work, unless "
                                          "--overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace -o's outputs that exist."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: a .safetensors file or a model name (`aid "
                                        f"models list`; downloaded on first use); default: {default_backbone().name}, "
                                        f"which knows {default_backbone().knows or default_backbone().description} "
                                        "only."),
    method: Optional[str] = typer.Option(None, "--method", help="Inpainting method or operating point (aid-18, "
                                         "aid-12; aid-18:NAME with the guidance module NAME; see `aid methods`). "
                                         "Default: aid where a guidance module for the backbone is at hand (the "
                                         "embedded backbone ships one, or --guidance), else repaint, the best "
                                         "training-free method in the benchmark; the `wrote` line says which."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, show_default=False,
                                        help="EDM grid steps N; NFE = 2N-1 (default 18: 35 NFE; 12: 23 NFE). "
                                             "aid-18 and aid-12 fix their own; a different --steps is refused."),
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
    guidance: Optional[Path] = typer.Option(None, "--guidance", help="AID's guidance module, a file or a name (default: "
                                            "the one shipped for the backbone; implies --method aid)."),
    churn: Optional[float] = options.churn(),
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
      [bold]aid inpaint photo.png --mask mask.png --method aid-12[/]   (23 NFE)
      [bold]aid inpaint *.png --mask masks/ -o filled/[/]            (one start-up for many images)
      [bold]aid inpaint photos/ --mask masks/ -o filled/ --samples 4 --json[/]
      [bold]aid inpaint dog.png --mask hole.png -o out.png --model img512-xs.safetensors --class 207[/]
      [bold]aid inpaint face.png --mask mask.png -o filled.png --model edm-ffhq-64 --device cuda --precision fp16[/]
    """
    from ..jobs import InpaintHooks, InpaintSettings, inpaint_files

    settings = InpaintSettings(
        model=model, method=method, steps=steps, guidance=guidance, churn=churn, seed=seed, samples=samples, batch=batch,
        device=device, precision=options.value(precision), compile=compile_net, fit=options.value(fit),
        invert_mask=invert_mask, resize_mask=resize_mask, dilate=dilate, feather=feather, class_label=class_label,
        vae=vae, offline=offline, cache=cache_dir, overwrite=overwrite, threads=threads)
    bar = InpaintBar(err, show=err.is_terminal and not quiet)
    state = {"run": None, "written": []}

    def ready(run) -> None:
        state["run"] = run
        if run.method.tuned and not quiet:
            err.print(f"{run.method.name}: this backbone's tuned params {escape(json.dumps(run.method.tuned))} "
                      f"(aid bench --tune)")
        bar.start(len(run.jobs))

    def written(records: list[dict]) -> None:
        run = state["run"]
        why, knows = run.method.why, _knows(run.model)
        for rec in records:
            state["written"].append(rec["path"])
            where = f"; {rec['space']}" if run.inpainter.space.latent and rec["space"] != "pixels" else ""
            if not quiet:
                err.print(f"wrote {escape(rec['path'])} ({rec['method']}{escape(why + ';' if why else ',')} "
                          f"{rec['nfe']} NFE, seed {rec['seed']}, {rec['seconds']:.2f} s; "
                          f"{escape(rec['fit'] + where)}{escape('; ' + knows if knows else '')})", soft_wrap=True)
            if json_out:
                print(json.dumps(rec), flush=True)

    def skipped(job, e) -> None:  # a batch job goes on: one line per bad file, a count, exit 2 at the end
        err.print(f"[bold red]skipped[/] {escape(job.image.name)}: {escape(str(e))}", soft_wrap=True)
        if json_out:
            print(json.dumps({"image": str(job.image), "mask": str(job.mask), "error": str(e)}), flush=True)

    hooks = InpaintHooks(notice=lambda m: err.print(escape(m), soft_wrap=True), ready=ready, written=written, skipped=skipped, bar=bar)
    try:
        with DownloadBar() as download:
            hooks.download = download
            inpaint_files(images, mask, output, settings, hooks)
    except KeyboardInterrupt:
        bar.close()
        run, done = state["run"], state["written"]
        total = sum(len(job.outputs) for job in run.jobs) if run is not None else None
        if not done:
            err.print("interrupted: nothing was written")
        else:
            err.print(f"interrupted: {len(done)} of {total} outputs written (the last: {escape(done[-1])}); the other "
                      f"{total - len(done)} were not, and no partial file is left", soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        bar.close()


class InpaintBar:
    """`aid inpaint`'s progress on a terminal: the network evaluations of the sampler call under way (NFE done / total,
    per image) and, for several images, the images done. Nothing at all on a pipe or a log file, or with --quiet.
    It starts once the model is loaded (`start`), so that it never overlaps a download's bar."""

    def __init__(self, console: Console, show: bool):
        self.console, self.show, self.bar = console, show, None

    def start(self, images: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        # redirect_stdout=False: on a terminal, Progress would otherwise route print() through `console`, sending the
        # --json records to stderr instead of stdout
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, transient=True, disable=not self.show, redirect_stdout=False)
        self.images = self.bar.add_task("images", total=images, unit="images", visible=images > 1)
        self.nfe = self.bar.add_task("", total=1, unit="NFE", visible=False)
        self.bar.start()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

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
