"""The benchmark on whole photos: masks drawn at the photo's own scale (deterministic, versioned), every method through
`aid inpaint`'s own path (the bench's fill is the command line's, pixel for pixel), metrics at full resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.data.images import choose_fit, erode
from aid_cli.data.photo_masks import (PHOTO_FAMILIES, PHOTO_MASKS_VERSION, photo_eval_hole, photo_training_hole)
from aid_cli.errors import UserError

from .conftest import run_cli

SIZES = [(321, 481), (481, 321), (200, 517)]


@pytest.mark.parametrize("family", PHOTO_FAMILIES)
def test_photo_masks_are_deterministic_per_seed_and_versioned(family):
    for i, size in enumerate(SIZES):
        a = photo_eval_hole(family, 0, i, size)
        assert a.shape == size and a.dtype == bool and a.any()
        assert np.array_equal(a, photo_eval_hole(family, 0, i, size))  # the same mask, every time
        assert not np.array_equal(a, photo_eval_hole(family, 1, i, size))  # another seed, another mask
        assert not np.array_equal(a, photo_eval_hole(family, 0, i + 7, size))  # another photo, another mask
    with pytest.raises(ValueError, match="version"):
        photo_eval_hole(family, 0, 0, SIZES[0], version="photo-v0")
    assert PHOTO_MASKS_VERSION == "photo-v1"


def test_photo_masks_have_the_sizes_their_families_promise():
    n = 40
    for family in PHOTO_FAMILIES:
        fractions = [photo_eval_hole(family, 0, i, SIZES[i % 3]).mean() for i in range(n)]
        if family == "box":
            assert all(0.019 <= f <= 0.101 for f in fractions)
        if family == "blob":  # a smooth shape of 2-10 % of the area, wholly inside the photo
            assert all(0.015 <= f <= 0.11 for f in fractions)
        if family in ("stroke", "text"):  # thin: 15 px at most, so an erosion by 8 px leaves nothing
            for i in range(10):
                hole = photo_eval_hole(family, 0, i, SIZES[i % 3])
                assert not erode(hole, 8).any()
                assert hole.mean() < 0.1
    # training masks come from another stream: never an evaluation mask
    fam, hole = photo_training_hole(0, 0, 0, SIZES[0])
    assert fam in PHOTO_FAMILIES and hole.any()
    assert not any(np.array_equal(hole, photo_eval_hole(f, 0, 0, SIZES[0])) for f in PHOTO_FAMILIES)


def test_auto_fit_chooses_windows_for_thin_strokes_spread_wide_and_a_box_for_objects():
    stroke = photo_eval_hole("stroke", 0, 0, (321, 481))
    blob = photo_eval_hole("blob", 0, 0, (321, 481))
    assert choose_fit(stroke, 64) == "native"
    assert choose_fit(blob, 64) == "crop"
    small = np.zeros((321, 481), dtype=bool)
    small[100:120, 200:260] = True  # a box within 2x of the model's side: crop, near native scale
    assert choose_fit(small, 64) == "crop"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(70, 96), (90, 60)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90.0)], -1) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(np.rint(base).clip(0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_photo_bench_fill_is_aid_inpaints_and_metrics_are_at_full_resolution(photos, tiny_checkpoint, tmp_path,
                                                                              capsys):
    from aid_cli.bench.photos import PhotoRunner, neighbourhood
    from aid_cli.metrics.quality import psnr_hole
    from aid_cli.resolve import resolve_method

    out = tmp_path / "bench"
    code, _, err = run_cli(["bench", "--dataset", photos, "--n", 2, "--masks", "blob,stroke", "--methods",
                            "replace,telea", "--seeds", "3,", "--steps", 3, "--model", tiny_checkpoint, "--out", out,
                            "--examples", 2, "--offline", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["masks"]["version"] == PHOTO_MASKS_VERSION
    rows = {(r["method"], r["mask"]): r for r in result["rows"]}
    assert set(rows) == {(m, f) for m in ("replace", "telea") for f in ("blob", "stroke")}
    assert rows[("telea", "blob")]["nfe"] == 0 and rows[("replace", "blob")]["nfe"] == 5
    assert (out / "grid-blob.png").is_file() and (out / "grid-stroke.png").is_file()
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    cell = next(c for c in cells if c["method"] == "replace" and c["mask"] == "blob")

    # photo 1, mask family blob, noise seed 3: the bench fills it as `aid inpaint --seed 3·2²⁰ + 1` does
    runner = PhotoRunner(tiny_checkpoint, str(photos), 2, ["blob"], 0, "cpu", log=lambda m: None, lpips_offline=True)
    hole = runner.holes["blob"][1]
    spec = resolve_method("replace", 3, runner.checkpoint)
    filled, _ = runner.fill(spec, spec.build(), "blob", 3, 1)
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    code, _, err = run_cli(["inpaint", photos / "p1.png", "--mask", tmp_path / "mask.png", "-o", tmp_path / "cli.png",
                            "--model", tiny_checkpoint, "--method", "replace", "--steps", 3, "--seed", 3 * 2 ** 20 + 1],
                           capsys)
    assert code == 0, err
    cli_out = np.asarray(Image.open(tmp_path / "cli.png"))
    assert np.array_equal(filled.pixels[0], cli_out)
    truth = np.asarray(Image.open(photos / "p1.png"))
    assert np.array_equal(cli_out[~hole], truth[~hole]) and not np.array_equal(cli_out[hole], truth[hole])
    # hole-PSNR at the photo's own resolution, of that very fill
    to = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    expect = float(psnr_hole(to(cli_out), to(truth), torch.from_numpy(~hole)[None, None].float())[0])
    assert cell["psnr_hole"][1] == pytest.approx(expect, abs=1e-9)
    left, top, right, bottom = neighbourhood(hole)
    rows_, cols_ = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    assert left <= cols_[0] and right > cols_[-1] and top <= rows_[0] and bottom > rows_[-1]


def test_photo_and_model_resolution_families_do_not_mix(photos, tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(["bench", "--dataset", photos, "--n", 2, "--masks", "blob,center", "--methods", "telea",
                              "--model", tiny_checkpoint, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "separate runs" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError):
        from aid_cli.bench.runner import check_masks

        check_masks(["scribble"])
