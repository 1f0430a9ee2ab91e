"""Where backbones come from. For now: the embedded default in `weights/`, or a `.safetensors` path (`--model PATH`).

The embedded default is a small EDM backbone trained by `aid pretrain` on 64×64 cat faces; see weights/README.md.
`AID_WEIGHTS_DIR` overrides the folder (for installs that keep weights elsewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

EMBEDDED_BACKBONE = "aid-cats64-edm.safetensors"
EMBEDDED_GUIDANCE = "aid-cats64-guidance.safetensors"


def weights_dir() -> Path:
    return Path(os.environ.get("AID_WEIGHTS_DIR") or Path(__file__).resolve().parents[1] / "weights")


def cache_dir() -> Path:
    """aid's own cache (reference statistics, converted weights): $AID_CACHE, else $XDG_CACHE_HOME/aid, else ~/.cache/aid."""
    if os.environ.get("AID_CACHE"):
        return Path(os.environ["AID_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aid"


def _resolve(given, embedded: str, what: str, missing_embedded: str) -> Path:
    """A checkpoint path as given, or the embedded file `embedded` in weights/ when none is given."""
    if given is None:
        path = weights_dir() / embedded
        if not path.is_file():
            raise CheckpointError(f"{missing_embedded} ({path})")
        return path
    path = Path(given).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} is a folder, not a file: {path}")
    return path


def resolve_backbone(model: str | os.PathLike | None) -> Path:
    """The checkpoint file for `--model` (a path), or the embedded default when none is given."""
    return _resolve(model, EMBEDDED_BACKBONE, "checkpoint", "the embedded default backbone is missing; reinstall aid "
                    "from its repository or pass --model PATH.safetensors")
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a folder, not a file: {path}")
    return path


def resolve_guidance(guidance: str | os.PathLike | None) -> Path:
    """The guidance module for `--guidance` (a path), or the embedded default's when none is given."""
    return _resolve(guidance, EMBEDDED_GUIDANCE, "guidance module", "no guidance module for the embedded backbone is "
                    "installed; train one with `aid train` and pass --guidance PATH")
    path = Path(guidance).expanduser()
    if not path.is_file():
        raise CheckpointError(f"guidance module not found: {path}")
    return path


# --------------------------------------------------------------------------------------------- tuned baseline params
#
# `aid bench --tune METHOD` picks a baseline's step size for one backbone and records it beside the checkpoint, in
# `<checkpoint stem>.tuned.json`, or, when that folder is not writable, in aid's cache as `tuned/<sha256>.json`:
#   {"backbone_sha256": "…", "methods": {"dps": {"params": {"zeta": 0.16}, "grid": […], "scores": […], …}, …}}
# `aid inpaint` and `aid bench` take those params as the method's defaults for that backbone. A record whose
# backbone_sha256 is not the checkpoint's is refused (one notice; the method's own defaults apply).

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
    import json

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
    from .backbones.checkpoint import sha256_file

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
    import json

    from .fileio import atomic_write_text

    sidecar = tuned_sidecar(checkpoint)
    folder = sidecar.resolve().parent
    writable = os.access(folder, os.W_OK | os.X_OK) and (not sidecar.exists() or os.access(sidecar, os.W_OK))
    path = sidecar if writable else tuned_cache_file(sha256)
    record = {"backbone_sha256": sha256, "backbone": str(Path(checkpoint).resolve()), "methods": {}}
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


# ------------------------------------------------------------------------------------------------------ dataset names
# `aid train --dataset NAME`: a name resolves to a local copy; none of these can be downloaded by aid itself (licences
# and sizes differ), so a name that is not found locally fails at once with what to fetch and where to put it.

DATASETS = {
    "cats": ("cats64/train.zip", "the 64x64 cat faces (EDM zip layout); set AID_DATA to the folder holding cats64/"),
    "ffhq": ("ffhq-64x64.zip", "FFHQ at 64x64: build it with NVlabs/edm dataset_tool.py from the FFHQ images "
             "(github.com/NVlabs/ffhq-dataset)"),
    "afhqv2": ("afhqv2-64x64.zip", "AFHQv2 at 64x64: build it with NVlabs/edm dataset_tool.py from AFHQv2 "
               "(github.com/clovaai/stargan-v2)"),
    "imagenet": ("imagenet-512x512.zip", "ImageNet at 512x512: build it with NVlabs/edm2 dataset_tool.py from the "
                 "ILSVRC2012 training set (image-net.org)"),
}


def data_dir() -> Path:
    """Where named datasets are looked for: $AID_DATA, else aid's cache folder's data/."""
    return Path(os.environ["AID_DATA"]) if os.environ.get("AID_DATA") else cache_dir() / "data"


def resolve_dataset(name_or_path: str) -> Path:
    """A folder or zip path as given, or a dataset name resolved under `data_dir()`; fails at once, in one line."""
    from .errors import UserError

    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in DATASETS:
        relative, howto = DATASETS[name_or_path]
        candidate = data_dir() / relative
        if candidate.exists():
            return candidate
        raise UserError(f"dataset {name_or_path!r} is not available offline: expected {candidate} ({howto}); or pass "
                        f"--dataset PATH to a folder or EDM zip")
    raise UserError(f"dataset not found: {name_or_path} (a folder, an EDM zip, or one of {', '.join(DATASETS)})")
