"""Remake examples/scribble_before_after.jpg: a 6-pixel scribble across scikit-image's coffee() photo, filled with
--fit crop and --fit native, against skimage's biharmonic inpainting (README, "What the embedded default gives you").

    python scripts/scribble_example.py [WORKDIR]      # needs aid installed (the `aid` beside this Python) and scikit-image

Takes a few minutes on a 2-core CPU (each --fit native run: 23 windows × 35 NFE).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from skimage import data
from skimage.restoration import inpaint_biharmonic

REPO = Path(__file__).resolve().parents[1]
AID = Path(sys.executable).parent / "aid"
STROKE = [(40, 60), (150, 120), (260, 90), (380, 200), (470, 170), (570, 330)]


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    photo = data.coffee()
    Image.fromarray(photo).save(work / "coffee.png")
    mask = Image.new("L", (photo.shape[1], photo.shape[0]), 0)
    ImageDraw.Draw(mask).line(STROKE, fill=255, width=6, joint="curve")
    mask.save(work / "scribble.png")
    hole = np.asarray(mask) > 127
    shown = photo.copy()
    shown[hole] = (255, 0, 0)
    Image.fromarray(shown).save(work / "scribbled.png")
    biharmonic = inpaint_biharmonic(photo, hole, channel_axis=-1)
    Image.fromarray((biharmonic * 255).round().clip(0, 255).astype(np.uint8)).save(work / "biharmonic.png")
    runs = {"crop_replace": ["--method", "replace"], "native_replace": ["--method", "replace", "--fit", "native"],
            "crop_aid": [], "native_aid": ["--fit", "native"]}
    for name, extra in runs.items():
        subprocess.run([str(AID), "inpaint", work / "coffee.png", "--mask", work / "scribble.png", "-o",
                        work / f"{name}.png", *extra], check=True)
    tiles = [Image.open(work / f"{n}.png").convert("RGB") for n in
             ("scribbled", "crop_replace", "native_replace", "biharmonic", "crop_aid", "native_aid")]
    w, h = tiles[0].size
    grid = Image.new("RGB", (3 * w, 2 * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % 3) * w, (i // 3) * h))
    grid.resize((1350, 600), Image.LANCZOS).save(REPO / "examples" / "scribble_before_after.jpg", quality=88)
    print(f"wrote {REPO / 'examples' / 'scribble_before_after.jpg'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="aid-scribble-")))
