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

from .errors import DownloadError
from .fileio import publish

ATTEMPTS = 5  # transfers per call; each one resumes where the previous stopped
TIMEOUT_S = 30.0  # per connect or read
BACKOFF_S = 1.0  # wait before retry k: BACKOFF_S · 2^(k−1), at most 30 s
CHUNK = 1 << 20

Progress = Callable[[int, "int | None"], None]  # (bytes on disk, total bytes or None when the server does not say)


class Interrupted(Exception):
    """The transfer stopped early (connection dropped or reset, timeout, server busy): worth resuming."""


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download_url(url: str, dest: str | Path, check: Callable[[Path], None] | None = None,
                 progress: Progress | None = None, attempts: int | None = None) -> Path:
    """Fetch `url` to `dest`: continue `dest.part`, retry interrupted transfers, then `check(part)` and rename.

    `check` raises to refuse the bytes (a sha256 mismatch): the part is deleted and nothing is left. Failures are one
    DownloadError line; an interrupted transfer keeps its part, and the message says that running again resumes it.
    """
    dest, attempts = Path(dest), attempts or ATTEMPTS
    part = part_path(dest)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, progress)
            break
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


def _transfer(url: str, part: Path, progress: Progress | None) -> None:
    """One request: append to the part from where it ends (206), or rewrite it (200, a server without Range)."""
    have = part.stat().st_size if part.exists() else 0
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
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or not isinstance(reason, OSError):
            raise DownloadError(f"{url}: cannot connect ({reason})") from None
        raise Interrupted(str(reason)) from None
    except (OSError, http.client.HTTPException) as e:  # a timeout or reset while waiting for the headers
        raise Interrupted(f"{type(e).__name__}: {e}") from None
    with response:
        if have and response.status == 206 and _range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        else:  # the whole file again
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        done = have
        with open(part, mode) as f:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise Interrupted(f"{type(e).__name__} after {done:,} bytes") from None
                if not block:
                    break
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise Interrupted(f"connection closed after {done:,} of {total:,} bytes")


def _range_start(content_range: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/TOTAL`."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None
