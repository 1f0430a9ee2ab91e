"""Hostile checkpoints (safetensors metadata, official pickles, guidance modules): one line and exit 2, before any large
allocation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from aid_cli.errors import UserError

from .conftest import run_cli


BOMB_LIMIT_MB = 1100  # address-space limit of a bomb case: the interpreter with torch imported (~610 MB) + 500 MB


def run_limited(code: str, limit_mb: int = BOMB_LIMIT_MB, timeout: float = 60) -> tuple[str, int]:
    """Run `code` in a fresh interpreter under an address-space limit; returns (its stdout, its peak RSS in MB).
    `code` prints REFUSED: <message> when it gets the project's error, as a user would see it."""
    import os
    import subprocess
    import sys

    prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_mb << 20}, {limit_mb << 20}))\n"
               "import torch\nfrom aid_cli.errors import UserError\n"
               "def refused(f, *a, **k):\n"
               "    try:\n        f(*a, **k)\n    except UserError as e:\n        print('REFUSED:', e)\n"
               "    else:\n        print('ACCEPTED')\n")
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over fork + exec)
    epilogue = ("\nhwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
                "print('PEAK_MB', int(hwm.split()[1]) // 1024)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", prelude + code + epilogue], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.rsplit("PEAK_MB", 1)[1])
    return proc.stdout, peak


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_safetensors_claiming_a_huge_network_is_refused_before_allocating(tiny_checkpoint, tmp_path):
    from .conftest import TINY_KWARGS

    bomb = _rewrite_meta(tiny_checkpoint, tmp_path / "bomb.safetensors",
                         **{"aid.init_kwargs": json.dumps(dict(TINY_KWARGS, model_channels=4096,
                                                               channel_mult=[1, 2, 2, 2], img_resolution=64))})
    out, peak = run_limited(f"from aid_cli.backbones.checkpoint import load_backbone\n"
                            f"refused(load_backbone, {str(bomb)!r})")
    assert "REFUSED:" in out and "do not match the EDMPrecond architecture" in out, out
    assert peak < 500


@pytest.mark.parametrize("change, phrase", [
    ({"model_channels": -16}, "model_channels"),
    ({"label_dim": -1}, "label_dim"),
    ({"img_resolution": 0}, "img_resolution"),
    ({"channel_mult": [1, "x"]}, "channel_mult"),
    ({"num_blocks": 100}, "num_blocks"),
    ({"img_resolution": 17}, "not divisible"),
    ({"encoder_type": "exotic"}, "unusable architecture metadata"),
])
def test_invalid_architecture_metadata_is_one_line(tiny_checkpoint, tmp_path, capsys, change, phrase):
    from .conftest import TINY_KWARGS

    bad = _rewrite_meta(tiny_checkpoint, tmp_path / "bad.safetensors",
                        **{"aid.init_kwargs": json.dumps(dict(TINY_KWARGS, **change))})
    img, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.new("RGB", (16, 16), "grey").save(img)
    Image.new("L", (16, 16), 255).save(mask)
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--model", bad,
                              "--method", "unguided", "--steps", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not (tmp_path / "o.png").exists()


def test_deeply_nested_metadata_json_is_one_line(tiny_checkpoint, tmp_path):
    from aid_cli.backbones.checkpoint import load_backbone
    from aid_cli.errors import CheckpointError

    bad = _rewrite_meta(tiny_checkpoint, tmp_path / "deep.safetensors",
                        **{"aid.init_kwargs": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_backbone(bad)
    bad = _rewrite_meta(tiny_checkpoint, tmp_path / "deep2.safetensors",
                        **{"aid.provenance": '{"a":' * 100_000 + "1" + "}" * 100_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_backbone(bad)


def test_non_finite_weights_are_refused_at_load(tiny_net, tmp_path, capsys):
    from aid_cli.backbones.checkpoint import save_backbone

    from .conftest import TINY_KWARGS

    sd = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key].view(-1)[0] = float("nan")
    path = save_backbone(tmp_path / "nan.safetensors", tiny_net, "EDMPrecond", dict(TINY_KWARGS), state_dict=sd)
    img, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.new("RGB", (16, 16), "grey").save(img)
    Image.new("L", (16, 16), 255).save(mask)
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--model", path,
                              "--method", "unguided", "--steps", "2"], capsys)
    assert code == 2 and "NaN or infinite" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


from .test_convert import persistence  # noqa: E402,F401  (the fixture: a torch_utils.persistence to pickle with)


def _official_with(reconstruct, init_kwargs=None, modules=None) -> bytes:
    """An edm-*.pkl-shaped pickle whose `ema` record carries the given _init_kwargs and child modules."""
    import pickle

    from .conftest import TINY_KWARGS

    class Reduce:
        def __init__(self, fn, *args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    state = {"_parameters": {}, "_buffers": {}, "_modules": modules or {}, "_init_args": (),
             "_init_kwargs": init_kwargs if init_kwargs is not None else dict(TINY_KWARGS)}
    meta = dict(type="class", version=6, module_src="", class_name="EDMPrecond", state=state)
    return pickle.dumps({"ema": Reduce(reconstruct, meta)}, protocol=4)


def test_pickle_memo_index_bomb_is_refused_in_little_memory(tmp_path):
    import struct

    src = tmp_path / "memo.pkl"
    src.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 28) + b".")  # LONG_BINPUT 2^28: 9 bytes
    assert len(src.read_bytes()) == 9
    out, peak = run_limited(f"from aid_cli.backbones.convert import convert_pickle\n"
                            f"refused(convert_pickle, {str(src)!r}, {str(tmp_path / 'o.safetensors')!r})")
    assert "REFUSED:" in out and "memo index" in out, out
    assert peak < 500 and not (tmp_path / "o.safetensors").exists()


