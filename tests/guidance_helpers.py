"""Helpers of the guidance tests: a tiny task, folders of tiny images and photos, a tiny run's settings, quiet
training, and the check that a stopped and resumed run equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aid_cli.guidance.trainer import STATE_FILE, TrainConfig, train
from aid_cli.task import Task
from aid_cli.training import read_jsonl

from .conftest import random_images


def tiny_task(n=2, res=16, seed=0):
    """(task, x0): n random images with the same 8×8 hole."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    M = torch.ones(n, 1, res, res)
    M[:, :, 3:11, 4:12] = 0
    return Task.from_image(x0, M), x0


@pytest.fixture
def tiny_data(tmp_path):
    """A folder of six random 16×16 images."""
    return random_images(tmp_path / "imgs", 6)


@pytest.fixture
def tiny_photos(tmp_path):
    """A folder of four small photos of different sizes (gradients with noise)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(60, 90), (96, 50), (70, 70), (45, 120)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90.0)], -1) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(np.rint(base).clip(0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def tiny_32px(tmp_path):
    """(a tiny 32×32 backbone file, a folder of four random 32×32 images): the smallest size LPIPS (31 px) takes."""
    from aid_cli.backbones.checkpoint import save_backbone
    from aid_cli.backbones.edm import build_precond

    from .conftest import TINY_KWARGS

    kwargs = dict(TINY_KWARGS, img_resolution=32, attn_resolutions=[16])
    torch.manual_seed(0)
    net32 = tmp_path / "tiny32.safetensors"
    save_backbone(net32, build_precond("EDMPrecond", kwargs), "EDMPrecond", kwargs, provenance={"note": "test"})
    return net32, random_images(tmp_path / "imgs32", 4, res=32)


def cfg_for(data, out, backbone, **kw):
    """A tiny run's settings (score estimator, 6 iterations of batch 4 at N = 3), validated on `data` itself."""
    base = dict(dataset=str(data), out=str(out), backbone=str(backbone), steps=3, batch=4, iters=6, width=8,
                critic_width=8, lr_actor=1e-3, lr_critic=3e-3, val_every=3, val_n=2, checkpoint_every=3,
                val_dataset=str(data), val_offset=0, mask_bank=16, estimator="score", seed=1)
    base.update(kw)
    return TrainConfig(**base)


def quiet_train(cfg: TrainConfig, log=lambda *a: None, **kw):
    """`train` without a progress bar, its lines told to `log` (dropped by default)."""
    return train(cfg, progress=False, log=log, **kw)


def read_stats(run) -> list[dict]:
    """The records of a run's stats.jsonl."""
    return read_jsonl(run / "stats.jsonl")


def assert_resume_equals_uninterrupted(data, backbone, tmp_path, stop_at: int, **kw):
    """Train tmp_path/a uninterrupted and tmp_path/b stopped after `stop_at` iterations, then resumed: the saved states
    are equal to the bit. Returns (a's folder, its state)."""
    a = quiet_train(cfg_for(data, tmp_path / "a", backbone, **kw))
    quiet_train(cfg_for(data, tmp_path / "b", backbone, **kw), max_iters=stop_at)
    quiet_train(cfg_for(data, tmp_path / "b", backbone, **kw), resume=True)
    sa, sb = load_file(str(a / STATE_FILE)), load_file(str(tmp_path / "b" / STATE_FILE))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    return a, sa
