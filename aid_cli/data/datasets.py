"""Training/evaluation image sets: a folder of images or an EDM `dataset_tool.py` zip.

Images are decoded once into a uint8 tensor [N, C, H, W] at the requested resolution (64×64 cat faces: 184 MB for 15,000),
which keeps CPU training fast. Unreadable images are reported and skipped, never a crash half-way through.
Class labels come from the EDM layout's `dataset.json` (`{"labels": [[name, class], ...]}`, at the top of the zip or
folder) when it labels every image taken; otherwise `labels` is None.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError
from .folders import IMAGE_SUFFIXES
from ..paths import data_dir

@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    source: str = ""
    labels: torch.Tensor | None = None  # int64 [N] class of each image (dataset.json), or None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def as_float(self, index) -> torch.Tensor:
        """Images `index` as float32 in [−1, 1]."""
        return self.images[index].to(torch.float32) / 127.5 - 1


# Limits on what one dataset entry may cost: its stored size once inflated, and its pixels once decoded (a 1.5 MB
# zip entry can inflate to 1.5 GiB; a 50000 x 50000 PNG of a few KB decodes to 7.5 GB).
MAX_ENTRY_BYTES = 256 << 20
MAX_PIXELS = 64_000_000
# Entries a dataset zip may list: zipfile indexes every one up front (~0.5 KB each), and the images decoded stay in
# memory (70,000 FFHQ faces at 64 px: 860 MB). A zip listing more (1,000,000 empty entries: a 2.6 GB peak, then a
# MemoryError) is refused from its end record, before its index is read; a folder has no such limit.
MAX_ZIP_ENTRIES = 250_000


class SkipEntry(Exception):
    """One dataset entry that cannot be used; the reason is its message, and the entry is skipped and reported."""


def center_square(im: Image.Image, resolution: int) -> Image.Image:
    """The centred square of `im`, resized (box/Lanczos) to resolution x resolution; as EDM's dataset_tool does."""
    if im.size == (resolution, resolution):
        return im
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return im.resize((resolution, resolution), Image.LANCZOS)


def _decode(data: bytes, resolution: int | None, channels: int) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # "Corrupt EXIF data" x 10,000
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused below, never printed raw
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise SkipEntry(f"{w}x{h} pixels, more than the {MAX_PIXELS:,} an image may have here")
            if im.format == "TIFF":  # libtiff prints its complaints straight to stderr
                from .images import native_stderr_silenced

                with native_stderr_silenced():
                    im.load()
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB" if channels == 3 else "L")
            if resolution is not None:
                im = center_square(im, resolution)
            arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _entries(path: Path):
    """Yield (name, bytes-loader) for every image in a folder or EDM zip, in sorted order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for p in files:
            yield str(p.relative_to(path)), p.read_bytes
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            with open(path, "rb") as f:
                end = zipfile._EndRecData(f)  # the end record only (ZIP64 too): how many entries the index lists
            listed = end[zipfile._ECD_ENTRIES_TOTAL] if end else 0
            if listed > MAX_ZIP_ENTRIES:
                raise UserError(f"dataset zip {path} lists {listed:,} entries, more than the {MAX_ZIP_ENTRIES:,} a "
                                f"dataset zip may have here; unpack it into a folder or split it")
            z = zipfile.ZipFile(path)
            infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"dataset zip is damaged: {path} ({e})") from None
        for name in sorted(n for n in infos if Path(n).suffix.lower() in IMAGE_SUFFIXES):
            yield name, (lambda info=infos[name]: _read_zip_entry(z, info))
    elif path.exists():
        raise UserError(f"dataset is neither a folder nor a zip archive: {path}")
    else:
        raise UserError(f"dataset not found: {path}")


def _read_zip_entry(z: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int = MAX_ENTRY_BYTES) -> bytes:
    """One zip entry's bytes, at most `cap` of them; a damaged, encrypted or oversized entry is a SkipEntry."""
    import lzma
    import zlib

    if info.flag_bits & 0x1:
        raise SkipEntry("encrypted entry")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise SkipEntry(f"unsupported compression method {info.compress_type}")
    if info.file_size > cap:
        raise SkipEntry(f"inflates to {info.file_size:,} bytes, more than the {cap:,} an entry may have")
    try:
        with z.open(info) as f:
            data = f.read(cap + 1)  # zipfile stops at the declared size and checks the CRC at its end
    except zipfile.BadZipFile as e:
        raise SkipEntry(f"damaged entry ({e})") from None
    except (zlib.error, lzma.LZMAError, EOFError, OSError, ValueError) as e:
        raise SkipEntry(f"damaged entry: the compressed data is broken ({type(e).__name__}: {e})") from None
    except (RuntimeError, NotImplementedError) as e:  # encrypted, or a compression this Python lacks
        raise SkipEntry(f"unreadable entry ({e})") from None
    if len(data) > cap:
        raise SkipEntry(f"inflates to more than the {cap:,} bytes an entry may have")
    return data


