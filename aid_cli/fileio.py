"""Atomic file writing: a temp file in the destination folder, then a rename, so no reader ever sees half a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def check_writable_dir(path: Path) -> None:
    """Fail with one line when the folder for `path` is missing or not writable."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder is not writable: {folder}")


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Fail with one line, before any work, when `path` cannot be written as a file: it is a folder, a file that is
    not writable, or its folder is missing or not writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable")
    check_writable_dir(path)


def check_output_folder(path: str | os.PathLike, what: str) -> None:
    """Fail with one line, before any work, when `path` cannot be (made and) written as a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not a writable folder")


def _lock_temp(fd: int, wait: bool) -> bool:
    """An exclusive OS lock on an open temp file: its writer holds one for as long as it lives (False: held by a
    live writer, or no locks here)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no way to tell a live writer's temp from a dead one's
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove the temps that atomic writes of `path` killed half-way (kill -9, a power cut) left beside it
    (`.NAME.XXXX.tmp.SUFFIX`, 17–34 MB each for a large image): those no live writer holds locked. Returns how many."""
    import glob

    path = Path(path)
    n = 0
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock_temp(fd, wait=False):
                p.unlink()
                n += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is removed.

    The temp is locked (an OS lock, gone with the process) while it is written, so the temps of writers that were
    killed are told from live ones and removed by the next write of the same file."""
    path = Path(path)
    check_writable_dir(path)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.resolve().parent)
    _lock_temp(fd, wait=True)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except Exception as e:
        if disk_full(e):
            raise UserError(f"no space left on the device to write {path} (nothing was written; free some space "
                            f"and run again)") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.close(fd)


def claim_new(path: str | os.PathLike) -> bool:
    """Create `path` empty, only if nothing is there (O_CREAT | O_EXCL: one process wins a name however many race
    for it); True when this process now holds the name. A folder that refuses the file is no claim (the caller's
    checks say why)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    except OSError:
        return True  # nothing to win here: writing will fail, with its own one-line reason
    os.close(fd)
    return True


def release_claims(paths) -> None:
    """Remove the names `claim_new` took that were never written (still empty)."""
    for p in paths:
        with contextlib.suppress(OSError):
            if Path(p).is_file() and not Path(p).is_symlink() and Path(p).stat().st_size == 0:
                Path(p).unlink()


def disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or quota) is full: an OSError with ENOSPC/EDQUOT, or a library's wrapped one
    (safetensors reports Rust's StorageFull, Pillow re-raises as OSError)."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return True
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text or "code: 28," in text


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a finished temporary file into place in one rename, with the usual permissions (mkstemp makes 0600).

    The file's bytes are flushed to disk (fsync) before the rename and the folder's entry after it, so a power loss
    leaves the old file or the new one, never a renamed but empty one."""
    os.chmod(tmp, 0o666 & ~_umask())
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
    _fsync(Path(path).resolve().parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    return Path(path)


def _fsync(path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on Windows: the rename is all there is
        return
    try:
        os.fsync(fd)
    except OSError as e:  # a full disk or an I/O error surfaces here; folders on some filesystems cannot be synced
        if flags & getattr(os, "O_DIRECTORY", 0) == 0 and e.errno in (28, 5):  # ENOSPC, EIO: the bytes are not safe
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), then move the result into place atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically, and byte-for-byte the same for the same tensors and metadata.

    safetensors keeps the metadata in a hash map, so the header lists its keys in a different order on every save, and
    the file's sha256 (which binds a guidance module to its backbone, and a download to its record) changed with it:
    converting the same official pickle twice gave two "different" backbones. The header is rewritten with its keys
    sorted: the same JSON object in the same number of bytes, so every data offset stays valid."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_safetensors_header(tmp)

    return atomic_write(path, write)


def _sort_safetensors_header(path: Path) -> None:
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= size:  # always, for safetensors' compact JSON; otherwise the file stays as written
            f.seek(8)
            f.write(canonical.ljust(size, b" "))  # safetensors pads its header with spaces


def clean_stale_temps(folder: Path, log=None) -> int:
    """Remove the temp files an atomic write killed half-way left behind (`.NAME.XXXX.tmp*`, see fileio.atomic_path)
    in a run folder that this run owns; returns how many."""
    n = 0
    for p in [*Path(folder).glob(".*.tmp*"), *Path(folder).glob("*/.*.tmp*")]:
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    if n and log is not None:
        log(f"removed {n} stale temp file{'s' if n > 1 else ''} left by an interrupted write in {folder}")
    return n


def utc_now() -> str:
    """Now, in UTC, to the second (ISO 8601): the date of records and reports."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of the regular files under `path` (a file's own size; 0 when missing). Symbolic links are not followed."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


RUNS_DIR = "aid-runs"  # where `aid train` and `aid pretrain` put numbered runs without --out ($AID_RUNS overrides)


def numbered_run_dir(desc: str, root: str | os.PathLike | None = None) -> Path:
    """A new run folder ROOT/NNNNN-DESC, numbered one above the highest run in ROOT (EDM's convention: `00000-…`,
    `00001-…`); not created here. ROOT: `$AID_RUNS`, else `./aid-runs`.

    Under torchrun every rank would count on its own and could pick different numbers, so there --out is required."""
    import re

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("under torchrun, pass --out RUN_FOLDER (every process must write to the same run)")
    root = Path(root or os.environ.get("AID_RUNS") or RUNS_DIR).expanduser()
    ids = [int(m.group()) for p in (root.iterdir() if root.is_dir() else ())
           if p.is_dir() and (m := re.match(r"\d+", p.name))]
    desc = re.sub(r"[^A-Za-z0-9._-]+", "-", desc).strip("-") or "run"
    return root / f"{max(ids, default=-1) + 1:05d}-{desc}"


def run_description(kind: str, dataset: str | os.PathLike) -> str:
    """`train-cats64-train` for ../data/cats64/train.zip, `train-ffhq` for a dataset name: a run's folder suffix."""
    path = Path(dataset)
    name = f"{path.parent.name}-{path.stem}" if path.suffix and path.parent.name not in ("", ".", "..") else path.stem
    return f"{kind}-{name or 'data'}"


PATH_KEYS = ("dataset", "val_dataset", "out", "backbone", "init", "vae", "guidance")


def portable_record(record: dict, run: str | os.PathLike) -> dict:
    """A copy of a run's settings fit for a published file's metadata: no absolute paths of the machine it ran on.

    Path-valued entries (PATH_KEYS, also in a nested "config") become names: a path inside the run relative to it
    ("." for the run itself), any other its last two components (`/data/x/cats64/train.zip` -> `cats64/train.zip`).
    Model names (`ffhq`, `edm-ffhq-64`) and missing values stay as they are."""
    run = Path(run).resolve()

    def name(value):
        if not isinstance(value, str) or ("/" not in value and os.sep not in value):
            return value
        path = Path(value).expanduser().resolve()
        if path == run or run in path.parents:
            return path.relative_to(run).as_posix() or "."
        return "/".join(path.parts[-2:])

    out = {}
    for key, value in record.items():
        if isinstance(value, dict) and key == "config":
            out[key] = portable_record(value, run)
        else:
            out[key] = name(value) if key in PATH_KEYS else value
    return out
