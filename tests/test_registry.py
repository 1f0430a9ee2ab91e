"""The model registry against a local HTTP server (127.0.0.1): a plain URL with Range support and the Hugging Face hub's
file API (`HF_ENDPOINT`), corrupted files, dropped connections, offline mode, the cache folders and `aid models …`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from aid_cli import download, paths
from aid_cli.models import cache, catalogue
from aid_cli.backbones.checkpoint import load_backbone
from aid_cli.backbones.edm import build_precond
from aid_cli.errors import CheckpointError, DownloadError, OfflineError
from aid_cli.models.entry import HubFile, ModelEntry

from .conftest import REPO, TINY_KWARGS, run_cli
from .test_convert import official_layout_bytes, persistence  # noqa: F401  (persistence: a fixture)

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "test-org/tiny-edm"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------ the server


class Served:
    """What the server serves (plain paths and hub files), which transfers it cuts short, and what it was asked."""

    def __init__(self):
        self.plain: dict[str, bytes] = {}
        self.hub: dict[tuple[str, str, str], bytes] = {}  # (repo, revision, filename)
        self.drop: dict[str, int] = {}  # path → how many more GETs to cut off after half the body
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.url = ""

    def hub_path(self, filename: str, repo: str = REPO_ID, revision: str = REVISION) -> str:
        return f"/{repo}/resolve/{revision}/{filename}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body: bool):
        served: Served = self.server.served
        served.requests.append((self.command, self.path, self.headers.get("Range")))
        extra = {}
        hub = re.fullmatch(r"/(.+?/.+?)/resolve/([0-9a-f]{40})/(.+)", self.path)
        if hub:  # the hub's /resolve/ endpoint: commit and ETag (an LFS file's sha256), as huggingface_hub needs
            data = served.hub.get((hub[1], hub[2], hub[3]))
            if data is not None:
                extra = {"X-Repo-Commit": hub[2], "ETag": f'"{sha256(data)}"'}
        else:
            data = served.plain.get(self.path)
            if data is not None:  # a validator, as a file server sends: a part is resumed only under it
                extra = {"ETag": f'"{sha256(data)}"'}
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if match and if_range is not None and if_range != extra.get("ETag"):
            match = None  # the file changed since the part was begun: the whole file (RFC 9110 If-Range)
        if match:
            start, status = int(match[1]), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        chunk = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        if served.drop.get(self.path, 0) > 0:  # cut the connection after half the body
            served.drop[self.path] -= 1
            self.wfile.write(chunk[:len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.served = Served()
    httpd.served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.served
    httpd.shutdown()
    httpd.server_close()


CACHE_VARS = ("AID_CACHE", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT",
              "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@pytest.fixture
def home(tmp_path, monkeypatch, server):
    """A clean cache environment: everything under tmp_path, the hub endpoint on the local server, quick retries."""
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    return tmp_path


def use_models(monkeypatch, *entries: ModelEntry):
    """The registry's table plus test entries."""
    monkeypatch.setattr(catalogue, "MODELS", catalogue.MODELS + entries)


@pytest.fixture
def tiny_bytes(tiny_checkpoint) -> bytes:
    return tiny_checkpoint.read_bytes()


def error_line(code: int, err: str) -> str:
    """Exit 2 and one `error:` line (progress notes such as "downloading …" may precede it), no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


def files_under(folder: Path) -> list[str]:
    """Regular files under `folder` (lock files aside), relative."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and not p.name.endswith(".lock"))


def url_entry(server, name="tiny-url", file="tiny.safetensors", **kw) -> ModelEntry:
    return ModelEntry(name=name, kind="backbone", resolution=16, license="test", description="test", file=file,
                      urls=(f"{server.url}/files/{file}",), **kw)


def hub_entry(name="tiny-hub", file="tiny.safetensors", **kw) -> ModelEntry:
    return ModelEntry(name=name, kind="backbone", resolution=16, license="test", description="test", file=file,
                      hub=(HubFile(REPO_ID, file, REVISION),), **kw)


# ------------------------------------------------------------------------------------------------------- plain URLs


