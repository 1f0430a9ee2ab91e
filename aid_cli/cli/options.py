"""Options that several commands share, declared once: `device: str = options.device()` in a command's signature.

Choices are enums so that `--help` lists them and click refuses anything else with its own one-line error; a command
turns them back into plain strings (`.value`) at its boundary, so the library never sees an enum."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .console import CACHE_HELP, OFFLINE_HELP, THREADS_HELP, TRAIN_PRECISION_HELP


class Precision(str, Enum):
    """Inference precision of the backbone."""
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class TrainPrecision(str, Enum):
    """Autocast of training's forward passes (fp16 is not offered for training)."""
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Fit(str, Enum):
    """How a hole reaches the backbone (data/images.py)."""
    auto = "auto"
    crop = "crop"
    resize = "resize"
    native = "native"


def value(choice) -> Optional[str]:
    """An enum choice as the plain string the library takes (None stays None, a string stays itself)."""
    return choice.value if isinstance(choice, Enum) else choice


DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (auto: cuda, then mps, then cpu)."

FIT_HELP = ("auto: chosen per hole by what the backbone was trained on (a photo backbone: native for thin strokes "
            "spread wide, crop for the rest; other backbones: crop); crop: a box around the mask (at native scale "
            "when it is small); resize: the whole image; native: windows at the model's own scale along the mask, "
            "filled one after another (long thin strokes on large photos).")


def device(panel: Optional[str] = None):
    return typer.Option("auto", "--device", help=DEVICE_HELP, rich_help_panel=panel)


def precision(extra: str = ""):
    return typer.Option(Precision.auto, "--precision", case_sensitive=False,
                        help="Backbone precision (auto: as the checkpoint says; fp16 needs a GPU)." + extra)


def train_precision(extra: str = "", panel: Optional[str] = None):
    return typer.Option(TrainPrecision.auto, "--precision", case_sensitive=False, help=TRAIN_PRECISION_HELP + extra,
                        rich_help_panel=panel)


def fit(help: str = FIT_HELP):
    return typer.Option(Fit.auto, "--fit", case_sensitive=False, help=help)


def threads(panel: Optional[str] = None):
    return typer.Option(None, "--threads", min=1, help=THREADS_HELP, rich_help_panel=panel)


def churn(help: str = "EDM's churn S_churn on AID's solve (0: the deterministic ODE; > 0: fresh noise before each "
                       "step, reproducible per --seed). Default: what the guidance module was trained with (0 unless "
                       "`aid train --churn`).", panel: Optional[str] = None):
    return typer.Option(None, "--churn", min=0.0, metavar="S", show_default=False, help=help, rich_help_panel=panel)


def offline(help: str = OFFLINE_HELP):
    return typer.Option(False, "--offline", help=help)


def cache_dir() -> Optional[Path]:
    return typer.Option(None, "--cache-dir", help=CACHE_HELP)


def compile_net(help: str = "torch.compile the backbone (pays off on a GPU, for many images; falls back with a "
                            "notice where it cannot compile).", panel: Optional[str] = None):
    return typer.Option(False, "--compile", help=help, rich_help_panel=panel)


def _flags_take_no_value() -> None:
    """Typer's rich help writes a flag's type (`<bool>`) beside it, as if it took a value (its plain help does not):
    a flag shows no type."""
    option = typer.core.TyperOption
    shown = getattr(option, "display_type_rich", None)  # (a Typer before 0.29 has none, and shows no type)
    if shown is None or getattr(shown, "aid_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich.aid_flags = True
    option.display_type_rich = display_type_rich


_flags_take_no_value()
