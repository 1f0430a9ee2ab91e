"""The benchmark's analysis scripts on real runs: scripts/texture_breakdown.py and scripts/kid_difference.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aid_cli.bench import read_cells

from .bench_helpers import _bench_args
from .bench_helpers import data, isolated_cache, lpips_cache, stand_in_inception  # noqa: F401 (fixtures)
from .conftest import REPO
from .test_cli_inpaint import run_cli


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_texture_breakdown_pairs_images_and_refuses_runs_of_other_masks(tmp_path, data, tiny_checkpoint, capsys):
    """scripts/texture_breakdown.py: Δ per image equals the cells' own difference, bins hold every image once, the
    kept fills' texture is read from the grids (copy's fills are the truth: ratio 1; greyfill's are flat: 0), and two
    runs that drew other masks are refused in one line."""
    tb = _script("texture_breakdown")
    out = tmp_path / "a"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,greyfill", "freeform,center", "1", "4",
                                       "--examples", "4"), capsys)
    assert code == 0, err
    assert tb.main([str(out), "--a", "greyfill", "--b", "copy", "--metric", "ssim", "--bins", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cells = {(c["method"], c["mask"]): c for c in read_cells(out)}
    for family in ("freeform", "center"):
        r = result["families"][family]
        delta = np.subtract(cells[("greyfill", family)]["ssim"], cells[("copy", family)]["ssim"])
        np.testing.assert_allclose(r["mean_delta"], delta.mean(), rtol=1e-9)
        assert sum(b["n"] for b in r["bins"]) == r["n"] == 4
        assert sum(b["a_worse"] for b in r["bins"]) == 4  # SSIM: higher is better, greyfill below copy everywhere
        assert r["fill_texture_b"]["ratio"] == pytest.approx(1.0, abs=1e-6)  # copy: the ground truth itself
        assert r["fill_texture_a"]["ratio"] == pytest.approx(0.0, abs=1e-6)  # greyfill: one grey value
    assert result["all"]["n"] == 8
    other = tmp_path / "b"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, other, "copy", "freeform", "1", "4", "--mask-seed", "3"),
                           capsys)
    assert code == 0, err
    assert tb.main([str(out), "--a", "greyfill", "--b", "copy", "--b-run", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different images or masks (mask_seed 0 / 3)" in err


def test_kid_difference_script_pairs_two_methods_of_a_run(tmp_path, data, tiny_checkpoint, capsys):
    """scripts/kid_difference.py: per mask family, KID(a) − KID(b) over the seeds both ran (the rows' own KIDs), its
    paired bootstrap from metrics/realism.py; greyfill is behind copy (the truth) in most resamples; a run without
    features is refused in one line."""
    from aid_cli.metrics.realism import kid

    kd = _script("kid_difference")
    out = tmp_path / "a"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,greyfill", "freeform,center", "2"), capsys)
    assert code == 0, err
    rows = {(r["method"], r["mask"]): r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert kd.main([str(out), "--a", "greyfill", "--b", "copy", "--draws", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["freeform", "center"]
    ref = np.load(out / "features" / "originals.npy")
    for family, r in result.items():
        assert r["seeds"] == [0, 1] and r["draws"] == 50
        assert r["delta"] == pytest.approx(rows[("greyfill", family)]["kid"]["mean"]
                                           - rows[("copy", family)]["kid"]["mean"], rel=1e-9)
        assert r["delta"] == pytest.approx(np.mean([kid(np.load(out / c["features"]), ref) for c in read_cells(out)
                                                    if c["method"] == "greyfill" and c["mask"] == family])
                                           - kid(ref, ref), rel=1e-9)
        assert r["delta"] > 0 and r["a_worse"] > 0.5 and r["std"] > 0  # (4 images: some resamples hold 1 or 2)
    assert kd.main([str(out), "--a", "greyfill", "--b", "copy", "--draws", "50"]) == 0
    text = capsys.readouterr().out
    assert f"freeform: KID×10³ greyfill − copy = {1000 * result['freeform']['delta']:+.2f} ±" in text
    assert f"greyfill behind in {100 * result['center']['a_worse']:.1f} %" in text
    bare = tmp_path / "b"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, bare, "copy", "center", "1", "4", "--no-realism"),
                           capsys)
    assert code == 0, err
    assert kd.main([str(bare), "--a", "copy", "--b", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without --realism" in err
