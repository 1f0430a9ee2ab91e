"""`aid serve`'s HTTP side: the page (static files shipped in the package), a small JSON API, and the checks that keep
other web pages and large uploads out. The standard library's ThreadingHTTPServer: no dependency to install or audit,
and a local page for one user needs nothing more (docs/serve.md says why).

    GET  /                          the page (index.html, app.js, app.css: package data, no CDN)
    GET  /api/info                  models (the cached ones), methods, steps, limits, defaults
    POST /api/images                body: an image file's bytes → {id, width, height, mode, notes, preview}
    GET  /api/images/ID.png         the image as decoded (EXIF orientation applied), 8-bit, for the page's canvas
    POST /api/masks?image=ID[&invert=1][&resize=1]
                                    body: a mask file's bytes (white = fill) → {id, fraction, notes, preview}
    GET  /api/masks/ID.png          the hole as read (white = fill), for the page's canvas
    POST /api/fill                  JSON {image, mask, model, method, steps, seed, samples, fit, dilate, feather,
                                    class} → 202 {id, position}: queued
    GET  /api/jobs/ID               {state: queued|running|done|error, position, nfe_done, nfe_total, results, error}
    GET  /api/results/ID.png        a result (PNG: every visible pixel the input's); ?download=1 as an attachment

Every error is JSON {"error": "one line"} with a 4xx status (5xx only for a bug). Nothing a client sends is used as a
path: static files come from a fixed table, uploads and results are found by random ids in memory.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import UserError
from .engine import Bounded, Engine, FillRequest, STEPS_CHOICES, MAX_SAMPLES, new_id, page_methods

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # one upload, before decoding
MAX_PIXELS = 50_000_000  # one image or mask, checked on its header before decoding (Pillow's own bomb limit is 179 M)
MAX_JSON_BYTES = 64 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")

STATIC = {  # path → (file in aid_cli/serve/static, content type): the only files the server sends
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
ID = re.compile(r"[0-9a-f]{16}")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


class HTTPError(Exception):
    """A refused request: its status and the one line the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> set[str]:
    """The Host headers this server answers: its loopback names, the address it is bound to, and, bound to every
    interface, this machine's name and addresses; each with the port (a page on another port is another origin)."""
    names = set(LOOPBACK) | {host} | set(extra)
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    return {f"{_bracket(name).lower()}:{port}" for name in names if name}


class Uploads:
    """Decoded uploads kept in memory by id: a few images (LoadedImage) and their masks (bool holes), the oldest dropped
    first; both decoded by the project's hardened loaders (data/images.py), as `aid inpaint` decodes files."""

    def __init__(self, max_pixels: int, budget: int = 1 << 30):
        self.max_pixels = max_pixels
        self.images = Bounded(8, budget, lambda item: item[0].pixels.nbytes)
        self.masks = Bounded(64, budget // 4, lambda item: item[1].nbytes)
        self.decoding = threading.Lock()  # one decode at a time: uploads never hold several big images at once

    def add_image(self, data: bytes) -> dict:
        from ..data.images import Upload, load_image

        with self.decoding:
            img = load_image(Upload(data, "the uploaded image"), max_pixels=self.max_pixels)
            preview = _png(_preview_pixels(img), img.icc_profile)  # its colour profile too, as the results carry it
        image_id = new_id()
        self.images.put(image_id, (img, preview))
        return {"id": image_id, "width": img.size[0], "height": img.size[1], "mode": img.mode,
                "notes": list(img.notes), "preview": f"/api/images/{image_id}.png"}

    def add_mask(self, data: bytes, image_id: str, invert: bool, resize: bool) -> dict:
        from ..data.images import Upload, load_mask, mask_stats

        img = self.image(image_id)
        notes: list[str] = []
        with self.decoding:
            hole = load_mask(Upload(data, "the mask"), img.size, invert=invert, resize=resize, notes=notes,
                             max_pixels=self.max_pixels, resize_hint="tick 'scale to the image' to scale it")
        mask_id = new_id()
        self.masks.put(mask_id, (image_id, hole))
        return {"id": mask_id, "fraction": round(mask_stats(hole), 6), "notes": notes,
                "preview": f"/api/masks/{mask_id}.png"}

    def image(self, image_id: str):
        item = self.images.get(image_id)
        if item is None:
            raise UserError("that image is no longer on the server (it keeps the last few): open it again")
        return item[0]

    def preview(self, image_id: str) -> bytes | None:
        item = self.images.get(image_id)
        return None if item is None else item[1]

    def mask(self, mask_id: str, image_id: str):
        item = self.masks.get(mask_id)
        if item is None:
            raise UserError("that mask is no longer on the server: paint or load it again")
        if item[0] != image_id:
            raise UserError("that mask was made for another image: paint or load it again")
        return item[1]

    def mask_png(self, mask_id: str) -> bytes | None:
        import numpy as np

        item = self.masks.get(mask_id)
        return None if item is None else _png((item[1] * np.uint8(255)).astype(np.uint8))


def _preview_pixels(img):
    """The image as an 8-bit array a browser shows as the file is (16-bit greyscale scaled to 8 bits)."""
    import numpy as np

    if img.mode == "I;16":
        return np.rint(img.pixels / 257).astype(np.uint8)
    return img.pixels


def _png(array, icc_profile: bytes | None = None) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1, **extra)
    return buffer.getvalue()


