"""Repack an EDM-layout zip of JPEG images losslessly so it travels to the device machine (64 MiB per call, repo
included): `jpegtran -arithmetic -copy none` re-codes each JPEG's entropy coding only, so every image decodes to the
same pixels (checked here, image by image, with Pillow) and the cats64 training set shrinks by about a fifth.

    python scripts/pack_for_device.py ../shared/data/cats64/train.zip .carry/cats64-train.zip

Needs `jpegtran` (Debian: libjpeg-turbo-progs). Non-JPEG members (dataset.json) are copied as they are. The output is
written atomically; .carry/ is git-ignored (see docs/gpu-session.md).
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aid_cli.fileio import atomic_write  # noqa: E402


def repack(src: Path, dst: Path) -> tuple[int, int, int]:
    """(images re-coded, bytes in, bytes out)."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename.lower().endswith((".jpg", ".jpeg")):
                    packed = subprocess.run(["jpegtran", "-arithmetic", "-copy", "none"], input=data,
                                            capture_output=True, check=True).stdout
                    if not np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                                          np.asarray(Image.open(io.BytesIO(packed)))):
                        raise SystemExit(f"{info.filename}: re-coded JPEG decodes differently; not packed")
                    data, n = packed, n + 1
                zout.writestr(info.filename, data)

    atomic_write(dst, write)
    return n, src.stat().st_size, dst.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.parent.mkdir(parents=True, exist_ok=True)
    n, a, b = repack(src, dst)
    print(f"{dst}: {n} JPEGs re-coded losslessly, {a / 2**20:.1f} MiB -> {b / 2**20:.1f} MiB")
