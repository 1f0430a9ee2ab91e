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
