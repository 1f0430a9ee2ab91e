"""`--device auto|cpu|cuda|mps`: auto picks cuda, then mps, then cpu; a named device that is missing is an error."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if has_mps:
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                            f"built for CUDA {torch.version.cuda or 'none'})")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UserError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}")
