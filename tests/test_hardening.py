"""Issue 18: hostile files and flaky servers get one line and exit 2, no memory blow-up, nothing lost or poisoned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.errors import UserError

from .conftest import run_cli


# ---------------------------------------------------------------------------------------------------------------- item 1
from .test_guidance import cfg_for as _train_cfg  # noqa: E402  the training tests' tiny actor-critic run
from .test_guidance import tiny_data  # noqa: E402,F401  (a fixture: six 16x16 images)


def test_read_stats_drops_a_torn_last_line_with_a_notice(tmp_path):
    from aid_cli.training import read_jsonl as read_stats

    path = tmp_path / "stats.jsonl"
    path.write_text('{"iteration": 1, "actor_loss": 0.1}\n{"iteration": 2}\n{"iteration": 61, "actor_loss": 0.12')
    notes = []
    assert [r["iteration"] for r in read_stats(path, notice=notes.append)] == [1, 2]
    assert len(notes) == 1 and "dropped 1" in notes[0]


def test_torn_stats_line_then_resume_trains_on_and_logs_each_iteration_once(tiny_data, tiny_checkpoint, tmp_path):
    from aid_cli.guidance.trainer import train

    run = tmp_path / "r"
    train(_train_cfg(tiny_data, run, tiny_checkpoint), max_iters=3, progress=False, log=lambda *a: None)
    stats = run / "stats.jsonl"
    # a killed run logged iteration 4 after its last checkpoint (3), then died while appending iteration 5
    with open(stats, "a") as f:
        f.write('{"iteration": 4, "actor_loss": 0.5}\n{"iteration": 5, "actor_loss": 0.12')
    (run / ".training-state.safetensors.abcd.tmp.safetensors").write_bytes(b"\0" * 100)  # a write killed half-way
    logs = []
    train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=logs.append)
    recs = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [r["iteration"] for r in recs if "actor_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["iteration"] == 6 and recs[-1]["actor_loss"] != 0.5
    assert any("cut back to iteration 3" in str(line) for line in logs)
    assert any("stale temp" in str(line) for line in logs)
    assert not list(run.glob(".*.tmp*"))
    from aid_cli.guidance.checkpoint import load_guidance

    assert load_guidance(run / "guidance.safetensors")[1]["training"]["iterations"] == 6  # the module kept up


def test_resume_with_corrupt_config_or_state_is_one_line(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from aid_cli.guidance.trainer import STATE_FILE, train

    run = tmp_path / "r"
    train(_train_cfg(tiny_data, run, tiny_checkpoint, iters=3), progress=False, log=lambda *a: None)
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config[:40])
    with pytest.raises(UserError, match="config.json is missing or corrupt"):
        train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=lambda *a: None)
    (run / "config.json").write_text(config)
    state = (run / STATE_FILE).read_bytes()
    (run / STATE_FILE).write_bytes(state[: len(state) // 2])
    with pytest.raises(UserError, match="training state .* corrupt"):
        train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=lambda *a: None)
    (run / STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":')
    code, out, err = run_cli(["train", "--dataset", tiny_data, "--out", run, "--backbone", tiny_checkpoint,
                              "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_pretrain_resume_cuts_its_log_back_too(tmp_path):
    from aid_cli.training import truncate_log

    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    assert truncate_log(path, "step", 4) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]


def test_fractional_snapshot_kimg_keeps_every_snapshot(tiny_data, tmp_path):
    from aid_cli.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(dataset=str(tiny_data), out=str(tmp_path / "p"), resolution=16, model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], batch=4, lr=1e-3,
                         lr_rampup_kimg=0.008, ema_halflife_kimg=0.01, duration_kimg=0.016, snapshot_kimg=0.008,
                         checkpoint_minutes=60.0, seed=3)
    run = pretrain(cfg, progress=False, log=lambda *a: None)
    names = sorted(p.name for p in run.glob("network-snapshot-*.safetensors"))
    assert names == ["network-snapshot-000000.008.safetensors", "network-snapshot-000000.016.safetensors"]


# ---------------------------------------------------------------------------------------------------------------- item 2
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


def _png_bytes(size=(16, 16)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _huge_png_header(w: int, h: int) -> bytes:
    """A few dozen bytes that say: a w x h RGB PNG."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _patch_central(data: bytes, name: str, offset: int, value: bytes) -> bytes:
    """Overwrite a field of `name`'s central-directory record (flags +8, method +10, uncompressed size +24)."""
    i = data.index(b"PK\x01\x02")
    while True:
        n = int.from_bytes(data[i + 28:i + 30], "little")
        if data[i + 46:i + 46 + n].decode() == name:
            return data[:i + offset] + value + data[i + offset + len(value):]
        i = data.index(b"PK\x01\x02", i + 4)


