"""Plain-URL downloads that resume: the bytes grow in `<file>.part` (an HTTP Range request continues it, on a retry in
the same run or on the next run), are checked, and only then renamed to `<file>`. A cache never holds half a file or
unchecked bytes under a real name.

A part is continued only under a validator: the first reply's strong ETag (else its Last-Modified), kept beside it in
`<file>.part.validator` and sent as `If-Range`. A server that changed the file answers with the whole new file; a
continuation that does not carry the same validator is thrown away and the transfer starts over. Without a validator
a transfer always starts from zero, so a file is never spliced from two versions. Every attempt runs under a
watchdog: fewer than STALL_BYTES in STALL_S seconds (connecting, waiting for the headers, or in the body) or more than
ATTEMPT_S seconds in all cuts the connection, and the transfer is retried.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .errors import DownloadError, one_line
from .fileio import publish

ATTEMPTS = 5  # transfers per call; each one resumes where the previous stopped
TIMEOUT_S = 30.0  # per connect or read
BACKOFF_S = 1.0  # wait before retry k: BACKOFF_S · 2^(k−1), at most 30 s
CHUNK = 1 << 20
STALL_S = 60.0  # an attempt that brings fewer than STALL_BYTES in any STALL_S seconds (headers included) is cut
STALL_BYTES = 64 << 10
ATTEMPT_S = 3600.0  # one attempt's deadline, however steadily the bytes trickle; the next attempt resumes
MAX_BYTES = 64 << 30  # a file of unknown size (a first download, no Content-Length) stops here all the same

Progress = Callable[[int, "int | None"], None]  # (bytes on disk, total bytes or None when the server does not say)


class Interrupted(Exception):
    """The transfer stopped early (connection dropped or reset, timeout, server busy): worth resuming."""


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def validator_path(part: str | Path) -> Path:
    """Where the validator (ETag or Last-Modified) of a part's first reply is kept."""
    part = Path(part)
    return part.with_name(part.name + ".validator")


def drop_part(part: Path) -> None:
    """Remove a part and its validator."""
    for p in (part, validator_path(part)):
        p.unlink(missing_ok=True)


def _validator(headers) -> dict | None:
    """The reply's validator usable in If-Range: a strong ETag, else Last-Modified; None when it has neither."""
    etag, modified = (headers.get("ETag") or "").strip(), (headers.get("Last-Modified") or "").strip()
    if etag and not etag.startswith("W/"):
        return {"ETag": etag}
    return {"Last-Modified": modified} if modified else None


def _saved_validator(part: Path) -> dict | None:
    try:
        saved = json.loads(validator_path(part).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and len(saved) == 1 and next(iter(saved)) in ("ETag", "Last-Modified") and \
        isinstance(next(iter(saved.values())), str)
    return saved if ok else None


class _Watch:
    """One attempt's watchdog: cuts the connection (shuts its socket down, so a blocked read returns) when fewer than
    STALL_BYTES arrived in STALL_S seconds, headers included, or the attempt has run ATTEMPT_S seconds."""

    def __init__(self):
        self.stall_s, self.deadline_s = STALL_S, ATTEMPT_S
        self.start = self.mark = time.monotonic()
        self.sock, self.reason = None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def progress(self) -> None:
        self.mark = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(0.5, self.stall_s / 4)):
            now = time.monotonic()
            if now - self.mark > self.stall_s:
                self.reason = f"stalled: fewer than {STALL_BYTES:,} bytes in {self.stall_s:g} s"
            elif now - self.start > self.deadline_s:
                self.reason = f"the attempt ran past its deadline of {self.deadline_s:g} s"
            else:
                continue
            sock = self.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            return


def _opener(watch: _Watch) -> urllib.request.OpenerDirector:
    """urllib's opener, with connections that hand their socket to `watch` (a redirect's new one too)."""

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                watch.sock = self.sock
                watch.progress()
        return Connection

    http_conn, https_conn = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def download_url(url: str, dest: str | Path, check: Callable[[Path], None] | None = None,
                 progress: Progress | None = None, attempts: int | None = None, size: int | None = None,
                 size_origin: str = "") -> Path:
    """Fetch `url` to `dest`: continue `dest.part` (under its validator), retry interrupted transfers, then
    `check(part)` and rename.

    `check` raises to refuse the bytes (a sha256 mismatch): the part is deleted and nothing is left. Failures are one
    DownloadError line; an interrupted transfer keeps its part, and the message says that running again resumes it.
    `size` (the published or recorded size, when known) caps the transfer: a server announcing or sending more is
    refused at once, not after the bytes are on disk. An attempt that stalls (fewer than STALL_BYTES in STALL_S
    seconds, waiting for the headers too) or runs past ATTEMPT_S is cut and resumed like a dropped one.
    """
    dest, attempts = Path(dest), attempts or ATTEMPTS
    part = part_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, progress, size, size_origin)
            break
        except DownloadError as e:
            if "no space left" not in str(e):
                drop_part(part)  # refused bytes are never kept
            raise
        except Interrupted as e:
            if attempt == attempts:
                kept = part.stat().st_size if part.exists() else 0
                again = "run the command again to resume" if validator_path(part).exists() else \
                    "run the command again (the server gives no validator, so it starts over)"
                raise DownloadError(f"download of {url} interrupted ({e}); {attempts} attempt(s), {kept:,} bytes kept "
                                    f"in {part}: {again}") from None
            time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 30.0))
    if check is not None:
        try:
            check(part)
        except BaseException:
            drop_part(part)
            raise
    validator_path(part).unlink(missing_ok=True)
    return publish(part, dest)


