"""`aid bench` on a tiny random backbone and four 16×16 images: its reports and their schema, the oracles' scores, the
realism metrics against a direct computation, the Markdown table (runs, resume and processes: test_bench_run.py;
methods and tuning: test_bench_methods.py)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.backbones.checkpoint import save_backbone
from aid_cli.backbones.edm import build_precond
from aid_cli.bench import BenchConfig, read_cells, run_bench
from aid_cli.data.masks import MASKS_VERSION
from aid_cli.fileio import sha256_file

from .bench_helpers import _bench_args, _dataset  # (_dataset: also test_vipaint's)
from .bench_helpers import data, isolated_cache, lpips_cache, stand_in_inception  # noqa: F401 (fixtures)
from .conftest import TINY_KWARGS
from .test_cli_inpaint import assert_user_error, run_cli


def test_bench_writes_json_csv_grids_and_plot(tmp_path, data, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps,copy", "freeform,center", "2", "4",
                                            "--json", tmp_path / "b.json"), capsys)
    assert code == 0, err
    assert stdout == ""
    assert "NFE" in err and "dps" in err  # the table (on stderr)
    result = json.loads((out / "bench.json").read_text())
    assert json.loads((tmp_path / "b.json").read_text()) == result

    cfg = result["config"]
    assert cfg["n"] == 4 and cfg["seeds"] == [0, 1] and cfg["steps"] == 2
    assert cfg["masks"]["version"] == MASKS_VERSION and cfg["masks"]["families"] == ["freeform", "center"]
    assert cfg["model"]["sha256"] == sha256_file(tiny_checkpoint)
    assert cfg["model"]["path"] == str(tiny_checkpoint.resolve())
    assert cfg["device"].startswith("cpu") and cfg["torch"] == torch.__version__
    assert {"psnr_hole", "ssim", "lpips", "lpips_vgg", "fid", "kid", "aggregation", "sec_per_image"} <= \
        cfg["metrics"].keys()
    assert "(a.b / 2048 + 1)^3" in cfg["metrics"]["kid"] and "299x299" in cfg["metrics"]["fid"]
    assert cfg["peak_memory"]["kind"] in ("process_rss_peak_sampled", "process_maxrss_lifetime")
    assert cfg["methods"]["dps"] == {"method": "dps", "params": {}, "params_source": "defaults", "steps": 2}

    rows = result["rows"]
    assert [(r["method"], r["mask"]) for r in rows] == [("dps", "freeform"), ("dps", "center"), ("copy", "freeform"),
                                                         ("copy", "center")]
    for r in rows:
        assert {"method", "mask", "nfe", "backward", "sec_per_image", "psnr_hole", "ssim", "lpips", "lpips_vgg",
                "fid", "kid", "peak_memory_mib"} <= r.keys()
        for metric in ("psnr_hole", "ssim", "lpips", "lpips_vgg", "fid", "kid"):
            assert {"mean", "std"} <= r[metric].keys()
        assert r["sec_per_image"] >= 0 and r["peak_memory_mib"] > 0 and r["seeds"] == [0, 1]
        assert r["lpips"]["mean"] is None  # 16×16 is below LPIPS's 31×31 minimum: null, with one notice
        assert r["lpips_vgg"]["mean"] is not None and r["kid"]["mean"] is not None  # VGG16 takes 16×16
        assert {"lpips_vgg", "fid", "kid"} <= r["per_seed"][0].keys()
    dps, copy = rows[0], rows[2]
    assert (dps["nfe"], dps["backward"]) == (3, 2)  # 2N − 1 forwards, N backwards
    assert isinstance(dps["psnr_hole"]["mean"], float) and dps["psnr_hole"]["std"] > 0  # seeds draw other noise
    assert [p["seed"] for p in dps["per_seed"]] == [0, 1]
    assert (copy["nfe"], copy["backward"]) == (0, 0)
    assert copy["psnr_hole"] == {"mean": None, "std": None, "value": "inf"}  # exact hole: +inf, null in JSON
    assert copy["ssim"]["mean"] == pytest.approx(1.0) and copy["ssim"]["std"] == pytest.approx(0.0)
    assert err.count("lpips is null") == 1

    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["mask"]) for r in table] == [(r["method"], r["mask"]) for r in rows]
    assert table[2]["psnr_hole_mean"] == "inf" and float(table[0]["psnr_hole_mean"]) == dps["psnr_hole"]["mean"]
    assert float(table[0]["kid_mean"]) == dps["kid"]["mean"] and float(table[0]["kid_std"]) == dps["kid"]["std"]
    assert list(table[0])[-6:] == ["lpips_vgg_mean", "lpips_vgg_std", "fid_mean", "fid_std", "kid_mean", "kid_std"]
    md = (out / "bench.md").read_text()
    assert "| LPIPS ↓ | LPIPS-VGG ↓ | FID ↓ | KID×10³ ↓ |" in md
    assert f"| {dps['kid']['mean'] * 1000:.2f} ± {dps['kid']['std'] * 1000:.2f} |" in md
    for family in ("freeform", "center"):
        with Image.open(out / f"grid-{family}.png") as im:
            assert im.height >= 4 * 64  # input, dps, copy, ground truth; tiles scaled up to ≥ 64 px
    with Image.open(out / "quality-speed.png") as im:
        assert im.size == (720, 480)
    assert len(read_cells(out)) == 8  # 2 methods × 2 masks × 2 seeds


def test_copy_oracle_has_lpips_zero(tmp_path, lpips_cache):
    if lpips_cache is None:
        pytest.skip("LPIPS weights unavailable offline")
    kwargs = dict(TINY_KWARGS, img_resolution=32)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny32.safetensors"
    save_backbone(ckpt, build_precond("EDMPrecond", dict(kwargs)).eval(), "EDMPrecond", kwargs)
    data = _dataset(tmp_path / "data32", n=2, res=32)
    cfg = BenchConfig(dataset=str(data), methods=["copy", "greyfill"], masks=["center"], n=2, seeds=[0], steps=2,
                      batch=2)
    rows = run_bench(cfg, tmp_path / "out", model=ckpt, device="cpu", log=lambda m: None)["rows"]
    assert rows[0]["lpips"]["mean"] == 0.0 and rows[0]["ssim"]["mean"] == pytest.approx(1.0)
    assert rows[0]["lpips"]["std"] is None  # one seed
    assert rows[1]["lpips"]["mean"] > 0.01 and rows[1]["psnr_hole"]["mean"] is not None


def _png_batch(folder, n) -> torch.Tensor:
    """The dataset's first n PNGs as uint8 [n, 3, H, W] (as the bench reads them: sorted by name)."""
    files = sorted(folder.glob("*.png"))[:n]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


