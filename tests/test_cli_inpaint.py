"""`aid inpaint` end to end, as a user runs it: good inputs give exact, reproducible files; every bad input gives one
line on stderr, exit code 2, no traceback and no output file (nor a half-written one, nor a stray temp file).

The CLI runs in-process (`aid_cli.cli.main(argv)`) because importing torch in a fresh interpreter per test is slow; one
test runs the real entry point in a subprocess to prove a user error prints no traceback there either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aid_cli import cli

from .conftest import REPO, run_cli

STEPS = 3
W, H = 451, 300  # odd, non-square: exercises the crop box, reflection padding and resizing
HOLE_BOX = (120, 80, 190, 150)  # left, top, right, bottom


# ------------------------------------------------------------------------------------------------------------ helpers


def assert_user_error(code: int, out: str, err: str, *phrases: str) -> str:
    """Exit 2, exactly one `error:` line on stderr naming the problem, no traceback, nothing on stdout."""
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Exception" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in {line!r}"
    assert out == ""
    return line


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden temp files included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def random_pixels(h: int, w: int, mode: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = {"L": 0, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    return rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)


def rect_hole(h: int, w: int, box=HOLE_BOX) -> np.ndarray:
    left, top, right, bottom = box
    hole = np.zeros((h, w), dtype=bool)
    hole[top:bottom, left:right] = True
    return hole


def write_image(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, hole: np.ndarray) -> Path:
    Image.fromarray((hole * 255).astype(np.uint8)).save(path)
    return path


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@dataclass
class Scene:
    """An input image + mask in `inputs/`, an empty `out/` folder for results, and a tiny checkpoint."""

    image: Path
    mask: Path
    pixels: np.ndarray
    hole: np.ndarray
    out_dir: Path
    model: Path

    @property
    def out(self) -> Path:
        return self.out_dir / "out.png"

    def args(self, *extra, image=None, mask=None, out=None, model=None, seed=0) -> list:
        return ["inpaint", image or self.image, "--mask", mask or self.mask, "-o", out or self.out,
                "--model", model or self.model, "--method", "replace", "--steps", STEPS, "--seed", seed,
                "--device", "cpu", *extra]


def make_scene(tmp_path: Path, model: Path, mode: str = "RGB", size=(W, H), box=HOLE_BOX) -> Scene:
    inputs, out_dir = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir(exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    w, h = size
    pixels, hole = random_pixels(h, w, mode), rect_hole(h, w, box)
    return Scene(image=write_image(inputs / "photo.png", pixels), mask=write_mask(inputs / "photo_mask.png", hole),
                 pixels=pixels, hole=hole, out_dir=out_dir, model=model)


@pytest.fixture
def scene(tmp_path, tiny_checkpoint) -> Scene:
    return make_scene(tmp_path, tiny_checkpoint)


def assert_visible_exact_and_hole_filled(out: np.ndarray, pixels: np.ndarray, hole: np.ndarray) -> None:
    assert hole.any() and not hole.all()
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert np.array_equal(out[~hole], pixels[~hole]), "a visible pixel changed"
    changed = (out[hole] != pixels[hole]).reshape(int(hole.sum()), -1).any(axis=1)
    assert changed.mean() > 0.5, f"only {changed.mean():.0%} of the hole pixels changed"


# ------------------------------------------------------------------------------------------------- working commands

def test_replace_keeps_visible_pixels_and_fills_the_hole(scene, capsys):
    code, out, err = run_cli(scene.args(), capsys)
    assert code == 0, err
    assert out == ""  # without --json, stdout stays clean
    assert "Traceback" not in err and "wrote" in err
    assert sorted(listing(scene.out_dir)) == ["out.png"]  # no temp files left beside it
    with Image.open(scene.out) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (W, H))
    assert_visible_exact_and_hole_filled(read(scene.out), scene.pixels, scene.hole)


def test_same_seed_is_byte_identical_and_another_seed_differs(scene, capsys):
    a, b, c = (scene.out_dir / n for n in ("a.png", "b.png", "c.png"))
    assert run_cli(scene.args(out=a, seed=0), capsys)[0] == 0
    assert run_cli(scene.args(out=b, seed=0), capsys)[0] == 0
    assert run_cli(scene.args(out=c, seed=1), capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    pa, pc = read(a), read(c)
    assert np.array_equal(pa[~scene.hole], pc[~scene.hole])
    assert not np.array_equal(pa[scene.hole], pc[scene.hole])


def test_json_prints_one_record_per_output(scene, capsys):
    code, out, err = run_cli(scene.args("--json"), capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert {"path", "seed", "method", "nfe", "seconds"} <= rec.keys()
    assert rec["path"] == str(scene.out) and Path(rec["path"]).is_file()
    assert (rec["seed"], rec["method"], rec["nfe"]) == (0, "replace", 2 * STEPS - 1)
    assert isinstance(rec["seconds"], (int, float)) and rec["seconds"] >= 0


def test_samples_write_suffixed_files_with_consecutive_seeds(scene, capsys):
    code, out, err = run_cli(scene.args("--samples", 2, "--json", seed=5), capsys)
    assert code == 0, err
    files = [scene.out_dir / "out-0.png", scene.out_dir / "out-1.png"]
    assert sorted(listing(scene.out_dir)) == ["out-0.png", "out-1.png"]
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["path"] for r in recs] == [str(f) for f in files]
    assert [r["seed"] for r in recs] == [5, 6]
    first, second = read(files[0]), read(files[1])
    for img in (first, second):
        assert_visible_exact_and_hole_filled(img, scene.pixels, scene.hole)
    assert not np.array_equal(first, second)
    # sample k uses seed + k: sample 1 is (up to batch-size rounding) the single-sample run with seed 6
    single = scene.out_dir / "single.png"
    assert run_cli(scene.args(out=single, seed=6), capsys)[0] == 0
    diff = np.abs(read(single).astype(int) - second.astype(int))
    assert diff.max() <= 2, f"sample 1 of seed 5 differs from seed 6 alone by up to {diff.max()}"


def test_json_stays_on_stdout_while_a_progress_bar_runs_in_a_terminal(scene, capsys, monkeypatch):
    """With several outputs a progress bar shows on a terminal stderr; it must not swallow the stdout records."""
    monkeypatch.setattr(cli.inpaint, "err", Console(stderr=True, highlight=False, soft_wrap=True, force_terminal=True))
    code, out, err = run_cli(scene.args("--samples", 2, "--json"), capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["seed"] for r in recs] == [0, 1]
    assert '"nfe"' not in err


def test_folder_mode_pairs_by_stem(tmp_path, tiny_checkpoint, capsys):
    images, masks, out_dir = tmp_path / "images", tmp_path / "masks", tmp_path / "filled"
    images.mkdir()
    masks.mkdir()
    cases = {"cat": (W, H), "dog": (200, 260)}
    for i, (stem, (w, h)) in enumerate(cases.items()):
        write_image(images / f"{stem}.png", random_pixels(h, w, "RGB", seed=i))
    write_mask(masks / "cat.png", rect_hole(H, W))
    write_mask(masks / "dog_mask.png", rect_hole(260, 200, (20, 30, 90, 100)))
    args = ["inpaint", images, "--mask", masks, "-o", out_dir, "--model", tiny_checkpoint, "--method", "replace",
            "--steps", STEPS, "--device", "cpu", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert sorted(listing(out_dir)) == ["cat.png", "dog.png"]
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert sorted(Path(r["path"]).name for r in recs) == ["cat.png", "dog.png"]
    assert_visible_exact_and_hole_filled(read(out_dir / "cat.png"), read(images / "cat.png"), rect_hole(H, W))
    assert_visible_exact_and_hole_filled(read(out_dir / "dog.png"), read(images / "dog.png"),
                                         rect_hole(260, 200, (20, 30, 90, 100)))


def test_folder_mode_errors_before_any_output(tmp_path, tiny_checkpoint, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for stem in ("cat", "dog"):
        write_image(images / f"{stem}.png", random_pixels(40, 50, "RGB"))
    write_mask(masks / "cat.png", rect_hole(40, 50, (10, 10, 20, 20)))
    base = ["--model", tiny_checkpoint, "--steps", STEPS, "--device", "cpu"]
    out_dir = tmp_path / "filled"
    code, out, err = run_cli(["inpaint", images, "--mask", masks, "-o", out_dir, *base], capsys)
    assert_user_error(code, out, err, "no mask for 1 of 2 images", "dog.png")
    assert not out_dir.exists()
    write_mask(masks / "dog-mask.png", rect_hole(40, 50, (10, 10, 20, 20)))
    code, out, err = run_cli(["inpaint", images, "--mask", masks, "-o", tmp_path / "no" / "filled", *base], capsys)
    assert_user_error(code, out, err, "parent does not exist")
    assert not (tmp_path / "no").exists()
    a_file = write_image(tmp_path / "file.png", random_pixels(4, 4, "RGB"))
    code, out, err = run_cli(["inpaint", images, "--mask", masks, "-o", a_file, *base], capsys)
    assert_user_error(code, out, err, "-o must be a folder")
    code, out, err = run_cli(["inpaint", images, "--mask", masks, "-o", out_dir, "--model", tmp_path / "nope.safetensors",
                              "--steps", STEPS, "--device", "cpu"], capsys)
    assert_user_error(code, out, err, "checkpoint not found")
    assert not out_dir.exists()  # a bad checkpoint leaves no empty output folder behind


def test_invert_mask_swaps_the_meaning(scene, capsys):
    keep_mask = write_mask(scene.image.parent / "keep.png", ~scene.hole)  # white = keep
    inverted, plain = scene.out_dir / "inverted.png", scene.out_dir / "plain.png"
    assert run_cli(scene.args("--invert-mask", mask=keep_mask, out=inverted), capsys)[0] == 0
    assert run_cli(scene.args(out=plain), capsys)[0] == 0
    assert inverted.read_bytes() == plain.read_bytes()
    assert_visible_exact_and_hole_filled(read(inverted), scene.pixels, scene.hole)
    # and the same white = keep mask without the flag fills the other region
    other = scene.out_dir / "other.png"
    code, _, err = run_cli(scene.args(mask=keep_mask, out=other), capsys)
    assert code == 0 and "--invert-mask" in err  # 96 % white: the inverted-mask warning
    assert np.array_equal(read(other)[scene.hole], scene.pixels[scene.hole])


def test_fit_resize_on_a_non_square_image(scene, capsys):
    code, out, err = run_cli(scene.args("--fit", "resize", "--json"), capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["fit"].startswith(f"took the whole {W}x{H} image")
    assert_visible_exact_and_hole_filled(read(scene.out), scene.pixels, scene.hole)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_greyscale_keep_their_mode(tmp_path, tiny_checkpoint, mode, capsys):
    scene = make_scene(tmp_path, tiny_checkpoint, mode=mode, size=(97, 64), box=(30, 10, 70, 40))
    code, _, err = run_cli(scene.args(), capsys)
    assert code == 0, err
    with Image.open(scene.out) as im:
        assert im.mode == mode
    result = read(scene.out)
    if mode == "RGBA":
        assert np.array_equal(result[..., 3], scene.pixels[..., 3]), "alpha must pass through untouched"
        assert_visible_exact_and_hole_filled(result[..., :3], scene.pixels[..., :3], scene.hole)
    else:
        assert_visible_exact_and_hole_filled(result, scene.pixels, scene.hole)


def test_resize_mask_accepts_a_mask_of_another_size(scene, capsys):
    small = write_mask(scene.image.parent / "small.png", rect_hole(H // 2, (W + 1) // 2, (60, 40, 95, 75)))
    code, _, err = run_cli(scene.args(mask=small), capsys)
    assert_user_error(code, "", err, "226x150", f"{W}x{H}", "--resize-mask")
    assert listing(scene.out_dir) == {}
    code, _, err = run_cli(scene.args("--resize-mask", mask=small), capsys)
    assert code == 0, err
    assert read(scene.out).shape == scene.pixels.shape


def test_empty_mask_copies_the_image_through(scene, capsys):
    empty = write_mask(scene.image.parent / "empty.png", np.zeros((H, W), dtype=bool))
    code, out, err = run_cli(scene.args("--json", mask=empty), capsys)
    assert code == 0, err
    assert "empty" in err and "copied through" in err
    assert np.array_equal(read(scene.out), scene.pixels)
    rec = json.loads(out)
    assert rec["nfe"] == 0 and rec["fit"] == "copied"


def test_nearly_full_mask_warns_it_may_be_inverted(scene, capsys):
    nearly_full = np.ones((H, W), dtype=bool)
    nearly_full[:10, :10] = False
    full = write_mask(scene.image.parent / "full.png", nearly_full)
    code, _, err = run_cli(scene.args(mask=full), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "--invert-mask" in line]
    assert len(warnings) == 1 and "full.png" in warnings[0] and "%" in warnings[0], err
    assert np.array_equal(read(scene.out)[:10, :10], scene.pixels[:10, :10])


# ------------------------------------------------------------------------------------- bad inputs: one line, exit 2

def test_missing_image_file(scene, capsys):
    missing = scene.image.parent / "nope.png"
    code, out, err = run_cli(scene.args(image=missing), capsys)
    assert_user_error(code, out, err, "not found", str(missing))
    assert listing(scene.out_dir) == {}


def test_missing_mask_file(scene, capsys):
    missing = scene.image.parent / "nope_mask.png"
    code, out, err = run_cli(scene.args(mask=missing), capsys)
    assert_user_error(code, out, err, "mask", "not found", str(missing))
    assert listing(scene.out_dir) == {}


@pytest.mark.parametrize("what", ["image", "mask"])
def test_file_that_is_not_an_image(scene, capsys, what):
    bogus = scene.image.parent / f"bogus-{what}.png"
    bogus.write_text("this is not a PNG\n")
    code, out, err = run_cli(scene.args(**{what: bogus}), capsys)
    assert_user_error(code, out, err, what, "not an image", str(bogus))
    assert listing(scene.out_dir) == {}


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image(scene, capsys, fmt):
    full = scene.image.parent / f"full.{fmt}"
    Image.fromarray(scene.pixels).save(full)
    cut = scene.image.parent / f"cut.{fmt}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    code, out, err = run_cli(scene.args(image=cut), capsys)
    assert_user_error(code, out, err, "truncated", str(cut))
    assert listing(scene.out_dir) == {}


def test_output_in_a_missing_folder(scene, capsys):
    target = scene.out_dir / "no" / "such" / "out.png"
    code, out, err = run_cli(scene.args(out=target), capsys)
    assert_user_error(code, out, err, "does not exist", str(target.parent))
    assert listing(scene.out_dir) == {}


def test_output_in_a_read_only_folder(scene, capsys, monkeypatch):
    # root ignores permission bits, so the check's os.access is told this one folder is read-only
    real_access = os.access
    read_only = scene.out_dir.resolve()

    def access(path, mode, *a, **k):
        if Path(path).resolve() == read_only and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    code, out, err = run_cli(scene.args(), capsys)
    assert_user_error(code, out, err, "not writable", str(read_only))
    assert listing(scene.out_dir) == {}


def test_output_in_a_really_read_only_folder(scene, capsys):
    os.chmod(scene.out_dir, 0o555)
    try:
        if os.access(scene.out_dir, os.W_OK):
            pytest.skip("running as root: permission bits do not block writes (see the monkeypatched test)")
        code, out, err = run_cli(scene.args(), capsys)
        assert_user_error(code, out, err, "not writable")
        assert listing(scene.out_dir) == {}
    finally:
        os.chmod(scene.out_dir, 0o755)


def test_output_over_the_input_is_refused(scene, capsys):
    before = scene.image.read_bytes()
    code, out, err = run_cli(scene.args(out=scene.image), capsys)
    assert_user_error(code, out, err, "refusing to write over an input", str(scene.image))
    assert scene.image.read_bytes() == before
    assert sorted(listing(scene.image.parent)) == ["photo.png", "photo_mask.png"]


def test_output_over_the_mask_is_refused(scene, capsys):
    before = scene.mask.read_bytes()
    code, out, err = run_cli(scene.args(out=scene.mask), capsys)
    assert_user_error(code, out, err, "refusing to write over an input")
    assert scene.mask.read_bytes() == before


def test_output_with_an_unknown_suffix(scene, capsys):
    code, out, err = run_cli(scene.args(out=scene.out_dir / "result.xyz"), capsys)
    assert_user_error(code, out, err, "cannot tell the output format", "result.xyz")
    assert listing(scene.out_dir) == {}


def test_missing_checkpoint(scene, capsys):
    missing = scene.model.parent / "absent.safetensors"
    code, out, err = run_cli(scene.args(model=missing), capsys)
    assert_user_error(code, out, err, "checkpoint not found", str(missing))
    assert listing(scene.out_dir) == {}


def _random_bytes(src: Path) -> bytes:
    return np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _truncated(src: Path) -> bytes:
    data = src.read_bytes()
    return data[: len(data) // 2]


def _header_only(src: Path) -> bytes:
    data = src.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


@pytest.mark.parametrize("corrupt", [_random_bytes, _truncated, _header_only])
def test_corrupt_checkpoint(scene, capsys, corrupt):
    bad = scene.model.parent / "bad.safetensors"
    bad.write_bytes(corrupt(scene.model))
    code, out, err = run_cli(scene.args(model=bad), capsys)
    assert_user_error(code, out, err, str(bad))
    assert "not a readable safetensors checkpoint" in err or "corrupt checkpoint" in err
    assert listing(scene.out_dir) == {}


def _rewrite(src: Path, dst: Path, tensors=None, metadata=None) -> Path:
    """A copy of the safetensors checkpoint `src` with some tensors and/or metadata entries replaced."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(src))
    sd.update(tensors or {})
    meta.update(metadata or {})
    save_file(sd, str(dst), metadata=meta)
    return dst


