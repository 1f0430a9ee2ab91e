"""What the benchmark's tests share (tests/test_bench*.py): an offline aid cache per test with the LPIPS weights
converted once per session, a cheap stand-in for FID's Inception, a tiny dataset, a guidance module, the command line."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from .conftest import random_images

STEPS = "2"
_CONVERTED: dict = {}  # the LPIPS cache folder, shared by every test module that imports these fixtures


@pytest.fixture(scope="session")
def lpips_cache(tmp_path_factory):
    """A cache folder holding the converted LPIPS weights, AlexNet and VGG16 (built once per session; None if LPIPS
    is unavailable)."""
    from aid_cli.metrics.lpips import TRUNKS, LPIPSUnavailable, load_lpips

    if "folder" not in _CONVERTED:
        folder = tmp_path_factory.mktemp("lpips-cache")
        try:
            for net in TRUNKS:
                load_lpips(offline=True, cache=folder, net=net)
            assert all(os.path.isfile(folder / t.cache_file) for t in TRUNKS.values())
        except LPIPSUnavailable:
            folder = None
        _CONVERTED["folder"] = folder
    return _CONVERTED["folder"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, lpips_cache):
    """Each test gets its own aid cache (tuned records), offline, with the LPIPS weights already converted."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if lpips_cache is not None:
        for f in lpips_cache.iterdir():
            try:
                os.link(f, cache / f.name)  # VGG16's is 59 MB: a link, not a copy, per test
            except OSError:
                shutil.copy(f, cache / f.name)
    monkeypatch.setenv("AID_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


class StandInFeatures(torch.nn.Module):
    """A cheap stand-in for FID's Inception in the bench's tests: [N, 3, 299, 299] → [N, 48] non-negative features
    (4×4 average pools of each channel shifted to ≥ 0). Tests marked `real_inception` get the real network."""

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))  # inception_features finds the device from a parameter

    def forward(self, x):
        return (torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) + 1) * self.one


@pytest.fixture(autouse=True)
def stand_in_inception(request, monkeypatch):
    if request.node.get_closest_marker("real_inception") is None:
        from aid_cli.metrics import fid

        monkeypatch.setattr(fid, "load_inception", lambda device="cpu": StandInFeatures().to(device))


def _dataset(folder, n=4, res=16, seed=0):
    return random_images(folder, n, res, prefix="img", seed=seed)


@pytest.fixture
def data(tmp_path):
    return _dataset(tmp_path / "data")


def _guidance(path, backbone_sha256, seed=0):
    """A random (non-zero) AID guidance module for a backbone."""
    from aid_cli.guidance.checkpoint import save_guidance
    from aid_cli.guidance.networks import Actor

    torch.manual_seed(seed)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    return save_guidance(path, actor, {"width": 8}, backbone_sha256)


def _bench_args(data, ckpt, out, methods="dps,copy", masks="freeform,center", seeds="2", batch="4", *extra):
    return ["bench", "--methods", methods, "--dataset", data, "--model", ckpt, "--masks", masks, "--n", "4",
            "--seeds", seeds, "--steps", STEPS, "--batch", batch, "--device", "cpu", "--out", out, *extra]
