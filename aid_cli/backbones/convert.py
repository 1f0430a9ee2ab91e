"""Convert official NVIDIA EDM and EDM2 pickles (`edm-*.pkl`, `edm2-*.pkl`) to safetensors without running anything.

An official pickle rebuilds each network through `torch_utils.persistence._reconstruct_persistent_obj(meta)`, which in
NVIDIA's code executes the Python source stored in `meta['module_src']`, and each tensor storage through
`torch.storage._load_from_bytes`, which runs a nested, unrestricted `torch.load`. Loading one with `pickle` or
`torch.load(weights_only=False)` therefore runs whatever the file says. Here a restricted unpickler resolves only the
globals in `ALLOWED_GLOBALS`, each to a harmless stand-in: networks become `ModuleStub` records (class name, a hash of the
never-run source, the pickled attributes), storages are read by `torch.load(..., weights_only=True)`, and any other
global is refused before it can be called.

EDM2 files (`dnnlib.util.EasyDict(encoder, dataset_kwargs, loss_fn, ema)`) store the EMA network in float16; it is
written as float32 (exactly the float16 values). Their `encoder` (EDM2's `StabilityVAEEncoder` for latent models, a
persistent object whose state holds the latent scale and bias as small numpy arrays, hence the numpy array globals) is
kept as the checkpoint's `aid.encoder` record; a latent network from a file without one gets EDM2's defaults.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch._utils

from ..errors import CheckpointError, UserError, one_line
from ..fileio import check_writable_dir
from ..fileio import sha256_file
from .checkpoint import NETWORKS, build_checked, check_finite, save_backbone
from .edm import count_parameters
from .vae import ENCODER_CLASS, check_encoder, stability_encoder

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct
    from numpy.core.multiarray import scalar as _numpy_scalar

PIXEL_ENCODER_CLASS = "StandardRGBEncoder"  # EDM2's pixel-space "encoder": x / 127.5 − 1, nothing to record


class ModuleStub:
    """A pickled network module as plain data: class name, sha256 of its source (never run) and pickled attributes.

    `torch.nn.ModuleDict` resolves to this class too; it pickles as NEWOBJ() then BUILD(state), hence the class defaults.
    """

    class_name = "ModuleDict"
    module_src_sha256: str | None = None

    def __init__(self, class_name: str, module_src_sha256: str, state: dict):
        self.class_name = class_name
        self.module_src_sha256 = module_src_sha256
        self.state = state

    def __setstate__(self, state):
        """BUILD opcode: keep the attributes as data."""
        self.state = state


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (EDM2 files): a plain dict."""


def _reconstruct_persistent_obj(meta) -> ModuleStub:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: records the object, never runs `module_src`."""
    if not (isinstance(meta, dict) and isinstance(meta.get("class_name"), str) and isinstance(meta.get("state"), dict)):
        raise CheckpointError("malformed persistent-object record (needs class_name and state)")
    src = meta.get("module_src")
    src_hash = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
    return ModuleStub(meta["class_name"], src_hash, meta["state"])


def _reconstruct_ndarray(subtype, shape, dtype):
    """Stand-in for numpy's `_reconstruct` (how numpy pickles arrays): only a plain, empty ndarray, which the pickle's
    BUILD then fills from bytes. An object-dtype array can only hold what this unpickler itself built; `_plain` refuses
    any array that is not numeric anyway."""
    if subtype is not np.ndarray:
        raise CheckpointError(f"refused: a numpy array record names the class {getattr(subtype, '__name__', subtype)!r}; "
                              f"nothing from it was run")
    try:
        count = int(np.prod([int(n) for n in shape], dtype=np.float64)) if isinstance(shape, (tuple, list)) else \
            int(shape)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError("malformed numpy array record") from None
    if count > MAX_OBJECTS:  # numpy pickles an empty array here and fills it by BUILD from the file's bytes
        raise CheckpointError(f"refused: a numpy array record asks for {count:,} elements up front")
    return _numpy_reconstruct(np.ndarray, shape, dtype)


def _check_nested_archive(data: bytes) -> None:
    """Refuse a storage record whose torch zip would inflate beyond its own bytes before torch reads it: torch writes
    its archives uncompressed (every entry stored, so the entries together fit in the record), while a deflated
    entry of a 1 MB record can inflate to gigabytes inside the nested load. (A legacy, non-zip record holds raw
    bytes and is left to torch's weights-only loader.)"""
    import zipfile

    if not data.startswith(b"PK"):
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
        raise CheckpointError(f"malformed tensor storage record (a damaged torch archive: {one_line(e)})") from None
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"refused: a tensor storage record holds compressed entries ({compressed[0][:60]}), "
                              f"which torch never writes; nothing was inflated")
    declared = sum(i.file_size for i in infos)
    if declared > len(data):
        raise CheckpointError(f"refused: a tensor storage record of {len(data):,} bytes declares {declared:,} bytes "
                              f"of entries; nothing was inflated")


