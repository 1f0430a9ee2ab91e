"""`aid models convert`: official EDM and EDM2 pickles become safetensors checkpoints, and nothing a pickle contains is
ever run."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aid_cli.backbones.checkpoint import load_backbone
from aid_cli.fileio import sha256_file
from aid_cli.backbones.convert import ALLOWED_GLOBALS, RestrictedUnpickler, convert_pickle
from aid_cli.backbones.edm import build_precond
from aid_cli.backbones.edm2 import build_precond as build_edm2
from aid_cli.backbones.vae import VAE_REPO, stability_encoder
from aid_cli.errors import CheckpointError, UserError

from .conftest import REPO, TINY_KWARGS, need_shared

OFFICIAL_CASES = ["edm_ddpmpp_uncond", "vp_ddpmpp_cond"]


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run `aid` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "aid_cli.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """Exit code 2 and exactly one `error:` line on stderr, no traceback; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# Pickles built here: the official persistence layout (with a stand-in `torch_utils.persistence` that, like NVIDIA's,
# executes `module_src`) and outright malicious ones.


@pytest.fixture
def persistence(monkeypatch):
    """Install a `torch_utils.persistence` whose `_reconstruct_persistent_obj` runs `module_src`, as NVIDIA's does."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})
        return meta

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return _reconstruct_persistent_obj


class OfficialLayoutPickler(pickle.Pickler):
    """Pickle torch modules as NVIDIA's persistence does: `_reconstruct_persistent_obj(meta)` carrying `module_src`."""

    def __init__(self, file, reconstruct, module_src: str, init_kwargs: dict):
        super().__init__(file, protocol=4)
        self.reconstruct, self.module_src, self.init_kwargs = reconstruct, module_src, init_kwargs

    def reducer_override(self, obj):
        """Modules (but not ModuleDict, which official files pickle plainly) become persistent-object records."""
        if not isinstance(obj, torch.nn.Module) or isinstance(obj, torch.nn.ModuleDict):
            return NotImplemented
        state = dict(obj.__dict__, _init_args=(), _init_kwargs=self.init_kwargs)
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__, state=state)
        return self.reconstruct, (meta,)


@pytest.fixture
def easydict(monkeypatch):
    """A `dnnlib.util.EasyDict` class to pickle EDM2-layout files with (the real one is a dict subclass)."""
    package, module = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = module.__name__, "EasyDict"
    module.EasyDict = EasyDict
    package.util = module
    monkeypatch.setitem(sys.modules, "dnnlib", package)
    monkeypatch.setitem(sys.modules, "dnnlib.util", module)
    return EasyDict


class PersistentRecord:
    """A persistent object that is not a module (EDM2's encoder), pickled as NVIDIA's persistence does."""

    def __init__(self, reconstruct, class_name: str, state: dict, module_src: str = ""):
        self.reconstruct, self.class_name, self.state, self.module_src = reconstruct, class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return self.reconstruct, (meta,)


EDM2_KWARGS = dict(img_resolution=8, img_channels=4, label_dim=3, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], use_fp16=False)


def vae_encoder_state(scale, bias, **extra) -> dict:
    """The pickled state of EDM2's StabilityVAEEncoder (its __getstate__: __dict__ with _vae=None)."""
    return dict(vae_name=VAE_REPO, scale=scale, bias=bias, batch_size=8, _vae=None, _init_args=(), _init_kwargs={},
                **extra)


def edm2_layout_bytes(net, reconstruct, easydict, module_src: str = "", encoder=None,
                      init_kwargs: dict | None = None) -> bytes:
    """An `edm2-*.pkl`-style pickle: EasyDict(encoder, dataset_kwargs, loss_fn, ema) with the EMA network in float16."""
    buf = io.BytesIO()
    data = easydict(encoder=encoder, dataset_kwargs=easydict(class_name="training.dataset.ImageFolderDataset"),
                    loss_fn=None)
    data["ema"] = net.to(torch.float16)
    OfficialLayoutPickler(buf, reconstruct, module_src, dict(init_kwargs or EDM2_KWARGS)).dump(data)
    return buf.getvalue()


