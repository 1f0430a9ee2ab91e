"""Hostile images and dataset zips, full disks and warnings: one line, no memory blow-up, nothing half-written; folder
mode goes on past bad images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aid_cli.errors import UserError

from .conftest import run_cli
from .test_convert import persistence  # noqa: F401  (a fixture)
from .test_guidance import tiny_data  # noqa: F401  (a fixture: six 16x16 images)
from .test_hardening_checkpoints import run_limited


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
