"""The `aid` command line: parse, call, print. Rich output goes to stderr; `--json` records go to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="aid",
    help="Inpaint images with frozen diffusion backbones: AID (amortized guidance) and the training-free baselines.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)
models_app = typer.Typer(help="Backbone checkpoints: convert official pickles safely.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True, highlight=False)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


@app.command()
def pretrain(
    dataset: Path = typer.Option(..., "--dataset", help="Folder of images or EDM-layout zip."),
    out: Path = typer.Option(..., "--out", help="Run folder (created); holds checkpoints, stats.jsonl, sample grids."),
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
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's)."),
):
    """Train an EDM backbone (SongUNet DDPM++ + EDMPrecond) with the EDM loss.

    Example: [bold]aid pretrain --dataset ../shared/data/cats64/train.zip --out ~/aid-runs/cats64[/]
    """
    from .devices import resolve_device
    from .pretrain import PretrainConfig
    from .pretrain import pretrain as run_pretrain

    import torch

    if threads:
        torch.set_num_threads(threads)
    cfg = PretrainConfig(dataset=str(dataset), out=str(out), resolution=resolution, model_channels=width,
                         channel_mult=_parse_ints(channel_mult, "--channel-mult"), num_blocks=depth,
                         attn_resolutions=_parse_ints(attn, "--attn"), dropout=dropout, batch=batch, lr=lr,
                         lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                         duration_kimg=duration_kimg, snapshot_kimg=snapshot_kimg, checkpoint_minutes=checkpoint_minutes,
                         seed=seed)
    run = run_pretrain(cfg, resume=resume, device=resolve_device(device), log=err.print)
    err.print(f"done: {run}")


def main(argv: List[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors and aborts carry their own exit codes
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