def official_layout_bytes(net, reconstruct, module_src: str, init_kwargs: dict) -> bytes:
    """An `edm-*.pkl`-style pickle of `net`."""
    buf = io.BytesIO()
    OfficialLayoutPickler(buf, reconstruct, module_src, init_kwargs).dump(
        dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return buf.getvalue()


def touch_code(marker) -> str:
    """Python source that creates `marker`."""
    return f"open({str(marker)!r}, 'w').close()"


class Reduce:
    """An object that unpickles as `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def os_system_pickle(marker, reconstruct) -> bytes:
    return pickle.dumps({"ema": Reduce(os.system, f"touch {marker}")})


def exec_pickle(marker, reconstruct) -> bytes:
    return pickle.dumps({"ema": Reduce(exec, touch_code(marker))})


def system_in_meta_pickle(marker, reconstruct) -> bytes:
    state = {"_parameters": {"weight": Reduce(os.system, f"touch {marker}")}, "_init_kwargs": dict(TINY_KWARGS)}
    meta = dict(type="class", version=6, module_src="", class_name="EDMPrecond", state=state)
    return pickle.dumps({"ema": Reduce(reconstruct, meta)})


def system_in_storage_pickle(marker, reconstruct) -> bytes:
    inner = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {marker}"), inner, _use_new_zipfile_serialization=False)
    return pickle.dumps({"ema": Reduce(torch.storage._load_from_bytes, inner.getvalue())})


# ----------------------------------------------------------------------------------------------------------------------
# Official fixtures convert exactly.


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_official_pickle_converts_exactly(case, tmp_path):
    folder = need_shared("fixtures", "edm", case)
    src, dst = folder / "official_format.pkl", tmp_path / f"{case}.safetensors"
    meta = json.loads((folder / "meta.json").read_text())
    summary = convert_pickle(src, dst)

    ref, got = load_file(str(folder / "state_dict.safetensors")), load_file(str(dst))
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with safe_open(str(dst), framework="pt") as f:
        header = f.metadata()
    assert header["aid.precond"] == meta["precond"]
    assert json.loads(header["aid.init_kwargs"]) == meta["init_kwargs"]
    assert json.loads(header["aid.provenance"]) == {"source": "official_format.pkl", "source_sha256": sha256_file(src),
                                                    "converted_by": "aid models convert"}
    assert summary["precond"] == meta["precond"] and summary["resolution"] == meta["init_kwargs"]["img_resolution"]
    assert summary["sha256"] == sha256_file(dst)

    net, _ = load_backbone(dst)
    assert summary["parameters"] == sum(p.numel() for p in net.parameters())
    io_ref = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        denoised = net(io_ref["x"], io_ref["sigma"], io_ref.get("class_labels"))
    assert (denoised - io_ref["denoised"]).abs().max() / io_ref["denoised"].abs().max() < 1e-5


def test_cli_convert_prints_summary_and_json(tmp_path):
    src = need_shared("fixtures", "edm", "edm_ddpmpp_uncond", "official_format.pkl")
    dst = tmp_path / "edm.safetensors"
    result = run_cli("models", "convert", src, dst, "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "EDMPrecond" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["precond"] == "EDMPrecond" and summary["sha256"] == sha256_file(dst)


def test_official_edm2_pickle_converts_exactly(tmp_path):
    """Issue 6 acceptance: `aid models convert .../edm2_latent_cond/official_format.pkl m.safetensors` gives float32
    weights equal to the fixture's state dict (the official float16 EMA weights, cast)."""
    folder = need_shared("fixtures", "edm2", "edm2_latent_cond")
    src, dst = folder / "official_format.pkl", tmp_path / "m.safetensors"
    meta = json.loads((folder / "meta.json").read_text())
    result = run_cli("models", "convert", src, dst, "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Precond (EDM2)" in result.stderr
    summary = json.loads(result.stdout)

    ref, got = load_file(str(folder / "state_dict.safetensors")), load_file(str(dst))
    assert sorted(got) == sorted(ref)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]) for k in ref)
    with safe_open(str(dst), framework="pt") as f:
        header = f.metadata()
    assert header["aid.precond"] == "Precond" == meta["precond"]
    assert json.loads(header["aid.init_kwargs"]) == meta["init_kwargs"]
    assert json.loads(header["aid.encoder"]) == stability_encoder()  # no encoder in the file: EDM2's defaults
    assert summary["family"] == "edm2" and summary["label_dim"] == 10 and summary["sha256"] == sha256_file(dst)

    net, info = load_backbone(dst)
    assert info["family"] == "edm2" and info["encoder"]["vae_name"] == VAE_REPO and info["label_dim"] == 10
    io_ref = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        denoised = net(io_ref["x"], io_ref["sigma"], io_ref["class_labels"])
    assert (denoised - io_ref["denoised"]).abs().max() / io_ref["denoised"].abs().max() < 1e-5


