"""Backbone evaluation: the validation loss must not depend on the batch size it is computed with."""

from __future__ import annotations

import pytest
import torch

from aid_cli.backbones.evaluate import generate, validation_loss
from aid_cli.data.datasets import ImageSet


def test_validation_loss_does_not_depend_on_batch(tiny_net):
    g = torch.Generator().manual_seed(1)
    data = ImageSet(images=torch.randint(0, 256, (7, 3, 16, 16), generator=g, dtype=torch.uint8),
                    names=[f"{i}.png" for i in range(7)])
    a = validation_loss(tiny_net, data, seed=3, batch=7)
    b = validation_loss(tiny_net, data, seed=3, batch=2)
    assert a["images"] == 7 and a["edm_loss"] > 0
    assert b["edm_loss"] == pytest.approx(a["edm_loss"], rel=1e-5)
    for s, v in a["mse_at_sigma"].items():
        assert b["mse_at_sigma"][s] == pytest.approx(v, rel=1e-5)
    assert validation_loss(tiny_net, data, seed=4, batch=7)["edm_loss"] != pytest.approx(a["edm_loss"], rel=1e-5)


def test_generated_samples_do_not_depend_on_batch(tiny_net):
    a = generate(tiny_net, 5, 16, steps=4, seed=2, batch=5)
    b = generate(tiny_net, 5, 16, steps=4, seed=2, batch=2)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 16, 16)
    assert torch.equal(a, b)


def test_models_eval_cli_val_fid_grid_and_log_progress(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """`aid models eval` end to end on a tiny backbone, with a stand-in feature network (the real Inception is checked
    in test_fid.py): JSON with both measures, the sample grid, and progress lines when stderr is not a terminal."""
    import json

    import numpy as np
    from PIL import Image

    from aid_cli.metrics import fid as fidmod

    from .conftest import run_cli

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):  # [N, 3, 299, 299] → [N, 6]: channel means and spreads
            return self.scale * torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    monkeypatch.setattr(fidmod, "load_inception", lambda device="cpu": Features())
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(["models", "eval", "--model", tiny_checkpoint, "--val", ref, "--fid-ref", ref,
                                 "--fid-samples", "10", "--steps", "3", "--batch", "4", "--device", "cpu", "--json", out,
                                 "--grid", tmp_path / "grid.png"], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert json.loads(stdout) == result
    assert result["val"]["images"] == 12 and result["val"]["edm_loss"] > 0
    assert result["fid"]["samples"] == 10 and result["fid"]["nfe"] == 5 and np.isfinite(result["fid"]["fid"])
    assert "sampling (5 NFE): 10/10" in err and "reference features: 12/12" in err  # logged, not a tty
    assert Image.open(tmp_path / "grid.png").size[0] > 16
    assert list((tmp_path / "cache").glob("fid-ref-*.npz"))  # reference statistics cached