def _read_labels(path: Path) -> dict[str, int] | None:
    """name → class from an EDM-layout `dataset.json`, or None when there is none (or it holds no labels)."""
    try:
        if path.is_dir():
            meta = path / "dataset.json"
            data = meta.read_bytes() if meta.is_file() else None
        else:
            with zipfile.ZipFile(path) as z:
                data = z.read("dataset.json") if "dataset.json" in z.namelist() else None
        labels = json.loads(data)["labels"] if data is not None else None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable dataset.json ({e})") from None
    if labels is None:
        return None
    try:
        return {str(name).replace("\\", "/"): int(label) for name, label in labels}
    except (TypeError, ValueError):
        raise UserError(f"{path}: dataset.json labels must be [name, class] pairs") from None


def _decode_all(path: Path, resolution: int | None, channels: int, limit: int | None, on_skip, offset: int,
                same_shape: bool) -> tuple[list[np.ndarray], list[str], list[tuple[str, str]]]:
    """(arrays HWC uint8, names, skipped) of a folder or EDM zip, sorted by name; unreadable entries are skipped and
    reported (and, with `same_shape`, those whose size differs from the first image's)."""
    arrays, names, skipped = [], [], []
    for k, (name, read) in enumerate(_entries(path)):
        if k < offset:
            continue
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arr = _decode(read(), resolution, channels)
        except Exception as e:  # untrusted bytes: any way a decoder fails on them skips the entry, reported
            skipped.append((name, str(e).splitlines()[0] if str(e) else type(e).__name__))
            if on_skip:
                on_skip(name, skipped[-1][1])
            continue
        if same_shape and arrays and arr.shape != arrays[0].shape:
            skipped.append((name, f"size {arr.shape[1]}x{arr.shape[0]} differs from the first image's"))
            if on_skip:
                on_skip(*skipped[-1])
            continue
        arrays.append(arr)
        names.append(name)
    if not arrays:
        raise UserError(f"no readable images in {path}")
    return arrays, names, skipped


def load_image_set(path: str | Path, resolution: int | None = None, channels: int = 3, limit: int | None = None,
                   on_skip=None, offset: int = 0) -> ImageSet:
    """Decode every image of a folder or EDM zip (sorted by name) at `resolution` (None: keep; all must then agree).
    `offset`: skip the first `offset` entries unread (e.g. a benchmark's images); `limit`: keep at most that many."""
    path = Path(path)
    arrays, names, skipped = _decode_all(path, resolution, channels, limit, on_skip, offset, same_shape=True)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"dataset images must be square (got {images.shape[-1]}x{images.shape[-2]}); pass a resolution")
    table = _read_labels(path)
    labels = None
    if table is not None and all(n.replace("\\", "/") in table for n in names):
        labels = torch.tensor([table[n.replace("\\", "/")] for n in names], dtype=torch.int64)
    return ImageSet(images=images, names=names, skipped=skipped, source=str(path), labels=labels)


# ------------------------------------------------------------------------------------------------ whole photos
# Photos of any size (the photo set's: long side 400–512 px) are kept at their own resolution, and a backbone
# trains on random square windows of them at random downscales: a 64-px training image then shows anything from 64 px
# of the photo (native scale) to its whole short side, as `aid inpaint` presents a hole at whatever scale it fits.


@dataclass
class PhotoSet:
    """Whole photos, each a uint8 [C, H, W] tensor at its own size."""
    photos: list[torch.Tensor]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.photos)

    def same_square(self) -> int | None:
        """The common side when every photo is a square of one size (an aligned set such as cats64), else None."""
        sizes = {tuple(p.shape[1:]) for p in self.photos}
        if len(sizes) != 1:
            return None
        h, w = sizes.pop()
        return h if h == w else None

    def as_image_set(self, resolution: int) -> ImageSet:
        """Every photo's centred square at `resolution` (what `load_image_set` gives for the same files)."""
        arrays = []
        for p in self.photos:
            im = Image.fromarray(p.permute(1, 2, 0).squeeze(-1).numpy())
            arr = np.asarray(center_square(im, resolution), dtype=np.uint8)
            arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return ImageSet(images=images, names=list(self.names), skipped=list(self.skipped), source=self.source)

    def crops(self, n: int, resolution: int, seed: int, min_side: int | None = None,
              max_side: int | None = None) -> ImageSet:
        """A fixed set of `n` random-scale crops (no flips), crop i drawn from its own generator (seed + i): the
        validation images of a photo backbone, the same for every run and batch size."""
        out = [random_crops(self, 1, resolution, torch.Generator().manual_seed(seed + i), min_side, max_side,
                            xflip=False) for i in range(n)]
        names = [f"crop-{i}" for i in range(n)]
        return ImageSet(images=torch.cat(out), names=names, source=f"{self.source} ({n} crops, seed {seed})")