def _load_storage_bytes(data):
    """Stand-in for `torch.storage._load_from_bytes`: the nested load runs with `weights_only=True`."""
    if not isinstance(data, bytes):
        raise CheckpointError("malformed tensor storage record")
    _check_nested_archive(data)
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused: a tensor storage record fails torch's weights-only check "
                              f"({one_line(e, prefer='GLOBAL')}); nothing from it was run") from None


# Every global an official EDM/EDM2 pickle may name, mapped to what it resolves to here. The torch rebuild functions and
# numpy reconstructors are the real ones: they only assemble tensors, dtypes and numbers from data already unpickled.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleStub,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): np.ndarray,  # the subtype argument of _reconstruct (called directly: only an array)
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("dnnlib.util", "EasyDict"): EasyDict,
}


# Limits of the opcode scan that runs before anything is unpickled (far beyond an official file: EDM2-XXL has well
# under a million opcodes, memo indices count up from 0 and its stack stays a few dozen deep).
MAX_OPCODES = 20_000_000
MAX_STACK = 10_000  # items on the unpickler's stack (a 200 k-deep list needs 200 k) and open MARKs
MAX_DEPTH = 100  # module nesting and _init_kwargs nesting, checked while walking the result
MAX_OBJECTS = 1_000_000  # values walked in _init_kwargs and encoder records


class _BoundedFile:
    """A binary file whose reads never ask for more than what is left (a length field of 2^60 in the pickle would
    otherwise make Python allocate that much before finding the file is short)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise CheckpointError(f"truncated or malformed pickle: a record of {n:,} bytes with only "
                                  f"{self.left:,} left in the file")
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readinto(self, buf) -> int:
        if len(buf) > self.left:
            raise CheckpointError(f"truncated or malformed pickle: a record of {len(buf):,} bytes with only "
                                  f"{self.left:,} left in the file")
        n = self.f.readinto(buf)
        self.left -= n
        return n

    def readline(self) -> bytes:
        line = self.f.readline(min(self.left, 1 << 20))
        self.left -= len(line)
        return line

    def tell(self) -> int:
        return self.f.tell()


_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def scan_pickle(f) -> None:
    """Walk the opcodes (pickletools.genops, which builds nothing) and refuse, in one CheckpointError line, a pickle an
    official file never is: more than MAX_OPCODES opcodes, a memo index beyond the opcodes seen so far (a 9-byte file
    whose LONG_BINPUT 2^28 makes the C unpickler allocate 2 GB of memo), a memo read of an index never stored, or a
    stack or MARK nesting deeper than MAX_STACK."""
    import pickletools

    stored: set[int] = set()
    heights: list[int] = []  # stack height at each open MARK
    height = 0
    for n, (op, arg, pos) in enumerate(pickletools.genops(f)):
        if n >= MAX_OPCODES:
            raise CheckpointError(f"refused: more than {MAX_OPCODES:,} pickle opcodes")
        name = op.name
        if name in _PUT_OPS:
            if not isinstance(arg, int) or not 0 <= arg <= n:
                raise CheckpointError(f"refused: memo index {arg} at byte {pos} (an official file counts up from 0)")
            stored.add(arg)
        elif name == "MEMOIZE":  # stores at index len(memo)
            stored.add(len(stored))
        elif name in _GET_OPS and arg not in stored:
            raise CheckpointError(f"refused: memo index {arg} read at byte {pos} was never stored")
        # stack bookkeeping from the opcode's documented effect
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            if not heights:
                raise CheckpointError(f"malformed pickle: {name} at byte {pos} without a MARK")
            height = heights.pop()
            before = before[before.index(pickletools.stackslice) + 1:] if pickletools.stackslice in before else []
            height -= len(before)
        else:
            height -= len(before)
        if height < 0:
            raise CheckpointError(f"malformed pickle: {name} at byte {pos} pops an empty stack")
        if name == "MARK":
            heights.append(height)
        else:
            height += len(after)
        if height > MAX_STACK or len(heights) > MAX_STACK:
            raise CheckpointError(f"refused: the pickle nests deeper than {MAX_STACK:,} levels (byte {pos})")


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only `ALLOWED_GLOBALS` (to the objects there); any other global is refused before it can run.

    The pure-Python unpickler (its memo is a dict, its object building iterative), with BUILD refused on classes,
    functions and modules: a BUILD can otherwise set attributes on this converter's own stand-ins."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        import types

        target = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)):
            raise CheckpointError(f"refused: the pickle sets attributes on "
                                  f"{getattr(target, '__name__', type(target).__name__)} itself; nothing from it "
                                  f"was run")
        return pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        """Look the global up in the allow-list; refuse everything else."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"refused: pickle asks for {module}.{name}, which a checkpoint never needs; "
                                  f"nothing from it was run") from None


