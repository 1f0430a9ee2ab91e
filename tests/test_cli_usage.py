"""Usage errors through the installed `aid` entry point, the way a user meets them: no arguments, a misspelt option, a
value out of range, a missing required option or an unknown command print the usage message and exit 2, never a
traceback; `--version`, `-h` and `--help` work at every level.

These run the console script that pip installed (beside the interpreter running the tests) in a subprocess, so that a
change inside a dependency (Typer >= 0.29 carries its own copy of click) cannot hide a traceback behind an in-process
runner again. None of them imports torch: each call takes a fraction of a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli

ENTRY_POINT = Path(sys.executable).parent / ("aid.exe" if os.name == "nt" else "aid")


def aid(*args, **env) -> subprocess.CompletedProcess:
    if not ENTRY_POINT.exists():
        pytest.skip(f"no installed entry point at {ENTRY_POINT} (pip install -e . first)")
    environ = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1", **env)
    return subprocess.run([str(ENTRY_POINT), *map(str, args)], capture_output=True, text=True, env=environ,
                          timeout=120)


def assert_usage_error(result: subprocess.CompletedProcess, usage: str, *phrases: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert f"Usage: {usage}" in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr}"
    assert result.stdout == ""


USAGE_ERRORS = {
    "misspelt option": (["inpaint", "photo.png", "--stepz", "3"], "aid inpaint [OPTIONS] IMAGE", "No such option: --stepz"),
    "--steps 1": (["inpaint", "photo.png", "--mask", "m.png", "--steps", "1"], "aid inpaint", "--steps"),
    "--steps not a number": (["inpaint", "photo.png", "--mask", "m.png", "--steps", "many"], "aid inpaint", "--steps"),
    "inpaint without --mask": (["inpaint", "photo.png"], "aid inpaint", "Missing option '--mask'"),
    "inpaint without an image": (["inpaint", "--mask", "m.png"], "aid inpaint", "Missing argument 'IMAGE'"),
    "bench with a misspelt option": (["bench", "--methodz", "repaint,dps,aid"], "aid bench",
                                     "No such option: --methodz"),
    "train without --dataset": (["train"], "aid train", "Missing option '--dataset'"),
    "unknown command": (["inpant"], "aid [OPTIONS] COMMAND", "No such command 'inpant'"),
    "unknown models command": (["models", "lst"], "aid models", "No such command 'lst'"),
    "unknown top-level option": (["--verbose"], "aid [OPTIONS] COMMAND", "No such option: --verbose"),
    "metrics with one image": (["metrics", "a.png"], "aid metrics [OPTIONS] REF IMG", "Missing argument 'IMG'"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_print_usage_and_exit_2(case):
    args, usage, phrase = USAGE_ERRORS[case]
    assert_usage_error(aid(*args), usage, phrase)


@pytest.mark.parametrize("args", [[], ["models"]])
def test_no_command_prints_help_and_exits_2(args):
    result = aid(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Usage: aid" in result.stdout and "Commands" in result.stdout


def test_version():
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        result = aid(flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"aid {version('aid-inpaint')}"
        assert result.stderr == ""


@pytest.mark.parametrize("args, usage", [
    ([], "aid [OPTIONS] COMMAND [ARGS]..."),
    (["inpaint"], "aid inpaint [OPTIONS] IMAGE"),
    (["models", "convert"], "aid models convert [OPTIONS] SRC [DST]"),
    (["models", "download"], "aid models download [OPTIONS] NAME..."),
    (["metrics"], "aid metrics [OPTIONS] REF IMG"),
    (["bench"], "aid bench [OPTIONS]"),
])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_at_every_level(args, usage, flag):
    result = aid(*args, flag)
    assert result.returncode == 0, result.stderr
    assert f"Usage: {usage}" in result.stdout  # arguments named IMAGE, [DST], NAME..., not {image}
    assert "{" not in result.stdout.splitlines()[1]


def test_help_keeps_square_brackets_of_pip_extras():
    """Rich markup must not swallow the `[latent]` of `pip install "aid-inpaint[latent]"`."""
    result = aid("inpaint", "--help")
    assert '"aid-inpaint[latent]"' in result.stdout


def test_methods_cite_nothing_outside_the_package():
    result = aid("methods")
    assert result.returncode == 0, result.stderr
    assert "method.md" not in result.stdout and "aid " in result.stdout


def test_user_error_is_one_line_and_exit_2():
    result = aid("inpaint", "no-such-photo.png", "--mask", "no-such-mask.png", "-o", "out.png")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: image path not found: no-such-photo.png"]


@pytest.mark.parametrize("case", ["misspelt option", "--steps 1", "bench with a misspelt option", "unknown command"])
def test_usage_errors_in_process_too(case, capsys):
    """`aid_cli.cli.main(argv)` (what the entry point calls) gives the same exit code to an in-process caller."""
    args, _, phrase = USAGE_ERRORS[case]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err and "Usage:" in err


def test_main_returns_on_success_in_process(capsys):
    """Scripts and tests call `main(argv)` in a row: success returns (no SystemExit(0))."""
    from aid_cli import cli

    assert cli.main(["--version"]) is None
    assert capsys.readouterr().out.startswith("aid ")
