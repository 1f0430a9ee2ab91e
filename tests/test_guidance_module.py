"""The guidance module itself: the actor's and critic's shapes and layers, deployment through the `aid` method (the
policy's mean, the task stem once per solve, a channels-last copy on CPU, D(X_n; σ_n) as an input), and the module
from `aid train` to `aid inpaint --guidance`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.backbones.edm import count_parameters
from aid_cli.errors import CheckpointError
from aid_cli.guidance.checkpoint import load_guidance, save_guidance
from aid_cli.guidance.networks import Actor, Critic, constant_map_conv, noise_embedding
from aid_cli.methods import get_method
from aid_cli.sampling.heun import SamplerState, edm_sigmas, sample, sample_generators

from .conftest import TINY_KWARGS
from .guidance_helpers import tiny_data, tiny_task  # noqa: F401


def test_shapes_zero_init_and_budget():
    actor, critic = Actor(width=16), Critic(width=16)
    task, x0 = tiny_task()
    sigma = torch.tensor([80.0, 0.002])
    assert actor(sigma, x0, task.M, task.y).shape == x0.shape
    assert torch.equal(actor(sigma, x0, task.M, task.y), torch.zeros_like(x0))  # starts as the unguided sampler
    assert critic(sigma, x0, task.M, task.y).shape == (2,)
    # the default actor for the official 61.8 M EDM-64 backbone stays under 1 % of it
    assert count_parameters(Actor(width=64)) < 0.01 * 61_805_571


def test_deployment_uses_the_mean_and_checks_the_backbone(tiny_net, tmp_path):
    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    path = save_guidance(tmp_path / "g.safetensors", actor, dict(channels=3, width=8, emb_dim=16), "a" * 64)
    task, _ = tiny_task()
    method = get_method("aid", actor=load_guidance(path, backbone_sha256="a" * 64)[0])
    out = sample(tiny_net, task, method, num_steps=3, seed=0)
    assert out.nfe == 5 and out.backward == 0
    plain = sample(tiny_net, task, get_method("unguided"), num_steps=3, seed=0)
    assert not torch.allclose(out.completed, plain.completed)
    again = sample(tiny_net, task, get_method("aid", actor=load_guidance(path)[0]), num_steps=3, seed=0)
    assert torch.equal(out.completed, again.completed)  # deterministic: the policy's mean
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_guidance(path, backbone_sha256="b" * 64)
    assert TINY_KWARGS["img_resolution"] == 16


def test_deployment_runs_the_task_stem_once_per_solve_with_the_same_result(tiny_net):
    torch.manual_seed(0)
    actor = Actor(width=8).requires_grad_(False)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    task, _ = tiny_task()
    calls = []
    actor.stem_in.register_forward_hook(lambda *a: calls.append(1))
    cached = sample(tiny_net, task, get_method("aid", actor=actor), num_steps=4, seed=0)
    assert len(calls) == 1  # once per solve, not once per step
    x = torch.randn_like(task.y)
    sigma = torch.full((2,), 1.3)
    with torch.no_grad():
        assert torch.allclose(actor(sigma, x, task.M, task.y, actor.condition(task.M, task.y)),
                              actor(sigma, x, task.M, task.y), atol=0)
    policy = get_method("aid", actor=actor.requires_grad_(True))
    s = SamplerState(net=tiny_net, task=task, sigmas=edm_sigmas(4), generators=sample_generators(0, 2))
    calls.clear()
    with torch.enable_grad():  # with gradients (backprop training) each step runs the stem in its own graph
        for n in range(4):
            assert policy.drift(s, n, x, None, s.sigmas[n]).requires_grad
    assert len(calls) == 4
    assert cached.nfe == 7


def test_cpu_deployment_runs_a_channels_last_copy_with_the_same_field(tiny_net):
    """Without gradients on CPU the policy's mean comes from a channels-last copy of the actor: the same field (to
    float rounding), returned NCHW, and the loaded module itself is left as it was."""
    torch.manual_seed(0)
    actor = Actor(width=8, denoised_input=True).requires_grad_(False)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    task, _ = tiny_task()
    policy = get_method("aid", actor=actor)
    s = SamplerState(net=tiny_net, task=task, sigmas=edm_sigmas(4), generators=sample_generators(0, 2))
    policy.setup(s)
    x, D = torch.randn(2, *task.y.shape)
    with torch.no_grad():
        a = policy.drift(s, 1, x, D, s.sigmas[1])
        want = actor(s.sigmas[1].expand(2), x, task.M, task.y, None, D)
    fast = policy._solve[0]  # the per-solve copy
    assert fast is not actor and fast.out.weight.is_contiguous(memory_format=torch.channels_last)
    assert a.is_contiguous() and torch.allclose(a, want, atol=1e-5, rtol=1e-4) and a.abs().max() > 1e-3
    assert actor.out.weight.is_contiguous()  # the module's own weights keep their layout


@pytest.mark.parametrize("denoised", [False, True])
@pytest.mark.parametrize("size", [(1, 2), (3, 5), (16, 16)])
def test_first_layer_in_parts_equals_the_conv_of_the_concatenation(denoised, size):
    """The trunk's first conv runs as task part + state part + embedding part (the embedding's over a 3×3 map); it
    must give what one conv over the concatenated channels gives, at every image size, edges included."""
    torch.manual_seed(0)
    for net in (Actor(width=8, emb_dim=6, denoised_input=denoised), Critic(width=8, emb_dim=6, denoised_input=denoised)):
        torch.nn.init.normal_(net.trunk_in.bias)
        B, (H, W) = 3, size
        x, y, D = torch.randn(3, B, 3, H, W)
        M = (torch.rand(B, 1, H, W) > 0.5).float()
        sigma = torch.tensor([0.01, 1.3, 70.0])
        with torch.no_grad():
            stem = net.stem(net.stem_in(torch.cat([M, y], dim=1)))
            c_in = (1 / (sigma ** 2 + 0.25).sqrt())[:, None, None, None]
            emb = noise_embedding(sigma, 6)[:, :, None, None].expand(-1, -1, H, W)
            state = [c_in * x] + ([D, M * (y - D)] if denoised else [])
            want = net.trunk_in(torch.cat([stem, *state, emb], dim=1))  # the layer as one conv
            seen = []
            hook = net.trunk.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            got = net.features(sigma, x, M, y, denoised=D if denoised else None)
            hook.remove()
            assert torch.allclose(seen[0], want, atol=1e-5, rtol=1e-5)  # the trunk's input (norms would magnify ulps)
            assert torch.allclose(net.features(sigma, x, M, y, net.condition(M, y), D if denoised else None), got,
                                  atol=0, rtol=0)
        e = torch.randn(B, 6)
        w = torch.randn(4, 6, 3, 3)
        assert torch.allclose(constant_map_conv(e, w, (H, W)),
                              torch.nn.functional.conv2d(e[:, :, None, None].expand(-1, -1, H, W), w, padding=1),
                              atol=1e-5)


def test_denoised_input_actor_reads_the_steps_own_estimate(tiny_net, tmp_path):
    """An actor with `denoised_input` gets D(X_n; σ_n) of the step it steers, at no extra NFE, and round-trips."""
    torch.manual_seed(0)
    actor = Actor(width=8, denoised_input=True)
    torch.nn.init.normal_(actor.out.weight, std=0.1)
    assert count_parameters(actor) == count_parameters(Actor(width=8)) + 2 * 3 * 8 * 9  # D and M ⊙ (y − D) channels
    task, x0 = tiny_task()
    sigma = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="denoised"):
        actor(sigma, x0, task.M, task.y)
    seen = []

    class Watched(type(get_method("aid", actor=actor))):
        def drift(self, s, n, x, denoised, sigma):
            with torch.no_grad():
                seen.append(torch.equal(denoised, s.net(x, s.sigmas[n].expand(x.shape[0]), None)))
            return super().drift(s, n, x, denoised, sigma)

    out = sample(tiny_net, task, Watched(actor=actor), num_steps=4, seed=0)
    assert seen == [True] * 4
    assert out.nfe == sample(tiny_net, task, get_method("unguided"), num_steps=4, seed=0).nfe == 7
    assert not torch.allclose(out.x, sample(tiny_net, task, get_method("unguided"), num_steps=4, seed=0).x)
    save_guidance(tmp_path / "g.safetensors", actor, dict(channels=3, width=8, emb_dim=16, denoised_input=True), "ab")
    loaded, _ = load_guidance(tmp_path / "g.safetensors", backbone_sha256="ab")
    again = sample(tiny_net, task, get_method("aid", actor=loaded), num_steps=4, seed=0)
    assert torch.equal(again.x, out.x)


def test_cli_train_then_inpaint_with_the_module(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from aid_cli.cli import main

    out = tmp_path / "run"
    main(["train", "--dataset", str(tiny_data), "--out", str(out), "--backbone", str(tiny_checkpoint), "--steps", "3",
          "--batch", "2", "--iters", "2", "--width", "8", "--device", "cpu"])
    guidance = out / "guidance.safetensors"
    assert guidance.is_file()
    image, mask = tiny_data / "0.png", tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(mask)
    main(["inpaint", str(image), "--mask", str(mask), "-o", str(tmp_path / "o.png"), "--model", str(tiny_checkpoint),
          "--method", "aid", "--guidance", str(guidance), "--steps", "3", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == "aid" and record["nfe"] == 5


def test_named_dataset_that_is_not_offline_fails_at_once(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    from aid_cli.cli import main

    monkeypatch.setenv("AID_DATA", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "ffhq", "--out", str(tmp_path / "r"), "--backbone", str(tiny_checkpoint)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "dataset_tool.py" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_guidance_for_another_backbone_is_refused_by_inpaint(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from aid_cli.cli import main

    path = save_guidance(tmp_path / "g.safetensors", Actor(width=8), dict(channels=3, width=8, emb_dim=16), "f" * 64)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(mask)
    with pytest.raises(SystemExit) as e:
        main(["inpaint", str(tiny_data / "0.png"), "--mask", str(mask), "-o", str(tmp_path / "o.png"), "--model",
              str(tiny_checkpoint), "--method", "aid", "--guidance", str(path), "--steps", "3"])
    assert e.value.code == 2 and "trained on backbone" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
