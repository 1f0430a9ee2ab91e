"""Models by name: the embedded default, official NVIDIA checkpoints, guidance modules; where each comes from, its
licence, sha256 and size; `--model` and `--guidance` resolved to a file (models/cache.py fetches it).

`--model` takes a `.safetensors` path or a name (`aid models list`); without it, the embedded default in `weights/`
(a small EDM backbone trained by `aid pretrain` on 64×64 cat faces; weights/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, UserError
from .cache import cached_path, expected_hash, fetch_model
from .entry import ModelEntry
from ..paths import weights_dir

EMBEDDED_BACKBONE = "aid-cats64-edm.safetensors"
EMBEDDED_GUIDANCE = "aid-cats64-guidance.safetensors"

NVIDIA_LICENSE = "CC BY-NC-SA 4.0 (NVIDIA; non-commercial)"
EMBEDDED_LICENSE = "research use only (training images carry no licence; weights/README.md)"
EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"


def _edm(data: str, kind: str, arch: str) -> ModelEntry:
    file = f"edm-{data}-64x64-uncond-{kind}.pkl"
    pretty = {"ffhq": "FFHQ", "afhqv2": "AFHQv2"}[data]
    return ModelEntry(name=f"edm-{data}-64-{kind}", kind="backbone", resolution=64, license=NVIDIA_LICENSE,
                      description=f"EDM (Karras et al. 2022) {pretty} 64x64 unconditional, {kind.upper()} {arch}, EMA",
                      file=file, urls=(EDM_URL + file,), aliases=(f"edm-{data}-64",) if kind == "vp" else ())


def _edm2(name: str, file: str, resolution: int, what: str) -> ModelEntry:
    return ModelEntry(name=name, kind="backbone", resolution=resolution, license=NVIDIA_LICENSE,
                      description=f"EDM2 (Karras et al. 2024) ImageNet {resolution}x{resolution} class-conditional, "
                                  f"{what}", file=file, urls=(EDM2_URL + file,))


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(name="aid-cats64", kind="backbone", resolution=64, license=EMBEDDED_LICENSE,
               description="embedded default: EDM SongUNet DDPM++ (4.2 M parameters) trained by aid pretrain on 64x64 "
                           "cat faces", file=EMBEDDED_BACKBONE, embedded=True, knows="aligned 64x64 cat faces",
               sha256="b7fefd36232891fb810f66472ec4b519fe141b741838298ad242338cda18f44d", size=16813228),
    ModelEntry(name="aid-cats64-guidance", kind="guidance", resolution=64, license=EMBEDDED_LICENSE,
               description="AID guidance module for aid-cats64 (CPU-trained, backprop estimator at N = 18 and 12, an LPIPS term, the "
                           "denoised-input actor; weights/aid-cats64-guidance.md)",
               file=EMBEDDED_GUIDANCE, embedded=True, backbone="aid-cats64",
               sha256="0f5be661f69c64bda27ea3aaf8be24c9a2480aed45ff5591d9855d567f562d9e", size=146828),
    _edm("ffhq", "vp", "DDPM++"),
    _edm("ffhq", "ve", "NCSN++"),
    _edm("afhqv2", "vp", "DDPM++"),
    _edm("afhqv2", "ve", "NCSN++"),
    _edm2("edm2-img512-xs", "edm2-img512-xs-2147483-0.135.pkl", 512, "latent (SD VAE), XS, post-hoc EMA 0.135"),
    _edm2("edm2-img512-s", "edm2-img512-s-2147483-0.130.pkl", 512, "latent (SD VAE), S, post-hoc EMA 0.130"),
    _edm2("edm2-img512-m", "edm2-img512-m-2147483-0.100.pkl", 512, "latent (SD VAE), M, post-hoc EMA 0.100"),
    _edm2("edm2-img64-s", "edm2-img64-s-1073741-0.075.pkl", 64, "pixel space, S, post-hoc EMA 0.075"),
)


def lookup_model(name: str) -> ModelEntry | None:
    """The entry named `name` (or one of its aliases), None when there is none."""
    return next((m for m in MODELS if name == m.name or name in m.aliases), None)


def default_backbone() -> ModelEntry:
    """The entry of the backbone `--model` defaults to."""
    return next(m for m in MODELS if m.kind == "backbone" and m.file == EMBEDDED_BACKBONE)


def find_model(name: str) -> ModelEntry:
    """The entry named `name`, or a one-line UserError listing the names."""
    entry = lookup_model(name)
    if entry is None:
        close = _close_names(name)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model {name!r}: {hint}known: {', '.join(m.name for m in MODELS)}")
    return entry


def _close_names(name: str) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, [m.name for m in MODELS] + [a for m in MODELS for a in m.aliases], 1)


def _resolve(given, kind: str, embedded: str, missing_embedded: str, fetch: dict) -> Path:
    """A checkpoint path as given, a model name (fetched unless cached), or the embedded file when none is given."""
    what = "checkpoint" if kind == "backbone" else "guidance module"
    if given is None:
        path = weights_dir() / embedded
        if not path.is_file():
            raise CheckpointError(f"{missing_embedded} ({path})")
        return path
    path = Path(given).expanduser()
    if not path.exists() and (entry := lookup_model(str(given))) is not None:
        if entry.kind != kind:
            raise UserError(f"{entry.name} is a {entry.kind} model, not a {kind}")
        return fetch_model(entry, **fetch)
    if not path.exists():
        close = _close_names(str(given))
        hint = f" (nor a model name; did you mean {close[0]}? see `aid models list`)" if close else ""
        raise CheckpointError(f"{what} not found: {path}{hint}")
    if path.is_dir():
        raise CheckpointError(f"{what} is a folder, not a file: {path}")
    return path


def resolve_backbone(model: str | os.PathLike | None, **fetch) -> Path:
    """The checkpoint file for `--model` (a path or a model name), or the embedded default when none is given.

    A name not yet in the cache is downloaded (`fetch` goes to `fetch_model`: cache, offline, progress, log).
    """
    return _resolve(model, "backbone", EMBEDDED_BACKBONE, "the embedded default backbone is missing; reinstall aid "
                    "from its repository or pass --model PATH.safetensors", fetch)


def resolve_guidance(guidance: str | os.PathLike | None, **fetch) -> Path:
    """The guidance module for `--guidance` (a path or a model name), or the embedded default's when none is given."""
    return _resolve(guidance, "guidance", EMBEDDED_GUIDANCE, "no guidance module for the embedded backbone is "
                    "installed; train one with `aid train` and pass --guidance PATH", fetch)