def test_edm2_pickle_with_its_vae_encoder_converts_and_runs_nothing(tmp_path, persistence, easydict):
    marker = tmp_path / "module_src_ran"
    torch.manual_seed(2)
    net = build_edm2("Precond", EDM2_KWARGS)
    scale = np.float32(0.5) / np.float32([4.0, 5.0, 6.0, 7.0])  # numpy arrays, as in the official encoder's state
    encoder = PersistentRecord(persistence, "StabilityVAEEncoder", vae_encoder_state(scale, np.float32(-0.25) * scale),
                               module_src=touch_code(marker))
    src, dst = tmp_path / "edm2-tiny.pkl", tmp_path / "tiny.safetensors"
    src.write_bytes(edm2_layout_bytes(net, persistence, easydict, touch_code(marker), encoder))
    summary = convert_pickle(src, dst)
    assert not marker.exists()
    assert summary["encoder"] == {"class_name": "StabilityVAEEncoder", "vae_name": VAE_REPO,
                                  "scale": [float(v) for v in scale], "bias": [float(v) for v in -0.25 * scale]}
    got = load_file(str(dst))
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float()) for k, v in net.state_dict().items())
    loaded, info = load_backbone(dst)
    assert info["encoder"] == summary["encoder"]


def test_edm2_pixel_model_has_no_encoder(tmp_path, persistence, easydict):
    kwargs = dict(EDM2_KWARGS, img_channels=3, label_dim=0)
    net = build_edm2("Precond", kwargs)
    encoder = PersistentRecord(persistence, "StandardRGBEncoder", {"_init_args": (), "_init_kwargs": {}})
    src, dst = tmp_path / "edm2-rgb.pkl", tmp_path / "rgb.safetensors"
    src.write_bytes(edm2_layout_bytes(net, persistence, easydict, encoder=encoder, init_kwargs=kwargs))
    assert convert_pickle(src, dst)["encoder"] is None
    with safe_open(str(dst), framework="pt") as f:
        assert "aid.encoder" not in f.metadata()
    assert load_backbone(dst)[1]["encoder"] is None


@pytest.mark.parametrize("encoder, message", [
    (("SomethingElse", {}), "unknown encoder class 'SomethingElse'"),
    (("StabilityVAEEncoder", vae_encoder_state(np.float32([1, 2, 3]), np.float32([0, 0, 0]))), "4 finite numbers"),
    (("StabilityVAEEncoder", vae_encoder_state(np.array(["a", "b", "c", "d"]), np.float32([0] * 4))), "dtype"),
])
def test_edm2_unusable_encoder_is_refused(encoder, message, tmp_path, persistence, easydict):
    net = build_edm2("Precond", EDM2_KWARGS)
    src, dst = tmp_path / "edm2.pkl", tmp_path / "edm2.safetensors"
    src.write_bytes(edm2_layout_bytes(net, persistence, easydict, encoder=PersistentRecord(persistence, *encoder)))
    with pytest.raises(CheckpointError, match=message):
        convert_pickle(src, dst)
    assert not dst.exists()


def system_in_numpy_array_pickle(marker, reconstruct) -> bytes:
    """An object-dtype numpy array (the encoder's scale) whose element would run a shell command."""
    scale = np.empty(1, dtype=object)
    scale[0] = Reduce(os.system, f"touch {marker}")
    state = vae_encoder_state(scale, np.float32([0] * 4))
    meta = dict(type="class", version=6, module_src="", class_name="StabilityVAEEncoder", state=state)
    return pickle.dumps({"encoder": Reduce(reconstruct, meta), "ema": None})


