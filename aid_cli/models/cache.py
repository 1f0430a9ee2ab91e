"""The model cache: downloads (resumable, verified by sha256), official pickles converted once, records, removal.

`--model NAME`, `aid models list|info|download|convert|rm`. A name maps to where its file comes from (shipped in
weights/, a Hugging Face hub repo pinned to a commit, a plain URL: every source serves the same file), its licence,
and the file's sha256 and size: given here where known in advance, else recorded on the first download and enforced
from then on. Official pickles are converted once, through the safe converter (backbones/convert.py); inference loads
only the resulting `.safetensors`.

Cache (`models_dir()`; `--cache-dir DIR` replaces it and puts hub files in DIR/hub):
  <name>/<published file>.part    a download in progress; the next attempt resumes it
  <name>/<published file>         a verified download (an official pickle is deleted once converted)
  <name>/<name>.safetensors       what `--model NAME` loads (for pickles: the conversion)
  <name>/record.json              where it came from, sha256 and size of the download and of the conversion
  known-sha256.json               sha256 and size of each file as first downloaded; `aid models rm` keeps it
  .locks/<name>.lock              one download of a model at a time
Hub sources go to the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, DownloadError, OfflineError, UserError, one_line
from ..fileio import utc_now
from .entry import HubFile, ModelEntry
from ..paths import hub_cache_dir, model_mirror, models_dir, offline_mode, offline_reason, weights_dir

KNOWN_HASHES = "known-sha256.json"


def download_urls(entry: ModelEntry) -> list[str]:
    """The plain URLs a model is fetched from: the catalogue's, or `$AID_MODEL_MIRROR/<file>` in their place."""
    mirror = model_mirror()
    return [f"{mirror}/{entry.file}"] if mirror and entry.urls else list(entry.urls)


def _sources(entry: ModelEntry) -> list[str]:
    return [str(h) for h in entry.hub] + download_urls(entry)


def model_folder(entry: ModelEntry, cache=None) -> Path:
    """A model's folder in the cache."""
    return models_dir(cache) / entry.name


def _hub_cached(src: HubFile, cache) -> Path | None:
    """The hub cache's copy of `src`, None when absent (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.repo_id, src.filename, cache_dir=str(hub_cache_dir(cache)),
                                   revision=src.revision)
    return Path(found) if isinstance(found, str) else None


def cached_path(entry: ModelEntry, cache=None) -> Path | None:
    """The file `--model NAME` loads, when it is on disk; None when it must be fetched (or converted) first."""
    if entry.embedded:
        path = weights_dir() / entry.file
        return path if path.is_file() else None
    if entry.converts:
        path = model_folder(entry, cache) / f"{entry.name}.safetensors"
        return path if path.is_file() else None
    path = model_folder(entry, cache) / entry.file
    if path.is_file():
        return path
    return next((p for p in (_hub_cached(h, cache) for h in entry.hub) if p is not None), None)


def _known(cache) -> dict:
    path = models_dir(cache) / KNOWN_HASHES
    try:
        known = json.loads(path.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def expected_hash(entry: ModelEntry, cache=None) -> tuple[str | None, int | None, str]:
    """(sha256, size, where from) of the published file: the table's, else the first download's, else (None, None, "")."""
    if entry.sha256:
        return entry.sha256, entry.size, "published"
    record = _known(cache).get(f"{entry.name}/{entry.file}")
    if isinstance(record, dict) and record.get("sha256"):
        return record["sha256"], record.get("size"), f"recorded on the first download, {record.get('recorded', '?')}"
    return None, None, ""


def _remember_hash(entry: ModelEntry, cache, sha256: str, size: int, source: str) -> None:
    """Record the first download's sha256 and size; later downloads must match them."""
    from ..fileio import atomic_write_text

    with _lock("known-sha256", cache):  # downloads of other models may record at the same time
        known = _known(cache)
        known[f"{entry.name}/{entry.file}"] = {"sha256": sha256, "size": size, "source": source, "recorded": utc_now()}
        atomic_write_text(models_dir(cache) / KNOWN_HASHES, json.dumps(known, indent=2, sort_keys=True) + "\n")




def _verify(entry: ModelEntry, path: Path, cache, source: str) -> str:
    """sha256 of a file, checked against the published or first-recorded value. With none, nothing is checked here:
    `_finish` records a download's hash once it converted and loaded; a file put in the cache by hand records nothing."""
    from ..fileio import sha256_file

    digest, size = sha256_file(path), path.stat().st_size
    want, want_size, origin = expected_hash(entry, cache)
    if want is None:
        pass  # recorded by _finish, once the file converted and loaded: an error page never becomes "the" hash
    elif digest != want or (want_size is not None and size != want_size):
        raise DownloadError(f"{entry.name}: {entry.file} from {source} is corrupt or altered (sha256 {digest[:16]}…, "
                            f"{size:,} bytes; expected {want[:16]}…, {origin}): refused, nothing kept")
    return digest


