"""Where aid keeps and finds things: the shipped weights, its cache, the Hugging Face hub cache, named datasets; and
whether downloads are allowed (`offline_mode`, the one place that reads HF_HUB_OFFLINE). A leaf: every layer may ask
it for a path.

`AID_WEIGHTS_DIR` overrides the shipped weights' folder (for installs that keep weights elsewhere); `AID_CACHE` (else
`$XDG_CACHE_HOME/aid`, else `~/.cache/aid`) is aid's own cache: models, reference statistics, LPIPS weights, tuned
parameters. `AID_MODEL_MIRROR` (a base URL) fetches every catalogue file served by a plain URL from
`$AID_MODEL_MIRROR/<file>` instead (a local mirror, a test server).
"""

from __future__ import annotations

import os
from pathlib import Path


def weights_dir() -> Path:
    return Path(os.environ.get("AID_WEIGHTS_DIR") or Path(__file__).resolve().parents[1] / "weights")


def cache_dir() -> Path:
    """aid's own cache (models, reference statistics, tuned params): $AID_CACHE, else $XDG_CACHE_HOME/aid, else
    ~/.cache/aid."""
    if os.environ.get("AID_CACHE"):
        return Path(os.environ["AID_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "aid"


def models_dir(cache: str | os.PathLike | None = None) -> Path:
    """Downloaded and converted models: `--cache-dir`, else `cache_dir()/models`."""
    return Path(cache).expanduser() if cache else cache_dir() / "models"


def hub_cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Hugging Face hub files: `--cache-dir`/hub, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (read now, not when huggingface_hub was imported)."""
    if cache:
        return Path(cache).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def data_dir() -> Path:
    """Where named datasets are looked for: $AID_DATA, else aid's cache folder's data/."""
    return Path(os.environ["AID_DATA"]) if os.environ.get("AID_DATA") else cache_dir() / "data"


def model_mirror() -> str | None:
    """$AID_MODEL_MIRROR without a trailing slash: the base URL that replaces every catalogue URL's folder; None unset."""
    base = os.environ.get("AID_MODEL_MIRROR", "").strip()
    return base.rstrip("/") or None


OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # HF_HUB_OFFLINE as huggingface_hub reads it


def offline_mode(offline: bool | None = None, hub_library: bool = False) -> bool:
    """`--offline` when given, else HF_HUB_OFFLINE (1, ON, YES, TRUE). `hub_library`: also the hub library's own flag,
    which it read when it was imported (for the downloads it makes itself, as the VAE's)."""
    if offline is not None:
        return bool(offline)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in OFFLINE_VALUES:
        return True
    if hub_library:
        import huggingface_hub.constants as hf

        return bool(hf.HF_HUB_OFFLINE)
    return False


def offline_reason(offline: bool | None) -> str:
    """What turned downloads off, for a message."""
    return "--offline" if offline else f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}"
