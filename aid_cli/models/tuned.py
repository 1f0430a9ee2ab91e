"""Tuned baseline parameters, per backbone (resolve.py takes them as a method's defaults).

`aid bench --tune METHOD` picks a baseline's step size for one backbone and records it beside the checkpoint, in
`<checkpoint stem>.tuned.json`, or, when that folder is not writable, in aid's cache as `tuned/<sha256>.json`:
  {"backbone_sha256": "…", "methods": {"dps": {"params": {"zeta": 0.16}, "grid": […], "scores": […], …}, …}}
`aid inpaint` and `aid bench` take those params as the method's defaults for that backbone. A record whose
backbone_sha256 is not the checkpoint's is refused (one notice; the method's own defaults apply).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..paths import cache_dir

TUNED_SUFFIX = ".tuned.json"


def tuned_sidecar(checkpoint: str | os.PathLike) -> Path:
    """`<folder>/<stem>.tuned.json` beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(path.stem + TUNED_SUFFIX)


def tuned_cache_file(sha256: str) -> Path:
    """The cache's record for a backbone (used when the checkpoint's folder is not writable)."""
    return cache_dir() / "tuned" / f"{sha256}.json"


def _cached_records_exist() -> bool:
    folder = cache_dir() / "tuned"
    return folder.is_dir() and any(folder.glob("*.json"))


def _read_record(path: Path, sha256: str, notice) -> dict:
    """The methods of one record file, or {} (with a notice) when it is unreadable or for another backbone."""
    try:
        record = json.loads(path.read_text())
        methods = record["methods"]
        if not isinstance(methods, dict):
            raise TypeError("methods is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if notice:
            notice(f"ignoring the tuned-parameter record {path}: unreadable ({type(e).__name__}: {e})")
        return {}
    if record.get("backbone_sha256") != sha256:
        if notice:
            notice(f"ignoring the tuned-parameter record {path}: it was tuned for backbone sha256 "
                   f"{str(record.get('backbone_sha256'))[:16]}…, this checkpoint is {sha256[:16]}…; using the "
                   f"methods' defaults")
        return {}
    return {k: dict(v, record=str(path)) for k, v in methods.items() if isinstance(v, dict)}


def tuned_entries(checkpoint: str | os.PathLike, sha256: str | None = None, notice=None) -> dict[str, dict]:
    """Every tuned entry that applies to this checkpoint, by method name ({} when none).

    The checkpoint is hashed only when a record might exist. Sidecar entries win over cached ones.
    """
    from ..fileio import sha256_file

    sidecar = tuned_sidecar(checkpoint)
    if not sidecar.is_file() and not _cached_records_exist():
        return {}
    sha256 = sha256 or sha256_file(checkpoint)
    entries: dict[str, dict] = {}
    cached = tuned_cache_file(sha256)
    if cached.is_file():
        entries.update(_read_record(cached, sha256, notice))
    if sidecar.is_file():
        entries.update(_read_record(sidecar, sha256, notice))
    return entries


def tuned_params(checkpoint: str | os.PathLike, method: str, sha256: str | None = None, notice=None) -> dict:
    """The tuned params of `method` for this checkpoint, {} when it was never tuned (the method's defaults apply)."""
    entry = tuned_entries(checkpoint, sha256, notice).get(method)
    params = entry.get("params") if entry else None
    return dict(params) if isinstance(params, dict) else {}


def write_tuned(checkpoint: str | os.PathLike, method: str, entry: dict, sha256: str) -> Path:
    """Merge `entry` as `methods[method]` into the checkpoint's record, atomically; returns the file written.

    The sidecar beside the checkpoint when its folder is writable, else the cache's `tuned/<sha256>.json`. Entries of
    other methods are kept; a record for another backbone is replaced.
    """
    from ..fileio import atomic_write_text

    sidecar = tuned_sidecar(checkpoint)
    folder = sidecar.resolve().parent
    writable = os.access(folder, os.W_OK | os.X_OK) and (not sidecar.exists() or os.access(sidecar, os.W_OK))
    path = sidecar if writable else tuned_cache_file(sha256)
    record = {"backbone_sha256": sha256, "backbone": Path(checkpoint).name, "methods": {}}  # a name: no machine paths
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("backbone_sha256") == sha256 and isinstance(old.get("methods"), dict):
                record["methods"].update(old["methods"])
        except (OSError, ValueError, AttributeError):
            pass  # a damaged record is replaced
    record["methods"][method] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")