class AidServer(ThreadingHTTPServer):
    """The HTTP server: its engine (models, queue, results), uploads, limits and the Host names it answers."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, host: str, port: int, engine: Engine, uploads: Uploads, max_bytes: int = MAX_UPLOAD_BYTES,
                 allow_hosts: tuple[str, ...] = (), log: Callable[[str], None] = lambda message: None,
                 quiet_requests: bool = True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass --port 0 for a free port, or "
                            f"another --host") from None
        self.engine, self.uploads, self.max_bytes, self.log = engine, uploads, max_bytes, log
        self.host = host
        self.port = self.server_address[1]
        self.hosts = allowed_hosts(host, self.port, allow_hosts)
        self.quiet_requests = quiet_requests
        self.info_cache: dict | None = None

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"http://{_bracket(shown)}:{self.port}/"

    def info(self) -> dict:
        if self.info_cache is None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                __version__ = version("aid-inpaint")
            except PackageNotFoundError:
                __version__ = "unknown (not installed)"
            models = self.engine.models
            self.info_cache = {
                "version": __version__, "models": models.list(), "methods": page_methods(),
                "steps": [{"steps": s, "nfe": n} for s, n in STEPS_CHOICES.items()], "default_steps": 12,
                "limits": {"bytes": self.max_bytes, "pixels": self.uploads.max_pixels,
                           "queue": self.engine.queue_length, "samples": MAX_SAMPLES}}
        return self.info_cache

    def close(self) -> None:
        """Stop answering, stop the fills, free the port."""
        self.shutdown()
        self.engine.stop()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: AidServer
    server_version = "aid-serve"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay silent (a stalled upload does not hold a thread for ever)

    # -- plumbing

    def log_message(self, format, *args):  # noqa: A002  (BaseHTTPRequestHandler's signature)
        if not self.server.quiet_requests:
            sys.stderr.write("aid serve: %s\n" % (format % args))

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _handle(self, method: str) -> None:
        try:
            self._check_origin(method)
            route = urlsplit(self.path)
            getattr(self, f"_{method.lower()}")(route.path, parse_qs(route.query))
        except HTTPError as e:
            self._error(e.status, str(e))
        except UserError as e:
            self._error(HTTPStatus.BAD_REQUEST, " ".join(p.strip() for p in str(e).splitlines() if p.strip()))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug: one line to the page, the traceback to the server's terminal
            import traceback

            traceback.print_exc(file=sys.stderr)
            from ..errors import one_line

            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {one_line(e, with_type=True)}")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._refuse_method()

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT  # no CORS preflight is ever answered: other origins get nothing

    def _refuse_method(self):
        self.close_connection = True
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served here")

    # -- who may ask

    def _check_origin(self, method: str) -> None:
        """Only this server's own page (or a client that is no browser page, such as curl) may use it: the Host must be
        one of this server's names (a DNS-rebinding page has its own name there), and a browser request from any other
        origin (Origin, Sec-Fetch-Site) is refused, GETs of the API included; following a link to the page is fine."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.hosts:
            self.close_connection = True
            raise HTTPError(HTTPStatus.FORBIDDEN, f"refused: Host {host or '(none)'!r} is not this server's (start "
                                                  f"aid serve with --allow-host NAME to answer to another name)")
        origin = self.headers.get("Origin")
        site = (self.headers.get("Sec-Fetch-Site") or "").lower()
        navigation = (method == "GET" and urlsplit(self.path).path in STATIC
                      and (self.headers.get("Sec-Fetch-Mode") or "navigate") == "navigate")
        if origin is not None and origin.lower() != f"http://{host}" and not navigation:
            self.close_connection = True
            raise HTTPError(HTTPStatus.FORBIDDEN, f"refused: a request from another origin ({origin[:100]})")
        if site in ("cross-site", "same-site") and not navigation:
            self.close_connection = True
            raise HTTPError(HTTPStatus.FORBIDDEN, f"refused: a {site} request (only this server's own page may use it)")

    def _body(self, limit: int, what: str) -> bytes:
        """The request's body, at most `limit` bytes, refused before it is read when it claims more."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length")
        n = int(length)
        if n > limit:
            self.close_connection = True  # its bytes are never read
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{what} is too large: {n / 1e6:.3g} MB (the limit is {limit / 1e6:.3g} MB)")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{what} arrived incomplete ({len(data)} of {n} bytes)")
        return data

    def _json_body(self) -> dict:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the fill request as application/json")
        try:
            return json.loads(self._body(MAX_JSON_BYTES, "the request"))
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the request is not valid JSON") from None

    # -- routes

    def _get(self, path: str, query: dict) -> None:
        if path in STATIC:
            name, ctype = STATIC[path]
            body = resources.files("aid_cli.serve").joinpath("static", name).read_bytes()
            return self._send(HTTPStatus.OK, body, ctype)
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.info())
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "api":
            kind, name = parts[1], parts[2]
            if kind == "jobs" and ID.fullmatch(name):
                status = self.server.engine.status(name)
                if status is None:
                    raise HTTPError(HTTPStatus.NOT_FOUND, "no such fill (the server keeps the last 1,024)")
                return self._json(HTTPStatus.OK, status)
            if name.endswith(".png") and ID.fullmatch(name[:-4]):
                key = name[:-4]
                if kind == "results":
                    result = self.server.engine.results.get(key)
                    body = result["png"] if result else None
                elif kind == "images":
                    body = self.server.uploads.preview(key)
                elif kind == "masks":
                    body = self.server.uploads.mask_png(key)
                else:
                    body = None
                if body is None:
                    raise HTTPError(HTTPStatus.NOT_FOUND, f"no such {kind[:-1]} (the server keeps the last few)")
                headers = {}
                if kind == "results" and query.get("download"):
                    headers["Content-Disposition"] = f'attachment; filename="aid-filled-{key[:8]}.png"'
                return self._send(HTTPStatus.OK, body, "image/png", headers)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"nothing at {path[:100]}")

    def _post(self, path: str, query: dict) -> None:
        server = self.server
        if path == "/api/images":
            data = self._body(server.max_bytes, "the image")
            return self._json(HTTPStatus.OK, server.uploads.add_image(data))
        if path == "/api/masks":
            image = (query.get("image") or [""])[0]
            if not ID.fullmatch(image):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "a mask upload names its image: /api/masks?image=ID")
            flag = lambda name: (query.get(name) or ["0"])[0] in ("1", "true", "yes")  # noqa: E731
            data = self._body(server.max_bytes, "the mask")
            return self._json(HTTPStatus.OK, server.uploads.add_mask(data, image, flag("invert"), flag("resize")))
        if path == "/api/fill":
            request = FillRequest.parse(self._json_body())
            server.uploads.mask(request.mask, request.image)  # both still here, and made for each other
            server.engine.models.get(request.model)  # a model this server offers
            try:
                job = server.engine.submit(request)
            except UserError as e:
                raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, str(e)) from None
            return self._json(HTTPStatus.ACCEPTED, server.engine.status(job.id))
        self.close_connection = True
        raise HTTPError(HTTPStatus.NOT_FOUND, f"nothing to post at {path[:100]}")


def make_server(model: str | None = None, guidance=None, host: str = "127.0.0.1", port: int = 0,
                device: str = "cpu", precision: str = "auto", cache=None, offline: bool = True,
                queue_length: int = 4, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
                threads: int | None = None, allow_hosts: tuple[str, ...] = (),
                log: Callable[[str], None] = lambda message: None, quiet_requests: bool = True) -> AidServer:
    """Load the startup backbone and build the server (not yet serving: `serve_forever`, or `start_in_thread`).

    `model`: a checkpoint path or a model name (fetched unless `offline`), default the embedded backbone."""
    from pathlib import Path

    from ..devices import check_precision, resolve_device
    from ..models.catalogue import lookup_model, resolve_backbone
    from .engine import Models

    if queue_length < 1:
        raise UserError(f"--queue must be at least 1, got {queue_length}")
    dev = resolve_device(device)
    check_precision(precision, dev)
    checkpoint = resolve_backbone(model, cache=cache, offline=True if offline else None)
    if model is None:
        label = "aid-cats64"
    elif lookup_model(str(model)) is not None and not Path(str(model)).exists():
        label = lookup_model(str(model)).name
    else:
        label = Path(checkpoint).name
    models = Models(Path(checkpoint), label, guidance=guidance, cache=cache)
    uploads = Uploads(max_pixels)
    engine = Engine(models, dev, precision, queue_length=queue_length, uploads=uploads, threads=threads, log=log)
    server = AidServer(host, port, engine, uploads, max_bytes=max_bytes, allow_hosts=allow_hosts, log=log,
                       quiet_requests=quiet_requests)  # the port first: a busy one fails before any loading
    try:
        engine.load(models.get(None))
        if guidance is not None:  # a module for another backbone fails now, in one line, not on the first fill
            engine.chosen(models.get(None), None, 12)
    except BaseException:
        server.server_close()
        raise
    engine.start()
    return server


def start_in_thread(server: AidServer) -> threading.Thread:
    """Serve from a daemon thread (tests, scripts); `server.close()` stops it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="aid-serve",
                              daemon=True)
    thread.start()
    return thread


__all__ = ["AidServer", "Uploads", "make_server", "start_in_thread", "allowed_hosts", "is_loopback",
           "MAX_UPLOAD_BYTES", "MAX_PIXELS"]