def test_dataset_zip_bad_entries_are_skipped_and_reported(tmp_path):
    import zipfile

    from aid_cli.data.datasets import load_image_set

    png = _png_bytes()
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("0-good.png", png, compress_type=zipfile.ZIP_STORED)
        z.writestr("1-badcrc.png", png, compress_type=zipfile.ZIP_STORED)
        z.writestr("2-deflate.png", png, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("3-encrypted.png", png, compress_type=zipfile.ZIP_STORED)
        z.writestr("4-method.png", png, compress_type=zipfile.ZIP_STORED)
        z.writestr("5-inflates.png", b"\0" * 1024, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("6-huge.png", _huge_png_header(50_000, 50_000), compress_type=zipfile.ZIP_STORED)
        z.writestr("7-x[/]\x1b[31m.png", b"not a png", compress_type=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
    at = infos["1-badcrc.png"].header_offset + 30 + len("1-badcrc.png") + 40
    data[at] ^= 0xFF  # a flipped byte inside the stored image: the CRC no longer matches
    at = infos["2-deflate.png"].header_offset + 30 + len("2-deflate.png") + 5
    data[at:at + 8] = b"\xff" * 8  # broken deflate stream
    data = bytes(data)
    data = _patch_central(data, "3-encrypted.png", 8, b"\x01\x00")
    data = _patch_central(data, "4-method.png", 10, b"\x63\x00")  # method 99
    data = _patch_central(data, "5-inflates.png", 24, (1536 << 20).to_bytes(4, "little"))  # says 1.5 GiB
    path.write_bytes(data)
    skips = []
    data_set = load_image_set(path, resolution=16, on_skip=lambda n, why: skips.append((n, why)))
    assert data_set.names == ["0-good.png"]
    reasons = dict(skips)
    assert set(reasons) == {"1-badcrc.png", "2-deflate.png", "3-encrypted.png", "4-method.png", "5-inflates.png",
                            "6-huge.png", "7-x[/]\x1b[31m.png"}, reasons
    assert "CRC" in reasons["1-badcrc.png"] and "encrypted" in reasons["3-encrypted.png"]
    assert "compression" in reasons["4-method.png"] and "inflates" in reasons["5-inflates.png"]
    assert "pixels" in reasons["6-huge.png"] or "exceeds" in reasons["6-huge.png"]


def test_dataset_bombs_stay_in_little_memory(tmp_path):
    import zipfile

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("0.png", _png_bytes())
        z.writestr("1.png", _huge_png_header(50_000, 50_000))
        z.writestr("2.png", _huge_png_header(9_000, 9_000))  # 81 M pixels: above our cap, below Pillow's own
        z.writestr("3.png", b"\0" * (300 << 20), compress_type=zipfile.ZIP_DEFLATED)  # inflates to 300 MB
    assert path.stat().st_size < 2_000_000
    out, peak = run_limited(f"from aid_cli.data.datasets import load_image_set\n"
                            f"d = load_image_set({str(path)!r}, resolution=16)\n"
                            f"print('LOADED', d.names, len(d.skipped))\n")
    assert "LOADED ['0.png'] 3" in out, out
    assert peak < 500


def test_markup_and_escape_codes_in_file_names_are_printed_inert(tiny_data, tmp_path, capsys):
    (tiny_data / "x[").mkdir()
    (tiny_data / "x[" / "].png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # listed as x[/].png
    (tiny_data / "\x1b[31mred\x07.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, err = run_cli(["pretrain", "--dataset", tiny_data, "--resolution", "16", "--width", "16",
                              "--channel-mult", "1,2", "--attn", "8", "--batch", "4", "--duration", "0.004",
                              "--snapshot-kimg", "0", "--out", tmp_path / "run", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "skipped x[/].png" in err and "\x1b" not in err and "\x07" not in err
    assert "\\x1b[31mred\\x07.png" in err
    img = tmp_path / "\x1b]0;pwned\x07.png"
    code, out, err = run_cli(["inpaint", img, "--mask", img, "-o", tmp_path / "o.png"], capsys)
    assert code == 2 and "\x1b" not in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------------------- item 5
def _png_with_chunk(mode: str, chunk: bytes, body: bytes, plte: int | None = None) -> bytes:
    import io
    import struct
    import zlib

    im = Image.new(mode, (8, 8))
    if mode == "P":
        im.putpalette([0, 0, 0, 255, 0, 0])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    data, out, i = buf.getvalue(), buf.getvalue()[:8], 8
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        kind, old = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        new = body if kind == chunk else (old[:3 * plte] if kind == b"PLTE" and plte else old)
        out += struct.pack(">I", len(new)) + kind + new + struct.pack(">I", zlib.crc32(kind + new))
        i += 12 + n
    return out


def test_palette_png_with_more_transparency_than_palette_is_clean(tmp_path, capsys):
    img, mask = tmp_path / "p.png", tmp_path / "m.png"
    img.write_bytes(_png_with_chunk("P", b"tRNS", b"\xff" * 300, plte=2))  # 300 alpha entries, 2 colours
    Image.new("L", (8, 8), 255).save(mask)
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--method", "copy"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "cannot be converted to RGBA" in err and not (tmp_path / "o.png").exists()
    code, out, err = run_cli(["inpaint", mask, "--mask", img, "-o", tmp_path / "o.png", "--method", "copy"], capsys)
    assert code in (0, 2) and "Traceback" not in err, err  # as a mask it reads (greyscale conversion) or is refused


def _in_full_tmpfs(script: str, tmp_path, size="320k") -> "subprocess.CompletedProcess":
    """Run a shell script with $FULL a tmpfs of `size` (a private mount namespace: nothing outside sees it)."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    full = tmp_path / "full"
    full.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {full}"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode()[:100]}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FULL=str(full), PY=sys.executable)
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {full} && {script}"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_full_disk_is_one_line_and_leaves_no_partial_file(tiny_checkpoint, tmp_path, persistence):
    from aid_cli.backbones.edm import build_precond

    from .conftest import TINY_KWARGS
    from .test_convert import official_layout_bytes

    big = tmp_path / "big.png"  # ~800 KB of noise: more than the tmpfs holds
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(big)
    mask = tmp_path / "mask.png"
    Image.new("L", (512, 512), 0).save(mask)
    src = tmp_path / "edm-tiny.pkl"
    net = build_precond("EDMPrecond", dict(TINY_KWARGS, model_channels=64))
    src.write_bytes(official_layout_bytes(net, persistence, "", dict(TINY_KWARGS, model_channels=64)))
    script = (f'$PY -m aid_cli.cli inpaint {big} --mask {mask} -o $FULL/out.png --method copy; echo "rc=$?"; '
              f'$PY -m aid_cli.cli models convert {src} $FULL/conv.safetensors; echo "rc=$?"; ls -A $FULL')
    proc = _in_full_tmpfs(script, tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("rc=2") == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("no space left" in line for line in errors), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "rc=2"  # `ls -A` printed nothing: no partial or temp file


def test_python_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    def noisy(*a, **k):
        warnings.warn("invalid value encountered in cast", RuntimeWarning)
        raise UserError("stop here")

    monkeypatch.setattr("aid_cli.pretrain.pretrain", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, out, err = run_cli(["pretrain", "--dataset", tmp_path, "--out", tmp_path / "r"], capsys)
    assert "warning: invalid value encountered in cast" in err and "warnings.warn" not in err, err


# ------------------------------------------------------------------------------------------------------------ fuzz test
def _seed_images() -> dict[str, bytes]:
    import io

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    out = {}
    for fmt, im, kw in (("PNG", rgb, {}), ("PNG", rgb.convert("P"), {"transparency": 3}), ("JPEG", rgb, {}),
                        ("WEBP", rgb, {"lossless": True}), ("GIF", rgb.convert("P"), {}),
                        ("TIFF", rgb, {"compression": "tiff_lzw"}), ("PNG", rgb.convert("I;16"), {})):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[f"{fmt}-{im.mode}"] = buf.getvalue()
    return out


def _mutate(data: bytes, rng) -> bytes:
    b = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.integers(1, 8)):
            b[rng.integers(len(b))] = rng.integers(256)
    elif kind == 1:  # cut off
        b = b[:rng.integers(1, len(b))]
    elif kind == 2:  # a run of 0xff / 0x00 (lengths and sizes become huge or zero)
        at = rng.integers(len(b))
        b[at:at + 4] = bytes([0xFF if rng.integers(2) else 0]) * 4
    elif kind == 3:  # duplicate a slice
        i, j = sorted(rng.integers(len(b), size=2))
        b = b[:j] + b[i:j] + b[j:]
    else:  # overwrite the header area
        for _ in range(3):
            b[rng.integers(min(len(b), 64))] = rng.integers(256)
    return bytes(b)


def test_fuzzed_image_files_give_only_the_projects_error(tmp_path, capfd):
    import time
    import warnings

    from aid_cli.data.images import load_image, load_mask

    rng = np.random.default_rng(18)
    seeds = _seed_images()
    tried = refused = 0
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own warnings are not what this test checks
        for name, data in seeds.items():
            for k in range(50):
                path = tmp_path / f"{name}-{k}.img"
                path.write_bytes(_mutate(data, rng))
                tried += 1
                try:
                    im = load_image(path)
                    load_mask(path, im.size)
                except UserError as e:
                    refused += 1
                    assert "\n" not in str(e)
                except Exception as e:  # anything else is a traceback for the user
                    raise AssertionError(f"{name} case {k}: {type(e).__name__}: {e}") from None
    assert tried == 50 * len(seeds) and refused > tried // 4  # most mutations break the file
    assert time.time() - t0 < 120
    assert capfd.readouterr().err == ""  # nothing printed raw by a C decoder (libtiff) either


# ------------------------------------------------------------------------------------------------------- items 3, 4
from .test_registry import (error_line, home, server, url_entry, use_models)  # noqa: E402,F401  (fixtures too)


@pytest.fixture
def hostile():
    """A local server (127.0.0.1) whose replies misbehave: serve[path] = (status, headers, body, drip seconds)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served: dict[str, tuple] = {}
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            import time

            seen.append((self.path, self.headers.get("Range")))
            status, headers, body, drip = served[self.path](self.headers.get("Range")) \
                if callable(served.get(self.path)) else served.get(self.path, (404, {}, b"", 0))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                if drip:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(drip)
                else:
                    self.wfile.write(body)
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_html_error_page_is_never_recorded_and_rm_can_forget(home, server, monkeypatch, persistence, capsys):
    from aid_cli import paths
    from aid_cli.models import cache
    from aid_cli.backbones.edm import build_precond

    from .conftest import TINY_KWARGS
    from .test_convert import official_layout_bytes

    entry = url_entry(server, name="tiny-edm", file="edm-tiny.pkl")
    use_models(monkeypatch, entry)
    known = paths.models_dir() / cache.KNOWN_HASHES
    server.plain["/files/edm-tiny.pkl"] = b"<html><body>503 Service Unavailable</body></html>"
    code, out, err = run_cli(["models", "download", "tiny-edm"], capsys)
    assert "converting it failed" in error_line(code, err)
    assert not known.exists() or "tiny-edm/edm-tiny.pkl" not in json.loads(known.read_text())  # not poisoned
    run_cli(["models", "rm", "tiny-edm"], capsys)
    good = official_layout_bytes(build_precond("EDMPrecond", dict(TINY_KWARGS)), persistence, "", dict(TINY_KWARGS))
    server.plain["/files/edm-tiny.pkl"] = good
    code, out, err = run_cli(["models", "download", "tiny-edm"], capsys)
    assert code == 0, err
    import hashlib

    assert json.loads(known.read_text())["tiny-edm/edm-tiny.pkl"]["sha256"] == hashlib.sha256(good).hexdigest()
    code, out, err = run_cli(["models", "rm", "tiny-edm", "--forget-hash"], capsys)
    assert code == 0 and "forgotten" in err
    assert "tiny-edm/edm-tiny.pkl" not in json.loads(known.read_text())


def test_partial_reply_from_another_offset_is_never_taken_as_the_file(hostile, tmp_path, monkeypatch):
    from aid_cli import download

    served, url, seen = hostile
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    data = bytes(range(256)) * 40

    def reply(rng):
        if rng:  # asked to resume: answers from byte 100 instead
            return 206, {"Content-Range": f"bytes 100-{len(data) - 1}/{len(data)}",
                         "Content-Length": str(len(data) - 100), "ETag": '"v1"'}, data[100:], 0
        return 200, {"Content-Length": str(len(data)), "ETag": '"v1"'}, data, 0

    served["/f"] = reply
    dest = tmp_path / "f.bin"
    download.part_path(dest).write_bytes(data[:1000])
    download.validator_path(download.part_path(dest)).write_text(json.dumps({"ETag": '"v1"'}))  # begun under v1
    download.download_url(f"{url}/f", dest, attempts=2)
    assert dest.read_bytes() == data and seen == [("/f", "bytes=1000-"), ("/f", None)]


def test_downloads_stop_at_the_known_size_and_on_a_stall(hostile, tmp_path, monkeypatch):
    from aid_cli import download
    from aid_cli.errors import DownloadError

    served, url, seen = hostile
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    served["/announced"] = (200, {"Content-Length": str(10_000)}, b"x" * 10_000, 0)
    served["/unannounced"] = (200, {}, b"x" * 300_000, 0)  # no length: closes the connection at the end
    with pytest.raises(DownloadError, match="announces 10,000 bytes, but the file has 1,000"):
        download.download_url(f"{url}/announced", tmp_path / "a", size=1000, attempts=1)
    with pytest.raises(DownloadError, match="sends more than the 1,000 bytes"):
        download.download_url(f"{url}/unannounced", tmp_path / "b", size=1000, attempts=1)
    assert not list(tmp_path.iterdir())  # no part, no file
    monkeypatch.setattr(download, "MAX_BYTES", 5000)  # size unknown, no length announced: the overall cap holds
    with pytest.raises(DownloadError, match="sends more than the 5,000 bytes"):
        download.download_url(f"{url}/unannounced", tmp_path / "b", attempts=1)
    with pytest.raises(DownloadError, match="more than any model file"):
        download.download_url(f"{url}/announced", tmp_path / "a", attempts=1)
    assert not list(tmp_path.iterdir())

    import time

    monkeypatch.setattr(download, "STALL_S", 0.6)
    monkeypatch.setattr(download, "STALL_BYTES", 100)
    served["/drip"] = (200, {"Content-Length": "1000"}, b"y" * 1000, 0.1)  # 10 bytes/s
    t0 = time.time()
    with pytest.raises(DownloadError, match="stalled"):
        download.download_url(f"{url}/drip", tmp_path / "c", attempts=1)
    assert time.time() - t0 < 10


def test_redirect_loop_is_one_line(hostile, tmp_path):
    from aid_cli import download
    from aid_cli.errors import DownloadError

    served, url, seen = hostile
    served["/loop"] = (302, {"Location": f"{url}/loop", "Content-Length": "0"}, b"", 0)
    with pytest.raises(DownloadError) as info:
        download.download_url(f"{url}/loop", tmp_path / "l", attempts=1)
    assert "redirect loop" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------- item 6
def test_folder_mode_goes_on_past_bad_images_and_counts_them(tiny_checkpoint, tmp_path, capsys):
    images, masks, out_dir = tmp_path / "images", tmp_path / "masks", tmp_path / "filled"
    images.mkdir()
    masks.mkdir()
    for stem in ("a", "c", "e"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{stem}.png")
        mask = Image.new("L", (24, 20), 0)
        mask.paste(255, (4, 4, 12, 12))
        mask.save(masks / f"{stem}.png")
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("L", (24, 20), 255).save(masks / "b.png")
    Image.new("RGB", (30, 30)).save(images / "d.png")  # its mask has another size
    Image.new("L", (24, 20), 255).save(masks / "d.png")
    code, out, err = run_cli(["inpaint", images, "--mask", masks, "-o", out_dir, "--model", tiny_checkpoint,
                              "--method", "replace", "--steps", "2", "--device", "cpu", "--json"], capsys)
    assert code == 2, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "c.png", "e.png"]
    assert "skipped b.png" in err and "skipped d.png" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: 2 of 5 images could not be inpainted")
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert sorted(Path(r["path"]).name for r in recs if "path" in r) == ["a.png", "c.png", "e.png"]
    assert sorted(Path(r["image"]).name for r in recs if "error" in r) == ["b.png", "d.png"]


def test_full_disk_in_training_and_download_is_one_line(tiny_data, tiny_checkpoint, tmp_path, hostile):
    served, url, seen = hostile
    served["/big"] = (200, {"Content-Length": str(600_000)}, b"z" * 600_000, 0)
    script = (f'$PY -m aid_cli.cli pretrain --dataset {tiny_data} --resolution 16 --width 16 --channel-mult 1,2 '
              f'--attn 8 --batch 4 --duration 0.004 --out $FULL/run --device cpu; echo "rc=$?"; '
              f'$PY -m aid_cli.cli train --dataset {tiny_data} --backbone {tiny_checkpoint} --out $FULL/aid '
              f'--iters 2 --batch 2 --device cpu; echo "rc=$?"; rm -rf $FULL/*; '
              f'$PY -c "import sys; from aid_cli import cli, download; sys.argv[0] = \'aid\'; '
              f'download.download_url(\'{url}/big\', \'$FULL/big.bin\', attempts=1)" 2>&1 | tail -1; echo "rc=$?"; '
              f'ls -A $FULL')
    proc = _in_full_tmpfs(script, tmp_path, size="200k")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("rc=2") == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("no space left" in line for line in errors), proc.stderr
    assert "DownloadError: no space left on the device for big.bin.part" in proc.stdout, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "big.bin.part"  # kept, to resume; nothing else


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


def test_fuzzed_dataset_zip_skips_bad_entries_quietly(tmp_path, capfd):
    import zipfile

    from aid_cli.data.datasets import load_image_set

    rng = np.random.default_rng(19)
    path = tmp_path / "fuzz.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("000-good.png", _png_bytes())
        for name, data in _seed_images().items():
            for k in range(15):
                z.writestr(f"{name}-{k:02d}.{name.split('-')[0].lower()}", _mutate(data, rng))
    skips = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may warn either
        d = load_image_set(path, resolution=16, on_skip=lambda n, why: skips.append(n))
    images = [n for n in zipfile.ZipFile(path).namelist() if not n.endswith(".gif")]  # GIF: not a dataset suffix
    assert len(d) + len(skips) == len(images) and len(d) >= 1 and len(skips) > 20
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------------- item 7
def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    from aid_cli import fileio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    fileio.atomic_write_text(tmp_path / "x.txt", "hello")
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp.txt") and events[2][1] == str(tmp_path)


def test_model_cache_temp_left_by_a_killed_conversion_is_removed(home, server, monkeypatch, tiny_bytes):
    from aid_cli import paths
    from aid_cli.models import cache

    entry = url_entry(server)
    use_models(monkeypatch, entry)
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    folder = cache.model_folder(entry)
    folder.mkdir(parents=True)
    (folder / ".tiny-url.safetensors.k1ll.tmp.safetensors").write_bytes(b"\0" * 1000)
    cache.fetch_model(entry)
    assert not list(folder.glob(".*.tmp*"))


@pytest.fixture
def tiny_bytes(tiny_checkpoint) -> bytes:
    return tiny_checkpoint.read_bytes()