def guidance_at_hand(checkpoint: str | os.PathLike, cache=None) -> tuple[str, Path] | None:
    """(name, file) of a guidance module on disk for this backbone file, else None; nothing is downloaded or hashed.

    "On disk": the module shipped in weights/, or one in the cache, whose catalogue entry names as its backbone the model
    this checkpoint file is (the embedded one, or a cached download). `aid inpaint` defaults to --method aid then.
    """
    try:
        target = Path(checkpoint).resolve()
    except OSError:
        return None
    for entry in MODELS:
        if entry.kind != "guidance" or entry.backbone is None:
            continue
        backbone = lookup_model(entry.backbone)
        if backbone is None:
            continue
        backbone_file, module = cached_path(backbone, cache), cached_path(entry, cache)
        if backbone_file is not None and module is not None and backbone_file.resolve() == target:
            return entry.name, module
    return None


def describe_model(entry: ModelEntry, cache=None) -> dict:
    """The JSON record of `aid models list --json` and `aid models info --json`."""
    sha256, size, origin = expected_hash(entry, cache)
    path = cached_path(entry, cache)
    record = {"name": entry.name, "kind": entry.kind, "resolution": entry.resolution, "cached": path is not None,
              "license": entry.license, "aliases": list(entry.aliases), "description": entry.description,
              "file": entry.file, "sources": ["weights/" + entry.file] if entry.embedded else entry.sources,
              "sha256": sha256, "size": size, "sha256_origin": origin or None,
              "path": str(path) if path else None}
    if entry.backbone:
        record["backbone"] = entry.backbone
    if entry.note and path is None:
        record["note"] = entry.note
    return record