def load_photo_set(path: str | Path, channels: int = 3, limit: int | None = None, on_skip=None,
                   offset: int = 0) -> PhotoSet:
    """Decode every image of a folder or zip (sorted by name) at its own size."""
    path = Path(path)
    arrays, names, skipped = _decode_all(path, None, channels, limit, on_skip, offset, same_shape=False)
    photos = [torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous() for a in arrays]
    return PhotoSet(photos=photos, names=names, skipped=skipped, source=str(path))


def whole_photos(path: str | Path, probe: int = 64) -> bool:
    """True when a folder or zip holds photos of several sizes or shapes (train on random-scale windows of them), False
    for an aligned set of one square size (cat faces: train on the images whole). Reads the headers of the first
    `probe` readable images only."""
    sizes = set()
    for _, read in _entries(Path(path)):
        try:
            with Image.open(io.BytesIO(read())) as im:
                sizes.add(im.size)  # (an EXIF rotation swaps the sides: it changes neither test below)
        except Exception:  # unreadable: the loaders report it
            continue
        if len(sizes) > 1 or len(sizes) == 1 and len(set(next(iter(sizes)))) > 1:
            return True
        probe -= 1
        if probe == 0:
            break
    return False


def crop_sides(h: int, w: int, resolution: int, min_side: int | None, max_side: int | None) -> tuple[int, int]:
    """The range of window sides (source pixels) that random crops of an h x w photo take: from `min_side` (default:
    the resolution, native scale) to `max_side` (default: the photo's short side), both within the photo."""
    short = min(h, w)
    hi = min(short, max_side) if max_side else short
    lo = min(max(min_side or resolution, 1), hi)
    return lo, hi


def crop_boxes(photos: PhotoSet, n: int, resolution: int, g: torch.Generator, min_side: int | None = None,
               max_side: int | None = None) -> list[tuple[int, int, int, int, bool]]:
    """`n` windows (photo index, top, left, side, x-flip): photo uniform, side L log-uniform in `crop_sides`, position
    uniform, flip with probability 1/2. Every draw comes from `g` in a fixed order, so a training step's crops depend
    on the step's generator alone."""
    idx = torch.randint(len(photos), (n,), generator=g)
    u = torch.rand(n, 3, generator=g)  # scale, top, left
    flip = torch.rand(n, generator=g) < 0.5
    boxes = []
    for i in range(n):
        k = int(idx[i])
        h, w = photos.photos[k].shape[1:]
        lo, hi = crop_sides(h, w, resolution, min_side, max_side)
        side = int(round(math.exp(math.log(lo) + float(u[i, 0]) * (math.log(hi) - math.log(lo)))))
        side = min(max(side, lo), hi)
        top = min(int(float(u[i, 1]) * (h - side + 1)), h - side)
        left = min(int(float(u[i, 2]) * (w - side + 1)), w - side)
        boxes.append((k, top, left, side, bool(flip[i])))
    return boxes


def random_crops(photos: PhotoSet, n: int, resolution: int, g: torch.Generator, min_side: int | None = None,
                 max_side: int | None = None, xflip: bool = True) -> torch.Tensor:
    """`n` uint8 [n, C, R, R] training images: the windows of `crop_boxes`, resized to R x R (bilinear, antialiased
    when shrinking), x-flipped where drawn (and `xflip`)."""
    import torch.nn.functional as F

    out = []
    for k, top, left, side, flip in crop_boxes(photos, n, resolution, g, min_side, max_side):
        x = photos.photos[k][:, top:top + side, left:left + side]
        if side != resolution:
            x = F.interpolate(x[None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                              antialias=side > resolution)[0].round().clamp(0, 255).to(torch.uint8)
        out.append(x.flip(-1) if xflip and flip else x)
    return torch.stack(out)


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
