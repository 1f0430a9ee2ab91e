"""The research scripts still run on today's `aid` (not part of the product suite: `pytest research/`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.bench import read_cells
from aid_cli.fileio import sha256_file
from aid_cli.guidance.checkpoint import save_guidance
from aid_cli.guidance.networks import Actor

from tests.conftest import random_images, run_cli

HERE = Path(__file__).resolve().parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lpips_cache(tmp_path_factory):
    """The converted LPIPS weights, once per session (None if LPIPS is unavailable)."""
    from aid_cli.metrics.lpips import TRUNKS, LPIPSUnavailable, load_lpips

    folder = tmp_path_factory.mktemp("lpips-cache")
    try:
        for net in TRUNKS:
            load_lpips(offline=True, cache=folder, net=net)
    except LPIPSUnavailable:
        return None
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, lpips_cache):
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in (lpips_cache.iterdir() if lpips_cache is not None else []):
        try:
            os.link(f, cache / f.name)
        except OSError:
            shutil.copy(f, cache / f.name)
    monkeypatch.setenv("AID_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class StandInFeatures(torch.nn.Module):
    """A cheap stand-in for FID's Inception: [N, 3, 299, 299] → [N, 48] non-negative features."""

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) + 1) * self.one


@pytest.fixture(autouse=True)
def stand_in_inception(monkeypatch):
    from aid_cli.metrics import fid

    monkeypatch.setattr(fid, "load_inception", lambda device="cpu": StandInFeatures().to(device))


@pytest.fixture
def data(tmp_path):
    return random_images(tmp_path / "data", 4, prefix="img")


def _bench_args(data, ckpt, out, methods, masks, seeds, batch="4", *extra):
    return ["bench", "--methods", methods, "--dataset", data, "--model", ckpt, "--masks", masks, "--n", "4",
            "--seeds", seeds, "--steps", "2", "--batch", batch, "--device", "cpu", "--out", out, *extra]


def test_texture_breakdown_pairs_images_and_refuses_runs_of_other_masks(tmp_path, data, tiny_checkpoint, capsys):
    """Δ per image equals the cells' own difference, bins hold every image once, the kept fills' texture is read from
    the grids (copy's fills are the truth: ratio 1; greyfill's are flat: 0), and two runs that drew other masks are
    refused in one line."""
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
        assert r["fill_texture_b"]["ratio"] == pytest.approx(1.0, abs=1e-6)
        assert r["fill_texture_a"]["ratio"] == pytest.approx(0.0, abs=1e-6)
    assert result["all"]["n"] == 8
    other = tmp_path / "b"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, other, "copy", "freeform", "1", "4", "--mask-seed", "3"),
                           capsys)
    assert code == 0, err
    assert tb.main([str(out), "--a", "greyfill", "--b", "copy", "--b-run", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different images or masks (mask_seed 0 / 3)" in err


def test_kid_difference_pairs_two_methods_of_a_run(tmp_path, data, tiny_checkpoint, capsys):
    """Per mask family, KID(a) − KID(b) over the seeds both ran (the rows' own KIDs); greyfill is behind copy (the
    truth) in most resamples; a run without features is refused in one line."""
    kd = _script("kid_difference")
    out = tmp_path / "a"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,greyfill", "freeform,center", "2"), capsys)
    assert code == 0, err
    rows = {(r["method"], r["mask"]): r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert kd.main([str(out), "--a", "greyfill", "--b", "copy", "--draws", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["freeform", "center"]
    for family, r in result.items():
        assert r["seeds"] == [0, 1] and r["draws"] == 50
        assert r["delta"] == pytest.approx(rows[("greyfill", family)]["kid"]["mean"]
                                           - rows[("copy", family)]["kid"]["mean"], rel=1e-9)
        assert r["delta"] > 0 and r["a_worse"] > 0.5 and r["std"] > 0
    bare = tmp_path / "b"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, bare, "copy", "center", "1", "4", "--no-realism"),
                           capsys)
    assert code == 0, err
    assert kd.main([str(bare), "--a", "copy", "--b", "copy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without --realism" in err


def test_actor_cost_times_calls_and_whole_solves(tiny_checkpoint, tmp_path, capsys):
    """Per-call milliseconds in both layouts, then whole solves unguided and AID-18 in turn with the actor's share (a
    timing tool: only its shape is checked)."""
    from aid_cli.methods.aid import AID

    torch.manual_seed(0)
    actor = Actor(width=8, denoised_input=True)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    path = save_guidance(tmp_path / "g.safetensors", actor, dict(channels=3, width=8, emb_dim=16, denoised_input=True),
                         sha256_file(tiny_checkpoint))
    script = _script("actor_cost")
    deployed = AID._deployed
    try:
        assert script.main(["--backbone", str(tiny_checkpoint), "--guidance", str(path), "--batch", "2", "--threads",
                            "1", "--repeats", "1", "--solves", "2"]) == 0
    finally:
        AID._deployed = deployed  # the script wraps it with a timer
    out = capsys.readouterr().out
    assert out.count("ms per call") == 4 and out.count("round ") == 4
    share = float(out.split("the actor's share of an AID-18 solve: median ")[1].split(" %")[0])
    assert 0 < share < 100


def test_tradeoff_plot_reads_bench_runs_and_draws_their_points(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = _script("tradeoff_plot")
    runs = []
    for k, (psnr, kid) in enumerate([(17.2, 0.004), (16.9, 0.0043)]):
        run = tmp_path / f"r{k}"
        run.mkdir()
        row = {"method": "aid-18", "mask": "freeform", "psnr_hole": {"mean": psnr, "std": None},
               "kid": {"mean": kid, "std": 0.001}}
        (run / "bench.json").write_text(json.dumps({"config": {}, "rows": [row]}))
        runs.append(f"{run}=S{k}")
    out = tmp_path / "trade.png"
    assert plot.main([*runs, "--out", str(out), "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["lever"]
    assert [(p["label"], p["psnr"], round(p["kid"], 6)) for p in points] == [("S0", 17.2, 4.0), ("S1", 16.9, 4.3)]
    assert Image.open(out).size[0] > 100
