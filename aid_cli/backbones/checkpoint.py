"""Backbone checkpoints: safetensors with JSON metadata (architecture, provenance). Never pickles.

Metadata keys (all strings, as safetensors requires):
  aid.kind          "backbone"
  aid.precond       "EDMPrecond" | "VPPrecond" | "VEPrecond" (EDM, edm.py) | "Precond" (EDM2, edm2.py): the official
                    class name, as in the pickle
  aid.init_kwargs   JSON of the constructor arguments (the official `_init_kwargs`)
  aid.provenance    JSON: where the weights came from (source file and its sha256, training run, ...)
  aid.encoder       (latent backbones only) JSON of the pixel ↔ latent encoder, as EDM2's `StabilityVAEEncoder`:
                    {"class_name", "vae_name", "scale", "bias"} with final latent = raw latent · scale + bias
                    (vae.py, method.md §11). Absent: the network works on pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..fileio import save_safetensors
from . import edm, edm2

# Official class name → (family, class). Both families keep the official names, so a class name identifies its family.
NETWORKS: dict[str, tuple[str, type]] = {**{k: ("edm", v) for k, v in edm.PRECONDS.items()},
                                        **{k: ("edm2", v) for k, v in edm2.PRECONDS.items()}}


def build_network(precond: str, init_kwargs: dict) -> torch.nn.Module:
    """Build an EDM or EDM2 network from the official class name and `_init_kwargs`."""
    if precond not in NETWORKS:
        raise ValueError(f"unknown preconditioner {precond!r} (known: {', '.join(NETWORKS)})")
    return NETWORKS[precond][1](**init_kwargs)


# Bounds on an architecture record (safetensors metadata or a pickle's _init_kwargs), far beyond any real network: a
# record outside them is refused before anything is built. Integers: (low, high); lists: (max length, item low, high).
_INT_BOUNDS = {"img_resolution": (1, 4096), "img_channels": (1, 64), "label_dim": (0, 100_000),
               "augment_dim": (0, 64), "model_channels": (1, 8192), "channel_mult_emb": (1, 64),
               "channel_mult_noise": (1, 64), "num_blocks": (1, 64), "logvar_channels": (1, 8192),
               "num_heads": (1, 1024), "channels_per_head": (1, 8192)}
_LIST_BOUNDS = {"channel_mult": (16, 1, 64), "attn_resolutions": (32, 0, 4096), "resample_filter": (16, -1e6, 1e6)}


def _short(value) -> str:
    """A value for an error line: numbers and short strings as they are, containers by type and length only."""
    if isinstance(value, (list, dict, tuple)):
        if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
            return repr(value)[:60]
        return f"a {type(value).__name__} of {len(value)} items"
    return repr(value)[:60]


def check_init_kwargs(precond: str, init_kwargs) -> None:
    """Refuse (ValueError, one line) an architecture record that is not a flat object of sane values."""
    if precond not in NETWORKS:
        raise ValueError(f"unknown preconditioner {precond!r} (known: {', '.join(NETWORKS)})")
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"init_kwargs is a {type(init_kwargs).__name__}, not an object")
    for key in ("img_resolution", "img_channels"):
        if key not in init_kwargs:
            raise ValueError(f"init_kwargs has no {key}")
    for key, value in init_kwargs.items():
        if not isinstance(key, str):
            raise ValueError("init_kwargs has a non-string key")
        if key in _INT_BOUNDS and not (key in ("channel_mult_emb", "channel_mult_noise") and value is None):
            lo, hi = _INT_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{key} = {_short(value)} (an integer in [{lo}, {hi}] expected)")
        elif key in _LIST_BOUNDS:
            n, lo, hi = _LIST_BOUNDS[key]
            ok = isinstance(value, list) and len(value) <= n and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi for v in value)
            if not ok or (key == "channel_mult" and (not value or not all(isinstance(v, int) for v in value))):
                raise ValueError(f"{key} = {_short(value)} (a list of at most {n} numbers in [{lo}, {hi}] expected)")
        elif isinstance(value, (dict, list)):
            raise ValueError(f"{key}: an unexpected nested value")
        elif isinstance(value, float) and value != value:
            raise ValueError(f"{key} is NaN")
        elif isinstance(value, str) and len(value) > 100:
            raise ValueError(f"{key}: an overlong string")
    res, levels = init_kwargs["img_resolution"], len(init_kwargs.get("channel_mult") or [1])
    if res % (1 << (levels - 1)):
        raise ValueError(f"img_resolution {res} is not divisible by 2^{levels - 1} (its {levels} resolution levels)")


def build_checked(precond: str, init_kwargs: dict, shapes: dict[str, tuple], name: str,
                  misfit: str = "weights do not match the {precond} architecture in its metadata") -> torch.nn.Module:
    """The network `init_kwargs` describes, built only after its every weight's shape was checked against `shapes` (a
    checkpoint header's): validated, then built on the meta device (no memory), compared, and only then given real,
    uninitialised storage for the caller to load. A record that does not fit is one CheckpointError line, so a small
    file claiming a huge network never allocates it."""
    try:
        check_init_kwargs(precond, init_kwargs)
        with torch.device("meta"):
            net = build_network(precond, init_kwargs)
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError, OverflowError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: unusable architecture metadata ({detail})") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshapen = [f"{k} {list(shapes[k])} vs {list(v)}" for k, v in expected.items()
                 if k in shapes and tuple(shapes[k]) != v]
    problems = [f"{len(keys)} {what} (first: {keys[0]})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:
        raise CheckpointError(f"{name}: {misfit.format(precond=precond)}: {'; '.join(problems)}")
    return net.to_empty(device="cpu")


def check_finite(sd: dict, name: str) -> None:
    """Refuse weights holding NaN or ±inf (a diverged run's snapshot would fill every hole black, exit 0)."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{name}: weight {k} holds NaN or infinite values; this checkpoint is unusable "
                                  f"(a diverged training run?)")


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what}: JSON nested too deeply") from None