def _transfer(url: str, part: Path, progress: Progress | None, size: int | None = None, origin: str = "") -> None:
    """One attempt under its watchdog."""
    with _Watch() as watch:
        try:
            _request(url, part, progress, size, origin, watch)
        except Interrupted:
            if watch.reason:
                raise Interrupted(watch.reason) from None
            raise
        if watch.reason:  # cut at the very end of a reply of unknown length: its end is not trusted
            raise Interrupted(watch.reason)


def _request(url: str, part: Path, progress: Progress | None, size: int | None, origin: str, watch: _Watch) -> None:
    """One request: append to the part from where it ends (206 from exactly there, same validator), or rewrite it
    (200)."""
    have = part.stat().st_size if part.exists() else 0
    saved = _saved_validator(part) if have else None
    if have and saved is None:  # nothing says the part's bytes are still the server's file: start over
        drop_part(part)
        have = 0
    if size is not None and have > size:  # more than the file can hold: start over
        drop_part(part)
        have = 0
    if size is not None and have == size and have:
        return  # already whole (the check decides)
    headers = {"User-Agent": "aid-inpaint", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = next(iter(saved.values()))
    try:
        response = _opener(watch).open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part is already whole (the check decides)
            return
        if e.code in (408, 429) or e.code >= 500:
            raise Interrupted(f"HTTP {e.code}") from None
        reason = str(e.reason or "")
        reason = "a redirect loop" if "infinite loop" in reason else (reason.splitlines() or [""])[0].strip()
        raise DownloadError(f"{url}: HTTP {e.code} {reason}".rstrip()) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if watch.reason:
            raise Interrupted(watch.reason) from None
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or not isinstance(reason, OSError):
            raise DownloadError(f"{url}: cannot connect ({one_line(reason)})") from None
        raise Interrupted(one_line(reason)) from None
    except (OSError, http.client.HTTPException) as e:  # a timeout, reset or cut while waiting for the headers
        raise Interrupted(watch.reason or f"{type(e).__name__}: {one_line(e)}") from None
    watch.progress()  # the headers are in
    with response:
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(f"{url}: the server sent {encoding[:20]}-encoded bytes though asked for the file "
                                f"itself (Accept-Encoding: identity): refused, nothing kept")
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        total = None
        if response.status == 206:
            start, end, whole = _content_range(response.headers.get("Content-Range"))
            if start is None:
                raise DownloadError(f"{url}: a partial reply (206) without a valid Content-Range; refused")
            if start != have:  # another range than asked: never appended, never taken as the whole file
                drop_part(part)
                raise Interrupted(f"the server sent bytes {start}- when asked for bytes {have}-; starting over")
            if _validator(response.headers) != saved:  # If-Range ignored, and the file is not the one begun
                drop_part(part)
                raise Interrupted("the file on the server is not the one the kept part was begun from (its "
                                  "validator changed or is missing); starting over")
            if length is not None and end is not None and end - start + 1 != length:
                raise DownloadError(f"{url}: Content-Range bytes {start}-{end} and Content-Length {length} disagree")
            total = whole if whole is not None else (have + length if length is not None else None)
            mode = "ab"
        else:  # the whole file again
            have, mode = 0, "wb"
            total = length
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: the server announces {total:,} bytes, but the file has {size:,}"
                                f"{f' ({origin})' if origin else ''}: refused, nothing kept")
        if total is not None and total > MAX_BYTES:
            raise DownloadError(f"{url}: the server announces {total:,} bytes, more than any model file "
                                f"({MAX_BYTES:,}); refused")
        if mode == "wb":  # a fresh part: keep its validator (or none) for a later resume
            validator = _validator(response.headers)
            drop_part(part)
            if validator is not None:
                validator_path(part).write_text(json.dumps(validator))
        limit = size if size is not None else total if total is not None else MAX_BYTES  # known, announced, or cap
        done, fresh = have, 0
        read = getattr(response, "read1", response.read)  # whatever has arrived, so a trickle cannot hide a stall
        with open(part, mode) as f:
            while True:
                try:
                    block = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise Interrupted(watch.reason or f"{type(e).__name__} after {done:,} bytes") from None
                if not block:
                    break
                if limit is not None and done + len(block) > limit:
                    raise DownloadError(f"{url}: the server sends more than the {limit:,} bytes of the file"
                                        f"{f' ({origin})' if origin and limit == size else ''}: refused, nothing kept")
                try:
                    f.write(block)
                except OSError as e:
                    from .fileio import disk_full

                    if not disk_full(e):
                        raise
                    raise DownloadError(f"no space left on the device for {part.name} after {done:,} bytes; they are "
                                        f"kept: free some space and run the command again to resume") from None
                done += len(block)
                fresh += len(block)
                if fresh >= STALL_BYTES:  # enough in this window: the watchdog's stall clock starts again
                    watch.progress()
                    fresh = 0
                if progress:
                    progress(done, total)
    if watch.reason:
        raise Interrupted(watch.reason)
    if total is not None and done < total:
        raise Interrupted(f"connection closed after {done:,} of {total:,} bytes")


def _content_range(content_range: str | None) -> tuple[int | None, int | None, int | None]:
    """(start, end, total) of `Content-Range: bytes START-END/TOTAL` (total None for `*`); (None, None, None) when
    the header is missing or malformed."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range or "")
    if not match or int(match[2]) < int(match[1]):
        return None, None, None
    whole = None if match[3] == "*" else int(match[3])
    if whole is not None and int(match[2]) >= whole:
        return None, None, None
    return int(match[1]), int(match[2]), whole


def _range_start(content_range: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/TOTAL`."""
    return _content_range(content_range)[0]
