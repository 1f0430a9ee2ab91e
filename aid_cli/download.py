"""Plain-URL downloads that resume: the bytes grow in `<file>.part` (an HTTP Range request continues it, on a retry in
the same run or on the next run), are checked, and only then renamed to `<file>`. A cache never holds half a file or
unchecked bytes under a real name.
"""

from __future__ import annotations

import http.client
import re
import socket
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
STALL_S = 60.0  # a transfer that brings fewer than STALL_BYTES in any STALL_S seconds is stalled (and resumed)
STALL_BYTES = 64 << 10
MAX_BYTES = 64 << 30  # a file of unknown size (a first download, no Content-Length) stops here all the same

Progress = Callable[[int, "int | None"], None]  # (bytes on disk, total bytes or None when the server does not say)


class Interrupted(Exception):
    """The transfer stopped early (connection dropped or reset, timeout, server busy): worth resuming."""


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download_url(url: str, dest: str | Path, check: Callable[[Path], None] | None = None,
                 progress: Progress | None = None, attempts: int | None = None, size: int | None = None,
                 size_origin: str = "") -> Path:
    """Fetch `url` to `dest`: continue `dest.part`, retry interrupted transfers, then `check(part)` and rename.

    `check` raises to refuse the bytes (a sha256 mismatch): the part is deleted and nothing is left. Failures are one
    DownloadError line; an interrupted transfer keeps its part, and the message says that running again resumes it.
    `size` (the published or recorded size, when known) caps the transfer: a server announcing or sending more is
    refused at once, not after the bytes are on disk. A transfer that stalls (fewer than STALL_BYTES in STALL_S
    seconds) is cut and resumed like a dropped one.
    """
    dest, attempts = Path(dest), attempts or ATTEMPTS
    part = part_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, progress, size, size_origin)
            break
        except DownloadError as e:
            if "no space left" not in str(e):
                part.unlink(missing_ok=True)  # refused bytes are never kept
            raise
        except Interrupted as e:
            if attempt == attempts:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"download of {url} interrupted ({e}); {attempts} attempt(s), {kept:,} bytes kept "
                                    f"in {part}: run the command again to resume") from None
            time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 30.0))
    if check is not None:
        try:
            check(part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return publish(part, dest)


def _transfer(url: str, part: Path, progress: Progress | None, size: int | None = None, origin: str = "") -> None:
    """One request: append to the part from where it ends (206 from exactly there), or rewrite it (200)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # more than the file can hold: start over
        part.unlink()
        have = 0
    if size is not None and have == size and have:
        return  # already whole (the check decides)
    headers = {"User-Agent": "aid-inpaint", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
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
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or not isinstance(reason, OSError):
            raise DownloadError(f"{url}: cannot connect ({one_line(reason)})") from None
        raise Interrupted(one_line(reason)) from None
    except (OSError, http.client.HTTPException) as e:  # a timeout or reset while waiting for the headers
        raise Interrupted(f"{type(e).__name__}: {one_line(e)}") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        total = None
        if response.status == 206:
            start, end, whole = _content_range(response.headers.get("Content-Range"))
            if start is None:
                raise DownloadError(f"{url}: a partial reply (206) without a valid Content-Range; refused")
            if start != have:  # another range than asked: never appended, never taken as the whole file
                part.unlink(missing_ok=True)
                raise Interrupted(f"the server sent bytes {start}- when asked for bytes {have}-; starting over")
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
        limit = size if size is not None else total if total is not None else MAX_BYTES  # known, announced, or cap
        done = have
        window_start, window_bytes = time.monotonic(), 0
        read = getattr(response, "read1", response.read)  # whatever has arrived, so a trickle cannot hide a stall
        with open(part, mode) as f:
            while True:
                try:
                    block = read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise Interrupted(f"{type(e).__name__} after {done:,} bytes") from None
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
                window_bytes += len(block)
                if progress:
                    progress(done, total)
                now = time.monotonic()
                if now - window_start >= STALL_S:
                    if window_bytes < STALL_BYTES:
                        raise Interrupted(f"stalled: {window_bytes:,} bytes in {now - window_start:.0f} s after "
                                          f"{done:,} bytes")
                    window_start, window_bytes = now, 0
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
