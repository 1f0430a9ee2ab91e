"""The `aid` command line: parse, call, print. Rich output goes to stderr; `--json` records go to stdout.

One module per command group, each command a function that only parses its options, calls the library and prints
(console.py holds what they share). This file is the app: which commands exist, in the order `aid --help` lists them,
and `main`, the console entry point (`aid = aid_cli.cli:main`; `python -m aid_cli.cli` runs it too, as torchrun does).
"""

from __future__ import annotations

import sys
from typing import List

import typer
from rich.markup import escape

from ..errors import UserError
from . import about, bench, guidance, inpaint, metrics, models, serve, train
from .console import Command, err

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


# The commands, in the order `aid --help` lists them.
app.command()(train.pretrain)
models_app.command("convert", cls=Command)(models.models_convert)
models_app.command("list")(models.models_list)
models_app.command("info", cls=Command)(models.models_info)
models_app.command("download", cls=Command)(models.models_download)
models_app.command("rm", cls=Command)(models.models_rm)
app.command("env")(about.env_cmd)
app.command(cls=Command)(inpaint.inpaint)
app.command()(serve.serve)
models_app.command("eval")(models.models_eval)
app.command("metrics", cls=Command)(metrics.metrics_cmd)
app.command()(bench.bench)
app.command()(train.train)
guidance.register(app)
app.command()(about.methods)


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
            from ..threads import configure_environment

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
        from ..fileio import disk_full

        if disk_full(e):  # an append (a log) or a library's own write: one line, the files written so far are whole
            err.print(f"[bold red]error:[/] no space left on the device ({escape(str(e).splitlines()[0][:200])}); "
                      f"free some space and run again (training runs continue with --resume)", soft_wrap=True)
            sys.exit(2)
        raise


__all__ = ["app", "main"]
