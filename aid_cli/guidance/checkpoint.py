"""Guidance checkpoints: the actor's weights as safetensors, with its architecture and the backbone it was trained on.

Metadata (strings): `aid.kind` = "guidance", `aid.actor` (JSON constructor arguments), `aid.backbone_sha256` (the sha256
of the backbone checkpoint file the module was trained with), `aid.training` (JSON: hyperparameters, iterations, data).
A guidance module only makes sense with its own backbone: pairing it with another is an error that says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..backbones.checkpoint import read_metadata
from ..errors import CheckpointError
from ..fileio import portable_record, save_safetensors
from .networks import Actor


def save_guidance(path, actor: Actor, actor_kwargs: dict, backbone_sha256: str, training: dict | None = None) -> Path:
    """Write the module; `training`'s paths are recorded as names relative to the run (its "out"), never as the
    absolute paths of the machine it was trained on."""
    if training and training.get("out"):
        training = portable_record(training, training["out"])
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in actor.state_dict().items()}
    meta = {"aid.kind": "guidance", "aid.actor": json.dumps(actor_kwargs, sort_keys=True),
            "aid.backbone_sha256": backbone_sha256, "aid.training": json.dumps(training or {}, sort_keys=True)}
    return save_safetensors(path, tensors, meta)


def load_guidance(path, backbone_sha256: str | None = None, device="cpu") -> tuple[Actor, dict]:
    """The actor (eval mode, frozen) and its metadata; refuses a module trained on another backbone."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("aid.kind") != "guidance":
        raise CheckpointError(f"{path}: not an aid guidance module (kind: {meta.get('aid.kind', 'none')})")
    trained_on = meta.get("aid.backbone_sha256", "")
    if backbone_sha256 is not None and trained_on != backbone_sha256:
        raise CheckpointError(f"{path.name} was trained on backbone {trained_on[:12]}…, not on the one given "
                              f"({backbone_sha256[:12]}…); train a module for this backbone with `aid train`")
    try:
        kwargs = json.loads(meta["aid.actor"])
        actor = Actor(**kwargs)
        actor.load_state_dict(load_file(str(path)), strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unusable guidance module ({str(e).splitlines()[0]})") from None
    info = {"path": str(path), "actor": kwargs, "backbone_sha256": trained_on,
            "training": json.loads(meta.get("aid.training", "{}"))}
    return actor.eval().requires_grad_(False).to(device), info