def numpy_reconstruct_of_other_class_pickle(marker, reconstruct) -> bytes:
    """numpy's array reconstructor asked to build something that is not an ndarray."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return pickle.dumps({"ema": Reduce(_reconstruct, collections.OrderedDict, (0,), b"b")})


def test_numpy_array_globals_resolve_to_the_checked_stand_in():
    stand_in = ALLOWED_GLOBALS[("numpy._core.multiarray", "_reconstruct")]
    assert ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")] is stand_in  # numpy 1 files (2024's EDM2)
    assert stand_in.__module__ == "aid_cli.backbones.convert"
    assert isinstance(stand_in(np.ndarray, (0,), b"b"), np.ndarray)
    with pytest.raises(CheckpointError, match="refused"):
        stand_in(collections.OrderedDict, (0,), b"b")


# ----------------------------------------------------------------------------------------------------------------------
# Nothing in a pickle runs.


def test_module_src_is_never_executed(tmp_path, persistence):
    marker = tmp_path / "module_src_ran"
    torch.manual_seed(1)
    net = build_precond("EDMPrecond", dict(TINY_KWARGS))
    data = official_layout_bytes(net, persistence, touch_code(marker), dict(TINY_KWARGS))
    pickle.loads(data)  # control: a plain unpickle of this file runs module_src
    assert marker.exists()
    marker.unlink()

    src, dst = tmp_path / "edm-tiny.pkl", tmp_path / "tiny.safetensors"
    src.write_bytes(data)
    summary = convert_pickle(src, dst)
    assert not marker.exists()
    assert summary["precond"] == "EDMPrecond"
    got = load_file(str(dst))
    assert sorted(got) == sorted(net.state_dict())
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_converting_twice_gives_the_same_file(tmp_path, persistence):
    """Guidance modules bind to the backbone file's sha256, so the same pickle must always convert to the same bytes
    (safetensors alone writes its metadata keys in a random order)."""
    net = build_precond("EDMPrecond", dict(TINY_KWARGS))
    src = tmp_path / "edm-tiny.pkl"
    src.write_bytes(official_layout_bytes(net, persistence, "", dict(TINY_KWARGS)))
    hashes = {sha256_file(convert_pickle(src, tmp_path / f"{i}.safetensors") and tmp_path / f"{i}.safetensors")
              for i in range(4)}
    assert len(hashes) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert len(f.metadata()) > 2 and list(f.keys()) == sorted(net.state_dict())
    got, _ = load_backbone(tmp_path / "0.safetensors")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in net.state_dict().items())


def test_weights_that_do_not_fit_are_refused(tmp_path, persistence):
    net = build_precond("EDMPrecond", dict(TINY_KWARGS))
    src, dst = tmp_path / "edm-tiny.pkl", tmp_path / "tiny.safetensors"
    src.write_bytes(official_layout_bytes(net, persistence, "", dict(TINY_KWARGS, model_channels=32)))
    with pytest.raises(CheckpointError, match="do not fit EDMPrecond"):
        convert_pickle(src, dst)
    assert not dst.exists()


@pytest.mark.parametrize("build", [os_system_pickle, exec_pickle, system_in_meta_pickle, system_in_storage_pickle,
                                   system_in_numpy_array_pickle, numpy_reconstruct_of_other_class_pickle])
def test_malicious_pickle_is_refused_and_nothing_runs(build, tmp_path, persistence):
    marker = tmp_path / "pwned"
    src, dst = tmp_path / "evil.pkl", tmp_path / "evil.safetensors"
    src.write_bytes(build(marker, persistence))
    line = assert_one_line_error(run_cli("models", "convert", src, dst))
    assert "refused" in line and "nothing from it was run" in line
    assert not marker.exists()
    assert not dst.exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                          ("builtins", "exec"), ("builtins", "getattr"), ("subprocess", "Popen"),
                                          ("torch", "load"), ("torch_utils.persistence", "persistent_class"),
                                          ("numpy", "load"), ("numpy", "frombuffer"), ("numpy.lib.npyio", "load"),
                                          ("dnnlib.util", "open_url"), ("dnnlib.util", "construct_class_by_name")])
def test_unlisted_globals_are_refused(module, name):
    with pytest.raises(CheckpointError, match=f"refused: pickle asks for {module}.{name}"):
        RestrictedUnpickler(io.BytesIO()).find_class(module, name)


def test_dangerous_allowed_globals_are_substituted():
    assert ALLOWED_GLOBALS[("torch.storage", "_load_from_bytes")] is not torch.storage._load_from_bytes
    assert ALLOWED_GLOBALS[("torch_utils.persistence", "_reconstruct_persistent_obj")].__module__ == \
        "aid_cli.backbones.convert"


# ----------------------------------------------------------------------------------------------------------------------
# Bad files and paths.


@pytest.mark.parametrize("content", [None, b"", b"[section]\nnot = 'a pickle'\n", "truncated"])
def test_bad_source_file_is_one_line_error(content, tmp_path):
    src, dst = tmp_path / "bad.pkl", tmp_path / "out.safetensors"
    if content == "truncated":
        content = pickle.dumps({"ema": list(range(1000)), "dataset_kwargs": {}})[:-200]
    if content is not None:
        src.write_bytes(content)
    assert_one_line_error(run_cli("models", "convert", src, dst))
    assert not dst.exists()


def test_destination_must_not_be_the_source(tmp_path):
    src = tmp_path / "same.safetensors"
    src.write_bytes(pickle.dumps({"ema": None}))
    with pytest.raises(UserError, match="source file itself"):
        convert_pickle(src, tmp_path / "." / "same.safetensors")
    assert src.read_bytes() == pickle.dumps({"ema": None})
