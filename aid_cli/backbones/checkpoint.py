"""Backbone checkpoints: safetensors with JSON metadata (architecture, provenance). Never pickles.

Metadata keys (all strings, as safetensors requires):
  aid.kind          "backbone"
  aid.precond       "EDMPrecond" | "VPPrecond" | "VEPrecond" (EDM, edm.py) | "Precond" (EDM2, edm2.py): the official
                    class name, as in the pickle
  aid.init_kwargs   JSON of the constructor arguments (the official `_init_kwargs`)
  aid.provenance    JSON: where the weights came from (source file and its sha256, training run, ...)
  aid.encoder       (latent backbones only) JSON of the pixel ↔ latent encoder, as EDM2's `StabilityVAEEncoder`:
                    {"class_name", "vae_name", "scale", "bias"} with final latent = raw latent · scale + bias
                    (latent.py, method.md §11). Absent: the network works on pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..fileio import save_safetensors, sha256_file  # noqa: F401  (sha256_file: imported from here by many modules)
from . import edm, edm2

# Official class name → (family, class). Both families keep the official names, so a class name identifies its family.
NETWORKS: dict[str, tuple[str, type]] = {**{k: ("edm", v) for k, v in edm.PRECONDS.items()},
                                        **{k: ("edm2", v) for k, v in edm2.PRECONDS.items()}}


def build_network(precond: str, init_kwargs: dict) -> torch.nn.Module:
    """Build an EDM or EDM2 network from the official class name and `_init_kwargs`."""
    if precond not in NETWORKS:
        raise ValueError(f"unknown preconditioner {precond!r} (known: {', '.join(NETWORKS)})")
    return NETWORKS[precond][1](**init_kwargs)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata, without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"not a readable safetensors checkpoint: {path} ({e})") from None


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
        init_kwargs = json.loads(meta["aid.init_kwargs"])
        provenance = json.loads(meta.get("aid.provenance", "{}"))
        encoder = json.loads(meta["aid.encoder"]) if "aid.encoder" in meta else None
        if encoder is not None:
            from .latent import check_encoder

            check_encoder(encoder, init_kwargs["img_channels"])
        net = build_network(precond, init_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable architecture metadata ({e})") from None
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: weights do not match the {precond} architecture in its metadata ({detail})") from None
    net.eval().requires_grad_(False).to(device)
    info = {"path": str(path), "precond": precond, "init_kwargs": init_kwargs, "provenance": provenance,
            "resolution": init_kwargs["img_resolution"], "channels": init_kwargs["img_channels"],
            "label_dim": init_kwargs.get("label_dim", 0), "family": NETWORKS[precond][0], "encoder": encoder}
    return net, info