def test_plain_url_download_is_verified_recorded_and_used_by_model_name(home, server, monkeypatch, tiny_bytes, capsys,
                                                                       tmp_path):
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    use_models(monkeypatch, url_entry(server))
    code, out, err = run_cli(["models", "download", "tiny-url", "--json"], capsys)
    assert code == 0, err
    record = json.loads(out)
    path = Path(record["path"])
    assert path == home / "xdg" / "aid" / "models" / "tiny-url" / "tiny.safetensors"
    assert path.read_bytes() == tiny_bytes
    assert record["cached"] and record["sha256"] == sha256(tiny_bytes) and record["size"] == len(tiny_bytes)
    assert record["sha256_origin"].startswith("recorded on the first download")
    assert files_under(path.parent) == ["record.json", "tiny.safetensors"]  # no .part left

    # --model NAME: resolved from the cache, no request
    before = len(server.requests)
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    _write_pair(image, mask)
    code, out, err = run_cli(["inpaint", image, "--mask", mask, "-o", tmp_path / "out.png", "--model", "tiny-url",
                              "--steps", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "out.png").is_file() and len(server.requests) == before


def _write_pair(image: Path, mask: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(image)
    hole = np.zeros((24, 24), np.uint8)
    hole[8:16, 8:16] = 255
    Image.fromarray(hole).save(mask)


def test_model_name_downloads_on_first_use(home, server, monkeypatch, tiny_bytes):
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    use_models(monkeypatch, url_entry(server))
    path = catalogue.resolve_backbone("tiny-url")
    net, info = load_backbone(path)
    assert info["resolution"] == 16


def test_corrupted_download_is_refused_and_nothing_is_left(home, server, monkeypatch, tiny_bytes, capsys):
    server.plain["/files/tiny.safetensors"] = tiny_bytes[:-1] + bytes([tiny_bytes[-1] ^ 1])
    use_models(monkeypatch, url_entry(server, sha256=sha256(tiny_bytes), size=len(tiny_bytes)))
    code, out, err = run_cli(["models", "download", "tiny-url"], capsys)
    line = error_line(code, err)
    assert "corrupt or altered" in line and "refused, nothing kept" in line
    assert files_under(home / "xdg" / "aid" / "models") == []
    assert not (home / "xdg" / "aid" / "models" / "tiny-url").exists()


def test_first_download_records_the_sha256_and_later_downloads_must_match(home, server, monkeypatch, tiny_bytes):
    entry = url_entry(server)
    use_models(monkeypatch, entry)
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    cache.fetch_model(entry)
    assert cache.remove_model(entry) > len(tiny_bytes)  # the file and its record
    assert not cache.model_folder(entry).exists()
    known = json.loads((paths.models_dir() / cache.KNOWN_HASHES).read_text())
    assert known["tiny-url/tiny.safetensors"]["sha256"] == sha256(tiny_bytes)  # rm keeps what was recorded

    server.plain["/files/tiny.safetensors"] = tiny_bytes + b"changed upstream"
    with pytest.raises(DownloadError, match="recorded on the first download"):
        cache.fetch_model(entry)
    assert not cache.model_folder(entry).exists()


def test_dropped_connection_is_resumed_with_range(home, server, monkeypatch, tiny_bytes):
    entry = url_entry(server)
    use_models(monkeypatch, entry)
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    server.drop["/files/tiny.safetensors"] = 1
    path = cache.fetch_model(entry)
    assert path.read_bytes() == tiny_bytes
    gets = [r for r in server.requests if r[0] == "GET"]
    assert [g[2] for g in gets] == [None, f"bytes={len(tiny_bytes) // 2}-"]


def test_interrupted_download_resumes_on_the_next_run(home, server, monkeypatch, tiny_bytes, capsys):
    entry = url_entry(server)
    use_models(monkeypatch, entry)
    monkeypatch.setattr(download, "ATTEMPTS", 1)
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    server.drop["/files/tiny.safetensors"] = 1
    code, out, err = run_cli(["models", "download", "tiny-url"], capsys)
    assert "run the command again to resume" in error_line(code, err)
    part = cache.model_folder(entry) / "tiny.safetensors.part"
    assert part.stat().st_size == len(tiny_bytes) // 2
    assert cache.cached_path(entry) is None  # a part is never used

    code, out, err = run_cli(["models", "download", "tiny-url"], capsys)
    assert code == 0, err
    assert server.requests[-1] == ("GET", "/files/tiny.safetensors", f"bytes={len(tiny_bytes) // 2}-")
    assert cache.cached_path(entry).read_bytes() == tiny_bytes and not part.exists()


def test_http_error_is_one_line(home, server, monkeypatch, capsys):
    use_models(monkeypatch, url_entry(server))  # nothing served: 404
    code, out, err = run_cli(["models", "download", "tiny-url"], capsys)
    assert "HTTP 404" in error_line(code, err)
    assert files_under(home / "xdg" / "aid" / "models") == []


# ------------------------------------------------------------------------------------------------- official pickles


def test_official_pickle_is_converted_once_and_deleted(home, server, monkeypatch, persistence):  # noqa: F811
    torch.manual_seed(3)
    net = build_precond("EDMPrecond", dict(TINY_KWARGS))
    data = official_layout_bytes(net, persistence, "raise SystemExit('module_src ran')", dict(TINY_KWARGS))
    entry = url_entry(server, name="tiny-edm", file="edm-tiny.pkl")
    use_models(monkeypatch, entry)
    server.plain["/files/edm-tiny.pkl"] = data
    path = cache.fetch_model(entry)
    assert path == cache.model_folder(entry) / "tiny-edm.safetensors"
    loaded, info = load_backbone(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert info["provenance"]["source_sha256"] == sha256(data)
    record = json.loads((cache.model_folder(entry) / "record.json").read_text())
    assert record["sha256"] == sha256(data) and record["converted"]["precond"] == "EDMPrecond"
    assert files_under(cache.model_folder(entry)) == ["record.json", "tiny-edm.safetensors"]  # pickle gone
    assert catalogue.describe_model(entry)["size"] == len(data)


class Mystery(torch.nn.Module):
    """A network class no converter knows."""


def test_failed_conversion_is_one_line_and_keeps_the_download(home, server, monkeypatch, persistence,  # noqa: F811
                                                              capsys):
    data = official_layout_bytes(Mystery(), persistence, "", {})
    # a published sha256 vouches for the file: it is kept for `aid models convert` (an unvouched one is removed,
    # test_hardening_round2.py)
    entry = url_entry(server, name="tiny-edm", file="edm-tiny.pkl", sha256=sha256(data), size=len(data))
    use_models(monkeypatch, entry)
    server.plain["/files/edm-tiny.pkl"] = data
    code, out, err = run_cli(["models", "download", "tiny-edm"], capsys)
    line = error_line(code, err)
    assert line.startswith("error: tiny-edm: edm-tiny.pkl is downloaded and verified") and "unknown network class" in line
    assert files_under(cache.model_folder(entry)) == ["edm-tiny.pkl"]
    requests = len(server.requests)
    code, out, err = run_cli(["models", "convert", "tiny-edm"], capsys)  # retries from the kept file, offline
    assert "unknown network class" in error_line(code, err) and len(server.requests) == requests


def test_convert_by_name_without_a_download_says_what_to_do(home, server, monkeypatch, capsys):
    use_models(monkeypatch, url_entry(server, name="tiny-edm", file="edm-tiny.pkl"))
    code, out, err = run_cli(["models", "convert", "tiny-edm"], capsys)
    assert "aid models download tiny-edm" in error_line(code, err)


# -------------------------------------------------------------------------------------------------------- the hub


def test_hub_download_goes_to_the_hub_cache_pinned_by_revision(home, server, monkeypatch, tiny_bytes, capsys):
    entry = hub_entry()
    use_models(monkeypatch, entry)
    server.hub[(REPO_ID, REVISION, "tiny.safetensors")] = tiny_bytes
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hubcache"))
    code, out, err = run_cli(["models", "download", "tiny-hub", "--json"], capsys)
    assert code == 0, err
    path = Path(json.loads(out)["path"])
    assert path == home / "hubcache" / "models--test-org--tiny-edm" / "snapshots" / REVISION / "tiny.safetensors"
    assert path.read_bytes() == tiny_bytes
    assert ("HEAD", server.hub_path("tiny.safetensors"), None) in server.requests
    # offline now: found in the hub cache without a request
    requests = len(server.requests)
    assert cache.fetch_model(entry, offline=True) == path and len(server.requests) == requests

    code, out, err = run_cli(["models", "rm", "tiny-hub"], capsys)
    assert code == 0 and "freed" in err
    assert files_under(home / "hubcache" / "models--test-org--tiny-edm") == []


def test_corrupted_hub_file_is_refused_and_nothing_is_left(home, server, monkeypatch, tiny_bytes):
    entry = hub_entry(sha256=sha256(tiny_bytes))
    use_models(monkeypatch, entry)
    server.hub[(REPO_ID, REVISION, "tiny.safetensors")] = b"not the weights" + tiny_bytes[15:]
    with pytest.raises(DownloadError, match="refused, nothing kept"):
        cache.fetch_model(entry)
    assert files_under(home / "hf" / "hub" / "models--test-org--tiny-edm") == []
    assert cache.cached_path(entry) is None


def test_hub_download_resumes_a_dropped_connection(home, server, monkeypatch, tiny_bytes):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # (10 MB: a small file would be one chunk)
    entry = hub_entry()
    use_models(monkeypatch, entry)
    server.hub[(REPO_ID, REVISION, "tiny.safetensors")] = tiny_bytes
    server.drop[server.hub_path("tiny.safetensors")] = 1
    path = cache.fetch_model(entry)
    assert path.read_bytes() == tiny_bytes
    gets = [r for r in server.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert len(gets) == 2 and gets[0][2] is None, server.requests
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", gets[1][2])[1]) <= len(tiny_bytes) // 2  # resumed, not restarted


def test_hub_source_falls_back_to_the_url(home, server, monkeypatch, tiny_bytes):
    entry = ModelEntry(name="tiny-both", kind="backbone", resolution=16, license="test", description="test",
                       file="tiny.safetensors", hub=(HubFile(REPO_ID, "tiny.safetensors", REVISION),),
                       urls=(f"{server.url}/files/tiny.safetensors",))
    use_models(monkeypatch, entry)
    server.plain["/files/tiny.safetensors"] = tiny_bytes  # the hub has nothing: 404
    assert cache.fetch_model(entry).read_bytes() == tiny_bytes


# ------------------------------------------------------------------------------------------------------- offline


def test_offline_download_fails_fast_in_one_line(tmp_path):
    """The acceptance check, as a user runs it: HF_HUB_OFFLINE=1 aid models download edm-ffhq-64."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "aid-offline-test"))
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "aid_cli.cli", "models", "download", "edm-ffhq-64"], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    seconds = time.perf_counter() - t0
    assert result.returncode != 0 and seconds < 5, (result.returncode, seconds)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "HF_HUB_OFFLINE=1" in lines[0]
    assert "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-ffhq-64x64-uncond-vp.pkl" in lines[0]
    assert f"put it at {tmp_path}/aid-offline-test/aid/models/edm-ffhq-64-vp/edm-ffhq-64x64-uncond-vp.pkl" in lines[0]
    assert not (tmp_path / "aid-offline-test").exists()  # nothing written


def test_offline_flag_and_model_name_make_no_request(home, server, monkeypatch, tiny_bytes, capsys, tmp_path):
    entry = url_entry(server)
    use_models(monkeypatch, entry)
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    image, mask = tmp_path / "img.png", tmp_path / "mask.png"
    _write_pair(image, mask)
    code, out, err = run_cli(["inpaint", image, "--mask", mask, "-o", tmp_path / "out.png", "--model", "tiny-url",
                              "--offline"], capsys)
    assert "downloads are off (--offline)" in error_line(code, err) and len(err.strip().splitlines()) == 1
    assert server.requests == [] and not (tmp_path / "out.png").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1"):
        cache.fetch_model(hub_entry())
    assert server.requests == []


def test_offline_uses_a_file_put_where_the_message_says(home, server, monkeypatch, tiny_bytes):
    entry = url_entry(server)
    use_models(monkeypatch, entry)
    with pytest.raises(OfflineError) as info:
        cache.fetch_model(entry, offline=True)
    target = Path(re.search(r"put it at (\S+),", str(info.value))[1])
    target.parent.mkdir(parents=True)
    target.write_bytes(tiny_bytes)
    assert cache.fetch_model(entry, offline=True) == target
    assert server.requests == []
    assert not (paths.models_dir() / cache.KNOWN_HASHES).exists()  # a hand-placed file sets no reference hash


# ------------------------------------------------------------------------------------------------ cache folders


def test_cache_folders_follow_the_environment(tmp_path, monkeypatch):
    for var in CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.models_dir() == tmp_path / "home" / ".cache" / "aid" / "models"
    assert paths.hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.models_dir() == tmp_path / "xdg" / "aid" / "models"
    assert paths.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert paths.hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert paths.hub_cache_dir() == tmp_path / "hubcache"
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "aid"))
    assert paths.models_dir() == tmp_path / "aid" / "models"
    assert paths.models_dir(tmp_path / "flag") == tmp_path / "flag"  # --cache-dir wins
    assert paths.hub_cache_dir(tmp_path / "flag") == tmp_path / "flag" / "hub"


def test_cache_dir_option_holds_the_download_and_rm_frees_it(home, server, monkeypatch, tiny_bytes, capsys):
    use_models(monkeypatch, url_entry(server))
    server.plain["/files/tiny.safetensors"] = tiny_bytes
    cache = home / "elsewhere"
    code, out, err = run_cli(["models", "download", "tiny-url", "--cache-dir", cache], capsys)
    assert code == 0, err
    assert (cache / "tiny-url" / "tiny.safetensors").read_bytes() == tiny_bytes
    assert not (home / "xdg" / "aid" / "models" / "tiny-url").exists()
    listed = {r["name"]: r for r in json.loads(run_cli(["models", "list", "--json", "--cache-dir", cache], capsys)[1])}
    assert listed["tiny-url"]["cached"]

    code, out, err = run_cli(["models", "rm", "tiny-url", "--cache-dir", cache], capsys)
    assert code == 0 and "removed" in err and "freed" in err
    assert not (cache / "tiny-url").exists()
    listed = {r["name"]: r for r in json.loads(run_cli(["models", "list", "--json", "--cache-dir", cache], capsys)[1])}
    assert not listed["tiny-url"]["cached"]


# ------------------------------------------------------------------------------------------------ the table, CLI


REQUIRED = {"edm-ffhq-64-vp", "edm-ffhq-64-ve", "edm-afhqv2-64-vp", "edm-afhqv2-64-ve", "edm2-img512-xs",
            "edm2-img512-s", "edm2-img512-m", "edm2-img64-s", "aid-cats64", "aid-cats64-guidance"}


def test_models_list_json_schema(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("AID_CACHE", raising=False)
    code, out, err = run_cli(["models", "list", "--json"], capsys)
    assert code == 0, err
    records = json.loads(out)
    names = [r["name"] for r in records]
    assert len(names) == len(set(names)) and REQUIRED <= set(names)
    for r in records:
        assert r["kind"] in ("backbone", "guidance")
        assert isinstance(r["resolution"], int) and isinstance(r["cached"], bool) and r["license"]
    by_name = {r["name"]: r for r in records}
    assert by_name["aid-cats64"]["cached"] and by_name["aid-cats64"]["sha256"] == \
        "b7fefd36232891fb810f66472ec4b519fe141b741838298ad242338cda18f44d"
    assert by_name["aid-cats64-guidance"]["cached"] and by_name["aid-cats64-guidance"]["kind"] == "guidance"
    assert by_name["edm-ffhq-64-vp"]["aliases"] == ["edm-ffhq-64"]
    for name in REQUIRED - {"aid-cats64", "aid-cats64-guidance"}:
        assert by_name[name]["license"].startswith("CC BY-NC-SA 4.0")
        assert all(s.startswith("https://nvlabs-fi-cdn.nvidia.com/edm") for s in by_name[name]["sources"])


def test_every_hub_source_is_pinned_to_a_commit():
    for m in catalogue.MODELS:
        assert all(re.fullmatch(r"[0-9a-f]{40}", h.revision) for h in m.hub), m.name
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256), m.name


@pytest.mark.parametrize("args, phrase", [
    (["models", "download", "nonsense"], "unknown model"),
    (["models", "info", "edm-ffhq"], "did you mean"),
    (["models", "rm"], "--all"),
    (["models", "rm", "aid-cats64"], "ships with aid"),
    (["models", "rm", "aid-cats64-guidance"], "ships with aid"),
])
def test_bad_model_commands_are_one_line(args, phrase, capsys):
    code, out, err = run_cli(args, capsys)
    assert phrase in error_line(code, err) and len(err.strip().splitlines()) == 1


def test_models_info_and_env(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("AID_CACHE", raising=False)
    code, out, err = run_cli(["models", "info", "edm-afhqv2-64", "--json"], capsys)
    assert code == 0 and json.loads(out)["name"] == "edm-afhqv2-64-vp"
    code, out, err = run_cli(["env", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["torch"]["version"] == torch.__version__ and info["devices"]["auto"] in ("cpu", "cuda", "mps")
    assert info["cache"]["models"]["path"] == str(tmp_path / "aid" / "models")
    assert "aid-cats64" in info["cache"]["cached_models"] and info["packages"]["numpy"]
    code, out, err = run_cli(["env"], capsys)
    assert code == 0 and "model cache:" in out and "torch:" in out