@pytest.mark.real_inception
def test_bench_realism_equals_a_direct_computation_and_copy_scores_zero(tmp_path, tiny_checkpoint):
    """FID and KID of the completed images against the originals, on the real TF-Inception: the features the bench
    keeps are those of the completions and of the originals computed directly; its KID, bootstrap std and FID are
    metrics/realism.py's and fid.py's on them; copy (the ground truth) scores KID(X, X) ≈ 0 and FID ≈ 0 where greyfill
    scores far more; LPIPS-VGG per image is lpips(net="vgg") of the completion."""
    from aid_cli.data.masks import eval_masks
    from aid_cli.metrics.fid import fid_from_features, inception_features, load_inception
    from aid_cli.metrics.lpips import load_lpips
    from aid_cli.metrics.realism import kid, kid_bootstrap, polynomial_kernel

    n = 8
    data = _dataset(tmp_path / "data8", n=n)
    cfg = BenchConfig(dataset=str(data), methods=["copy", "greyfill"], masks=["center"], n=n, seeds=[0], steps=2,
                      batch=4)
    out = tmp_path / "out"
    result = run_bench(cfg, out, model=tiny_checkpoint, device="cpu", log=lambda m: None)
    rows = {r["method"]: r for r in result["rows"]}
    cells = {c["method"]: c for c in read_cells(out)}
    assert cells["greyfill"]["features"] == "features/greyfill__center__0.npy"
    f_grey, f_copy = (np.load(out / cells[m]["features"]) for m in ("greyfill", "copy"))
    ref = np.load(out / "features" / "originals.npy")
    assert f_grey.shape == ref.shape == (n, 2048) and f_grey.dtype == np.float32

    # the same features, computed directly from the images (three of them: a feature vector is one image's own)
    x0 = _png_batch(data, n)
    M = eval_masks("center", n, 16, 0)
    grey = (x0.float() / 127.5 - 1) * M  # greyfill: the hole 0 (grey) in [−1, 1], the visible pixels kept
    model = load_inception()
    some = [0, 3, 7]
    np.testing.assert_allclose(ref[some], inception_features(x0[some], model=model), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f_grey[some], inception_features(grey[some], model=model), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(f_copy, ref)  # copy's completions are the originals

    # the bench's numbers are the direct computation on those features
    g = rows["greyfill"]
    assert g["kid"]["mean"] == pytest.approx(kid(f_grey, ref), rel=1e-12)
    assert g["kid"]["std"] == pytest.approx(kid_bootstrap(f_grey, ref).std(ddof=1), rel=1e-12) and g["kid"]["std"] > 0
    assert g["fid"]["mean"] == pytest.approx(fid_from_features(f_grey, ref), rel=1e-12) and g["fid"]["std"] is None
    assert g["per_seed"][0]["kid"] == g["kid"]["mean"]
    # KID of a set against itself: the unbiased estimator's O(1/n) closed form, ≈ 0 beside greyfill's
    c = rows["copy"]
    k = polynomial_kernel(ref, ref)
    assert c["kid"]["mean"] == pytest.approx(2 / (n - 1) * (k.mean() - np.diag(k).mean()), rel=1e-9)
    assert abs(c["kid"]["mean"]) < 0.1 * g["kid"]["mean"]  # (−0.014 against 0.23 at n = 8)
    assert 0 <= c["fid"]["mean"] < 1e-6 * g["fid"]["mean"]

    # LPIPS-VGG per image, as metrics/lpips.py computes it
    vgg = load_lpips(net="vgg", offline=True)
    assert cells["greyfill"]["lpips_vgg"] == pytest.approx(vgg(grey, x0.float() / 127.5 - 1).tolist(), abs=1e-6)
    assert cells["copy"]["lpips_vgg"] == [0.0] * n and c["lpips_vgg"]["mean"] == 0.0
    assert "lpips-vgg-v0.1.safetensors" in result["config"]["metrics"]["lpips_vgg_weights"]

    # the originals' features are made once and kept: --report-only rebuilds the same numbers from the files
    (out / "bench.json").unlink()
    code = run_bench(cfg, out, model=tiny_checkpoint, device="cpu", resume=True, log=lambda m: None,
                     report_only=True)
    again = {r["method"]: r for r in code["rows"]}
    assert again["greyfill"]["kid"] == g["kid"] and again["copy"]["fid"] == c["fid"]


def test_bench_realism_over_seeds_no_realism_and_older_cells(tmp_path, data, tiny_checkpoint, capsys):
    """A row of several seeds: FID mean ± std over seeds, KID the mean over seeds ± the paired bootstrap of that mean
    (one draw for every seed); --no-realism keeps no features and reports null; cells written before these metrics
    (no features, no lpips_vgg) give null, not an error."""
    from aid_cli.metrics.fid import fid_from_features
    from aid_cli.metrics.realism import kid, kid_bootstrap

    out = tmp_path / "out"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace", "freeform", "2"), capsys)
    assert code == 0, err
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    cells = read_cells(out)
    feats = [np.load(out / c["features"]) for c in cells]
    ref = np.load(out / "features" / "originals.npy")
    kids, fids = [kid(f, ref) for f in feats], [fid_from_features(f, ref) for f in feats]
    assert kids[0] != kids[1]  # the seeds drew other noise
    assert row["kid"]["mean"] == pytest.approx(np.mean(kids), rel=1e-12)
    assert row["kid"]["std"] == pytest.approx(kid_bootstrap(feats, ref).std(ddof=1), rel=1e-12)
    assert row["fid"]["mean"] == pytest.approx(np.mean(fids), rel=1e-12)
    assert row["fid"]["std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-9)
    assert [p["kid"] for p in row["per_seed"]] == pytest.approx(kids, rel=1e-12)
    per_image = [np.mean(c["lpips_vgg"]) for c in cells]
    assert row["lpips_vgg"]["mean"] == pytest.approx(np.mean(per_image), rel=1e-12)

    # cells of an older aid: no features, no lpips_vgg
    old = [{k: v for k, v in c.items() if k not in ("features", "lpips_vgg")} for c in cells]
    (out / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in old))
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace", "freeform", "2", "4", "--report-only"),
                           capsys)
    assert code == 0, err
    row = json.loads((out / "bench.json").read_text())["rows"][0]
    assert row["kid"] == {"mean": None, "std": None} and row["lpips_vgg"]["mean"] is None
    assert row["psnr_hole"]["mean"] is not None and "| n/a | n/a | n/a |" in (out / "bench.md").read_text()

    bare = tmp_path / "bare"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, bare, "copy", "center", "1", "4", "--no-realism"),
                           capsys)
    assert code == 0, err
    row = json.loads((bare / "bench.json").read_text())["rows"][0]
    assert row["fid"]["mean"] is None and row["kid"]["mean"] is None and not (bare / "features").exists()
    assert read_cells(bare)[0]["features"] is None and row["lpips_vgg"]["mean"] == 0.0
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, tmp_path / "bare2", "copy", "center", "1", "4",
                                       "--no-lpips-vgg"), capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "bare2" / "bench.json").read_text())["rows"][0]
    assert row["lpips_vgg"]["mean"] is None and row["kid"]["mean"] is not None