@contextlib.contextmanager
def _lock(name: str, cache):
    """One process at a time fetches, converts or removes a model (or records a hash)."""
    from filelock import FileLock

    folder = models_dir(cache) / ".locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{name}.lock"))
        lock.acquire()
    except OSError as e:
        raise UserError(f"the model cache {models_dir(cache)} is not writable ({e.strerror or one_line(e)}): set "
                        f"AID_CACHE or pass --cache-dir to a writable folder") from None
    try:
        yield
    finally:
        lock.release()


def _offline_error(entry: ModelEntry, cache, offline: bool | None) -> OfflineError:
    """One line: which file to fetch and where to put it."""
    again = f"`aid models download {entry.name}{f' --cache-dir {cache}' if cache else ''}`"
    head = f"{entry.name} is not in the cache and downloads are off ({offline_reason(offline)})"
    if entry.urls:
        return OfflineError(f"{head}: fetch {download_urls(entry)[0]} and put it at {model_folder(entry, cache) / entry.file}, then "
                            f"run {again} (it checks and converts a file found there)")
    h = entry.hub[0]
    return OfflineError(f"{head}: fetch {h.filename} of the Hugging Face repo {h.repo_id} at revision {h.revision} "
                        f"into the hub cache {hub_cache_dir(cache)} (`hf download {h.repo_id} {h.filename} --revision "
                        f"{h.revision}`)")


def _kept_download(entry: ModelEntry, cache) -> tuple[Path, str] | None:
    """A published file already on disk (kept after a failed conversion, or put there by hand), with its source."""
    local = model_folder(entry, cache) / entry.file
    if local.is_file():
        return local, str(local)
    for h in entry.hub:
        if (found := _hub_cached(h, cache)) is not None:
            return found, str(h)
    return None


