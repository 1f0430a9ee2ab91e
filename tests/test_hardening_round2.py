"""Issue 34, hardening round two: downloads that cannot be spliced or wedged, metadata that cannot eat memory, runs
that cannot collide, no tracebacks and no forged output lines. One test (at least) per numbered failure."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.errors import UserError

from .conftest import TINY_KWARGS, run_cli
from .test_convert import official_layout_bytes, persistence  # noqa: F401  (persistence: a fixture)
from .test_hardening_checkpoints import run_limited
from .test_hardening_files import _in_full_tmpfs
from .test_registry import CACHE_VARS, error_line

CATALOGUE_NAME = "edm-ffhq-64-vp"  # a real catalogue entry (no published sha256), fetched through AID_MODEL_MIRROR
CATALOGUE_FILE = "edm-ffhq-64x64-uncond-vp.pkl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ downloads, 1–4
class Script:
    """What the server does: replies[path] is a list of functions, one per GET in turn (the last one repeats); each
    gets the request handler and writes the whole reply itself (status line, headers, body), raw if it likes."""

    def __init__(self):
        self.replies: dict[str, list] = {}
        self.requests: list[dict] = []
        self.url = ""


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            seen = sum(1 for r in script.requests if r["path"] == self.path)
            script.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                    "if_range": self.headers.get("If-Range")})
            replies = script.replies.get(self.path)
            if not replies:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.close_connection = True
            try:
                replies[min(seen, len(replies) - 1)](self)
                self.wfile.flush()
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("AID_MODEL_MIRROR", f"{script.url}/mirror/")  # the documented override
    from aid_cli import download

    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    yield script
    httpd.shutdown()
    httpd.server_close()


def reply(body: bytes, status: int = 200, headers: dict | None = None, send: int | None = None, drip: float = 0):
    """A reply: the status, headers (Content-Length: len(body) unless given), then `send` bytes of the body (all)."""
    def write(h):
        h.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.end_headers()
        data = body[:send] if send is not None else body
        if drip:
            for i in range(0, len(data), 200):
                h.wfile.write(data[i:i + 200])
                h.wfile.flush()
                time.sleep(drip)
        else:
            h.wfile.write(data)
    return write


def partial(body: bytes, start: int, headers: dict | None = None):
    """A 206 reply from byte `start`, whatever validator was asked for (a server that ignores If-Range)."""
    return reply(body[start:], 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}", **(headers or {})})


def pickles(persistence) -> tuple[bytes, bytes]:  # noqa: F811
    """Two genuine, different official-layout pickles of one size (A and B: two releases of one file)."""
    from aid_cli.backbones.edm import build_precond

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(official_layout_bytes(build_precond("EDMPrecond", dict(TINY_KWARGS)), persistence, "",
                                         dict(TINY_KWARGS)))
    assert len(out[0]) == len(out[1]) and out[0] != out[1]
    return out[0], out[1]


def catalogue_entry():
    from aid_cli.models.catalogue import MODELS

    entry = next(m for m in MODELS if m.name == CATALOGUE_NAME)
    assert entry.sha256 is None and entry.file == CATALOGUE_FILE  # its hash is recorded on the first download
    return entry


def known_hashes() -> dict:
    from aid_cli import paths
    from aid_cli.models import cache

    path = paths.models_dir() / cache.KNOWN_HASHES
    return json.loads(path.read_text()) if path.exists() else {}


def cache_files() -> list[str]:
    from aid_cli import paths

    root = paths.models_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts
                  and p.name != "known-sha256.json") if root.exists() else []


PATH = f"/mirror/{CATALOGUE_FILE}"


def test_mirror_override_fetches_catalogue_files_from_the_given_base(mirror, persistence):  # noqa: F811
    from aid_cli.models.cache import download_urls, fetch_model

    a, _ = pickles(persistence)
    mirror.replies[PATH] = [reply(a, headers={"ETag": '"a"'})]
    entry = catalogue_entry()
    assert download_urls(entry) == [f"{mirror.url}/mirror/{CATALOGUE_FILE}"]
    assert fetch_model(entry).name == f"{CATALOGUE_NAME}.safetensors"
    assert known_hashes()[f"{CATALOGUE_NAME}/{CATALOGUE_FILE}"]["sha256"] == sha256(a)


def test_item1_a_file_changed_between_attempts_is_never_spliced(mirror, persistence):  # noqa: F811
    from aid_cli.models.cache import fetch_model

    a, b = pickles(persistence)
    half = len(a) // 2
    # A, cut half-way; then B (a server that ignores If-Range answers 206 from the same offset); then B whole
    mirror.replies[PATH] = [reply(a, headers={"ETag": '"a"'}, send=half), partial(b, half, {"ETag": '"b"'}),
                            reply(b, headers={"ETag": '"b"'})]
    fetch_model(catalogue_entry())
    assert known_hashes()[f"{CATALOGUE_NAME}/{CATALOGUE_FILE}"]["sha256"] == sha256(b)  # B itself, not a splice
    assert mirror.requests[1]["if_range"] == '"a"' and mirror.requests[1]["range"] == f"bytes={half}-"
    assert mirror.requests[2]["range"] is None  # started over


def test_item1_without_a_validator_a_transfer_starts_over(mirror, persistence):  # noqa: F811
    from aid_cli.models.cache import fetch_model

    a, b = pickles(persistence)
    mirror.replies[PATH] = [reply(a, send=len(a) // 2), reply(b)]  # no ETag, no Last-Modified
    fetch_model(catalogue_entry())
    assert [r["range"] for r in mirror.requests] == [None, None]
    assert known_hashes()[f"{CATALOGUE_NAME}/{CATALOGUE_FILE}"]["sha256"] == sha256(b)


@pytest.mark.parametrize("case", ["html", "short-length", "long-length", "gzip"])
def test_item2_a_bad_first_download_does_not_wedge_the_cache(mirror, persistence, capsys, case):  # noqa: F811
    import gzip

    a, _ = pickles(persistence)
    bad = {"html": reply(b"<html><head><title>503</title></head><body>Service Unavailable, try later</body>"
                         b"</html>\n" + b" " * 20),
           "short-length": reply(a, headers={"Content-Length": str(len(a) - 1000)}),
           "long-length": reply(a, headers={"Content-Length": str(len(a) + 1000)}),
           "gzip": reply(gzip.compress(a), headers={"Content-Encoding": "gzip"})}[case]
    mirror.replies[PATH] = [bad]
    code, out, err = run_cli(["models", "download", CATALOGUE_NAME], capsys)
    line = error_line(code, err)
    assert "verified" not in line, line
    assert f"{CATALOGUE_NAME}/{CATALOGUE_FILE}" not in known_hashes()
    assert not any(f.endswith(".pkl") or f.endswith(".safetensors") for f in cache_files()), cache_files()
    mirror.replies[PATH] = [reply(a, headers={"ETag": '"a"'})]  # the server works again: the next run downloads
    before = len(mirror.requests)
    code, out, err = run_cli(["models", "download", CATALOGUE_NAME], capsys)
    assert code == 0, err
    assert len(mirror.requests) > before
    assert known_hashes()[f"{CATALOGUE_NAME}/{CATALOGUE_FILE}"]["sha256"] == sha256(a)


def test_item3_a_header_trickle_is_cut_by_the_stall_limit(mirror, monkeypatch, capsys):
    from aid_cli import download

    monkeypatch.setattr(download, "STALL_S", 1.0)
    monkeypatch.setattr(download, "ATTEMPTS", 1)

    def trickle(h):  # 1 byte every 0.4 s: a 40-byte header takes 16 s
        for c in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            h.wfile.write(bytes([c]))
            h.wfile.flush()
            time.sleep(0.4)

    mirror.replies[PATH] = [trickle]
    t0 = time.monotonic()
    code, out, err = run_cli(["models", "download", CATALOGUE_NAME], capsys)
    assert "stalled" in error_line(code, err)
    assert time.monotonic() - t0 < 8
    assert cache_files() == [] and f"{CATALOGUE_NAME}/{CATALOGUE_FILE}" not in known_hashes()


def test_item3_an_attempt_has_an_overall_deadline(mirror, monkeypatch, tmp_path):
    from aid_cli import download
    from aid_cli.errors import DownloadError

    monkeypatch.setattr(download, "STALL_S", 1.0)
    monkeypatch.setattr(download, "STALL_BYTES", 100)
    monkeypatch.setattr(download, "ATTEMPT_S", 1.5)
    mirror.replies["/steady"] = [reply(b"x" * 200_000, drip=0.05)]  # 4 KB/s: no stall, but 50 s in all
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        download.download_url(f"{mirror.url}/steady", tmp_path / "f", attempts=1)
    assert time.monotonic() - t0 < 6


def test_item4_a_read_only_model_cache_is_one_line(mirror, tmp_path):
    script = (f'mount -o remount,ro $FULL && AID_CACHE=$FULL/cache $PY -m aid_cli.cli models download '
              f'{CATALOGUE_NAME}; echo "rc=$?"')
    proc = _in_full_tmpfs(script, tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not writable" in lines[0], proc.stderr


# ------------------------------------------------------------------------------------------ memory, items 5–8
def _with_metadata(src: Path, dst: Path, key: str, value: str) -> Path:
    """`src` with metadata `key` set to `value`, the header rewritten by hand (cheap for a value of 100 MB)."""
    import struct

    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.setdefault("__metadata__", {})[key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return dst


@pytest.fixture
def tiny_guidance(tmp_path) -> Path:
    from aid_cli.guidance.checkpoint import save_guidance
    from aid_cli.guidance.networks import Actor

    return save_guidance(tmp_path / "g.safetensors", Actor(width=8), {"channels": 3, "width": 8, "emb_dim": 16},
                         "0" * 64, training={"iterations": 3})


def test_item5_huge_metadata_is_refused_before_parsing(tiny_checkpoint, tiny_guidance, tmp_path):
    cases = [("guidance", tiny_guidance, "aid.training", '{"x": "' + "a" * (66 << 20) + '"}'),
             ("backbone", tiny_checkpoint, "aid.provenance", '{"x": "' + "a" * (72 << 20) + '"}'),
             ("backbone", tiny_checkpoint, "aid.init_kwargs", "[" + "1," * (46 << 20) + "1]"),
             ("backbone", tiny_checkpoint, "aid.provenance", '{"x": "' + "a" * (3 << 20) + '"}')]  # a small header
    for k, (kind, src, key, value) in enumerate(cases):
        bad = _with_metadata(src, tmp_path / f"bad{k}.safetensors", key, value)
        call = "from aid_cli.guidance.checkpoint import load_guidance as load\n" if kind == "guidance" else \
            "from aid_cli.backbones.checkpoint import load_backbone as load\n"
        out, peak = run_limited(call + f"refused(load, {str(bad)!r})")
        assert "REFUSED:" in out and ("header claims" in out or "more than the 1,048,576" in out), out
        assert peak < 500, (key, peak)
    from aid_cli.guidance.checkpoint import load_guidance

    assert load_guidance(tiny_guidance)[1]["training"]["iterations"] == 3  # an ordinary module still loads


def test_item6_a_deflated_storage_archive_is_refused_before_inflating(tmp_path):
    import io
    import pickle
    import zipfile

    from .test_convert import Reduce

    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf)
    inner, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for info in inner.infolist():
            if info.filename.endswith("/data/0"):  # the storage: 700 MB of zeros, deflated to < 1 MB
                with z.open(info.filename, "w", force_zip64=True) as f:
                    block = bytes(1 << 20)
                    for _ in range(700):
                        f.write(block)
            else:
                z.writestr(info.filename, inner.read(info))
    src = tmp_path / "bomb.pkl"
    src.write_bytes(pickle.dumps({"ema": Reduce(torch.storage._load_from_bytes, out.getvalue())}, protocol=4))
    assert src.stat().st_size < 2_000_000
    out_text, peak = run_limited(f"from aid_cli.backbones.convert import convert_pickle\n"
                                 f"refused(convert_pickle, {str(src)!r}, {str(tmp_path / 'o.safetensors')!r})")
    assert "REFUSED:" in out_text and "nothing was inflated" in out_text, out_text
    assert peak < 500 and not (tmp_path / "o.safetensors").exists()


def _many_entries_zip(path: Path, n: int) -> Path:
    """A real zip of `n` empty stored entries `NNNNNNN.png` (ZIP64 end records), written without zipfile's own index
    (which would cost the writer what it costs the reader)."""
    import struct

    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, 11, 0) + b"0000000.png"
    head = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, 11, 0, 0, 0, 0, 0, 0)
    central = b"".join(head + b"%07d.png" % i for i in range(n))
    offset = len(local)
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(central), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + central + z64 + locator + end)
    return path


def test_item7_a_zip_of_a_million_entries_is_one_line_in_little_memory(tmp_path):
    import zipfile

    path = _many_entries_zip(tmp_path / "many.zip", 1_000_000)
    assert zipfile.is_zipfile(path)
    out, peak = run_limited(f"from aid_cli.data.datasets import load_image_set\n"
                            f"refused(load_image_set, {str(path)!r}, resolution=16)\n")
    assert "REFUSED:" in out and "lists 1,000,000 entries" in out, out
    assert peak < 500
    small = _many_entries_zip(tmp_path / "few.zip", 3)  # under the cap: indexed, each empty entry skipped
    with pytest.raises(UserError, match="no readable images"):
        __import__("aid_cli.data.datasets", fromlist=["x"]).load_image_set(small, resolution=16)


def test_item8_a_huge_png_is_refused_from_its_header_in_little_memory(tmp_path):
    from .test_hardening_files import _huge_png_header

    big = tmp_path / "big.png"
    big.write_bytes(_huge_png_header(13_000, 13_000))  # 169 M pixels: under Pillow's own error limit (179 M)
    out, peak = run_limited(f"from aid_cli.data.images import load_image\nrefused(load_image, {str(big)!r})")
    assert "REFUSED:" in out and "memory budget" in out and "13000x13000" in out, out
    assert peak < 500


# ------------------------------------------------------------------------------------------- tracebacks, 12–18
@pytest.fixture
def pair(tmp_path):
    img, mask = tmp_path / "photo.png", tmp_path / "m.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    hole = np.zeros((16, 16), np.uint8)
    hole[4:10, 4:10] = 255
    Image.fromarray(hole).save(mask)
    return img, mask


def test_item12_special_files_as_images_are_one_line(pair, tmp_path, capsys):
    import os

    img, mask = pair
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for special in (fifo, Path("/dev/null"), tmp_path / "zero.png"):
        for args in (["inpaint", special, "--mask", mask], ["inpaint", img, "--mask", special]):
            code, out, err = run_cli([*args, "-o", tmp_path / "o.png", "--method", "copy"], capsys)
            assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert "not a regular file" in err, err
    assert not (tmp_path / "o.png").exists()


FILL = ["--method", "replace", "--steps", "2", "--device", "cpu"]


def test_item18_an_exif_directory_of_65535_broken_entries_is_one_warning(pair, tmp_path, capsys, tiny_checkpoint):
    import io
    import struct

    img, mask = pair
    n = 65_535  # every entry claims 1,000 bytes at offset 8: after the first few, "larger than the file"
    ifd = (b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", n)
           + b"".join(struct.pack(">HHII", 1000 + i % 60_000, 2, 1000, 8) for i in range(n)) + b"\0\0\0\0")
    buf = io.BytesIO()
    Image.open(img).save(buf, "PNG", exif=ifd)
    exif = tmp_path / "exif.png"
    exif.write_bytes(buf.getvalue())
    code, out, err = run_cli(["inpaint", exif, "--mask", mask, "-o", tmp_path / "o.png", "--model", tiny_checkpoint,
                              *FILL], capsys)
    assert code == 0, err[-2000:]
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "more like it" in warned[0], warned[:5]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_item18_a_multi_frame_file_says_it_uses_the_first_frame(pair, tmp_path, capsys, fmt, tiny_checkpoint):
    img, mask = pair
    frames = [Image.open(img).convert("RGB"), Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")]
    anim = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(anim, fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    code, out, err = run_cli(["inpaint", anim, "--mask", mask, "-o", tmp_path / "o.png", "--model", tiny_checkpoint,
                              *FILL], capsys)
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "3 frames" in warned[0] and "only the first is used" in warned[0], err


def test_item9_two_runs_without_o_never_pick_the_same_output(pair, tmp_path, capsys, tiny_checkpoint):
    from aid_cli.jobs import plan_jobs, release_jobs

    img, mask = pair
    first, _ = plan_jobs([img], mask, None, 1)  # two runs planned at once, neither has written yet
    second, _ = plan_jobs([img], mask, None, 1)
    assert first[0].outputs == [tmp_path / "photo-filled.png"]
    assert second[0].outputs == [tmp_path / "photo-filled-2.png"]
    release_jobs(first + second)
    assert not list(tmp_path.glob("photo-filled*"))  # never written: the claims are given back
    # a run that fails after planning (an unreadable model) leaves no empty claim behind
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "--model", tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and not list(tmp_path.glob("photo-filled*")), err
    for seed in (1, 2):
        code, out, err = run_cli(["inpaint", img, "--mask", mask, "--model", tiny_checkpoint, "--seed", str(seed),
                                  *FILL], capsys)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("photo-filled*")) == ["photo-filled-2.png", "photo-filled.png"]
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("photo-filled*"))


# ----------------------------------------------------------------------------------------- runs, items 10, 11, 13, 16
from .test_guidance import cfg_for, tiny_data  # noqa: E402,F401  (tiny_data: a fixture, six 16x16 images)


def _train_args(data, run, backbone, *extra):
    return ["train", "--dataset", data, "--out", run, "--backbone", backbone, "--iters", "3", "--batch", "2",
            "--steps", "3", "--device", "cpu", *extra]


def _iterations(run: Path) -> list[int]:
    return [json.loads(ln)["iteration"] for ln in (run / "stats.jsonl").read_text().splitlines()
            if "actor_loss" in json.loads(ln)]


def test_item10_a_second_process_on_one_run_folder_is_refused(tiny_data, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from filelock import FileLock

    from aid_cli.guidance.trainer import train

    run = tmp_path / "r"
    train(cfg_for(tiny_data, run, tiny_checkpoint, iters=3), max_iters=2, progress=False, log=lambda *a: None)
    before = (run / "stats.jsonl").read_text()
    with FileLock(str(run / ".lock")):  # another `aid train --resume` is training in this folder
        code, out, err = run_cli(_train_args(tiny_data, run, tiny_checkpoint, "--resume"), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "in use by another training process" in err, err
        assert (run / "stats.jsonl").read_text() == before  # nothing logged twice
    code, out, err = run_cli(_train_args(tiny_data, run, tiny_checkpoint, "--resume"), capsys)  # released: it goes on
    assert code == 0, err
    assert _iterations(run) == [1, 2, 3]


def test_item10_pretrain_holds_its_run_folder_too(tiny_data, tmp_path, capsys):  # noqa: F811
    from filelock import FileLock

    run = tmp_path / "p"
    run.mkdir()
    with FileLock(str(run / ".lock")):
        code, out, err = run_cli(["pretrain", "--dataset", tiny_data, "--resolution", "16", "--width", "16",
                                  "--channel-mult", "1,2", "--attn", "8", "--batch", "4", "--duration", "0.004",
                                  "--out", run, "--device", "cpu"], capsys)
    assert code == 2 and "in use by another training process" in err, err
    assert not (run / "stats.jsonl").exists()


def test_item11_a_rerun_after_a_kill_before_the_first_checkpoint_logs_afresh(tiny_data, tiny_checkpoint,  # noqa: F811
                                                                             tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    # what `aid train` killed at iteration 2, before its first checkpoint (3), leaves: a config and a log, no state
    (run / "config.json").write_text(json.dumps({"iters": 3}))
    (run / "stats.jsonl").write_text("".join(json.dumps({"iteration": i, "actor_loss": 0.5}) + "\n" for i in (1, 2)))
    code, out, err = run_cli(_train_args(tiny_data, run, tiny_checkpoint, "--resume"), capsys)
    assert code == 2 and "without --resume" in err, err
    code, out, err = run_cli(_train_args(tiny_data, run, tiny_checkpoint), capsys)
    assert code == 0, err
    assert _iterations(run) == [1, 2, 3] and "started afresh" in err


def test_item13_a_deeply_nested_stats_line_is_dropped_on_resume(tiny_data, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from aid_cli.guidance.trainer import train
    from aid_cli.training import read_jsonl, truncate_log

    run = tmp_path / "r"
    train(cfg_for(tiny_data, run, tiny_checkpoint, iters=3), max_iters=2, progress=False, log=lambda *a: None)
    with open(run / "stats.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    assert [r["iteration"] for r in read_jsonl(run / "stats.jsonl") if "actor_loss" in r] == [1, 2]
    code, out, err = run_cli(_train_args(tiny_data, run, tiny_checkpoint, "--resume"), capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert _iterations(run) == [1, 2, 3]
    (run / "x.jsonl").write_text('{"step": 1}\n' + '{"a":' * 100_000 + "}" * 100_000 + "\n")
    assert truncate_log(run / "x.jsonl", "step", 5) == 1


def test_item16_train_reports_the_images_it_skips(tiny_data, tiny_checkpoint, tmp_path):  # noqa: F811
    from aid_cli.guidance.trainer import train

    (tiny_data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    logs = []
    train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, iters=1, val_dataset=None), progress=False,
          log=lambda *a: logs.append(" ".join(map(str, a))))
    assert any(line.startswith("skipped broken.png") for line in logs), logs


# ---------------------------------------------------------------------------------- items 14, 15, 17
def _bench_args(data, backbone, out, *extra):
    return ["bench", "--methods", "replace", "--dataset", data, "--model", backbone, "--n", "2", "--steps", "2",
            "--masks", "center", "--device", "cpu", "--out", out, *extra]


def test_item14_bench_output_targets_are_checked_before_the_first_cell(tiny_data, tiny_checkpoint,  # noqa: F811
                                                                        tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, out, err = run_cli(_bench_args(tiny_data, tiny_checkpoint, tmp_path / "b1", "--json", folder), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a folder" in err, err
    assert not (tmp_path / "b1").exists()  # not a single cell was run
    md = tmp_path / "ro" / "README.md"
    script = (f'mkdir -p $FULL/ro && printf "x\\n<!-- aid bench: start -->\\n<!-- aid bench: end -->\\n" > '
              f'$FULL/ro/README.md && mount -o remount,ro $FULL && $PY -m aid_cli.cli '
              + " ".join(str(a) for a in _bench_args(tiny_data, tiny_checkpoint, tmp_path / "b2"))
              + ' --markdown $FULL/ro/README.md; echo "rc=$?"')
    proc = _in_full_tmpfs(script, tmp_path)
    assert "rc=2" in proc.stdout and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr[-2000:])
    assert "--markdown" in proc.stderr and "not writable" in proc.stderr, proc.stderr
    assert not (tmp_path / "b2").exists() and not md.exists()
    code, out, err = run_cli(_bench_args(tiny_data, tiny_checkpoint, tmp_path / "b3", "--json", tmp_path / "r.json"),
                             capsys)
    assert code == 0 and json.loads((tmp_path / "r.json").read_text()), err  # a writable target: as before


def test_item15_a_newline_in_a_file_name_cannot_forge_an_error_line(tiny_data, tmp_path, capsys):  # noqa: F811
    (tiny_data / "x\nerror: forged.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tiny_data / "y\rerror: forged.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, err = run_cli(["pretrain", "--dataset", tiny_data, "--resolution", "16", "--width", "16",
                              "--channel-mult", "1,2", "--attn", "8", "--batch", "4", "--duration", "0.004",
                              "--snapshot-kimg", "0", "--out", tmp_path / "run", "--device", "cpu"], capsys)
    assert code == 0, err
    assert not any(line.startswith("error:") for line in err.splitlines()), err
    assert "\r" not in err and "x\\x0aerror: forged.png" in err and "y\\x0derror: forged.png" in err, err


def test_item17_stale_temps_of_a_killed_save_are_removed_by_the_next_write(pair, tmp_path, capsys, tiny_checkpoint):
    import fcntl
    import os

    img, mask = pair
    stale = tmp_path / ".o.png.k1ll9x.tmp.png"  # what kill -9 during the save of o.png left
    stale.write_bytes(b"\0" * (1 << 20))
    live = tmp_path / ".o.png.l1ve00.tmp.png"  # another process is writing o.png right now: its temp is locked
    live.write_bytes(b"\0" * 100)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--model",
                                  tiny_checkpoint, *FILL], capsys)
        assert code == 0, err
        assert (tmp_path / "o.png").stat().st_size > 0
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.glob(".o.png.*")) == [live.name]
