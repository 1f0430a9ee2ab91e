"""Where weights come from: model names (the embedded default, official NVIDIA checkpoints, guidance modules) and their
sources, sha256 and cache; tuned baseline parameters; dataset names.

`--model` takes a `.safetensors` path or a registry name (`aid models list`); without it, the embedded default in
`weights/` (a small EDM backbone trained by `aid pretrain` on 64×64 cat faces; weights/README.md). `AID_WEIGHTS_DIR`
overrides that folder (for installs that keep weights elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, DownloadError, OfflineError, UserError

EMBEDDED_BACKBONE = "aid-cats64-edm.safetensors"
EMBEDDED_GUIDANCE = "aid-cats64-guidance.safetensors"


def weights_dir() -> Path:
    return Path(os.environ.get("AID_WEIGHTS_DIR") or Path(__file__).resolve().parents[1] / "weights")


def cache_dir() -> Path:
    """aid's own cache (models, reference statistics, tuned params): $AID_CACHE, else $XDG_CACHE_HOME/aid, else
    ~/.cache/aid."""
    if os.environ.get("AID_CACHE"):
        return Path(os.environ["AID_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "aid"


def _resolve(given, kind: str, embedded: str, missing_embedded: str, fetch: dict) -> Path:
    """A checkpoint path as given, a registry name (fetched unless cached), or the embedded file when none is given."""
    what = "checkpoint" if kind == "backbone" else "guidance module"
    if given is None:
        path = weights_dir() / embedded
        if not path.is_file():
            raise CheckpointError(f"{missing_embedded} ({path})")
        return path
    path = Path(given).expanduser()
    if not path.exists() and (entry := lookup_model(str(given))) is not None:
        if entry.kind != kind:
            raise UserError(f"{entry.name} is a {entry.kind} model, not a {kind}")
        return fetch_model(entry, **fetch)
    if not path.exists():
        close = _close_names(str(given))
        hint = f" (nor a model name; did you mean {close[0]}? see `aid models list`)" if close else ""
        raise CheckpointError(f"{what} not found: {path}{hint}")
    if path.is_dir():
        raise CheckpointError(f"{what} is a folder, not a file: {path}")
    return path


def resolve_backbone(model: str | os.PathLike | None, **fetch) -> Path:
    """The checkpoint file for `--model` (a path or a model name), or the embedded default when none is given.

    A name not yet in the cache is downloaded (`fetch` goes to `fetch_model`: cache, offline, progress, log).
    """
    return _resolve(model, "backbone", EMBEDDED_BACKBONE, "the embedded default backbone is missing; reinstall aid "
                    "from its repository or pass --model PATH.safetensors", fetch)


def resolve_guidance(guidance: str | os.PathLike | None, **fetch) -> Path:
    """The guidance module for `--guidance` (a path or a model name), or the embedded default's when none is given."""
    return _resolve(guidance, "guidance", EMBEDDED_GUIDANCE, "no guidance module for the embedded backbone is "
                    "installed; train one with `aid train` and pass --guidance PATH", fetch)


def guidance_at_hand(checkpoint: str | os.PathLike, cache=None) -> tuple[str, Path] | None:
    """(name, file) of a guidance module on disk for this backbone file, else None; nothing is downloaded or hashed.

    "On disk": the module shipped in weights/, or one in the cache, whose registry entry names as its backbone the model
    this checkpoint file is (the embedded one, or a cached download). `aid inpaint` defaults to --method aid then.
    """
    try:
        target = Path(checkpoint).resolve()
    except OSError:
        return None
    for entry in MODELS:
        if entry.kind != "guidance" or entry.backbone is None:
            continue
        backbone = lookup_model(entry.backbone)
        if backbone is None:
            continue
        backbone_file, module = cached_path(backbone, cache), cached_path(entry, cache)
        if backbone_file is not None and module is not None and backbone_file.resolve() == target:
            return entry.name, module
    return None


# --------------------------------------------------------------------------------------------- tuned baseline params
#
# `aid bench --tune METHOD` picks a baseline's step size for one backbone and records it beside the checkpoint, in
# `<checkpoint stem>.tuned.json`, or, when that folder is not writable, in aid's cache as `tuned/<sha256>.json`:
#   {"backbone_sha256": "…", "methods": {"dps": {"params": {"zeta": 0.16}, "grid": […], "scores": […], …}, …}}
# `aid inpaint` and `aid bench` take those params as the method's defaults for that backbone. A record whose
# backbone_sha256 is not the checkpoint's is refused (one notice; the method's own defaults apply).

