"""Which files are images and masks, without decoding any (nothing here imports torch or Pillow, so `aid inpaint`
checks its paths before the slow imports): the suffixes read and written, and images paired with their masks by stem."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}  # what folders and datasets read

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
                  ".bmp": "BMP"}
MASK_SUFFIXES = ("_mask", "-mask")  # `photo_mask.png` / `photo-mask.png` is the mask of `photo.*`


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (no hidden files), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _mask_base(stem: str) -> str | None:
    """`photo` for `photo_mask` / `photo-mask`, else None."""
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def _mask_index(folder: Path, suffixed_only: bool) -> dict[str, list[Path]]:
    """Image stem → candidate mask files in `folder` (`<stem>.*`, `<stem>_mask.*`, `<stem>-mask.*`)."""
    index: dict[str, list[Path]] = {}
    for p in _list_images(folder):
        base = _mask_base(p.stem)
        if base is None and suffixed_only:
            continue
        index.setdefault(base if base is not None else p.stem, []).append(p)
    return index


def _find_mask(image: Path, index: dict[str, list[Path]]) -> Path | None:
    candidates = index.get(image.stem, [])
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise UserError(f"several masks match {image.name}: {names}; keep one")
    return candidates[0] if candidates else None


def pair_inputs(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: file + file, folder + folder (matched by stem), folder + one mask for all, file + folder.

    Masks are matched as `<stem>.<ext>`, `<stem>_mask.<ext>` or `<stem>-mask.<ext>`. When masks and images share one
    folder, only the `_mask`/`-mask` files are masks, and an image file given that is one of them gives no pair (so
    `aid inpaint photos/*.png --mask photos/` skips the masks the glob names). Hidden files and non-image suffixes
    are skipped.
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    for p, what in ((image_path, "image"), (mask_path, "mask")):
        if not p.exists():
            raise UserError(f"{what} path not found: {p}")
        if not p.is_file() and not p.is_dir():  # /dev/null, a FIFO, <(cat x.png), a link to /dev/zero
            raise UserError(f"{what} is not a regular file or a folder (a device, pipe or socket): {p}")
    if image_path.is_file() and mask_path.is_file():
        return [(image_path, mask_path)]
    image_folder = image_path if image_path.is_dir() else image_path.parent
    same_folder = mask_path.is_dir() and mask_path.resolve() == image_folder.resolve()
    index = _mask_index(mask_path, suffixed_only=same_folder) if mask_path.is_dir() else {}
    if image_path.is_file() and same_folder and _mask_base(image_path.stem) is not None:
        return []  # a mask file among the images (a glob's): not an image
    if image_path.is_file():
        mask = _find_mask(image_path, index)
        if mask is None:
            raise UserError(f"no mask for {image_path.name} in {mask_path} (looked for {image_path.stem}.*, "
                            f"{image_path.stem}_mask.*, {image_path.stem}-mask.*)")
        return [(image_path, mask)]
    images = _list_images(image_path)
    if same_folder:
        images = [p for p in images if _mask_base(p.stem) is None]
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {image_path}")
    if mask_path.is_file():
        return [(p, mask_path) for p in images]
    pairs, missing = [], []
    for p in images:
        mask = _find_mask(p, index)
        (pairs.append((p, mask)) if mask is not None else missing.append(p.name))
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(f"no mask for {len(missing)} of {len(images)} images in {mask_path}: {shown}; masks are "
                        f"matched by name as <stem>.png, <stem>_mask.png or <stem>-mask.png")
    return pairs