def test_markdown_table_goes_between_the_readme_markers(tmp_path, data, tiny_checkpoint, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- aid bench: start -->\nold table\n<!-- aid bench: end -->\n\nafter\n")
    out = tmp_path / "out"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,greyfill", "center", "1", "4",
                                       "--markdown", readme), capsys)
    assert code == 0, err
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n") and text.endswith("<!-- aid bench: end -->\n\nafter\n")
    assert "| copy | center | 0 | 0 |" in text and "| greyfill | center |" in text
    assert (out / "bench.md").read_text() in text
    before = text
    code, _, _ = run_cli(_bench_args(data, tiny_checkpoint, out, "copy", "center", "1", "4", "--resume",
                                     "--markdown", readme), capsys)
    assert code == 0 and readme.read_text().count("<!-- aid bench: start -->") == 1 and readme.read_text() != before
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, tmp_path / "o2", "copy", "center", "1", "4",
                                            "--markdown", bare), capsys)
    assert_user_error(code, stdout, err, "aid bench: start")
    assert not (tmp_path / "o2").exists() and bare.read_text() == "no markers\n"  # failed before running anything


def test_a_row_gives_mean_counts_to_one_decimal_and_whole_counts_whole():
    """CoPaint's retries make its NFE a mean: the row shows it to one decimal, never 256.987 next to 257.2."""
    from aid_cli.bench import aggregate, rows_markdown

    def cell(seed, nfe):
        return {"method": "copaint", "mask": "center", "seed": seed, "n": 2, "nfe": nfe, "backward": 36,
                "sec_per_image": 1.0, "psnr_hole": [10.0, 12.0], "ssim": [0.5, 0.7], "lpips": [0.1, 0.3],
                "method_name": "copaint", "params": {}, "steps": 18}

    row = aggregate([cell(0, 257.2), cell(1, 256.774)])
    assert (row["nfe"], row["backward"]) == (257.0, 36) and isinstance(row["backward"], int)
    assert aggregate([cell(0, 256.12)])["nfe"] == 256.1
    assert row["psnr_hole"]["mean"] == pytest.approx(11.0) and row["seeds"] == [0, 1]
    cfg = {"n": 2, "dataset": "val.zip", "seeds": [0, 1], "masks": {"version": "v1"}, "device": "cpu",
           "aid": "0", "date": "2026-11-25"}
    assert "| copaint | center | 257.0 | 36 | 1 |" in rows_markdown({"config": cfg, "rows": [row]})