def test_pickle_shared_reference_bomb_is_refused_at_once(tmp_path, persistence):
    from .conftest import TINY_KWARGS

    bomb = [1]
    for _ in range(40):  # 2^40 leaves as a tree, 40 memo entries as a pickle
        bomb = [bomb, bomb]
    src = tmp_path / "bomb.pkl"
    src.write_bytes(_official_with(persistence, dict(TINY_KWARGS, channel_mult=bomb)))
    assert src.stat().st_size < 2000
    out, peak = run_limited(f"from aid_cli.backbones.convert import convert_pickle\n"
                            f"refused(convert_pickle, {str(src)!r}, {str(tmp_path / 'o.safetensors')!r})",
                            timeout=30)
    assert "REFUSED:" in out and "shared-reference" in out, out
    assert peak < 500


def test_pickle_deep_list_and_self_containing_module_are_one_line(tmp_path, persistence):
    import sys

    from aid_cli.backbones.convert import convert_pickle
    from aid_cli.errors import CheckpointError

    from .conftest import TINY_KWARGS

    deep = [1]
    for _ in range(5000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        data = _official_with(persistence, dict(TINY_KWARGS, channel_mult=deep))
    finally:
        sys.setrecursionlimit(limit)
    (tmp_path / "deep.pkl").write_bytes(data)
    with pytest.raises(CheckpointError, match="nested deeper"):
        convert_pickle(tmp_path / "deep.pkl", tmp_path / "o.safetensors")

    md = torch.nn.ModuleDict()
    md._modules["again"] = md  # a module holding itself
    (tmp_path / "self.pkl").write_bytes(_official_with(persistence, modules={"model": md}))
    with pytest.raises(CheckpointError, match="reached twice"):
        convert_pickle(tmp_path / "self.pkl", tmp_path / "o.safetensors")

    n = 200_000  # a 200 k-deep list on the unpickler's stack: refused by the opcode scan
    (tmp_path / "stack.pkl").write_bytes(b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".")
    with pytest.raises(CheckpointError, match="nests deeper"):
        convert_pickle(tmp_path / "stack.pkl", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_pickle_build_on_a_stand_in_class_is_refused(tmp_path):
    from aid_cli.backbones import convert

    # GLOBAL dnnlib.util.EasyDict; BUILD (None, {"pwned": 1}): setattr on the converter's own class
    payload = b"\x80\x02cdnnlib.util\nEasyDict\nN}X\x05\x00\x00\x00pwnedK\x01s\x86b."
    (tmp_path / "build.pkl").write_bytes(payload)
    with pytest.raises(UserError, match="sets attributes on EasyDict"):
        convert.convert_pickle(tmp_path / "build.pkl", tmp_path / "o.safetensors")
    assert not hasattr(convert.EasyDict, "pwned")
    payload = b"\x80\x02ctorch.nn.modules.container\nModuleDict\nN}X\x0a\x00\x00\x00class_nameX\x01\x00\x00\x00xs\x86b."
    (tmp_path / "build2.pkl").write_bytes(payload)
    with pytest.raises(UserError, match="sets attributes"):
        convert.convert_pickle(tmp_path / "build2.pkl", tmp_path / "o.safetensors")
    assert convert.ModuleStub.class_name == "ModuleDict"

def test_guidance_module_claiming_a_huge_actor_or_holding_nan_is_refused(tmp_path):
    from safetensors.torch import save_file

    from aid_cli.errors import CheckpointError
    from aid_cli.guidance.checkpoint import load_guidance, save_guidance
    from aid_cli.guidance.networks import Actor

    actor = Actor(width=8)
    good = save_guidance(tmp_path / "g.safetensors", actor, {"channels": 3, "width": 8, "emb_dim": 16}, "0" * 64)
    load_guidance(good)
    sd = {k: v.clone() for k, v in actor.state_dict().items()}
    for name, meta_actor in (("huge", {"channels": 3, "width": 4096, "emb_dim": 16}),
                             ("negative", {"channels": 3, "width": -8, "emb_dim": 16}),
                             ("deep", None)):
        meta = {"aid.kind": "guidance", "aid.backbone_sha256": "0" * 64,
                "aid.actor": json.dumps(meta_actor) if meta_actor else "[" * 100_000 + "]" * 100_000}
        save_file(sd, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(CheckpointError, match="unusable guidance module"):
            load_guidance(tmp_path / f"{name}.safetensors")
    sd["out.weight"].view(-1)[0] = float("inf")
    save_file(sd, str(tmp_path / "inf.safetensors"), metadata={"aid.kind": "guidance", "aid.backbone_sha256": "0" * 64,
                                                                "aid.actor": json.dumps({"channels": 3, "width": 8,
                                                                                         "emb_dim": 16})})
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_guidance(tmp_path / "inf.safetensors")