def _drop_hub_file(path: Path) -> None:
    """Remove a hub-cache file: the snapshot entry, its blob, and folders left empty up to the repo folder."""
    blob = path.resolve()
    for p in {path, blob}:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    repo = next((q for q in path.parents if q.name.startswith(("models--", "datasets--", "spaces--"))), None)
    if repo is not None:
        for folder in sorted((d for d in repo.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [repo]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty ones


def _download(entry: ModelEntry, cache, progress, log) -> tuple[Path, str, str]:
    """Fetch the published file from its first source that works: (path, source, sha256). Refused bytes are not kept."""
    from ..download import download_url

    reasons = []
    for h in entry.hub:
        from huggingface_hub import hf_hub_download

        if log:
            log(f"downloading {h}")
        try:
            path = Path(hf_hub_download(h.repo_id, h.filename, revision=h.revision, cache_dir=str(hub_cache_dir(cache)),
                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
        except Exception as e:  # every hub failure (network, 404, bad headers) is this source's; try the next one
            reasons.append(f"{h}: {one_line(e, with_type=True)}")
            continue
        try:
            return path, str(h), _verify(entry, path, cache, str(h))
        except DownloadError as e:
            _drop_hub_file(path)
            reasons.append(str(e))
    for url in download_urls(entry):
        dest = model_folder(entry, cache) / entry.file
        dest.parent.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"downloading {url}")
        digest = []
        try:
            bar = (lambda done, total: progress(entry.file, done, total)) if progress else None
            path = download_url(url, dest, check=lambda part: digest.append(_verify(entry, part, cache, url)),
                                progress=bar, size=expected_hash(entry, cache)[1],
                                size_origin=expected_hash(entry, cache)[2])
            return path, url, digest[0]
        except DownloadError as e:
            reasons.append(str(e))
    with contextlib.suppress(OSError):
        model_folder(entry, cache).rmdir()  # nothing was kept: leave no empty folder either
    raise DownloadError(reasons[0] if len(reasons) == 1 else f"{entry.name}: every source failed: {'; '.join(reasons)}")


def _finish(entry: ModelEntry, src: Path, source: str, sha256: str, cache, keep_source: bool, log) -> Path:
    """Convert an official pickle once (safe converter) and write the record; returns the file `--model` loads.

    A file whose sha256 nothing vouched for (no published or recorded hash) and that does not convert or load (an
    error page served as the file, a cut-off transfer) is removed from the cache, so the next run downloads it anew;
    a verified one is kept for `aid models convert` to retry."""
    from ..fileio import atomic_write_text

    folder = model_folder(entry, cache)
    folder.mkdir(parents=True, exist_ok=True)
    verified = expected_hash(entry, cache)[0] is not None
    record = {"name": entry.name, "kind": entry.kind, "file": entry.file, "source": source,
              "sha256": sha256, "size": src.stat().st_size, "license": entry.license, "date": utc_now()}

    def unusable(what: str, e: UserError) -> CheckpointError:
        if verified:
            return CheckpointError(f"{entry.name}: {entry.file} is downloaded and verified ({src}), but {what} "
                                   f"failed: {e}")
        if src.parent == folder:
            src.unlink(missing_ok=True)
        return CheckpointError(f"{entry.name}: {entry.file} from {source} is not a usable checkpoint ({what} failed: "
                               f"{e}); it was removed and nothing was recorded: the next run downloads it anew")

    if entry.converts:
        from ..backbones.convert import convert_pickle

        dst = folder / f"{entry.name}.safetensors"
        if log:
            log(f"converting {entry.file} (safe converter: nothing in the pickle is run)")
        try:
            summary = convert_pickle(src, dst)
        except UserError as e:
            raise unusable("converting it", e) from None
        record["converted"] = {k: summary[k] for k in ("precond", "parameters", "resolution", "sha256") if k in summary}
        record["converted"].update(file=dst.name, size=dst.stat().st_size)
        if not keep_source and src.parent == folder:
            src.unlink()
            record["source_kept"] = False
        result = dst
    else:
        if src.suffix == ".safetensors":  # it must at least be a readable checkpoint before its hash is trusted
            from ..backbones.checkpoint import _header_shapes, read_metadata

            try:
                read_metadata(src)
                _header_shapes(src)
            except UserError as e:
                raise unusable("reading it", e) from None
        result = src
    if not verified and source in _sources(entry):
        _remember_hash(entry, cache, sha256, record["size"], source)  # only now: the file converted and loaded
    atomic_write_text(folder / "record.json", json.dumps(record, indent=2) + "\n")
    return result


def fetch_model(entry: ModelEntry, cache=None, offline: bool | None = None, progress=None,
                log: Callable[[str], None] | None = None, keep_source: bool = False) -> Path:
    """The file `--model NAME` loads: from the cache, else downloaded (unless offline), verified and converted.

    `progress(file, done, total)` follows a plain-URL download (hub downloads show huggingface_hub's own bar).
    Offline, a model not in the cache fails at once with one line naming the file to fetch and where to put it.
    """
    ready = cached_path(entry, cache)
    if ready is not None:
        return ready
    if entry.embedded:
        raise CheckpointError(f"{entry.name}: {entry.note or 'missing from ' + str(weights_dir())}")
    if not entry.sources:
        raise UserError(f"{entry.name}: {entry.note or 'no download source is known'}")
    kept = _kept_download(entry, cache)
    if kept is None and offline_mode(offline):
        raise _offline_error(entry, cache, offline)
    with _lock(entry.name, cache):
        ready = cached_path(entry, cache)  # another process may have finished it meanwhile
        if ready is not None:
            return ready
        if model_folder(entry, cache).is_dir():  # a conversion killed half-way left its temp file (we hold the lock)
            from ..fileio import clean_stale_temps

            clean_stale_temps(model_folder(entry, cache), log)
        kept = _kept_download(entry, cache)
        if kept is not None:
            if log:
                log(f"{entry.name}: checking {kept[0]}")
            try:
                digest = _verify(entry, kept[0], cache, kept[1])
            except DownloadError:
                (_drop_hub_file if kept[1].startswith("hf://") else Path.unlink)(kept[0])
                raise
            return _finish(entry, *kept, digest, cache, keep_source, log)
        return _finish(entry, *_download(entry, cache, progress, log), cache, keep_source, log)


def convert_cached(entry: ModelEntry, cache=None, log=None) -> Path:
    """(Re)convert a model's kept download, without downloading anything (after a failed or outdated conversion)."""
    if not entry.converts:
        raise UserError(f"{entry.name}: {entry.file} is already a safetensors file; nothing to convert")
    with _lock(entry.name, cache):
        kept = _kept_download(entry, cache)
        if kept is None:
            raise UserError(f"{entry.name}: no download of {entry.file} is kept in {model_folder(entry, cache)}; run "
                            f"`aid models download {entry.name}` (it converts as it downloads)")
        digest = _verify(entry, kept[0], cache, kept[1])
        return _finish(entry, *kept, digest, cache, True, log)


def forget_hash(entry: ModelEntry, cache=None) -> bool:
    """Drop the sha256 recorded on the model's first download (the next download records a new one); True if one was."""
    from ..fileio import atomic_write_text

    with _lock("known-sha256", cache):
        known = _known(cache)
        if known.pop(f"{entry.name}/{entry.file}", None) is None:
            return False
        atomic_write_text(models_dir(cache) / KNOWN_HASHES, json.dumps(known, indent=2, sort_keys=True) + "\n")
        return True


def remove_model(entry: ModelEntry, cache=None) -> int:
    """Delete a model's cached files (its folder, its hub files); returns the bytes freed. Recorded hashes stay
    (`forget_hash` drops one)."""
    import shutil

    from ..fileio import tree_size

    if entry.embedded:
        raise UserError(f"{entry.name} ships with aid in {weights_dir()}; there is nothing to remove from the cache")
    freed = 0
    if not model_folder(entry, cache).exists() and not any(_hub_cached(h, cache) for h in entry.hub):
        return 0
    with _lock(entry.name, cache):
        folder = model_folder(entry, cache)
        freed += tree_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        for h in entry.hub:
            if (found := _hub_cached(h, cache)) is not None:
                freed += found.resolve().stat().st_size
                _drop_hub_file(found)
    return freed
