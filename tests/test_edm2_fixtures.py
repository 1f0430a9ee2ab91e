"""The EDM2 networks reproduce the official NVlabs/edm2 code (../shared/fixtures/edm2)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aid_cli.backbones.edm import count_parameters
from aid_cli.backbones.edm2 import MPConv, build_precond, normalize

from .conftest import load_fixture_net, need_shared

CASES = ["edm2_latent_cond", "edm2_rgb_uncond"]


def load_case(case):
    return load_fixture_net("edm2", case, build_precond)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_names_and_shapes_match_official(case):
    net, meta, _ = load_case(case)
    assert meta["precond"] == "Precond"
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == meta["keys"]


@pytest.mark.parametrize("case", CASES)
def test_denoised_matches_official_forward(case):
    net, meta, folder = load_case(case)
    io = load_file(str(folder / "io.safetensors"))
    assert ("class_labels" in io) == bool(meta["init_kwargs"]["label_dim"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        denoised = net(io["x"], io["sigma"], io.get("class_labels"))
    rel = (denoised - io["denoised"]).abs().max() / io["denoised"].abs().max()
    assert rel < 1e-5, float(rel)
    # run-time weight normalisation only: inference never rewrites the (unnormalised) stored weights
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_logvar_head_runs_and_labels_matter():
    net, _, folder = load_case("edm2_latent_cond")
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        d, logvar = net(io["x"], io["sigma"], io["class_labels"], return_logvar=True)
        other = net(io["x"], io["sigma"], io["class_labels"].roll(1, dims=1))
    assert logvar.shape == (io["x"].shape[0], 1, 1, 1) and torch.isfinite(logvar).all()
    assert not torch.allclose(d, other)


def test_forced_weight_normalisation_only_in_training():
    torch.manual_seed(0)
    conv = MPConv(4, 8, kernel=[3, 3])
    w = conv.weight.detach().clone() * 3
    with torch.no_grad():
        conv.weight.copy_(w)
        x = torch.randn(2, 4, 5, 5)
        y_eval = conv.eval()(x)
        assert torch.equal(conv.weight, w)  # eval: normalised on the fly, stored weight untouched
        y_train = conv.train()(x)
    assert torch.allclose(conv.weight, normalize(w))  # training: forced weight normalisation (eq. 66)
    assert torch.allclose(y_eval, y_train, rtol=1e-3, atol=1e-3)  # scale-invariant up to normalize()'s eps


def test_full_size_img512_xs_manifest():
    ref = json.loads(need_shared("fixtures", "edm2", "edm2_img512_xs_keys.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        net = build_precond("Precond", ref["init_kwargs"])
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["keys"]
    assert count_parameters(net) == ref["params"] == 124_713_253
