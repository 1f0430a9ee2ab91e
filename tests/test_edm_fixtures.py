"""The EDM networks and sampler reproduce the official NVlabs/edm code (../shared/fixtures/edm)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aid_cli.backbones.edm import build_precond, count_parameters
from aid_cli.sampling.heun import edm_sigmas, sample
from aid_cli.task import Task

from .conftest import load_fixture_net, need_shared

CASES = ["edm_ddpmpp_uncond", "edm_ncsnpp_uncond", "ve_ncsnpp_uncond", "vp_ddpmpp_cond"]


def load_case(case):
    return load_fixture_net("edm", case, build_precond)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_names_and_shapes_match_official(case):
    net, meta, _ = load_case(case)
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == meta["keys"]


@pytest.mark.parametrize("case", CASES)
def test_denoised_matches_official_forward(case):
    net, _, folder = load_case(case)
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        denoised = net(io["x"], io["sigma"], io.get("class_labels"))
    rel = (denoised - io["denoised"]).abs().max() / io["denoised"].abs().max()
    assert rel < 1e-5


@pytest.mark.parametrize("manifest", ["ffhq64_ddpmpp_keys.json", "ffhq64_ncsnpp_keys.json"])
def test_full_size_ffhq64_manifest(manifest):
    ref = json.loads(need_shared("fixtures", "edm", manifest).read_text())
    with torch.device("meta"):  # shapes only, no memory
        net = build_precond("EDMPrecond", ref["init_kwargs"])
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["keys"]
    assert count_parameters(net) == ref["params"]
    if "ddpmpp" in manifest:
        assert ref["params"] == 61_805_571


@pytest.mark.parametrize("steps", [12, 18])
def test_sampler_matches_official_edm_sampler(steps):
    net, _, folder = load_case("edm_ddpmpp_uncond")
    ref = load_file(str(folder / "sampler.safetensors"))
    z = ref["latents"]
    empty = Task(y=torch.zeros_like(z), M=torch.zeros(z.shape[0], 1, *z.shape[2:]))
    result = sample(net, empty, num_steps=steps, latents=z)
    assert result.nfe == 2 * steps - 1
    assert (result.x - ref[f"images_steps{steps}"]).abs().max() < 1e-4


def test_sigma_grid():
    s = edm_sigmas(18)
    assert s.dtype == torch.float32 and len(s) == 19
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002) and s[18].item() == 0
    assert torch.all(s[1:] < s[:-1])
