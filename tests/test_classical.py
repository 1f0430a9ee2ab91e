"""Classical inpainting (biharmonic, telea, ns) as methods of `aid inpaint`: at the photo's own scale, only hole
pixels change, the libraries' own results, and a missing optional extra is one line and exit 2."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli

CLASSICAL = ("biharmonic", "telea", "ns")


def photo(tmp_path, mode="RGB", size=(157, 103)):
    """A smooth photo-like image (gradients and a disc) with a stroke-shaped hole, saved as PNG."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / w * 255, yy / h * 255, 128 + 100 * ((xx - 60) ** 2 + (yy - 50) ** 2 < 900)], -1)
    pixels = np.rint(rgb).clip(0, 255).astype(np.uint8)
    if mode == "L":
        pixels = pixels[..., 0]
    Image.fromarray(pixels, mode).save(tmp_path / "photo.png")
    hole = np.zeros((h, w), dtype=bool)
    for t in range(120):  # a thin diagonal scratch, 3 px wide
        x, y = 20 + t, 10 + int(0.6 * t)
        hole[max(y - 1, 0):y + 2, x] = True
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return pixels, hole


@pytest.mark.parametrize("method", CLASSICAL)
def test_classical_fill_changes_only_hole_pixels(method, tmp_path, capsys):
    pytest.importorskip("cv2" if method != "biharmonic" else "skimage")
    pixels, hole = photo(tmp_path)
    code, out, err = run_cli(["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "-o",
                              tmp_path / "out.png", "--method", method], capsys)
    assert code == 0, err
    assert "0 NFE" in err and "native scale" in err
    result = np.asarray(Image.open(tmp_path / "out.png"))
    assert result.shape == pixels.shape
    assert np.array_equal(result[~hole], pixels[~hole])  # every visible pixel exact
    # a smooth image: the fill continues it, far better than the grey a blank hole would be
    err_fill = np.abs(result[hole].astype(float) - pixels[hole]).mean()
    err_grey = np.abs(128.0 - pixels[hole]).mean()
    assert err_fill < 0.25 * err_grey, (err_fill, err_grey)


def test_classical_results_are_the_libraries_own(tmp_path, capsys):
    """The fill is cv2.inpaint's / skimage's on the photo at its own scale: the crop box and its padding do not
    change the hole's pixels beyond what the box's edge can (the box holds the hole with a wide margin)."""
    cv2 = pytest.importorskip("cv2")
    pixels, hole = photo(tmp_path)
    run_cli(["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "-o", tmp_path / "t.png", "--method",
             "telea"], capsys)
    ours = np.asarray(Image.open(tmp_path / "t.png"))
    ref = cv2.inpaint(np.ascontiguousarray(pixels), hole.astype(np.uint8), 3.0, cv2.INPAINT_TELEA)
    assert np.abs(ours[hole].astype(int) - ref[hole]).max() <= 1


def test_classical_keeps_greyscale(tmp_path, capsys):
    pytest.importorskip("cv2")
    pixels, hole = photo(tmp_path, mode="L")
    code, _, err = run_cli(["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "-o",
                            tmp_path / "out.png", "--method", "ns"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "L"
        result = np.asarray(im)
    assert np.array_equal(result[~hole], pixels[~hole])


@pytest.mark.parametrize("method,module", [("telea", "cv2"), ("biharmonic", "skimage")])
def test_missing_extra_is_one_line_exit_2(method, module, tmp_path, capsys, monkeypatch):
    photo(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    code, out, err = run_cli(["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "-o",
                              tmp_path / "out.png", "--method", method], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "aid-inpaint[classical]" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()
