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

from ..backbones.checkpoint import _header_shapes, _json, check_finite, read_metadata
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


_ACTOR_BOUNDS = {"channels": (1, 64), "width": (1, 4096), "emb_dim": (1, 4096), "stem_blocks": (0, 64),
                 "trunk_blocks": (0, 64)}


def _check_actor_kwargs(kwargs) -> None:
    """Refuse (ValueError) an actor record that is not an object of bounded integers."""
    if not isinstance(kwargs, dict):
        raise ValueError("aid.actor is not an object")
    for key, value in kwargs.items():
        if key in _ACTOR_BOUNDS:
            lo, hi = _ACTOR_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"aid.actor {key} = {str(value)[:40]} (an integer in [{lo}, {hi}] expected)")
        elif key == "denoised_input":
            if not isinstance(value, (bool, int)):
                raise ValueError("aid.actor denoised_input is not a boolean")
        else:
            raise ValueError(f"aid.actor has an unknown setting {str(key)[:40]!r}")


def trained_churn(info: dict) -> float:
    """EDM's S_churn a module was trained with (`aid train --churn`; 0 for a module trained on the ODE), from
    `load_guidance`'s info: the churn it is deployed with unless the command says otherwise."""
    return float((info.get("training") or {}).get("churn") or 0.0)


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
        kwargs = _json(meta["aid.actor"], "aid.actor")
        training = _json(meta.get("aid.training", "{}"), "aid.training")
        _check_actor_kwargs(kwargs)
        with torch.device("meta"):  # shapes first: a small file claiming a huge actor allocates nothing
            actor = Actor(**kwargs)
        expected = {k: tuple(v.shape) for k, v in actor.state_dict().items()}
        if expected != _header_shapes(path):
            raise ValueError("its weights do not match the actor in its metadata")
        actor = actor.to_empty(device="cpu")
        sd = load_file(str(path))
        check_finite(sd, str(path))
        actor.load_state_dict(sd, strict=True)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, AssertionError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unusable guidance module ({detail})") from None
    info = {"path": str(path), "actor": kwargs, "backbone_sha256": trained_on, "training": training}
    return actor.eval().requires_grad_(False).to(device), info