TUNED_SUFFIX = ".tuned.json"


def tuned_sidecar(checkpoint: str | os.PathLike) -> Path:
    """`<folder>/<stem>.tuned.json` beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(path.stem + TUNED_SUFFIX)


def tuned_cache_file(sha256: str) -> Path:
    """The cache's record for a backbone (used when the checkpoint's folder is not writable)."""
    return cache_dir() / "tuned" / f"{sha256}.json"


def _cached_records_exist() -> bool:
    folder = cache_dir() / "tuned"
    return folder.is_dir() and any(folder.glob("*.json"))


def _read_record(path: Path, sha256: str, notice) -> dict:
    """The methods of one record file, or {} (with a notice) when it is unreadable or for another backbone."""
    try:
        record = json.loads(path.read_text())
        methods = record["methods"]
        if not isinstance(methods, dict):
            raise TypeError("methods is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if notice:
            notice(f"ignoring the tuned-parameter record {path}: unreadable ({type(e).__name__}: {e})")
        return {}
    if record.get("backbone_sha256") != sha256:
        if notice:
            notice(f"ignoring the tuned-parameter record {path}: it was tuned for backbone sha256 "
                   f"{str(record.get('backbone_sha256'))[:16]}…, this checkpoint is {sha256[:16]}…; using the "
                   f"methods' defaults")
        return {}
    return {k: dict(v, record=str(path)) for k, v in methods.items() if isinstance(v, dict)}


def tuned_entries(checkpoint: str | os.PathLike, sha256: str | None = None, notice=None) -> dict[str, dict]:
    """Every tuned entry that applies to this checkpoint, by method name ({} when none).

    The checkpoint is hashed only when a record might exist. Sidecar entries win over cached ones.
    """
    from .fileio import sha256_file

    sidecar = tuned_sidecar(checkpoint)
    if not sidecar.is_file() and not _cached_records_exist():
        return {}
    sha256 = sha256 or sha256_file(checkpoint)
    entries: dict[str, dict] = {}
    cached = tuned_cache_file(sha256)
    if cached.is_file():
        entries.update(_read_record(cached, sha256, notice))
    if sidecar.is_file():
        entries.update(_read_record(sidecar, sha256, notice))
    return entries


def tuned_params(checkpoint: str | os.PathLike, method: str, sha256: str | None = None, notice=None) -> dict:
    """The tuned params of `method` for this checkpoint, {} when it was never tuned (the method's defaults apply)."""
    entry = tuned_entries(checkpoint, sha256, notice).get(method)
    params = entry.get("params") if entry else None
    return dict(params) if isinstance(params, dict) else {}


def write_tuned(checkpoint: str | os.PathLike, method: str, entry: dict, sha256: str) -> Path:
    """Merge `entry` as `methods[method]` into the checkpoint's record, atomically; returns the file written.

    The sidecar beside the checkpoint when its folder is writable, else the cache's `tuned/<sha256>.json`. Entries of
    other methods are kept; a record for another backbone is replaced.
    """
    from .fileio import atomic_write_text

    sidecar = tuned_sidecar(checkpoint)
    folder = sidecar.resolve().parent
    writable = os.access(folder, os.W_OK | os.X_OK) and (not sidecar.exists() or os.access(sidecar, os.W_OK))
    path = sidecar if writable else tuned_cache_file(sha256)
    record = {"backbone_sha256": sha256, "backbone": Path(checkpoint).name, "methods": {}}  # a name: no machine paths
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("backbone_sha256") == sha256 and isinstance(old.get("methods"), dict):
                record["methods"].update(old["methods"])
        except (OSError, ValueError, AttributeError):
            pass  # a damaged record is replaced
    record["methods"][method] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ dataset names
# `aid train --dataset NAME`: a name resolves to a local copy; none of these can be downloaded by aid itself (licences
# and sizes differ), so a name that is not found locally fails at once with what to fetch and where to put it.

DATASETS = {
    "cats": ("cats64/train.zip", "the 64x64 cat faces (EDM zip layout); set AID_DATA to the folder holding cats64/"),
    "ffhq": ("ffhq-64x64.zip", "FFHQ at 64x64: build it with NVlabs/edm dataset_tool.py from the FFHQ images "
             "(github.com/NVlabs/ffhq-dataset)"),
    "afhqv2": ("afhqv2-64x64.zip", "AFHQv2 at 64x64: build it with NVlabs/edm dataset_tool.py from AFHQv2 "
               "(github.com/clovaai/stargan-v2)"),
    "imagenet": ("imagenet-512x512.zip", "ImageNet at 512x512: build it with NVlabs/edm2 dataset_tool.py from the "
                 "ILSVRC2012 training set (image-net.org)"),
}


def data_dir() -> Path:
    """Where named datasets are looked for: $AID_DATA, else aid's cache folder's data/."""
    return Path(os.environ["AID_DATA"]) if os.environ.get("AID_DATA") else cache_dir() / "data"


def resolve_dataset(name_or_path: str) -> Path:
    """A folder or zip path as given, or a dataset name resolved under `data_dir()`; fails at once, in one line."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in DATASETS:
        relative, howto = DATASETS[name_or_path]
        candidate = data_dir() / relative
        if candidate.exists():
            return candidate
        raise UserError(f"dataset {name_or_path!r} is not available offline: expected {candidate} ({howto}); or pass "
                        f"--dataset PATH to a folder or EDM zip")
    raise UserError(f"dataset not found: {name_or_path} (a folder, an EDM zip, or one of {', '.join(DATASETS)})")


# ------------------------------------------------------------------------------------------------------- model names
#
# `--model NAME`, `aid models list|info|download|convert|rm`. A name maps to where its file comes from (shipped in
# weights/, a Hugging Face hub repo pinned to a commit, a plain URL: every source serves the same file), its licence,
# and the file's sha256 and size: given here where known in advance, else recorded on the first download and enforced
# from then on. Official pickles are converted once, through the safe converter (backbones/convert.py); inference loads
# only the resulting `.safetensors`.
#
# Cache (`models_dir()`; `--cache-dir DIR` replaces it and puts hub files in DIR/hub):
#   <name>/<published file>.part    a download in progress; the next attempt resumes it
#   <name>/<published file>         a verified download (an official pickle is deleted once converted)
#   <name>/<name>.safetensors       what `--model NAME` loads (for pickles: the conversion)
#   <name>/record.json              where it came from, sha256 and size of the download and of the conversion
#   known-sha256.json               sha256 and size of each file as first downloaded; `aid models rm` keeps it
#   .locks/<name>.lock              one download of a model at a time
# Hub sources go to the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub).

NVIDIA_LICENSE = "CC BY-NC-SA 4.0 (NVIDIA; non-commercial)"
EMBEDDED_LICENSE = "research use only (training images carry no licence; weights/README.md)"
EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
KNOWN_HASHES = "known-sha256.json"


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face hub repo, pinned to a commit."""

    repo_id: str
    filename: str
    revision: str  # a 40-hex commit hash, never a branch

    def __str__(self) -> str:
        return f"hf://{self.repo_id}/{self.filename}@{self.revision}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "backbone" | "guidance"
    resolution: int  # image side in pixels
    license: str
    description: str
    file: str  # the published file name; every source serves it
    urls: tuple[str, ...] = ()
    hub: tuple[HubFile, ...] = ()
    sha256: str | None = None  # published; None: recorded on the first download
    size: int | None = None  # bytes, likewise
    aliases: tuple[str, ...] = ()
    embedded: bool = False  # ships in weights/ (file is its name there)
    backbone: str | None = None  # guidance: the backbone it was trained on
    note: str = ""  # why there is no source, for entries without one

    @property
    def converts(self) -> bool:
        """An official pickle: converted once to `<name>.safetensors`."""
        return self.file.endswith(".pkl")

    @property
    def sources(self) -> list[str]:
        return [str(h) for h in self.hub] + list(self.urls)


def _edm(data: str, kind: str, arch: str) -> ModelEntry:
    file = f"edm-{data}-64x64-uncond-{kind}.pkl"
    pretty = {"ffhq": "FFHQ", "afhqv2": "AFHQv2"}[data]
    return ModelEntry(name=f"edm-{data}-64-{kind}", kind="backbone", resolution=64, license=NVIDIA_LICENSE,
                      description=f"EDM (Karras et al. 2022) {pretty} 64x64 unconditional, {kind.upper()} {arch}, EMA",
                      file=file, urls=(EDM_URL + file,), aliases=(f"edm-{data}-64",) if kind == "vp" else ())


def _edm2(name: str, file: str, resolution: int, what: str) -> ModelEntry:
    return ModelEntry(name=name, kind="backbone", resolution=resolution, license=NVIDIA_LICENSE,
                      description=f"EDM2 (Karras et al. 2024) ImageNet {resolution}x{resolution} class-conditional, "
                                  f"{what}", file=file, urls=(EDM2_URL + file,))


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(name="aid-cats64", kind="backbone", resolution=64, license=EMBEDDED_LICENSE,
               description="embedded default: EDM SongUNet DDPM++ (4.2 M parameters) trained by aid pretrain on 64x64 "
                           "cat faces", file=EMBEDDED_BACKBONE, embedded=True,
               sha256="b7fefd36232891fb810f66472ec4b519fe141b741838298ad242338cda18f44d", size=16813228),
    ModelEntry(name="aid-cats64-guidance", kind="guidance", resolution=64, license=EMBEDDED_LICENSE,
               description="AID guidance module for aid-cats64 (CPU-trained, backprop estimator at N = 18 with the "
                           "denoised-input actor; weights/aid-cats64-guidance.md)",
               file=EMBEDDED_GUIDANCE, embedded=True, backbone="aid-cats64",
               sha256="f9076b6f615fb096286495e187b4b80528c437234c98ced6972f636e21adca41", size=146996),
    _edm("ffhq", "vp", "DDPM++"),
    _edm("ffhq", "ve", "NCSN++"),
    _edm("afhqv2", "vp", "DDPM++"),
    _edm("afhqv2", "ve", "NCSN++"),
    _edm2("edm2-img512-xs", "edm2-img512-xs-2147483-0.135.pkl", 512, "latent (SD VAE), XS, post-hoc EMA 0.135"),
    _edm2("edm2-img512-s", "edm2-img512-s-2147483-0.130.pkl", 512, "latent (SD VAE), S, post-hoc EMA 0.130"),
    _edm2("edm2-img512-m", "edm2-img512-m-2147483-0.100.pkl", 512, "latent (SD VAE), M, post-hoc EMA 0.100"),
    _edm2("edm2-img64-s", "edm2-img64-s-1073741-0.075.pkl", 64, "pixel space, S, post-hoc EMA 0.075"),
)