# What a checkpoint's header may cost before it is parsed: the whole JSON header (the tensor table and the metadata:
# EDM2-XXL's is ~150 KB) and each metadata value (the largest real one, a training record, is a few KB). A file
# claiming more (a 66 MB `aid.training` string made parsing peak at 2 GB) is refused before any of it is parsed.
MAX_HEADER_BYTES = 16 << 20
MAX_METADATA_VALUE = 1 << 20


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata, without loading tensors; a header over MAX_HEADER_BYTES, or a metadata value
    over MAX_METADATA_VALUE, is refused before it is parsed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"not a readable safetensors checkpoint: {path} ({e})") from None
    size = int.from_bytes(head, "little") if len(head) == 8 else None
    if size is not None and size > path.stat().st_size - 8:
        raise CheckpointError(f"not a readable safetensors checkpoint: {path} (its header claims {size:,} bytes; the "
                              f"file has {path.stat().st_size:,})")
    if size is not None and size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: its safetensors header claims {size:,} bytes, more than the "
                              f"{MAX_HEADER_BYTES:,} a checkpoint may have; refused unread")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"not a readable safetensors checkpoint: {path} ({e})") from None
    for key, value in meta.items():
        if len(value) > MAX_METADATA_VALUE:
            raise CheckpointError(f"{path}: metadata {key[:40]!r} holds {len(value):,} characters, more than the "
                                  f"{MAX_METADATA_VALUE:,} a value may have; refused unparsed")
    return meta


def _header_shapes(path: Path) -> dict[str, tuple]:
    """Every tensor's shape from the safetensors header, without reading any tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None


def save_backbone(path: str | Path, net: torch.nn.Module, precond: str, init_kwargs: dict,
                  provenance: dict | None = None, state_dict: dict | None = None, encoder: dict | None = None) -> Path:
    """Write the network's weights (float32, contiguous) and architecture atomically (`encoder`: latent backbones)."""
    sd = state_dict if state_dict is not None else net.state_dict()
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in sd.items()}
    meta = {
        "aid.kind": "backbone",
        "aid.precond": precond,
        "aid.init_kwargs": json.dumps(init_kwargs, sort_keys=True),
        "aid.provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    if encoder is not None:
        meta["aid.encoder"] = json.dumps(encoder, sort_keys=True)
    return save_safetensors(path, tensors, meta)


def load_backbone(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Build the network the metadata describes and load its weights strictly; returns (net in eval mode, info)."""
    path = Path(path)
    if path.suffix in (".pkl", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path.name}: only .safetensors checkpoints are loaded; convert official pickles once "
                              f"with `aid models convert {path} {path.with_suffix('.safetensors').name}`")
    meta = read_metadata(path)
    if meta.get("aid.kind") != "backbone":
        raise CheckpointError(f"{path}: not an aid backbone checkpoint (kind: {meta.get('aid.kind', 'none')})")
    try:
        precond = meta["aid.precond"]
        init_kwargs = _json(meta["aid.init_kwargs"], "aid.init_kwargs")
        provenance = _json(meta.get("aid.provenance", "{}"), "aid.provenance")
        encoder = _json(meta["aid.encoder"], "aid.encoder") if "aid.encoder" in meta else None
        check_init_kwargs(precond, init_kwargs)
        if encoder is not None:
            from .vae import check_encoder

            check_encoder(encoder, init_kwargs["img_channels"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable architecture metadata ({str(e)[:200]})") from None
    net = build_checked(precond, init_kwargs, _header_shapes(path), str(path))
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    check_finite(sd, str(path))
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: weights do not match the {precond} architecture in its metadata ({detail})") from None
    del sd
    net.eval().requires_grad_(False).to(device)
    info = {"path": str(path), "precond": precond, "init_kwargs": init_kwargs, "provenance": provenance,
            "resolution": init_kwargs["img_resolution"], "channels": init_kwargs["img_channels"],
            "label_dim": init_kwargs.get("label_dim", 0), "family": NETWORKS[precond][0], "encoder": encoder}
    return net, info