def test_one_seed_claims_no_spread_over_seeds():
    """A run of one seed says "one seed" and prints no ± over seeds (the table's title and the Markdown caption); two
    seeds give mean ± std over seeds."""
    from rich.console import Console

    from aid_cli.bench import aggregate, rich_table, rows_markdown

    def cell(seed, psnr):
        return {"method": "replace", "mask": "center", "seed": seed, "n": 2, "nfe": 35, "backward": 0,
                "sec_per_image": 1.0, "psnr_hole": [psnr, psnr + 2], "ssim": [0.5, 0.7], "lpips": [0.1, 0.3],
                "method_name": "replace", "params": {}, "steps": 18, "peak_memory_mib": 100.0}

    def shown(seeds):
        cfg = {"n": 2, "dataset": "val.zip", "seeds": seeds, "masks": {"version": "v1"}, "device": "cpu", "aid": "0",
               "date": "2026-11-25", "peak_memory": {"kind": "process_rss_peak_sampled"}}
        result = {"config": cfg, "rows": [aggregate([cell(s, 10.0 + s) for s in seeds])]}
        console = Console(record=True, width=200, file=io.StringIO())
        console.print(rich_table(result))
        return console.export_text(), rows_markdown(result)

    table, md = shown([0])
    assert "2 images, one seed (0), cpu; one seed: means over the images, no spread over seeds" in table
    assert "of `val.zip`, one seed (0), masks v1" in md and "±" not in table + md and "| 11.00 |" in md
    table, md = shown([0, 1])
    assert "2 images × 2 seeds, cpu; mean ± std over seeds" in table
    assert "× 2 seeds, masks v1" in md and "mean ± std over seeds" in md and "| 11.50 ± 0.71 |" in md

