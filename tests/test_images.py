"""The image edges of `aid inpaint`: files → model-resolution tensors → composited output, visible pixels bit-exact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.data import folders
from aid_cli.data import images as I
from aid_cli.errors import UserError
from aid_cli.task import Task

R = 64
rng = np.random.default_rng(0)


def random_pixels(h: int, w: int, mode: str) -> np.ndarray:
    """Random pixels of a Pillow mode, as numpy would hold them."""
    if mode == "I;16":
        return rng.integers(0, 65536, (h, w), dtype=np.uint16)
    channels = {"L": 0, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    return rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)


def write_mask(path: Path, hole: np.ndarray, **save) -> Path:
    Image.fromarray((hole * 255).astype(np.uint8)).save(path, **save)
    return path


def rect_hole(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    hole = np.zeros((h, w), dtype=bool)
    hole[top:bottom, left:right] = True
    return hole


def edge_path(tmp_path: Path, image_file: Path, mask_file: Path, fit_mode: str, out_name: str = "out.png"):
    """Run the whole edge path with a fake model (a random completion); return (loaded, hole, fit, output file)."""
    img = I.load_image(image_file)
    hole = I.load_mask(mask_file, img.size)
    fit = I.plan_fit(hole, R, fit_mode)
    y, M = I.to_task_tensors(img, hole, fit, R)
    task = Task(y=y, M=M)  # the shapes the sampler gets
    assert task.y.shape == (1, 3, R, R) and task.M.shape == (1, 1, R, R)
    assert y.min() >= -1 and y.max() <= 1 and set(M.unique().tolist()) <= {0.0, 1.0}
    completed = torch.rand(1, 3, R, R, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = I.composite(img, hole, fit, task.complete(completed))
    out_file = tmp_path / out_name
    assert I.save_image(out_file, out, img) == []
    return img, hole, fit, out_file


def assert_exact_outside_hole(original: np.ndarray, output: np.ndarray, hole: np.ndarray, alpha: bool = False):
    assert output.shape == original.shape and output.dtype == original.dtype
    assert np.array_equal(output[~hole], original[~hole]), "a visible pixel changed"
    colour = (lambda a: a[..., :-1]) if alpha else (lambda a: a)
    changed = np.any((colour(output) != colour(original)).reshape(*hole.shape, -1), axis=-1)
    assert changed[hole].mean() > 0.9, "the hole was not filled"
    if alpha:
        assert np.array_equal(output[..., -1], original[..., -1]), "alpha changed"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16"])
@pytest.mark.parametrize("fit_mode", ["crop", "resize"])
@pytest.mark.parametrize("where", ["inside", "border"])
def test_round_trip_is_exact_outside_the_hole(tmp_path, mode, fit_mode, where):
    h, w = 300, 451  # non-square, odd width
    pixels = random_pixels(h, w, mode)
    hole = rect_hole(h, w, 120, 200, 170, 260) if where == "inside" else rect_hole(h, w, 250, 400, 300, 451)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    img, loaded_hole, fit, out_file = edge_path(tmp_path, tmp_path / "in.png", write_mask(tmp_path / "m.png", hole),
                                                fit_mode)
    assert img.mode == mode and np.array_equal(loaded_hole, hole)
    written = I.load_image(out_file)
    assert written.mode == mode  # same bit depth and channel layout as the input
    assert_exact_outside_hole(pixels, written.pixels, hole, alpha=mode in ("RGBA", "LA"))


def test_crop_of_a_small_hole_is_at_native_scale(tmp_path):
    hole = rect_hole(300, 451, 120, 200, 140, 230)
    fit = I.plan_fit(hole, R, "crop")
    left, top, right, bottom = fit.box
    assert fit.side == R and fit.scale == 1 and fit.pad == (0, 0, 0, 0)
    assert left <= 200 and top <= 120 and right >= 230 and bottom >= 140  # the hole is inside the box
    assert fit.describe() == f"cropped a 64x64 box around the mask at ({left},{top}), kept at native scale (64x64)"


def test_crop_of_a_big_hole_adds_margin_and_downscales():
    hole = rect_hole(300, 451, 100, 100, 200, 180)  # 80 wide, 100 tall
    fit = I.plan_fit(hole, R, "crop", margin=0.25)
    assert fit.side == 100 + 2 * 25 and fit.scale < 1
    assert fit.box == (65, 75, 215, 225)  # centred on the hole
    assert "resized to 64x64" in fit.describe()


def test_crop_larger_than_the_image_is_reflection_padded():
    hole = rect_hole(40, 100, 0, 10, 40, 90)  # a hole as tall as the image
    fit = I.plan_fit(hole, R, "crop")
    assert fit.box[1::2] == (0, 40) and fit.pad[1] + fit.pad[3] == fit.side - 40 and fit.side == 100
    assert "by reflection" in fit.describe()


def test_resize_mode_pads_to_a_square():
    fit = I.plan_fit(np.zeros((300, 451), dtype=bool), R, "resize")
    assert fit.box == (0, 0, 451, 300) and fit.pad == (0, 75, 0, 76) and fit.side == 451
    assert fit.describe() == "took the whole 451x300 image, padded to 451x451 by reflection, resized to 64x64"


def test_exif_rotated_image_and_mask(tmp_path):
    stored = random_pixels(20, 30, "RGB")  # stored 30 wide, 20 tall; orientation 6 = show rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    shown = np.rot90(stored, k=-1)
    hole = rect_hole(30, 20, 5, 5, 15, 12)  # drawn on the image as shown
    mask_plain = write_mask(tmp_path / "shown.png", hole)
    mask_tagged = write_mask(tmp_path / "tagged.png", np.rot90(hole, k=1), exif=exif)  # stored raw, with the tag
    img = I.load_image(tmp_path / "rot.png")
    assert img.size == (20, 30) and np.array_equal(img.pixels, shown)
    assert np.array_equal(I.load_mask(mask_plain, img.size), hole)
    assert np.array_equal(I.load_mask(mask_tagged, img.size), hole)
    _, _, _, out_file = edge_path(tmp_path, tmp_path / "rot.png", mask_plain, "crop")
    out = np.asarray(Image.open(out_file))
    assert_exact_outside_hole(shown, out, hole)


def test_palette_and_cmyk_become_rgb(tmp_path):
    Image.fromarray(random_pixels(8, 8, "RGB")).quantize(16).save(tmp_path / "pal.png")
    Image.fromarray(random_pixels(8, 8, "RGB")).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name, source_mode in (("pal.png", "P"), ("cmyk.jpg", "CMYK")):
        loaded = I.load_image(tmp_path / name)
        assert loaded.source_mode == source_mode and loaded.mode == "RGB" and loaded.notes
        assert np.array_equal(loaded.pixels, np.asarray(Image.open(tmp_path / name).convert("RGB")))


def test_mask_white_is_fill_and_invert(tmp_path):
    grey = np.full((10, 10), 127, dtype=np.uint8)
    grey[:, 5:] = 128  # the threshold: ≥ 128 is white
    Image.fromarray(grey).save(tmp_path / "m.png")
    hole = I.load_mask(tmp_path / "m.png", (10, 10))
    assert not hole[:, :5].any() and hole[:, 5:].all()
    assert np.array_equal(I.load_mask(tmp_path / "m.png", (10, 10), invert=True), ~hole)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "m16.png")  # 16-bit masks on the same scale
    assert np.array_equal(I.load_mask(tmp_path / "m16.png", (10, 10)), hole)
    assert I.mask_stats(hole) == 0.5 and I.mask_stats(np.zeros((3, 3), bool)) == 0.0


def test_mask_size_mismatch_is_an_error_unless_resized(tmp_path):
    write_mask(tmp_path / "m.png", rect_hole(20, 30, 0, 15, 20, 30))  # 30x20, right half white
    with pytest.raises(UserError, match=r"mask .*m\.png is 30x20 but image is 60x40; pass --resize-mask"):
        I.load_mask(tmp_path / "m.png", (60, 40))
    hole = I.load_mask(tmp_path / "m.png", (60, 40), resize=True)
    assert hole.shape == (40, 60) and hole[:, 30:].all() and not hole[:, :30].any()


@pytest.mark.parametrize("loader", [I.load_image, lambda p: I.load_mask(p, (10, 10))])
def test_unreadable_files_are_one_line_user_errors(tmp_path, loader):
    Image.fromarray(random_pixels(200, 200, "RGB")).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    cases = {"half.png": "truncated", "notes.png": "not an image", "empty.png": "empty file",
             "missing.png": "not found", "folder.png": "is a folder"}
    for name, words in cases.items():
        with pytest.raises(UserError, match=words) as e:
            loader(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_output_over_an_input_is_refused(tmp_path):
    Image.fromarray(random_pixels(8, 8, "RGB")).save(tmp_path / "in.png")
    img = I.load_image(tmp_path / "in.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "in.png")
    for target in (tmp_path / "in.png", tmp_path / "link.png", tmp_path / "sub" / ".." / "in.png"):
        with pytest.raises(UserError, match="refusing to write over an input"):
            I.save_image(target, img.pixels, img)
    write_mask(tmp_path / "m.png", np.zeros((8, 8), bool))
    with pytest.raises(UserError, match="refusing to write over an input"):
        I.save_image(tmp_path / "m.png", img.pixels, img, protect=[tmp_path / "m.png"])
    assert np.array_equal(I.load_image(tmp_path / "in.png").pixels, img.pixels)  # untouched


def test_missing_or_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    Image.fromarray(random_pixels(8, 8, "RGB")).save(tmp_path / "in.png")
    img = I.load_image(tmp_path / "in.png")
    with pytest.raises(UserError, match="output folder does not exist"):
        I.save_image(tmp_path / "nowhere" / "out.png", img.pixels, img)
    monkeypatch.setattr(I.os, "access", lambda path, mode: False)  # fileio shares the os module
    with pytest.raises(UserError, match="output folder is not writable"):
        I.save_image(tmp_path / "out.png", img.pixels, img)
    assert not (tmp_path / "out.png").exists()


def test_read_only_folder_is_refused_for_real(tmp_path):
    Image.fromarray(random_pixels(8, 8, "RGB")).save(tmp_path / "in.png")
    img = I.load_image(tmp_path / "in.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not block writes (covered by the monkeypatched test)")
        with pytest.raises(UserError, match="not writable"):
            I.save_image(locked / "out.png", img.pixels, img)
    finally:
        locked.chmod(0o755)


def test_lossy_and_narrow_formats_warn(tmp_path):
    pixels = random_pixels(8, 8, "I;16")
    Image.fromarray(pixels).save(tmp_path / "in16.png")
    img = I.load_image(tmp_path / "in16.png")
    warnings = I.save_image(tmp_path / "out.jpg", img.pixels, img)
    assert any("16 bits" in w for w in warnings) and any("lossy" in w for w in warnings)
    assert Image.open(tmp_path / "out.jpg").mode == "L"
    assert I.save_image(tmp_path / "out.tif", img.pixels, img) == []
    assert np.array_equal(I.load_image(tmp_path / "out.tif").pixels, pixels)  # TIFF keeps 16 bits
    Image.fromarray(random_pixels(8, 8, "RGBA")).save(tmp_path / "in.png")
    rgba = I.load_image(tmp_path / "in.png")
    assert any("alpha" in w for w in I.save_image(tmp_path / "a.jpg", rgba.pixels, rgba))
    assert I.save_image(tmp_path / "a.webp", rgba.pixels, rgba) == []  # lossless WebP, exact
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.webp")), rgba.pixels)
    with pytest.raises(UserError, match="output format"):
        I.save_image(tmp_path / "a.gifx", rgba.pixels, rgba)


def test_mask_downscale_is_conservative(tmp_path):
    h, w = 300, 451
    hole = np.zeros((h, w), dtype=bool)
    hole[137, 222] = True  # one pixel, seen at about 1/7 scale
    Image.fromarray(random_pixels(h, w, "RGB")).save(tmp_path / "in.png")
    img = I.load_image(tmp_path / "in.png")
    fit = I.plan_fit(hole, R, "resize")
    _, M = I.to_task_tensors(img, hole, fit)
    assert int((M == 0).sum()) >= 1  # the single pixel still shows up as a hole
    out = I.composite(img, hole, fit, torch.full((1, 3, R, R), -1.0))  # the "model" paints black
    assert np.array_equal(out[~hole], img.pixels[~hole]) and (out[137, 222] == 0).all()
    # every original hole pixel lies in a model-resolution hole cell
    square = I._pad(rng.random((h, w)) < 0.01, fit)
    small = I.downscale_hole(square, R)
    ys, xs = np.nonzero(square)
    assert small[ys * R // fit.side, xs * R // fit.side].all()
    assert not I.downscale_hole(np.zeros((fit.side, fit.side), bool), R).any()


def test_pairing_by_stem(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("a.png", "b.jpg", "c.webp", ".hidden.png"):
        Image.new("RGB", (4, 4)).save(images / name)
    (images / "notes.txt").write_text("x")
    for name in ("a.png", "b_mask.png", "c-mask.png", "zzz.png"):
        Image.new("L", (4, 4)).save(masks / name)
    pairs = folders.pair_inputs(images, masks)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a.png"), ("b.jpg", "b_mask.png"),
                                                    ("c.webp", "c-mask.png")]
    assert folders.pair_inputs(images, masks / "zzz.png") == [(images / n, masks / "zzz.png") for n in ("a.png", "b.jpg",
                                                                                                 "c.webp")]
    assert folders.pair_inputs(images / "b.jpg", masks) == [(images / "b.jpg", masks / "b_mask.png")]
    assert folders.pair_inputs(images / "a.png", masks / "zzz.png") == [(images / "a.png", masks / "zzz.png")]
    (masks / "c-mask.png").unlink()
    with pytest.raises(UserError, match=r"no mask for 1 of 3 images in .*: c\.webp"):
        folders.pair_inputs(images, masks)
    with pytest.raises(UserError, match="mask path not found"):
        folders.pair_inputs(images, tmp_path / "nope")


def test_pairing_with_masks_beside_their_images(tmp_path):
    for name in ("a.png", "a_mask.png", "b.png", "b-mask.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    pairs = folders.pair_inputs(tmp_path, tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a_mask.png"), ("b.png", "b-mask.png")]
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")  # now a.png and a.jpg share a stem: fine, both use a_mask
    assert len(folders.pair_inputs(tmp_path, tmp_path)) == 3


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from aid_cli.fileio import atomic_write_text

    path = atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
