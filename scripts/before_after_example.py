"""Remake examples/before_after.jpg: the README's Quick-start fill of examples/chelsea.png with the default method
(top: the round mask, default --fit crop; bottom: the box mask with --fit resize), original | hole | result
(README, "What the embedded default gives you").

    python scripts/before_after_example.py [WORKDIR]      # needs aid installed (the `aid` beside this Python)

Takes well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
AID = Path(sys.executable).parent / "aid"
EXAMPLES = REPO / "examples"
ROWS = (("chelsea_mask.png", []), ("chelsea_box_mask.png", ["--fit", "resize"]))


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    photo = Image.open(EXAMPLES / "chelsea.png").convert("RGB")
    tiles = []
    for k, (mask_name, extra) in enumerate(ROWS):
        out = work / f"filled-{k}.png"
        subprocess.run([str(AID), "inpaint", EXAMPLES / "chelsea.png", "--mask", EXAMPLES / mask_name, "-o", out,
                        *extra], check=True)
        hole = np.asarray(Image.open(EXAMPLES / mask_name).convert("L")) > 127  # white = fill
        shown = np.asarray(photo).copy()
        shown[hole] = (128, 128, 128)
        tiles += [photo, Image.fromarray(shown), Image.open(out).convert("RGB")]
    w, h = photo.size
    grid = Image.new("RGB", (3 * w, 2 * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % 3) * w, (i // 3) * h))
    grid.resize((1353, 600), Image.LANCZOS).save(EXAMPLES / "before_after.jpg", quality=88)
    print(f"wrote {EXAMPLES / 'before_after.jpg'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