def lookup_model(name: str) -> ModelEntry | None:
    """The entry named `name` (or one of its aliases), None when there is none."""
    return next((m for m in MODELS if name == m.name or name in m.aliases), None)


def find_model(name: str) -> ModelEntry:
    """The entry named `name`, or a one-line UserError listing the names."""
    entry = lookup_model(name)
    if entry is None:
        close = _close_names(name)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model {name!r}: {hint}known: {', '.join(m.name for m in MODELS)}")
    return entry


def _close_names(name: str) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, [m.name for m in MODELS] + [a for m in MODELS for a in m.aliases], 1)


def offline_mode(offline: bool | None = None) -> bool:
    """`--offline`, else HF_HUB_OFFLINE read as huggingface_hub reads it (1, ON, YES, TRUE)."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _offline_reason(offline: bool | None) -> str:
    return "--offline" if offline else f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}"


def models_dir(cache: str | os.PathLike | None = None) -> Path:
    """Downloaded and converted models: `--cache-dir`, else `cache_dir()/models`."""
    return Path(cache).expanduser() if cache else cache_dir() / "models"


def hub_cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """Hugging Face hub files: `--cache-dir`/hub, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (read now, not when huggingface_hub was imported)."""
    if cache:
        return Path(cache).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


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
    from .fileio import atomic_write_text

    with _lock("known-sha256", cache):  # downloads of other models may record at the same time
        known = _known(cache)
        known[f"{entry.name}/{entry.file}"] = {"sha256": sha256, "size": size, "source": source, "recorded": _now()}
        atomic_write_text(models_dir(cache) / KNOWN_HASHES, json.dumps(known, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _verify(entry: ModelEntry, path: Path, cache, source: str) -> str:
    """sha256 of a file, checked against the published or first-recorded value. With none, nothing is checked here:
    `_finish` records a download's hash once it converted and loaded; a file put in the cache by hand records nothing."""
    from .fileio import sha256_file

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
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{name}.lock")):
        yield


