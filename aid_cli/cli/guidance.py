"""`aid guidance validate` and `aid guidance average`: choose among trained guidance modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from . import options
from .console import Command, err, log, model_file, parse_ints


def validate(
    modules: List[Path] = typer.Argument(..., metavar="MODULE", help="Guidance modules (.safetensors) to score."),
    val: Path = typer.Option(..., "--val", help="Validation images (folder or EDM zip), as `aid train --val`."),
    val_offset: int = typer.Option(100, "--val-offset", min=0, help="Skip this many images (as aid train)."),
    val_n: int = typer.Option(64, "--val-n", min=1, help="Images scored (as aid train)."),
    val_mask_seed: Optional[int] = typer.Option(None, "--val-mask-seed", min=0,
                                                help="Validation's mask seed (default: aid train's; 0 for runs whose "
                                                     "config.json has no val_mask_seed)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone: a file or a model name; default: the "
                                                                    "embedded one."),
    steps: str = typer.Option("18,12", "--steps", help="Grid steps N, comma-separated."),
    by_family: bool = typer.Option(False, "--by-family", help="Also each mask family's own means (a third of the "
                                                              "images each)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON record per module on stdout."),
    device: str = options.device(),
    threads: Optional[int] = options.threads(),
):
    """Score guidance modules on [bold]aid train[/]'s validation: hole-PSNR, SSIM, LPIPS and hole texture at each N.

    A run's own validation images, masks and noise: a module reads the same as the val_* line its run logged.

    Example: [bold]aid guidance validate runs/a/modules/guidance-001300.safetensors --val val.zip --val-n 96[/]
    """
    from ..data.masks import FAMILIES
    from ..devices import resolve_device
    from ..guidance.selection import validate_modules
    from ..models.catalogue import resolve_backbone
    from ..threads import apply_threads

    apply_threads(threads)
    Ns = parse_ints(steps, "--steps")
    count, records = validate_modules(modules, val, resolve_backbone(model_file(backbone, None, False)), steps=Ns,
                               offset=val_offset, n=val_n, mask_seed=val_mask_seed, by_family=by_family,
                               device=resolve_device(device), log=log)
    nan = float("nan")
    cells = lambda rec, part: " | ".join(  # noqa: E731
        f"{rec[f'val_psnr_hole_{part}{N}']:.2f} {rec.get(f'val_ssim_{part}{N}', nan):.4f} "
        f"{rec.get(f'val_lpips_{part}{N}', nan):.4f} {rec.get(f'val_texture_ratio_{part}{N}', nan):.3f}" for N in Ns)
    err.print(f"{count} images of {escape(str(val))} from {val_offset}; "
              + " | ".join(f"N = {N}: PSNR-hole SSIM LPIPS texture" for N in Ns) + " (texture: the fills' over the "
              "truth's)")
    for rec in records:
        err.print(f"{escape(rec['module'])}: {cells(rec, '')}")
        if by_family:
            for fam in FAMILIES:
                err.print(f"  {fam:>8}: {cells(rec, fam + '_')}")
        if as_json:
            print(json.dumps(rec), flush=True)


def average(
    out: Path = typer.Argument(..., metavar="OUT", help="The averaged module (.safetensors) to write."),
    modules: List[Path] = typer.Argument(..., metavar="MODULE", help="Modules of one run (same backbone and actor)."),
):
    """Average the weights of guidance modules: the mean of neighbouring checkpoints keeps what they share.

    The output records its sources; score it with [bold]aid guidance validate[/] like any checkpoint.

    Example: [bold]aid guidance average mean.safetensors runs/a/modules/guidance-0012*.safetensors[/]
    """
    from ..fileio import sha256_file
    from ..guidance.selection import average_modules

    path = average_modules(out, modules)
    err.print(f"wrote {escape(str(path))}: the mean of {len(modules)} modules, sha256 {sha256_file(path)}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Guidance modules: score checkpoints on training's validation, average them.",
                        no_args_is_help=True)
    group.command("validate", cls=Command)(validate)
    group.command("average", cls=Command)(average)
    app.add_typer(group, name="guidance")
