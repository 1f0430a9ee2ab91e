"""Masks as people draw them, and seams: strokes painted on a transparent layer are the hole (not a 100 % fill), and
the opt-in --dilate N / --feather N change exactly the pixels they say (the hole grown by N; a ramp N pixels wide)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from aid_cli.data.images import feather_weights, grow, load_mask

from .conftest import run_cli

H, W = 40, 50


def strokes() -> np.ndarray:
    hole = np.zeros((H, W), bool)
    hole[10:14, 5:45] = True  # a stroke across
    hole[5:35, 30:33] = True  # and one down
    return hole


def layer(hole: np.ndarray, rgb=(255, 0, 0), background=(255, 255, 255)) -> Image.Image:
    """Opaque strokes of colour `rgb` over a transparent layer whose hidden colour is `background` (as editors save)."""
    a = np.zeros((H, W, 4), np.uint8)
    a[..., :3] = background
    a[hole] = (*rgb, 255)
    return Image.fromarray(a, "RGBA")


@pytest.mark.parametrize("rgb, background", [((255, 0, 0), (255, 255, 255)), ((0, 0, 0), (255, 255, 255)),
                                             ((255, 255, 255), (0, 0, 0))])
def test_strokes_on_a_transparent_layer_are_the_hole(tmp_path, rgb, background):
    path = tmp_path / "m.png"
    layer(strokes(), rgb, background).save(path)
    notes = []
    hole = load_mask(path, (W, H), notes=notes)
    assert np.array_equal(hole, strokes())
    assert len(notes) == 1 and "transparent layer" in notes[0]
    assert np.array_equal(load_mask(path, (W, H), invert=True), ~strokes())


def test_la_and_palette_layers_too(tmp_path):
    la = np.zeros((H, W, 2), np.uint8)
    la[strokes()] = (200, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(load_mask(tmp_path / "la.png", (W, H)), strokes())
    p = layer(strokes()).convert("P")  # a palette with a transparent entry
    p.save(tmp_path / "p.png")
    assert np.array_equal(load_mask(tmp_path / "p.png", (W, H)), strokes())


def test_an_opaque_rgba_mask_is_read_by_brightness(tmp_path):
    a = np.zeros((H, W, 4), np.uint8)
    a[..., 3] = 255
    a[strokes(), :3] = 255  # white strokes on opaque black
    Image.fromarray(a, "RGBA").save(tmp_path / "m.png")
    notes = []
    assert np.array_equal(load_mask(tmp_path / "m.png", (W, H), notes=notes), strokes())
    assert notes == []


def test_grow_is_a_chessboard_dilation():
    hole = np.zeros((9, 9), bool)
    hole[4, 4] = True
    assert np.array_equal(grow(hole, 2), np.pad(np.ones((5, 5), bool), 2))
    corner = np.zeros((5, 5), bool)
    corner[0, 0] = True
    assert grow(corner, 1).sum() == 4  # clipped at the border
    assert np.array_equal(grow(hole, 0), hole)


def test_feather_weights_ramp():
    hole = np.zeros((1, 9), bool)
    hole[0, 4] = True
    assert feather_weights(hole, 3)[0].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25, 0])


# ------------------------------------------------------------------------------------------------- through the CLI

@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def fill(photo, mask, tiny_checkpoint, capsys, *extra):
    out = photo.with_name("out.png")  # one file, replaced by each fill of a test
    code, _, err = run_cli(["inpaint", photo, "--mask", mask, "-o", out, "--overwrite", "--model", tiny_checkpoint,
                            "--method", "replace", "--steps", 3, "--device", "cpu", *extra], capsys)
    assert code == 0, err
    return np.asarray(Image.open(out)).astype(int), err


def test_cli_reads_a_layer_mask_as_drawn(photo, tmp_path, tiny_checkpoint, capsys):
    path, pixels = photo
    layer(strokes()).save(tmp_path / "layer.png")
    out, err = fill(path, tmp_path / "layer.png", tiny_checkpoint, capsys)
    assert "transparent layer" in err and "--invert-mask" not in err
    assert np.array_equal(out[~strokes()], pixels[~strokes()])
    assert (out[strokes()] != pixels[strokes()]).any(axis=1).mean() > 0.5


def test_cli_dilate_fills_the_grown_hole_only(photo, tmp_path, tiny_checkpoint, capsys):
    path, pixels = photo
    Image.fromarray(strokes().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out, _ = fill(path, tmp_path / "mask.png", tiny_checkpoint, capsys, "--dilate", 2)
    grown = grow(strokes(), 2)
    assert np.array_equal(out[~grown], pixels[~grown])
    ring = grown & ~strokes()
    assert (out[ring] != pixels[ring]).any(axis=1).mean() > 0.5


def test_cli_feather_blends_a_ring_and_keeps_the_rest(photo, tmp_path, tiny_checkpoint, capsys):
    path, pixels = photo
    Image.fromarray(strokes().astype(np.uint8) * 255).save(tmp_path / "mask.png")
    sharp, _ = fill(path, tmp_path / "mask.png", tiny_checkpoint, capsys)
    soft, _ = fill(path, tmp_path / "mask.png", tiny_checkpoint, capsys, "--feather", 3)
    ring = grow(strokes(), 3)
    assert np.array_equal(soft[~ring], pixels[~ring])  # beyond N pixels: untouched
    assert np.array_equal(soft[strokes()], sharp[strokes()])  # the hole is the fill itself
    near = ring & ~strokes()
    assert (soft[near] != pixels[near]).any(axis=1).mean() > 0.5  # the ring changed, towards the fill
    w = feather_weights(strokes(), 3)[..., None]
    # each ring pixel lies between the original and the fill's rendering there: |soft − original| ≤ w·255 + 1
    assert (np.abs(soft - pixels)[near] <= (w * 255 + 1)[near]).all()


# ------------------------------------------------------------------------------------------------- --fit native

def test_plan_windows_cover_the_hole_once_at_native_scale():
    from aid_cli.data.images import plan_windows

    hole = np.zeros((100, 300), bool)
    hole[40:44, 10:290] = True  # a long thin stroke
    hole[90:100, 0:5] = True  # and a blot in a corner
    windows = plan_windows(hole, 32)
    covered = np.zeros_like(hole)
    for fit, fills in windows:
        assert fit.side == fit.resolution == 32 and fit.scale == 1.0  # native scale: never resized
        left, top, right, bottom = fit.box
        assert not (covered & fills).any()  # every hole pixel is filled by exactly one window
        assert fills[top:bottom, left:right].sum() == fills.sum()  # inside its window
        assert (fills <= hole).all()
        covered |= fills
    assert np.array_equal(covered, hole)
    assert len(windows) <= 300 // 16 + 2  # a stroke is followed window by window (inner squares of 16)


def test_cli_fit_native_fills_a_long_stroke_window_by_window(tmp_path, tiny_checkpoint, capsys):
    """A stroke across a photo far larger than the model: windows at native scale, visible pixels exact, and the
    same seed gives the same file; samples share nothing."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    hole = np.zeros((60, 120), bool)
    hole[28:31, 3:117] = True
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    args = ["inpaint", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "--model", tiny_checkpoint, "--method",
            "replace", "--steps", 3, "--device", "cpu", "--fit", "native", "--json"]
    code, out, err = run_cli(args + ["-o", tmp_path / "a.png"], capsys)
    assert code == 0, err
    import json as _json

    rec = _json.loads(out)
    windows = int(rec["fit"].split()[0])
    assert rec["fit"].endswith("window(s) of 16x16 at native scale") and windows > 1
    assert rec["nfe"] == windows * 5
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(a[~hole], pixels[~hole])
    assert (a[hole] != pixels[hole]).any(axis=1).mean() > 0.5
    assert run_cli(args + ["-o", tmp_path / "b.png"], capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    code, _, err = run_cli(args + ["-o", tmp_path / "c.png", "--feather", "2"], capsys)
    assert code == 2 and "--feather does not combine with --fit native" in err


def test_a_damaged_transparency_chunk_falls_back_to_brightness(tmp_path):
    """A palette mask whose tRNS chunk has more entries than its palette (Pillow cannot convert it to RGBA) is read by
    brightness, not a traceback."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([1 if x < 4 else 0 for x in range(8)]) for _ in range(8))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 3, 0, 0, 0))
           + chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") + chunk(b"tRNS", b"\xff" * 300)
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "m.png").write_bytes(png)
    hole = load_mask(tmp_path / "m.png", (8, 8))
    assert hole[:, :4].all() and not hole[:, 4:].any()  # palette entry 1 is white