def _offline_error(entry: ModelEntry, cache, offline: bool | None) -> OfflineError:
    """One line: which file to fetch and where to put it."""
    again = f"`aid models download {entry.name}{f' --cache-dir {cache}' if cache else ''}`"
    head = f"{entry.name} is not in the cache and downloads are off ({_offline_reason(offline)})"
    if entry.urls:
        return OfflineError(f"{head}: fetch {entry.urls[0]} and put it at {model_folder(entry, cache) / entry.file}, then "
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
    from .download import download_url

    reasons = []
    for h in entry.hub:
        from huggingface_hub import hf_hub_download

        if log:
            log(f"downloading {h}")
        try:
            path = Path(hf_hub_download(h.repo_id, h.filename, revision=h.revision, cache_dir=str(hub_cache_dir(cache)),
                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
        except Exception as e:  # every hub failure (network, 404, bad headers) is this source's; try the next one
            reasons.append(f"{h}: {_one_line(e)}")
            continue
        try:
            return path, str(h), _verify(entry, path, cache, str(h))
        except DownloadError as e:
            _drop_hub_file(path)
            reasons.append(str(e))
    for url in entry.urls:
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


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _finish(entry: ModelEntry, src: Path, source: str, sha256: str, cache, keep_source: bool, log) -> Path:
    """Convert an official pickle once (safe converter) and write the record; returns the file `--model` loads."""
    from .fileio import atomic_write_text

    folder = model_folder(entry, cache)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": entry.name, "kind": entry.kind, "file": entry.file, "source": source,
              "sha256": sha256, "size": src.stat().st_size, "license": entry.license, "date": _now()}
    if entry.converts:
        from .backbones.convert import convert_pickle

        dst = folder / f"{entry.name}.safetensors"
        if log:
            log(f"converting {entry.file} (safe converter: nothing in the pickle is run)")
        try:
            summary = convert_pickle(src, dst)
        except UserError as e:
            raise CheckpointError(f"{entry.name}: {entry.file} is downloaded and verified ({src}), but converting it "
                                  f"failed: {e}") from None
        record["converted"] = {k: summary[k] for k in ("precond", "parameters", "resolution", "sha256") if k in summary}
        record["converted"].update(file=dst.name, size=dst.stat().st_size)
        if not keep_source and src.parent == folder:
            src.unlink()
            record["source_kept"] = False
        result = dst
    else:
        if src.suffix == ".safetensors":  # it must at least be a readable checkpoint before its hash is trusted
            from .backbones.checkpoint import _header_shapes, read_metadata

            try:
                read_metadata(src)
                _header_shapes(src)
            except UserError as e:
                raise CheckpointError(f"{entry.name}: {entry.file} from {source} is not a usable checkpoint ({e}); "
                                      f"nothing was recorded") from None
        result = src
    if expected_hash(entry, cache)[0] is None and source in entry.sources:
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
            from .training import clean_stale_temps

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
    from .fileio import atomic_write_text

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

    from .fileio import tree_size

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


def describe_model(entry: ModelEntry, cache=None) -> dict:
    """The JSON record of `aid models list --json` and `aid models info --json`."""
    sha256, size, origin = expected_hash(entry, cache)
    path = cached_path(entry, cache)
    record = {"name": entry.name, "kind": entry.kind, "resolution": entry.resolution, "cached": path is not None,
              "license": entry.license, "aliases": list(entry.aliases), "description": entry.description,
              "file": entry.file, "sources": ["weights/" + entry.file] if entry.embedded else entry.sources,
              "sha256": sha256, "size": size, "sha256_origin": origin or None,
              "path": str(path) if path else None}
    if entry.backbone:
        record["backbone"] = entry.backbone
    if entry.note and path is None:
        record["note"] = entry.note
    return record
