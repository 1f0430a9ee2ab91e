"""Flaky and hostile servers: nothing wrong is ever recorded as a model file, downloads stop at the known size and on a
stall, and temp files of killed writes are cleaned up."""

from __future__ import annotations

import json

import pytest


from .conftest import run_cli
from .test_convert import persistence  # noqa: F401  (a fixture)
from .test_guidance import tiny_data  # noqa: F401  (a fixture: six 16x16 images)
from .test_hardening_files import _in_full_tmpfs


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