def read_official_pickle(path: Path):
    """Unpickle an official NVIDIA file with the restricted unpickler; any failure is one CheckpointError line."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            scan_pickle(_BoundedFile(f, size))
        with open(path, "rb") as f:
            return RestrictedUnpickler(_BoundedFile(f, size)).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    except Exception as e:  # untrusted bytes: every way they can fail to parse is the file's fault
        raise CheckpointError(f"{path.name}: not a readable pickle ({type(e).__name__}: {one_line(e)})") from None


def _entries(state: dict, key: str, where: str) -> dict:
    """`state[key]` (a dict such as `_parameters`), or a CheckpointError naming the module."""
    value = state.get(key, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"malformed module {where or '<root>'}: {key} is a {type(value).__name__}")
    return value


def _tensor(value, name: str) -> torch.Tensor:
    """A detached tensor, or a CheckpointError naming the entry."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"malformed weight {name}: a {type(value).__name__}, not a tensor")
    return value.detach()


def collect_state_dict(module: ModuleStub, prefix: str = "", _seen: set | None = None) -> dict[str, torch.Tensor]:
    """Flatten a module tree as `nn.Module.state_dict()` does: parameters, persistent buffers, then children. A module
    reached twice (a module holding itself, or a shared-reference bomb) or nested deeper than MAX_DEPTH is refused."""
    seen = set() if _seen is None else _seen
    where = prefix.rstrip(".")
    if id(module) in seen:
        raise CheckpointError(f"malformed module tree: {where or '<root>'} is reached twice (a module holding itself?)")
    if prefix.count(".") > MAX_DEPTH:
        raise CheckpointError(f"malformed module tree: nested deeper than {MAX_DEPTH} levels")
    seen.add(id(module))
    state = getattr(module, "state", None)
    if not isinstance(module, ModuleStub) or not isinstance(state, dict):
        raise CheckpointError(f"malformed module {where or '<root>'}: {type(module).__name__}")
    out = {prefix + k: _tensor(v, prefix + k) for k, v in _entries(state, "_parameters", where).items() if v is not None}
    skip = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset, list, tuple)):
        raise CheckpointError(f"malformed module {where or '<root>'}: _non_persistent_buffers_set")
    out.update({prefix + k: _tensor(v, prefix + k) for k, v in _entries(state, "_buffers", where).items()
                if v is not None and (not isinstance(k, str) or k not in skip)})
    for name, child in _entries(state, "_modules", where).items():
        if child is not None:
            out.update(collect_state_dict(child, f"{prefix}{name}.", seen))
    return out


def _plain(value, _depth: int = 0, _budget: list | None = None):
    """`_init_kwargs` as JSON-ready values: numpy numbers become Python numbers, tuples lists, dict subclasses dicts.
    Nesting deeper than MAX_DEPTH or more than MAX_OBJECTS values in all (a shared-reference bomb, which is small as
    a pickle and astronomically large as a tree) are refused."""
    budget = [MAX_OBJECTS] if _budget is None else _budget
    budget[0] -= 1
    if budget[0] < 0:
        raise CheckpointError(f"refused: more than {MAX_OBJECTS:,} values in a network record (a shared-reference "
                              f"bomb?)")
    if _depth > MAX_DEPTH:
        raise CheckpointError(f"refused: a network record nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CheckpointError(f"unsupported numpy array of dtype {value.dtype} in the pickle")
        if value.size > MAX_OBJECTS:
            raise CheckpointError("refused: an oversized numpy array in a network record")
        return value.tolist()
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise CheckpointError(f"unsupported numpy value of dtype {value.dtype} in the pickle")
        return value.item()
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, _depth + 1, budget) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, _depth + 1, budget) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"unsupported value in the network's _init_kwargs: {type(value).__name__}")


