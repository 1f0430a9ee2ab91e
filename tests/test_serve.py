"""`aid serve` through its HTTP API, as the page uses it: a fill equals `aid inpaint`'s for the same inputs; bad and
oversized uploads are refused in one line; requests from other origins (and other Host names) are refused; fills run
one at a time, in order, from a bounded queue; `aid serve` itself prints its URL, warns off loopback and stops on
Ctrl-C. Servers bind 127.0.0.1 on a free port and are closed by their fixture."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.serve.server import STATIC, make_server, start_in_thread

from .conftest import REPO, run_cli


# ----------------------------------------------------------------------------------------------------------- helpers

class Client:
    """A few lines of http.client: the requests the page makes, with the headers a browser would add when asked."""

    def __init__(self, server):
        self.host, self.port = "127.0.0.1", server.port
        self.server = server

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None, headers: dict | None = None):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        status, head, data = self.request(method, path, body, headers)
        assert head.get("Content-Type") == "application/json", (status, head, data[:200])
        return status, json.loads(data)

    def upload_image(self, data: bytes) -> dict:
        status, body = self.json("POST", "/api/images", data)
        assert status == 200, body
        return body

    def upload_mask(self, data: bytes, image: str, **flags) -> dict:
        query = "".join(f"&{k}=1" for k, v in flags.items() if v)
        status, body = self.json("POST", f"/api/masks?image={image}{query}", data)
        assert status == 200, body
        return body

    def fill(self, **request) -> dict:
        status, body = self.json("POST", "/api/fill", request)
        assert status == 202, body
        return body

    def wait(self, job: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, body = self.json("GET", f"/api/jobs/{job}")
            assert status == 200, body
            if body["state"] in ("done", "error"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"fill {job} did not finish in {timeout} s")

    def result(self, url: str) -> bytes:
        status, head, data = self.request("GET", url)
        assert status == 200 and head["Content-Type"] == "image/png", (status, data[:200])
        return data


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).copy()


def box_hole(h: int, w: int, box) -> np.ndarray:
    left, top, right, bottom = box
    hole = np.zeros((h, w), dtype=bool)
    hole[top:bottom, left:right] = True
    return hole


def huge_png_header(w: int, h: int) -> bytes:
    """A few dozen bytes that say: a w x h RGB PNG (a decompression bomb's claim)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def serve():
    """make(**options) → a server on 127.0.0.1 at a free port, serving from a thread; all closed at the end."""
    servers = []

    def make(**options):
        # the suite's thread count (conftest pins it), so a fill equals an in-process `aid inpaint`'s to the last bit
        options = {"device": "cpu", "threads": torch.get_num_threads(), **options}
        server = make_server(host="127.0.0.1", port=0, **options)
        start_in_thread(server)
        servers.append(server)
        return Client(server)

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def photo() -> np.ndarray:
    """A small crop of the example photo (96x80, odd sizes: the crop box is placed and padded)."""
    with Image.open(REPO / "examples" / "chelsea.png") as im:
        return np.asarray(im.convert("RGB"))[100:180, 150:246].copy()


# ----------------------------------------------------------------------------------------------- the fill itself

def test_a_fill_through_the_api_equals_aid_inpaint(serve, photo, tmp_path, capsys):
    """Embedded backbone, AID by default, 23 NFE: the PNG the API returns is byte for byte the file `aid inpaint`
    writes for the same image, mask and seed."""
    hole = box_hole(*photo.shape[:2], (30, 20, 60, 48))
    (tmp_path / "photo.png").write_bytes(png(photo))
    (tmp_path / "mask.png").write_bytes(png((hole * 255).astype(np.uint8)))
    code, _, err = run_cli(["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "-o",
                            tmp_path / "cli.png", "--steps", 12, "--seed", 7, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "aid by default" in err and "23 NFE" in err

    client = serve()
    image = client.upload_image(png(photo))
    assert (image["width"], image["height"], image["mode"]) == (96, 80, "RGB")
    mask = client.upload_mask(png((hole * 255).astype(np.uint8)), image["id"])
    assert mask["fraction"] == pytest.approx(hole.mean())
    job = client.wait(client.fill(image=image["id"], mask=mask["id"], steps=12, seed=7)["id"])
    assert job["state"] == "done", job
    assert job["method"] == "aid" and job["nfe_done"] == job["nfe_total"] == 23
    [result] = job["results"]
    assert (result["seed"], result["nfe"], result["steps"]) == (7, 23, 12)
    served = client.result(result["url"])
    assert served == (tmp_path / "cli.png").read_bytes()
    out = decode(served)
    assert np.array_equal(out[~hole], photo[~hole])
    assert (out[hole] != photo[hole]).any(axis=-1).mean() > 0.5


def test_samples_and_seeds_side_by_side(serve, tiny_checkpoint, photo):
    """Samples k get seeds seed + k, each its own result; the same seed again gives the same pixels."""
    client = serve(model=str(tiny_checkpoint))
    hole = box_hole(*photo.shape[:2], (10, 10, 30, 30))
    image = client.upload_image(png(photo))
    mask = client.upload_mask(png((hole * 255).astype(np.uint8)), image["id"])
    two = client.wait(client.fill(image=image["id"], mask=mask["id"], method="replace", seed=3, samples=2)["id"])
    one = client.wait(client.fill(image=image["id"], mask=mask["id"], method="replace", seed=4)["id"])
    assert [r["seed"] for r in two["results"]] == [3, 4]
    a, b = (decode(client.result(r["url"])) for r in two["results"])
    assert not np.array_equal(a, b)
    assert np.array_equal(b, decode(client.result(one["results"][0]["url"])))
    status, head, data = client.request("GET", two["results"][0]["url"] + "?download=1")
    assert status == 200 and head["Content-Disposition"].startswith("attachment; filename=")


def test_a_mask_file_can_be_inverted_or_scaled(serve, tiny_checkpoint, photo):
    client = serve(model=str(tiny_checkpoint))
    image = client.upload_image(png(photo))
    hole = box_hole(*photo.shape[:2], (0, 0, 48, 80))  # the left half
    keep = png((~hole * np.uint8(255)).astype(np.uint8))
    inverted = client.upload_mask(keep, image["id"], invert=True)
    assert inverted["fraction"] == pytest.approx(0.5)
    shown = decode(client.result(inverted["preview"]))  # the hole as read, white = fill, for the page's canvas
    assert np.array_equal(shown > 127, hole)
    small = png(np.kron((hole * 255).astype(np.uint8)[::8, ::8], np.ones((2, 2), np.uint8)))  # 24x20
    status, body = client.json("POST", f"/api/masks?image={image['id']}", small)
    assert status == 400 and body["error"] == ("the mask is 24x20 but image is 96x80; tick 'scale to the image' to "
                                               "scale it")
    assert client.upload_mask(small, image["id"], resize=True)["fraction"] == pytest.approx(0.5)


def test_choosing_another_cached_model_loads_it(serve, tiny_checkpoint, photo):
    """Started on a test checkpoint, the page also offers the embedded backbone (cached: shipped); a fill that asks for
    it loads it in place of the first, with its own default method, AID."""
    client = serve(model=str(tiny_checkpoint))
    info = client.json("GET", "/api/info")[1]
    offered = {m["id"]: m for m in info["models"]}
    assert offered[tiny_checkpoint.name]["default"] and offered[tiny_checkpoint.name]["default_method"] == "repaint"
    assert offered["aid-cats64"]["default_method"] == "aid" and "path" not in offered["aid-cats64"]
    image = client.upload_image(png(photo[:64, :64]))
    mask = client.upload_mask(png((box_hole(64, 64, (20, 20, 40, 40)) * 255).astype(np.uint8)), image["id"])
    job = client.wait(client.fill(image=image["id"], mask=mask["id"], model="aid-cats64")["id"])
    assert job["state"] == "done" and job["method"] == "aid" and job["results"][0]["model"] == "aid-cats64", job
    assert client.server.engine.current.id == "aid-cats64"


# --------------------------------------------------------------------------------------------------- bad uploads

def test_oversized_uploads_are_refused_with_a_clear_message(serve, tiny_checkpoint, photo):
    client = serve(model=str(tiny_checkpoint), max_bytes=20_000, max_pixels=5_000)
    status, body = client.json("POST", "/api/images", b"\0" * 24_000)
    assert status == 413 and body["error"] == "the image is too large: 0.024 MB (the limit is 0.02 MB)"
    status, body = client.json("POST", "/api/images", png(photo))  # 7,680 pixels, few bytes
    assert status == 400
    assert body["error"] == "image is too large: the uploaded image is 96x80 = 7,680 pixels (the limit is 5,000)"
    status, body = client.json("POST", "/api/images", huge_png_header(6000, 6000))  # 59 bytes claiming 36 M pixels
    assert status == 400 and body["error"] == ("image is too large: the uploaded image is 6000x6000 = 36,000,000 "
                                               "pixels (the limit is 5,000)")
    status, body = client.json("POST", f"/api/masks?image={'0' * 16}", huge_png_header(6000, 6000))
    assert status == 400 and body["error"] == "that image is no longer on the server (it keeps the last few): open it again"
    status, body = client.json("POST", "/api/images", b"x" * 100, headers={"Transfer-Encoding": "chunked"})
    assert status == 411


def test_a_decompression_bomb_is_refused_by_the_same_rule_as_the_cli(serve, tiny_checkpoint):
    """Under the server's own limit raised past Pillow's, Pillow's bomb rule (as for `aid inpaint`) still refuses."""
    client = serve(model=str(tiny_checkpoint), max_pixels=10**12)
    status, body = client.json("POST", "/api/images", huge_png_header(50000, 50000))
    assert status == 400
    assert body["error"].startswith("image is too large to decode safely: the uploaded image (")


@pytest.mark.parametrize("data, phrase", [
    (b"", "image is empty: the uploaded image"),
    (b"this is not an image at all", "image is not an image Pillow can read: the uploaded image"),
    ("truncated", "image is truncated or damaged: the uploaded image"),
])
def test_corrupt_uploads_are_refused_with_a_clear_message(serve, tiny_checkpoint, photo, data, phrase):
    client = serve(model=str(tiny_checkpoint))
    if data == "truncated":
        data = png(photo)[:400]
    status, body = client.json("POST", "/api/images", data)
    assert status == 400 and body["error"].startswith(phrase), body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]


def test_bad_masks_and_requests_are_one_line(serve, tiny_checkpoint, photo):
    client = serve(model=str(tiny_checkpoint))
    image = client.upload_image(png(photo))
    other = client.upload_image(png(photo[:40, :40]))
    status, body = client.json("POST", f"/api/masks?image={image['id']}", png(photo)[:300])
    assert status == 400 and body["error"].startswith("mask is truncated or damaged: the mask")
    status, body = client.json("POST", "/api/masks?image=../../etc/passwd", b"x")
    assert status == 400 and "names its image" in body["error"]
    mask = client.upload_mask(png(np.zeros((40, 40), np.uint8)), other["id"])
    cases = [
        ({"image": image["id"], "mask": mask["id"]}, "that mask was made for another image"),
        ({"image": image["id"], "mask": "0" * 16}, "that mask is no longer on the server"),
        ({"image": other["id"], "mask": mask["id"], "model": "/etc/passwd"}, "unknown model '/etc/passwd'"),
        ({"image": other["id"], "mask": mask["id"], "steps": 7}, "steps must be one of 12, 18"),
        ({"image": other["id"], "mask": mask["id"], "samples": 99}, "samples must be between 1 and 8"),
        ({"image": other["id"], "mask": mask["id"], "fit": "native", "feather": 2}, "feather does not combine"),
        ({"image": other["id"], "mask": mask["id"], "path": "/tmp/x"}, "unknown field(s) in the fill request: path"),
    ]
    for request, phrase in cases:
        status, body = client.json("POST", "/api/fill", request)
        assert status == 400 and phrase in body["error"], (request, body)
    status, body = client.json("POST", "/api/fill", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "the request is not valid JSON"
    # errors found while filling come back as the job's one line, as the CLI prints them
    job = client.wait(client.fill(image=other["id"], mask=mask["id"], method="nosuch")["id"])
    assert job["state"] == "error" and job["error"].startswith("unknown method 'nosuch'")
    job = client.wait(client.fill(image=other["id"], mask=mask["id"], method="replace", **{"class": 3})["id"])
    assert job["state"] == "error" and job["error"] == "--class 3: this backbone is unconditional; drop --class"
    # an empty mask gives the image back, unchanged, at 0 NFE
    job = client.wait(client.fill(image=other["id"], mask=mask["id"], method="replace")["id"])
    assert job["state"] == "done" and job["results"][0]["nfe"] == 0
    assert np.array_equal(decode(client.result(job["results"][0]["url"])), photo[:40, :40])


# ------------------------------------------------------------------------------------------------------ security

def test_cross_origin_requests_are_refused(serve, tiny_checkpoint, photo):
    client = serve(model=str(tiny_checkpoint))
    own = f"http://127.0.0.1:{client.port}"
    image = client.upload_image(png(photo))
    refused = [
        ("POST", "/api/images", png(photo), {"Origin": "https://evil.example"}),
        ("POST", "/api/images", png(photo), {"Origin": "null"}),
        ("POST", "/api/images", png(photo), {"Origin": f"http://127.0.0.1:{client.port + 1}"}),  # another port
        ("POST", "/api/images", png(photo), {"Sec-Fetch-Site": "cross-site"}),
        ("POST", "/api/images", png(photo), {"Sec-Fetch-Site": "same-site"}),  # e.g. a page on localhost:3000
        ("GET", "/api/info", None, {"Origin": "https://evil.example"}),
        ("GET", image["preview"], None, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}),
        ("POST", "/api/fill", b"{}", {"Content-Type": "application/json", "Origin": "https://evil.example"}),
        ("GET", "/api/info", None, {"Host": "evil.example"}),  # DNS rebinding: the page's own name
        ("GET", "/", None, {"Host": f"attacker.example:{client.port}"}),
    ]
    for method, path, body, headers in refused:
        status, head, data = client.request(method, path, body, headers)
        assert status == 403, (method, path, headers, status)
        assert json.loads(data)["error"].startswith("refused:"), data
        assert "Access-Control-Allow-Origin" not in head
    # a preflight is never answered, so no other origin's script may send JSON or read an answer
    status, head, _ = client.request("OPTIONS", "/api/fill", None, {"Origin": "https://evil.example",
                                                                    "Access-Control-Request-Method": "POST"})
    assert status == 405 and not any(k.startswith("Access-Control") for k in head)
    # the page's own requests (same Origin), curl (no Origin) and a link followed to the page pass
    assert client.request("POST", "/api/images", png(photo), {"Origin": own, "Sec-Fetch-Site": "same-origin"})[0] == 200
    assert client.request("GET", "/api/info", None, {"Host": f"localhost:{client.port}"})[0] == 200
    assert client.request("GET", "/", None, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200


def test_the_page_and_its_assets_come_from_the_package(serve, tiny_checkpoint):
    client = serve(model=str(tiny_checkpoint))
    status, head, html = client.request("GET", "/")
    assert status == 200 and head["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in head["Content-Security-Policy"] and head["X-Frame-Options"] == "DENY"
    texts = [html.decode()]
    for path in ("/app.js", "/app.css", "/favicon.svg"):
        status, _, data = client.request("GET", path)
        assert status == 200 and data, path
        texts.append(data.decode())
    for text in texts:  # nothing from the internet: no CDN, no font service
        assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in text
    for path in ("/../pyproject.toml", "/static/../server.py", "/%2e%2e/%2e%2e/etc/passwd", "/api/results/../x.png",
                 "/api/results/abcd.png", "/app.js/.."):
        assert client.request("GET", path)[0] == 404, path
    from importlib import resources

    shipped = {p.name for p in resources.files("aid_cli.serve").joinpath("static").iterdir()}
    assert {name for name, _ in STATIC.values()} <= shipped
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"serve/static/*"' in pyproject  # package data: an installed aid has the page too


# ----------------------------------------------------------------------------------------------------- the queue

def test_a_queue_of_fills_completes_in_order_one_at_a_time(serve, tiny_checkpoint, photo):
    client = serve(model=str(tiny_checkpoint), queue_length=3)
    engine = client.server.engine
    gate, original = threading.Event(), engine._run

    def held(job):  # the first fill waits until the queue behind it is full
        gate.wait(60)
        return original(job)

    engine._run = held
    image = client.upload_image(png(photo))
    masks = [client.upload_mask(png((box_hole(80, 96, (5 + 10 * i, 5, 25 + 10 * i, 30)) * 255).astype(np.uint8)),
                                image["id"]) for i in range(4)]
    jobs = [client.fill(image=image["id"], mask=masks[0]["id"], method="replace", seed=0)]
    deadline = time.time() + 30
    while client.json("GET", f"/api/jobs/{jobs[0]['id']}")[1]["state"] != "running" and time.time() < deadline:
        time.sleep(0.02)
    for i in range(1, 4):
        jobs.append(client.fill(image=image["id"], mask=masks[i]["id"], method="replace", seed=i))
    assert [client.json("GET", f"/api/jobs/{j['id']}")[1]["position"] for j in jobs] == [None, 1, 2, 3]
    status, body = client.json("POST", "/api/fill", {"image": image["id"], "mask": masks[0]["id"]})
    assert status == 429 and body["error"] == ("the queue is full (3 fills waiting): try again when one has finished")
    gate.set()
    done = [client.wait(j["id"]) for j in jobs]
    assert [d["state"] for d in done] == ["done"] * 4
    assert [d["started_order"] for d in done] == [1, 2, 3, 4]
    spans = [(engine.jobs.get(j["id"]).started, engine.jobs.get(j["id"]).finished) for j in jobs]
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(3)), spans  # one at a time, never two at once
    for i, d in enumerate(done):  # each its own mask and seed
        out = decode(client.result(d["results"][0]["url"]))
        hole = box_hole(80, 96, (5 + 10 * i, 5, 25 + 10 * i, 30))
        assert np.array_equal(out[~hole], photo[~hole]) and d["results"][0]["seed"] == i


# --------------------------------------------------------------------------------------------------- the command

def test_serve_warns_off_loopback_and_stops_on_ctrl_c(monkeypatch, capsys):
    """In-process, with the server replaced (tests bind 127.0.0.1 only): the warning, the URL, a clean stop."""
    import aid_cli.serve.server as server_module

    calls = {}

    class Fake:
        url = "http://0.0.0.0:1234/"

        class engine:
            @staticmethod
            def stop(wait):
                calls["stopped"] = True

        def serve_forever(self, poll_interval):
            raise KeyboardInterrupt

        def server_close(self):
            calls["closed"] = True

    monkeypatch.setattr(server_module, "make_server", lambda **options: calls.update(options) or Fake())
    code, out, err = run_cli(["serve", "--host", "0.0.0.0", "--port", "1234", "--device", "cpu"], capsys)
    assert code == 0, err
    assert calls["host"] == "0.0.0.0" and calls["port"] == 1234 and calls["stopped"] and calls["closed"]
    assert "warning: listening on 0.0.0.0: other machines on the network can use this page" in err
    assert err.strip().endswith("aid serve: stopped") and out == "http://0.0.0.0:1234/\n"
    calls.clear()
    code, out, err = run_cli(["serve", "--port", "1234", "--device", "cpu"], capsys)
    assert code == 0 and calls["host"] == "127.0.0.1" and "warning" not in err


def test_a_busy_port_is_one_line(tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_cli(["serve", "--port", port, "--model", tiny_checkpoint, "--device", "cpu"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port 0" in err


@pytest.mark.skipif(sys.platform == "win32", reason="signals to a child process are POSIX")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_aid_serve_prints_its_url_answers_and_stops_on_a_signal(tiny_checkpoint, signum):
    """The real command in its own process: the URL on stdout, the page answers, Ctrl-C (SIGINT) or `kill` (SIGTERM)
    stops it cleanly, exit 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO), AID_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "aid_cli.cli", "serve", "--port", "0", "--model",
                             str(tiny_checkpoint), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        assert info["models"][0]["label"] == tiny_checkpoint.name
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "aid serve: stopped"
