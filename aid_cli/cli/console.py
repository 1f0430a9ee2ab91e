"""What every command shares: the stderr console (no terminal control characters from a message), the usage
line, help texts, the download bar, and small option parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import UserError


def visible(text: str) -> str:
    """`text` with terminal control characters (escape sequences from a hostile file name, carriage returns, newlines,
    ...) shown as \\xNN instead of acting on the terminal; only tabs are kept. A message is one line: a file name
    holding a newline cannot start a forged `error: …` line of its own (a multi-line message is printed line by line,
    or as a rich object)."""
    return "".join(c if c == "\t" or (ord(c) >= 32 and not 0x7F <= ord(c) < 0xA0) else f"\\x{ord(c):02x}"
                   for c in text)

class SafeConsole(Console):
    """rich's Console that never sends a control character from a message to the terminal."""

    def print(self, *objects, **kwargs):
        return super().print(*(visible(o) if isinstance(o, str) else o for o in objects), **kwargs)

err = SafeConsole(stderr=True, highlight=False, soft_wrap=True)  # never hard-wrap: one message, one line (for grep, logs)

class Command(typer.core.TyperCommand):
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

CACHE_HELP = "Model cache folder (default: $AID_CACHE/models or ~/.cache/aid/models; hub files: the HF cache)."

OFFLINE_HELP = "Never download: a model not in the cache fails at once (also: HF_HUB_OFFLINE=1)."

THREADS_HELP = ("CPU threads for torch (default: the CPUs this process may use less those other processes keep busy "
                "when it starts, at least 1; AID_THREADS=N or OMP_NUM_THREADS=N set it for every command).")

TRAIN_PRECISION_HELP = ("Autocast of the forward passes (auto: bf16 on a CUDA GPU that has it, else fp32; "
                        "weights, optimizer and loss stay float32; fp16 is not offered for training).")

class DownloadBar:
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

def log(message: str) -> None:
    err.print(escape(message), soft_wrap=True)

def model_file(model: Optional[str], cache: Optional[Path], offline: bool) -> Optional[Path]:
    """`--model` as a checkpoint file: a path as given, a name fetched into the cache; None (the default) stays None."""
    if model is None:
        return None
    from ..models.catalogue import resolve_backbone

    with DownloadBar() as bar:
        return resolve_backbone(model, cache=cache, offline=True if offline else None, progress=bar, log=log)

def run_folder(out: Optional[Path], resume: bool, kind: str, dataset) -> Path:
    """--out as given, or a new numbered run folder (EDM's convention) when it is left out."""
    from ..fileio import numbered_run_dir, run_description

    if out is not None:
        return out
    if resume:
        raise UserError("--resume needs --out RUN_FOLDER: the run to continue")
    return numbered_run_dir(run_description(kind, dataset))

def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of integers, got {text!r}") from None

def wide(console: Console) -> Console:
    """A terminal console as is; for logs and pipes (80 columns by default) a wider one, so tables do not wrap."""
    return console if console.is_terminal else Console(stderr=True, highlight=False, width=160)