def _ema_network(data, name: str) -> ModuleStub:
    """The `ema` network of an official pickle, checked to be an EDM preconditioner or EDM2's Precond."""
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, ModuleStub):
        raise CheckpointError(f"{name}: no `ema` network in this pickle; is it an official NVIDIA EDM or EDM2 file?")
    if ema.class_name not in NETWORKS:
        supported = ", ".join(f"{k} ({v[0].upper()})" for k, v in NETWORKS.items())
        raise CheckpointError(f"{name}: unknown network class {ema.class_name!r} (supported: {supported})")
    return ema


def _encoder_record(data: dict, family: str, init_kwargs: dict, name: str) -> dict | None:
    """The `aid.encoder` record of an EDM2 file's `encoder` (None: a pixel-space network)."""
    if family != "edm2":
        return None
    channels = init_kwargs.get("img_channels")
    enc = data.get("encoder")
    if enc is None:  # no record: EDM2's latent models are the 4-channel ones, on the SD VAE with EDM2's constants
        return stability_encoder() if channels == 4 else None
    if not isinstance(enc, ModuleStub) or not isinstance(enc.state, dict):
        raise CheckpointError(f"{name}: malformed `encoder` record ({type(enc).__name__})")
    if enc.class_name == PIXEL_ENCODER_CLASS:
        return None
    if enc.class_name != ENCODER_CLASS:
        raise CheckpointError(f"{name}: unknown encoder class {enc.class_name!r} (supported: {ENCODER_CLASS}, "
                              f"{PIXEL_ENCODER_CLASS})")
    state = enc.state
    record = {"class_name": ENCODER_CLASS, "vae_name": _plain(state.get("vae_name")),
              "scale": _plain(state.get("scale")), "bias": _plain(state.get("bias"))}
    for key in ("scale", "bias"):  # a single number (numpy scalar) is one value for every channel
        if isinstance(record[key], (int, float)) and not isinstance(record[key], bool):
            record[key] = [float(record[key])] * (channels or 0)
        elif isinstance(record[key], list):
            record[key] = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in record[key]]
    try:
        check_encoder(record, channels)
    except ValueError as e:
        raise CheckpointError(f"{name}: unusable {ENCODER_CLASS} record ({e})") from None
    return record


def _init_kwargs(ema: ModuleStub, name: str) -> dict:
    """The constructor arguments the official persistence recorded for the network."""
    if ema.state.get("_init_args"):
        raise CheckpointError(f"{name}: the network was built with positional arguments, which official files never use")
    kwargs = _plain(ema.state.get("_init_kwargs"))
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{name}: the network has no _init_kwargs record")
    return kwargs


def _check_paths(src: Path, dst: Path) -> None:
    """Fail early on a missing source, a non-safetensors or unwritable destination, or dst naming src itself."""
    if not src.is_file():
        raise CheckpointError(f"source pickle not found: {src}")
    if dst.suffix != ".safetensors":
        raise UserError(f"destination must be a .safetensors file, got {dst.name}")
    if dst.resolve() == src.resolve() or (dst.exists() and dst.samefile(src)):
        raise UserError(f"destination is the source file itself: {dst}")
    check_writable_dir(dst)


def convert_pickle(src: str | Path, dst: str | Path) -> dict:
    """Convert an official EDM pickle's `ema` network to a safetensors backbone checkpoint; returns a summary."""
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    source_sha256 = sha256_file(src)
    data = read_official_pickle(src)
    ema = _ema_network(data, src.name)
    precond, init_kwargs = ema.class_name, _init_kwargs(ema, src.name)
    family = NETWORKS[precond][0]
    encoder = _encoder_record(data, family, init_kwargs, src.name)
    sd = collect_state_dict(ema)
    # validated and built on the meta device first: a pickle claiming a huge network allocates nothing for it
    net = build_checked(precond, init_kwargs, {k: tuple(v.shape) for k, v in sd.items()}, src.name,
                        misfit="weights do not fit {precond}")
    check_finite(sd, src.name)
    net.load_state_dict(sd, strict=True)  # EDM2's float16 EMA weights become float32 here, exactly
    provenance = {"source": src.name, "source_sha256": source_sha256, "converted_by": "aid models convert"}
    save_backbone(dst, net, precond, init_kwargs, provenance=provenance, encoder=encoder)
    return {"src": str(src), "dst": str(dst), "precond": precond, "family": family, "encoder": encoder,
            "parameters": count_parameters(net),
            "resolution": init_kwargs["img_resolution"], "channels": init_kwargs["img_channels"],
            "label_dim": init_kwargs.get("label_dim", 0), "source_sha256": source_sha256, "sha256": sha256_file(dst)}
