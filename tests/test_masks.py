"""Mask generators: deterministic by seed, versioned, hole ratios in range, the evaluation families' geometry."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from aid_cli.data.masks import (DEFAULT_HOLE_RANGE, MASKS_VERSION, eval_masks, free_form_masks, training_masks,
                                training_rng)


def _holes(M: torch.Tensor) -> torch.Tensor:
    return 1 - M.mean((1, 2, 3))


@pytest.mark.parametrize("family", ["freeform", "center", "strip"])
def test_eval_masks_are_binary_float32_known_is_one(family):
    M = eval_masks(family, 5, 32, seed=0)
    assert M.shape == (5, 1, 32, 32) and M.dtype == torch.float32
    assert set(M.unique().tolist()) == {0.0, 1.0}
    assert (_holes(M) > 0).all() and (_holes(M) < 1).all()


@pytest.mark.parametrize("family", ["freeform", "strip"])
def test_eval_masks_deterministic_by_seed_and_prefix_stable(family):
    a, b = eval_masks(family, 6, 32, seed=3), eval_masks(family, 6, 32, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(eval_masks(family, 3, 32, seed=3), a[:3])  # mask i depends on i, not on n
    assert not torch.equal(eval_masks(family, 6, 32, seed=4), a)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 6))  # masks differ from image to image


def test_free_form_hole_ratio_in_range():
    lo, hi = DEFAULT_HOLE_RANGE
    for res in (16, 64):
        h = _holes(eval_masks("freeform", 40, res, seed=0))
        assert (h >= lo).all() and (h <= hi).all(), (res, h.min(), h.max())
    h = _holes(free_form_masks(20, 32, np.random.default_rng(0), hole_range=(0.3, 0.4)))
    assert (h >= 0.3).all() and (h <= 0.4).all()
    with pytest.raises(ValueError):
        free_form_masks(1, 32, np.random.default_rng(0), hole_range=(0.6, 0.2))


def test_center_is_a_centred_square_of_half_the_side():
    M = eval_masks("center", 2, 16)[0, 0]
    hole = M == 0
    assert hole[4:12, 4:12].all() and hole.sum() == 64  # side 8, a 25 % hole
    assert torch.equal(eval_masks("center", 1, 16, seed=5)[0, 0], M)  # no randomness
    odd = eval_masks("center", 1, 15)[0, 0] == 0
    assert odd.sum() == 49 and odd[4:11, 4:11].all()


def test_strip_is_a_full_band_of_a_quarter_of_the_side():
    M = eval_masks("strip", 16, 16, seed=0)[:, 0]
    orientations = set()
    for m in M:
        hole = (m == 0).numpy()
        rows, cols = np.nonzero(hole.all(1))[0], np.nonzero(hole.all(0))[0]
        band = rows if len(rows) else cols
        orientations.add("h" if len(rows) else "v")
        assert len(band) == 4 and np.all(np.diff(band) == 1)  # one contiguous band, thickness 16/4
        assert hole.sum() == 4 * 16  # nothing else is a hole
    assert orientations == {"h", "v"}  # 16 draws: both orientations occur


def test_training_masks_deterministic_and_on_their_own_stream():
    a = training_masks(4, 32, seed=0, step=7)
    assert torch.equal(a, training_masks(4, 32, seed=0, step=7))
    assert not torch.equal(a, training_masks(4, 32, seed=0, step=8))
    assert not torch.equal(a, training_masks(4, 32, seed=1, step=7))
    ev = eval_masks("freeform", 4, 32, seed=0)
    assert not any(torch.equal(a[i], ev[j]) for i in range(4) for j in range(4))
    assert training_rng(0, 0).integers(1 << 62) != np.random.default_rng([0, 0]).integers(1 << 62)
    lo, hi = DEFAULT_HOLE_RANGE
    assert ((_holes(a) >= lo) & (_holes(a) <= hi)).all()


def test_version_is_checked_and_the_v1_set_is_frozen():
    assert MASKS_VERSION == "v1"
    with pytest.raises(ValueError, match="version"):
        eval_masks("freeform", 1, 16, version="v0")
    with pytest.raises(ValueError, match="family"):
        eval_masks("circle", 1, 16)
    # What v1 draws: if this changes, the generator changed and MASKS_VERSION must be bumped.
    digest = hashlib.sha256(b"".join(eval_masks(f, 4, 64, seed=0).numpy().tobytes()
                                     for f in ("freeform", "center", "strip"))).hexdigest()
    assert digest == V1_DIGEST, f"the v1 evaluation masks changed ({digest}); bump MASKS_VERSION"


V1_DIGEST = "a0d2ba6081d708c57510c81f969ec544c78acc50f1e3e7288c20d62fd9756af7"


def test_training_mask_bank_is_drawn_once_from_the_training_stream_with_every_family():
    from aid_cli.data.masks import band_known, box_known, training_mask_bank

    bank = training_mask_bank(60, 32, seed=3, families=("freeform", "box", "strip"))
    assert bank.shape == (60, 1, 32, 32) and bank.dtype == torch.bool
    assert torch.equal(bank, training_mask_bank(60, 32, seed=3, families=("freeform", "box", "strip")))
    assert not torch.equal(bank, training_mask_bank(60, 32, seed=4, families=("freeform", "box", "strip")))
    holes = 1 - bank.float().mean(dim=(1, 2, 3))
    assert float(holes.min()) >= 0.15 and float(holes.max()) <= 0.65
    rng = np.random.default_rng(0)
    for _ in range(50):
        box, band = box_known(rng, 32, 32), band_known(rng, 32, 32)
        ys, xs = np.nonzero(~box)  # one rectangle: its bounding box is all hole
        assert (~box)[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        rows, cols = (~band).all(axis=1), (~band).all(axis=0)  # a band crosses the whole image
        assert (~band).sum() == 32 * max(rows.sum(), cols.sum())
    with pytest.raises(ValueError, match="unknown training mask family"):
        training_mask_bank(4, 32, seed=0, families=("blob",))
