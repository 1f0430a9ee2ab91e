"""Where backbones come from. For now: the embedded default in `weights/`, or a `.safetensors` path (`--model PATH`).

The embedded default is a small EDM backbone trained by `aid pretrain` on 64×64 cat faces; see weights/README.md.
`AID_WEIGHTS_DIR` overrides the folder (for installs that keep weights elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

EMBEDDED_BACKBONE = "aid-cats64-edm.safetensors"


def weights_dir() -> Path:
    return Path(os.environ.get("AID_WEIGHTS_DIR") or Path(__file__).resolve().parents[1] / "weights")


def cache_dir() -> Path:
    """aid's own cache (reference statistics, converted weights): $AID_CACHE, else $XDG_CACHE_HOME/aid, else ~/.cache/aid."""
    if os.environ.get("AID_CACHE"):
        return Path(os.environ["AID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aid"


def resolve_backbone(model: str | os.PathLike | None) -> Path:
    """The checkpoint file for `--model` (a path), or the embedded default when none is given."""
    if model is None:
        path = weights_dir() / EMBEDDED_BACKBONE
        if not path.is_file():
            raise CheckpointError(f"the embedded default backbone is missing ({path}); reinstall aid from its "
                                  f"repository or pass --model PATH.safetensors")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a folder, not a file: {path}")
    return path