def _wrong_shape(src: Path, dst: Path) -> Path:
    sd = load_file(str(src))
    name = next(k for k, v in sd.items() if v.ndim == 4)  # a conv weight
    shape = list(sd[name].shape)
    shape[0] += 1
    return _rewrite(src, dst, tensors={name: torch.zeros(shape)})


def _wider_metadata(src: Path, dst: Path) -> Path:
    with safe_open(str(src), framework="pt") as f:
        kwargs = json.loads(f.metadata()["aid.init_kwargs"])
    kwargs["model_channels"] = 32
    return _rewrite(src, dst, metadata={"aid.init_kwargs": json.dumps(kwargs)})


def _missing_tensor(src: Path, dst: Path) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    sd = load_file(str(src))
    sd.pop(sorted(sd)[0])
    save_file(sd, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("make", [_wrong_shape, _wider_metadata, _missing_tensor])
def test_checkpoint_of_the_wrong_architecture(scene, capsys, make):
    bad = make(scene.model, scene.model.parent / "wrong.safetensors")
    code, out, err = run_cli(scene.args(model=bad), capsys)
    assert_user_error(code, out, err, "do not match the EDMPrecond architecture", str(bad))
    assert listing(scene.out_dir) == {}


@pytest.mark.parametrize("metadata, phrase", [
    ({"aid.kind": "dataset"}, "not an aid backbone"),
    ({"aid.init_kwargs": "{not json"}, "unusable architecture metadata"),
    ({"aid.precond": "FancyPrecond"}, "unusable architecture metadata"),
])
def test_checkpoint_with_unusable_metadata(scene, capsys, metadata, phrase):
    bad = _rewrite(scene.model, scene.model.parent / "meta.safetensors", metadata=metadata)
    code, out, err = run_cli(scene.args(model=bad), capsys)
    assert_user_error(code, out, err, phrase)
    assert listing(scene.out_dir) == {}


def test_pickle_checkpoint_is_refused(scene, capsys):
    pkl = scene.model.parent / "edm.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    code, out, err = run_cli(scene.args(model=pkl), capsys)
    assert_user_error(code, out, err, "only .safetensors", "aid models convert")


def test_unknown_method(scene, capsys):
    args = scene.args()
    args[args.index("--method") + 1] = "magic"
    code, out, err = run_cli(args, capsys)
    assert_user_error(code, out, err, "unknown method", "magic", "replace")
    assert listing(scene.out_dir) == {}


def test_unknown_fit(scene, capsys):
    """--fit is a choice (an enum: --help lists it): click refuses anything else as a usage error naming the choices."""
    code, out, err = run_cli(scene.args("--fit", "bogus"), capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "Usage:" in err and "--fit" in err and "bogus" in err
    assert all(choice in err for choice in ("auto", "crop", "resize", "native"))
    assert listing(scene.out_dir) == {}


def test_cuda_on_a_machine_without_cuda(scene, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    args = scene.args()
    args[args.index("--device") + 1] = "cuda"
    code, out, err = run_cli(args, capsys)
    assert_user_error(code, out, err, "--device cuda", "CUDA is not available")
    assert listing(scene.out_dir) == {}


def test_failed_write_leaves_no_partial_or_temp_file(scene, capsys, monkeypatch):
    """A write that dies half-way (disk full) must leave neither a half-written output nor its temp file."""

    def failing_save(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    try:
        code = run_cli(scene.args(), capsys)[0]
    except OSError:
        code = 1
    assert code != 0
    assert listing(scene.out_dir) == {}


def test_entry_point_prints_no_traceback_for_a_user_error(scene):
    """The real `python -m aid_cli.cli`, with a narrow console and a long path: one `error:` line, exit 2."""
    bad = scene.model.parent / ("a-long-folder-name-" * 4) / "corrupt.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage" * 100)
    env = dict(os.environ, COLUMNS="60", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "aid_cli.cli", *map(str, scene.args(model=bad))],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(bad) in lines[0]
    assert result.stdout == ""
    assert listing(scene.out_dir) == {}
