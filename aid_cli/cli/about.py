"""`aid env` (versions, devices, caches: for bug reports) and `aid methods`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from . import options


def env_cmd(
    cache_dir: Optional[Path] = options.cache_dir(),
    json_out: bool = typer.Option(False, "--json", help="Print everything as one JSON object."),
):
    """Versions, devices, caches and weights: paste this into a bug report."""
    from ..environment import environment, format_environment

    info = environment(cache_dir)
    print(json.dumps(info, indent=2) if json_out else format_environment(info))

def methods():
    """List the inpainting methods and AID's operating points: the names `aid inpaint --method` and `aid bench
    --methods` take."""
    from ..methods import METHODS
    from ..methods.base import OPERATING_POINTS

    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        doc = re.sub(r",? ?\(?method\.md §\d+\)?", "", doc)  # the project's notes, not shipped with the package
        print(f"{name:12s} {doc}")
    for name, (method, steps) in sorted(OPERATING_POINTS.items()):
        print(f"{name:12s} {method} at N = {steps} steps ({2 * steps - 1} NFE); {name}:NAME with the guidance module "
              f"NAME (`aid models list`; aid bench: or --guidance NAME=PATH)")
