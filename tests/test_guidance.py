"""AID's actor–critic: networks, the policy-gradient term, a few training iterations, exact resume, deployment."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aid_cli.fileio import sha256_file
from aid_cli.errors import CheckpointError, UserError
from aid_cli.data.masks import VALIDATION_MASK_SEED
from aid_cli.guidance.checkpoint import load_guidance, save_guidance
from aid_cli.backbones.edm import count_parameters
from aid_cli.guidance.networks import Actor, Critic, constant_map_conv, noise_embedding
from aid_cli.guidance.trainer import STATE_FILE, TrainConfig, actor_critic_losses, rollout, train
from aid_cli.methods import get_method
from aid_cli.sampling.heun import SamplerState, edm_sigmas, sample, sample_generators
from aid_cli.task import Task

from .conftest import TINY_KWARGS, run_cli


def tiny_task(n=2, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    M = torch.ones(n, 1, res, res)
    M[:, :, 3:11, 4:12] = 0
    return Task.from_image(x0, M), x0


def test_shapes_zero_init_and_budget():
    actor, critic = Actor(width=16), Critic(width=16)
    task, x0 = tiny_task()
    sigma = torch.tensor([80.0, 0.002])
    assert actor(sigma, x0, task.M, task.y).shape == x0.shape
    assert torch.equal(actor(sigma, x0, task.M, task.y), torch.zeros_like(x0))  # starts as the unguided sampler
    assert critic(sigma, x0, task.M, task.y).shape == (2,)
    # the default actor for the official 61.8 M EDM-64 backbone stays under 1 % of it
    assert count_parameters(Actor(width=64)) < 0.01 * 61_805_571


def test_log_prob_gradient_matches_autograd():
    """∇_φ log π(a|x) = ((a − μ)/γ)·∇_φ μ: the surrogate the trainer descends has exactly that gradient."""
    torch.manual_seed(0)
    actor = Actor(width=8).double()
    torch.nn.init.normal_(actor.out.weight, std=0.1)
    task, x = tiny_task(n=1)
    task, x = Task(y=task.y.double(), M=task.M.double()), x.double()
    sigma, gamma = torch.tensor([1.5], dtype=torch.float64), 0.3
    with torch.no_grad():
        a = actor(sigma, x, task.M, task.y) + gamma ** 0.5 * torch.randn_like(x)
    mu = actor(sigma, x, task.M, task.y)
    log_pi = -((a - mu) ** 2).sum() / (2 * gamma)
    g_auto = torch.autograd.grad(log_pi, list(actor.parameters()))
    mu = actor(sigma, x, task.M, task.y)
    g_formula = torch.autograd.grad(mu, list(actor.parameters()), grad_outputs=(a - mu.detach()) / gamma)
    for ga, gf in zip(g_auto, g_formula):
        assert torch.allclose(ga, gf, atol=1e-10, rtol=1e-10)
    # and the true Gaussian log-density differs from the surrogate only by a constant
    dist = torch.distributions.Normal(mu.detach(), gamma ** 0.5)
    const = dist.log_prob(a).sum() - (-((a - mu.detach()) ** 2).sum() / (2 * gamma))
    assert torch.isclose(const, torch.tensor(-0.5 * a.numel() * np.log(2 * np.pi * gamma), dtype=const.dtype), rtol=1e-5)


def test_td_residuals_use_terminal_target(tiny_net):
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, gamma=0.1)
    actor, critic = Actor(width=8), Critic(width=8)
    X, A, X_N, _ = rollout(tiny_net, actor, task, 3, cfg.gamma, sample_generators(0, 2))
    assert X.shape == (3, 2, 3, 16, 16) and A.shape == X.shape
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, edm_sigmas(3))
    with torch.no_grad():
        V = torch.stack([critic(edm_sigmas(3)[n].expand(2), X[n], task.M, task.y) for n in range(3)])
    r = 0.25 * ((A ** 2).mean(dim=(2, 3, 4)) - 0.1) / 3
    # the last residual closes on ℓ(X_N), the others on the next state's value
    assert torch.allclose(out["delta"][-1], out["terminal"] - V[-1] + r[-1], atol=1e-5)
    assert torch.allclose(out["delta"][0], V[1] - V[0] + r[0], atol=1e-5)


@pytest.fixture
def tiny_data(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def cfg_for(data, out, backbone, **kw):
    base = dict(dataset=str(data), out=str(out), backbone=str(backbone), steps=3, batch=4, iters=6, width=8,
                critic_width=8, lr_actor=1e-3, lr_critic=3e-3, val_every=3, val_n=2, checkpoint_every=3,
                val_dataset=str(data), val_offset=0, mask_bank=16, estimator="score", seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_updates_both_networks_and_lowers_td_loss(tiny_data, tiny_checkpoint, tmp_path):
    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, iters=40, val_every=20, checkpoint_every=20,
                        lr_actor=1e-4),  # eq. 11's noisy actor at 1e-3 moves the critic's target faster than it learns
                progress=False, log=lambda *a: None)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[0]["iteration"] == 0 and "val_psnr_hole_18" in stats[0]  # the unguided starting point
    stats = stats[1:]
    first, last = np.mean([s["critic_loss"] for s in stats[:5]]), np.mean([s["critic_loss"] for s in stats[-5:]])
    assert last < first
    assert "val_psnr_hole_18" in stats[19] and "val_psnr_hole_12" in stats[19]
    for key in ("delta_mean", "delta_std", "actor_grad_norm", "terminal", "control_energy"):
        assert np.isfinite(stats[-1][key])
    state = load_file(str(run / STATE_FILE))
    actor_out = state["actor.out.weight"]
    assert actor_out.abs().sum() > 0  # moved away from the zero initialisation
    actor, info = load_guidance(run / "guidance.safetensors")
    assert info["training"]["iterations"] == 40


def test_resume_equals_uninterrupted(tiny_data, tiny_checkpoint, tmp_path):
    train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint), progress=False, log=lambda *a: None)
    train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint), max_iters=3, progress=False, log=lambda *a: None)
    train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint), resume=True, progress=False, log=lambda *a: None)
    a, b = load_file(str(tmp_path / "a" / STATE_FILE)), load_file(str(tmp_path / "b" / STATE_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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
            assert policy.drift(s, n, x, None).requires_grad
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
        a = policy.drift(s, 1, x, D)
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
        def drift(self, s, n, x, denoised):
            with torch.no_grad():
                seen.append(torch.equal(denoised, s.net(x, s.sigmas[n].expand(x.shape[0]), None)))
            return super().drift(s, n, x, denoised)

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


def test_pathwise_actor_loss_is_the_one_step_cost_to_go(tiny_net):
    """pathwise: Σ_n (β/2)·mean(μ_n²)·Δt + V_θ(t_{n+1}, Heun(X_n) + μ_n·Δt), ℓ at the end; no gradient to the critic."""
    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, gamma=0.1, estimator="pathwise")
    torch.manual_seed(0)
    actor, critic = Actor(width=8), Critic(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    sig = edm_sigmas(3)
    X, A, X_N, _ = rollout(tiny_net, actor, task, 3, cfg.gamma, sample_generators(0, 2))
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, sig)
    with torch.no_grad():  # the same quantity, written out step by step from a fresh deterministic step
        mu = [actor(sig[n].expand(2), X[n], task.M, task.y) for n in range(3)]
        nxt = [X[1], X[2], X_N]
        total = 0
        for n in range(3):
            x_hat = nxt[n] - A[n] / 3 + mu[n] / 3
            v = (critic(sig[n + 1].expand(2), x_hat, task.M, task.y) if n < 2
                 else 1.0 * ((task.M * (x_hat - x0) ** 2).mean(dim=(1, 2, 3))) + 0.5 * (((1 - task.M) * (x_hat - x0) ** 2).mean(dim=(1, 2, 3))))
            total = total + 0.25 * (mu[n] ** 2).mean(dim=(1, 2, 3)) / 3 + v
    assert torch.allclose(out["actor_loss"], total.mean(), rtol=1e-5)
    out["actor_loss"].backward()
    assert all(p.grad is None for p in critic.parameters())  # the critic is held fixed in the actor's loss
    assert sum(p.grad.abs().sum() for p in actor.parameters() if p.grad is not None) > 0


def test_backprop_differentiates_the_whole_solve(tiny_net):
    """backprop: the loss is ℓ of the deterministic AID solve plus the control energy, and its gradient reaches the actor."""
    from aid_cli.guidance.trainer import backprop_loss, terminal_loss

    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, beta=0.5, estimator="backprop")
    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    out = backprop_loss(cfg, tiny_net, actor, task, x0, sample_generators(0, 2))
    with torch.no_grad():
        ref = sample(tiny_net, task, get_method("aid", actor=actor), num_steps=3, generators=sample_generators(0, 2))
    assert torch.allclose(out["terminal"], terminal_loss(ref.x, x0, task.M, 2.0, 1.0), rtol=1e-5)
    out["actor_loss"].backward()
    assert actor.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_net.parameters())  # the backbone stays frozen


def test_mix_steps_alternates_the_solves_n(tiny_net, tiny_data, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--mix-steps M: odd iterations solve at N = M, even ones at --steps, each J exactly the solve at that N; the
    stats say which N each line's solve used; the actor-critic estimators refuse it in one line."""
    import json

    from aid_cli.guidance.trainer import backprop_loss, rollout_steps, terminal_loss

    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, mix_steps=2, estimator="backprop")
    assert [rollout_steps(cfg, it) for it in range(4)] == [3, 2, 3, 2]
    assert rollout_steps(dataclasses.replace(cfg, mix_steps=0), 1) == 3
    task, x0 = tiny_task()
    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    out = backprop_loss(cfg, tiny_net, actor, task, x0, sample_generators(0, 2), steps=2)
    with torch.no_grad():
        ref = sample(tiny_net, task, get_method("aid", actor=actor), num_steps=2, generators=sample_generators(0, 2))
    assert torch.allclose(out["terminal"], terminal_loss(ref.x, x0, task.M, 2.0, 1.0), rtol=1e-5)
    from aid_cli.guidance import trainer

    used = []

    def spy(*args, steps=None, **kw):
        used.append(steps)
        return backprop_loss(*args, steps=steps, **kw)

    monkeypatch.setattr(trainer, "backprop_loss", spy)
    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=4, mix_steps=2),
                progress=False, log=lambda *a: None)
    lines = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert used == [3, 2, 3, 2]  # the solves the steps ran …
    assert [(r["iteration"], r["steps"]) for r in lines if "actor_loss" in r] == [(1, 3), (2, 2), (3, 3), (4, 2)]
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "s", "--backbone", tiny_checkpoint,
                            "--estimator", "score", "--mix-steps", "2", "--device", "cpu"], capsys)
    assert code == 2 and "--mix-steps" in err and "Traceback" not in err


FIXED_SCORE = dict(explore="scaled", critic="privileged", td_lambda=1.0, normalize_advantage=True)


@pytest.mark.parametrize("estimator,denoised,extra", [("pathwise", False, {}), ("proxy", False, {}),
                                                      ("score", True, {}), ("backprop", True, {}),
                                                      ("score", False, FIXED_SCORE)])
def test_variants_train_and_resume_exactly(estimator, denoised, extra, tiny_data, tiny_checkpoint, tmp_path):
    kw = dict(estimator=estimator, iters=4, val_every=4, checkpoint_every=2, denoised_input=denoised, **extra)
    run = train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, **kw), progress=False, log=lambda *a: None)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()][1:]
    assert len(stats) == 4 and np.isfinite(stats[-1]["terminal"]) and "val_psnr_hole_18" in stats[-1]
    assert "val_lpips_18" not in stats[-1]  # 16 px: below LPIPS's smallest size
    assert ("critic_loss" in stats[-1]) == (estimator not in ("proxy", "backprop"))
    train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw), max_iters=2, progress=False, log=lambda *a: None)
    train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw), resume=True, progress=False, log=lambda *a: None)
    a, b = load_file(str(tmp_path / "a" / STATE_FILE)), load_file(str(tmp_path / "b" / STATE_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_holdout_keeps_photos_out_of_training_for_validation(tiny_photos, tiny_checkpoint, tmp_path):
    from aid_cli.data.datasets import load_photo_set
    from aid_cli.guidance.trainer import split_holdout

    photos = load_photo_set(tiny_photos)
    names = list(photos.names)
    held = split_holdout(photos, 2)
    assert held.names == [names[1], names[3]] and photos.names == [names[0], names[2]]
    assert not set(held.names) & set(photos.names) and len(held.photos) == 2
    with pytest.raises(UserError):
        split_holdout(load_photo_set(tiny_photos), 9)
    logs = []
    run = train(cfg_for(tiny_photos, tmp_path / "h", tiny_checkpoint, estimator="backprop", mask_bank=8, val_n=2,
                        holdout=2, val_dataset=None, iters=1, val_every=1), progress=False, log=logs.append)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert "val_psnr_hole_18" in stats[-1]  # validated on the held-out photos (no --val given)
    assert a["actor.out.weight"].abs().sum() > 0
    actor, info = load_guidance(run / "guidance.safetensors")
    assert actor.denoised_input == denoised and info["actor"].get("denoised_input", False) == denoised
    # every checkpoint's module is kept; the last one is the run's module
    snaps = sorted(p.name for p in (run / "modules").iterdir())
    assert snaps == ["guidance-000002.safetensors", "guidance-000004.safetensors"]
    assert (run / "modules" / snaps[-1]).read_bytes() == (run / "guidance.safetensors").read_bytes()
    assert load_guidance(run / "modules" / snaps[0])[1]["training"]["iterations"] == 2
    # the critic (privileged or not) is training state only: the deployable module holds the actor's weights alone
    assert all(k.startswith("critic.") == (k not in actor.state_dict() and not k.startswith(("actor", "opt")))
               for k in a)
    assert set(load_file(str(run / "guidance.safetensors"))) == set(actor.state_dict())


def test_init_warm_starts_the_actor_and_refuses_another_architecture(tiny_data, tiny_checkpoint, tmp_path):
    """--init: iteration 0 of the new run is the given module (its validation PSNR included), the run records the
    module's sha256, and a module of another width is refused in one line."""
    first = train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, estimator="backprop", iters=3),
                  progress=False, log=lambda *a: None)
    module = first / "guidance.safetensors"
    run = train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, estimator="backprop", iters=1, lr_actor=0.0,
                        init=str(module)), progress=False, log=lambda *a: None)  # lr 0: the actor stays as loaded
    a, b = load_file(str(module)), load_file(str(run / "guidance.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["out.weight"].abs().sum() > 0
    val_a = json.loads((first / "stats.jsonl").read_text().splitlines()[-1])["val_psnr_hole_18"]
    val_b = json.loads((run / "stats.jsonl").read_text().splitlines()[0])["val_psnr_hole_18"]
    assert val_b == pytest.approx(val_a, abs=1e-5)  # the new run starts where the module ended
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == str(module) and cfg["init_sha256"] == sha256_file(module)
    with pytest.raises(UserError, match="--init .* differs"):
        train(cfg_for(tiny_data, tmp_path / "c", tiny_checkpoint, width=4, init=str(module)), max_iters=0,
              progress=False, log=lambda *a: None)


@pytest.mark.parametrize("estimator", ["score", "backprop"])
def test_bf16_backbone_in_rollouts_trains_close_to_fp32(estimator, tiny_data, tiny_net, tmp_path):
    from aid_cli import devices
    from aid_cli.backbones.checkpoint import save_backbone

    if not devices._autocast_runs(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch has no bfloat16 autocast on CPU")
    for p in tiny_net.parameters():  # the network's output layer starts at zero: perturb it so precision shows
        p.add_(0.05 * torch.randn_like(p))
    busy = save_backbone(tmp_path / "busy.safetensors", tiny_net, "EDMPrecond", dict(TINY_KWARGS))
    kw = dict(estimator=estimator, iters=1, val_every=100, checkpoint_every=1)
    runs = {p: train(cfg_for(tiny_data, tmp_path / p, busy, precision=p, **kw), progress=False,
                     log=lambda *a: None) for p in ("fp32", "bf16")}
    ell = {p: json.loads((r / "stats.jsonl").read_text().splitlines()[-1])["terminal"] for p, r in runs.items()}
    assert ell["fp32"] != ell["bf16"] and ell["bf16"] == pytest.approx(ell["fp32"], rel=0.05)
    actor = load_file(str(runs["bf16"] / STATE_FILE))
    assert all(v.dtype == torch.float32 for k, v in actor.items() if k.startswith(("actor.", "critic.")))


def test_sigterm_saves_state_and_module_then_resume_continues(tiny_data, tiny_checkpoint, tmp_path, monkeypatch):
    from .conftest import sigterm_at_call

    sigterm_at_call(monkeypatch, 2)
    logs = []
    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, iters=50, checkpoint_every=40, val_every=40),
                progress=False, log=logs.append)
    assert any("stopped at iteration 2" in str(line) for line in logs)
    assert load_guidance(run / "guidance.safetensors")[0] is not None
    monkeypatch.undo()
    train(cfg_for(tiny_data, run, tiny_checkpoint, iters=4, checkpoint_every=40, val_every=40), resume=True,
          progress=False, log=lambda *a: None)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in stats if "actor_loss" in r] == [1, 2, 3, 4]


def test_unknown_estimator_is_one_line(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from .conftest import run_cli

    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "r", "--backbone", tiny_checkpoint,
                            "--estimator", "magic"], capsys)
    assert code == 2 and "'magic' is not one of" in err and "Traceback" not in err  # a choice: click's usage error


def test_curves_png_from_a_run(tiny_data, tiny_checkpoint, tmp_path):
    from aid_cli.plots import training_curves
    from aid_cli.training import read_jsonl as read_stats

    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint), progress=False, log=lambda *a: None)
    im = Image.open(run / "curves.png")  # written with every checkpoint
    assert im.size == (960, 640)
    stats = read_stats(run / "stats.jsonl")
    path = training_curves(stats + [{"iteration": 7, "terminal": float("nan")}], tmp_path / "c.png", "t")
    assert np.asarray(Image.open(path)).std() > 0  # not a blank image
    empty = training_curves([], tmp_path / "e.png", "no stats yet")  # a fresh run: panels say "not recorded"
    assert empty.is_file()


def test_curves_of_a_run_without_critic_show_validation_lpips():
    from aid_cli.plots import LPIPS_PANEL, PANELS, curve_panels

    backprop = [{"iteration": 1, "terminal": 0.1}, {"iteration": 25, "val_psnr_hole_18": 15.0, "val_lpips_18": 0.13}]
    assert curve_panels(backprop)[2] == LPIPS_PANEL and len(curve_panels(backprop)) == 4
    score = backprop + [{"iteration": 2, "critic_loss": 0.5}]
    assert curve_panels(score) == PANELS  # the critic's TD loss where there is a critic
    assert curve_panels(backprop[:1]) == PANELS  # nothing to show yet: the panel says "not recorded"


def _lpips_or_skip():
    from aid_cli.metrics.lpips import LPIPSUnavailable, load_lpips

    try:
        return load_lpips(offline=True)
    except LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights unavailable: {e}")


def test_curves_of_a_mix_steps_run_draw_one_series_per_n(tmp_path):
    """--mix-steps alternates N: the terminal loss and control energy are drawn per N, validation as it is."""
    from aid_cli.plots import curve_series, training_curves

    stats = [{"iteration": 0, "val_psnr_hole_18": 14.0}] + \
            [{"iteration": i, "terminal": 0.1 + i, "control_energy": 1.0, "steps": 18 if i % 2 else 12}
             for i in range(1, 7)]
    split = curve_series(stats, "terminal", None)
    assert [(label, xs, ys) for label, xs, ys in split] == [("N = 18", [1, 3, 5], [1.1, 3.1, 5.1]),
                                                            ("N = 12", [2, 4, 6], [2.1, 4.1, 6.1])]
    assert curve_series(stats, "val_psnr_hole_18", "N = 18 (35 NFE)") == [("N = 18 (35 NFE)", [0], [14.0])]
    one_n = [dict(s, steps=18) for s in stats[1:]]
    assert curve_series(one_n, "terminal", None) == [(None, [1, 2, 3, 4, 5, 6], [s["terminal"] for s in one_n])]
    assert training_curves(stats, tmp_path / "c.png", "mix").is_file()


def test_terminal_cost_adds_lpips_of_the_completed_image():
    """--lambda-lpips: ℓ (eq. 2) + λ·LPIPS(M ⊙ x0 + M̄ ⊙ x, x0); its gradient reaches only the hole's pixels."""
    from aid_cli.guidance.trainer import terminal_cost, terminal_loss

    model = _lpips_or_skip()
    task, x0 = tiny_task(res=32)
    x = (torch.rand_like(x0) * 2 - 1).requires_grad_(True)
    plain = TrainConfig(dataset="", out="", backbone="")
    assert torch.equal(terminal_cost(plain, x, x0, task), terminal_loss(x, x0, task.M, 2.0, 1.0))
    cfg = TrainConfig(dataset="", out="", backbone="", lambda_vis=0.0, lambda_hole=0.0, lambda_lpips=0.5)
    ell = terminal_cost(cfg, x, x0, task, model)
    completed = task.M * x0 + (1 - task.M) * x
    assert torch.allclose(ell, 0.5 * model(completed, x0), rtol=1e-6) and (ell > 0).all()
    ell.sum().backward()
    visible = task.M.expand_as(x).bool()
    assert x.grad[visible].abs().max() == 0 and x.grad[~visible].abs().sum() > 0
    with pytest.raises(ValueError, match="LPIPS model"):
        terminal_cost(cfg, x, x0, task)


def test_terminal_cost_adds_ssim_dissimilarity_of_the_completed_image():
    """--lambda-ssim: ℓ (eq. 2) + λ·(1 − SSIM(M ⊙ x0 + M̄ ⊙ x, x0)), the SSIM aid reports; its gradient reaches only
    the hole's pixels, and a perfect fill costs nothing."""
    from aid_cli.guidance.trainer import terminal_cost, terminal_loss
    from aid_cli.metrics.quality import ssim_01

    task, x0 = tiny_task(res=16)
    x = (torch.rand_like(x0) * 2 - 1).requires_grad_(True)
    cfg = TrainConfig(dataset="", out="", backbone="", lambda_ssim=0.3)
    ell = terminal_cost(cfg, x, x0, task)
    completed = task.M * x0 + (1 - task.M) * x
    expected = terminal_loss(x, x0, task.M, 2.0, 1.0) + 0.3 * (1 - ssim_01(completed, x0))
    assert torch.allclose(ell, expected, rtol=1e-6) and (ell > terminal_loss(x, x0, task.M, 2.0, 1.0)).all()
    ssim_only = TrainConfig(dataset="", out="", backbone="", lambda_vis=0.0, lambda_hole=0.0, lambda_ssim=0.3)
    terminal_cost(ssim_only, x, x0, task).sum().backward()
    visible = task.M.expand_as(x).bool()
    assert x.grad[visible].abs().max() == 0 and x.grad[~visible].abs().sum() > 0
    assert torch.allclose(terminal_cost(cfg, x0.clone(), x0, task), torch.zeros(2), atol=1e-6)


def test_lambda_ssim_trains_validates_ssim_and_is_refused_where_it_cannot_apply(tiny_data, tiny_checkpoint, tmp_path,
                                                                               capsys):
    from .conftest import run_cli

    kw = dict(estimator="backprop", iters=2, batch=2, val_every=2, checkpoint_every=2)
    runs = {lam: train(cfg_for(tiny_data, tmp_path / f"lam{lam}", tiny_checkpoint, lambda_ssim=lam, **kw),
                       progress=False, log=lambda *a: None) for lam in (0.0, 1.0)}
    stats = {lam: [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
             for lam, run in runs.items()}
    # validation reports SSIM of the completed images beside the hole PSNR, at the start and after training
    assert all(0 < s[f"val_ssim_{N}"] <= 1 for lam in runs for s in (stats[lam][0], stats[lam][-1]) for N in (18, 12))
    # the same tasks, so the first iteration's terminal cost differs by the SSIM term alone (> 0)
    assert stats[1.0][1]["terminal"] > stats[0.0][1]["terminal"]
    assert json.loads((runs[1.0] / "config.json").read_text())["lambda_ssim"] == 1.0
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "p", "--backbone", tiny_checkpoint,
                            "--lambda-ssim", "0.5", "--estimator", "score", "--critic", "privileged"], capsys)
    assert code == 2 and "drop --lambda-lpips and --lambda-ssim" in err and len(err.strip().splitlines()) == 1


def test_actor_cost_script_times_calls_and_whole_solves(tiny_checkpoint, tmp_path, capsys):
    """scripts/actor_cost.py runs on any backbone and module: per-call milliseconds in both layouts, then whole solves
    unguided and AID-18 in turn with the actor's share (a timing tool: only its shape is checked here)."""
    import importlib.util

    torch.manual_seed(0)
    actor = Actor(width=8, denoised_input=True)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    path = save_guidance(tmp_path / "g.safetensors", actor, dict(channels=3, width=8, emb_dim=16, denoised_input=True),
                         sha256_file(tiny_checkpoint))
    spec = importlib.util.spec_from_file_location("actor_cost", Path(__file__).parents[1] / "scripts" / "actor_cost.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from aid_cli.methods.aid import AID

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


def test_lambda_lpips_trains_at_32_pixels_and_is_refused_below_31(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from aid_cli.backbones.checkpoint import save_backbone
    from aid_cli.backbones.edm import build_precond

    from .conftest import run_cli

    _lpips_or_skip()
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "r", "--backbone", tiny_checkpoint,
                            "--lambda-lpips", "1"], capsys)
    assert code == 2 and "at least 31x31 pixels" in err and len(err.strip().splitlines()) == 1
    kwargs = dict(TINY_KWARGS, img_resolution=32, attn_resolutions=[16])
    torch.manual_seed(0)
    net32 = tmp_path / "tiny32.safetensors"
    save_backbone(net32, build_precond("EDMPrecond", kwargs), "EDMPrecond", kwargs, provenance={"note": "test"})
    folder = tmp_path / "imgs32"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    kw = dict(estimator="backprop", iters=2, batch=2, val_every=2, checkpoint_every=2)
    runs = {lam: train(cfg_for(folder, tmp_path / f"lam{lam}", net32, lambda_lpips=lam, **kw), progress=False,
                       log=lambda *a: None) for lam in (0.0, 1.0)}
    stats = {lam: [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()][1:]
             for lam, run in runs.items()}
    # validation reports the completed images' LPIPS beside the hole PSNR at 31 px and more (not at 16)
    assert all(0 < stats[lam][-1][f"val_lpips_{N}"] < 2 for lam in runs for N in (18, 12))
    # the same tasks, so the first iteration's terminal cost differs by the LPIPS term alone (> 0)
    assert stats[1.0][0]["terminal"] > stats[0.0][0]["terminal"]
    assert json.loads((runs[1.0] / "config.json").read_text())["lambda_lpips"] == 1.0
    a = load_file(str(runs[0.0] / STATE_FILE))["actor.out.weight"]
    b = load_file(str(runs[1.0] / STATE_FILE))["actor.out.weight"]
    assert not torch.equal(a, b)


def test_resume_of_a_run_older_than_a_setting_keeps_its_default(tiny_data, tiny_checkpoint, tmp_path):
    """A run whose config.json predates a setting continues with that setting's default, not the new command's value."""
    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=2), max_iters=1,
                progress=False, log=lambda *a: None)
    saved = json.loads((run / "config.json").read_text())
    del saved["lambda_lpips"]
    (run / "config.json").write_text(json.dumps(saved))
    notes = []
    train(cfg_for(tiny_data, run, tiny_checkpoint, estimator="backprop", iters=2, lambda_lpips=1.0), resume=True,
          progress=False, log=notes.append)  # 16 px: LPIPS would be refused, so the default 0 must hold
    assert json.loads((run / "config.json").read_text())["lambda_lpips"] == 0.0


def test_ema_module_is_the_average_of_the_trained_weights_and_resumes_exactly(tiny_data, tiny_checkpoint, tmp_path):
    """--ema-halflife H: after every step φ̄ ← κ·φ̄ + (1 − κ)·φ with κ = 0.5^(1/H), φ̄ starting at φ after the first
    step; the module saved (and validated) is φ̄, the state keeps φ and φ̄, and a resumed run equals an uninterrupted
    one. Without the option a resume keeps the run's own half-life."""
    kw = dict(estimator="backprop", iters=4, checkpoint_every=1, val_every=2, ema_halflife=2.0)
    run = train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, **kw), progress=False, log=lambda *a: None)
    assert json.loads((run / "config.json").read_text())["ema_halflife"] == 2.0
    kappa = 0.5 ** (1 / 2.0)
    snapshot = lambda i: load_file(str(run / "modules" / f"guidance-{i:06d}.safetensors"))
    state = load_file(str(run / STATE_FILE))
    # φ_i after each step, from the same run without averaging (the same steps: the average never feeds back)
    plain = train(cfg_for(tiny_data, tmp_path / "p", tiny_checkpoint, **{**kw, "ema_halflife": 0.0}), progress=False,
                  log=lambda *a: None)
    raw = {i: load_file(str(plain / "modules" / f"guidance-{i:06d}.safetensors")) for i in (1, 2, 3, 4)}
    expected = dict(raw[1])
    for i in (2, 3, 4):
        expected = {k: kappa * expected[k] + (1 - kappa) * raw[i][k] for k in expected}
    for k, v in expected.items():
        assert torch.allclose(snapshot(4)[k], v, atol=1e-6), k
        assert torch.equal(state[f"actor.{k}"], raw[4][k]), k  # the optimiser trains φ itself
        assert torch.equal(state[f"actor_ema.module.{k}"], snapshot(4)[k]), k
    assert not torch.equal(snapshot(4)["out.weight"], raw[4]["out.weight"])
    assert torch.equal(load_guidance(run / "guidance.safetensors")[0].out.weight, snapshot(4)["out.weight"])

    half = train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw), max_iters=2, progress=False,
                 log=lambda *a: None)
    notes = []
    train(cfg_for(tiny_data, half, tiny_checkpoint, **{**kw, "ema_halflife": None}), resume=True, progress=False,
          log=notes.append)  # not given on --resume: the run's own half-life
    assert any("EMA (half-life 2" in n for n in notes)
    resumed = load_file(str(half / STATE_FILE))
    assert resumed.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], resumed[k]), k


def test_a_run_starts_averaging_on_resume(tiny_data, tiny_checkpoint, tmp_path):
    """--ema-halflife given on --resume of a run saved without φ̄: φ̄ starts as the φ of the first resumed step."""
    kw = dict(estimator="backprop", iters=3, checkpoint_every=1, val_every=10)
    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, **kw), max_iters=2, progress=False,
                log=lambda *a: None)
    assert not any(k.startswith("actor_ema.") for k in load_file(str(run / STATE_FILE)))
    train(cfg_for(tiny_data, run, tiny_checkpoint, **kw, ema_halflife=5.0), resume=True, progress=False,
          log=lambda *a: None)
    state = load_file(str(run / STATE_FILE))
    assert int(state["actor_ema.n_averaged"]) == 1
    assert all(torch.equal(state[k], state[f"actor_ema.module.{k[6:]}"]) for k in state if k.startswith("actor."))
    assert json.loads((run / "config.json").read_text())["ema_halflife"] == 5.0


def test_scaled_exploration_log_prob_gradient_matches_autograd(tiny_net):
    """γ_n = γ·c_u(σ_n)²: the trainer's log π (log_policy) has the gradient of the true Gaussian log-density
    N(a_n; μ_n, γ_n I) at every step, and the rollout's noise has that variance (in the actor's output units)."""
    from aid_cli.guidance.trainer import exploration_gammas, log_policy

    torch.manual_seed(0)
    cfg = TrainConfig(dataset="", out="", backbone="", steps=3, gamma=0.05, explore="scaled")
    sigmas = edm_sigmas(3)
    gammas = exploration_gammas(cfg, sigmas, 3).double()
    assert torch.allclose(gammas.float(), 0.05 * (sigmas[:3] ** 2 + 0.25))
    actor = Actor(width=8).double()
    torch.nn.init.normal_(actor.out.weight, std=0.1)
    task, x = tiny_task(n=2)
    M, y, x = task.M.double(), task.y.double(), x.double()
    X = torch.stack([x + s * torch.randn_like(x) for s in sigmas[:3].double()])
    sig = sigmas[:3].double().repeat_interleave(2)
    with torch.no_grad():
        mu0 = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
        A = mu0 + gammas.sqrt()[:, None, None, None, None] * torch.randn_like(mu0)
    mu = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
    ours = torch.autograd.grad(log_policy(A, mu, gammas).sum(), list(actor.parameters()))
    mu = actor(sig, X.flatten(0, 1), M.repeat(3, 1, 1, 1), y.repeat(3, 1, 1, 1)).reshape(X.shape)
    dist = torch.distributions.Normal(mu, gammas.sqrt()[:, None, None, None, None].expand_as(mu))
    auto = torch.autograd.grad(dist.log_prob(A).sum(), list(actor.parameters()))
    for g1, g2 in zip(ours, auto):
        assert torch.allclose(g1, g2, atol=1e-9, rtol=1e-9)
    # the rollout draws a_n − μ_n with standard deviation √γ·c_u(σ_n), as the log-density assumes
    policy = get_method("aid", actor=Actor(width=8), gamma=0.05, scaled_exploration=True)
    assert torch.allclose(policy.exploration_std(sigmas[0]), (0.05 * (80.0 ** 2 + 0.25)) ** 0.5 * torch.ones(()))
    task, _ = tiny_task(n=64)
    policy.record = True
    sample(tiny_net, task, policy, num_steps=3)
    noise = torch.stack([a for _, _, a, _ in policy.trajectory])  # the actor is zero: a_n is the noise itself
    assert torch.allclose(noise.std(dim=(1, 2, 3, 4)), gammas.float().sqrt(), rtol=0.02)


def test_monte_carlo_returns_are_the_summed_costs(tiny_net):
    """λ = 1: the critic's target at step n is G_n = Σ_{k≥n} r_k + ℓ(X_N), exactly, whatever the critic says; λ = 0
    keeps eq. 10/11's TD(0) residuals."""
    from aid_cli.guidance.trainer import lambda_advantages

    task, x0 = tiny_task()
    cfg = TrainConfig(dataset="", out="", backbone="", steps=4, beta=0.5, gamma=0.1, estimator="score", td_lambda=1.0)
    actor, critic = Actor(width=8), Critic(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    X, A, X_N, D = rollout(tiny_net, actor, task, 4, cfg.gamma, sample_generators(0, 2))
    out = actor_critic_losses(cfg, actor, critic, X, A, X_N, x0, task, edm_sigmas(4), D)
    r = 0.25 * ((A ** 2).mean(dim=(2, 3, 4)) - 0.1) / 4
    G = torch.stack([r[n:].sum(0) + out["terminal"] for n in range(4)])
    with torch.no_grad():
        V = torch.stack([critic(edm_sigmas(4)[n].expand(2), X[n], task.M, task.y) for n in range(4)])
    assert torch.allclose(V + lambda_advantages(out["delta"], 1.0), G, atol=1e-5)
    assert torch.allclose(lambda_advantages(out["delta"], 0.0), out["delta"])
    # the critic regresses on G: its loss is ½ Σ_n (G_n − V_n)², batch mean
    assert torch.isclose(out["critic_loss"], 0.5 * ((G - V) ** 2).sum(0).mean(), atol=1e-5)


def test_privileged_critic_starts_at_the_loss_of_the_denoised_estimate():
    from aid_cli.guidance.networks import PrivilegedCritic
    from aid_cli.guidance.trainer import terminal_loss

    task, x0 = tiny_task()
    critic = PrivilegedCritic(width=8, lambda_vis=2.0, lambda_hole=1.0)
    D = x0 + 0.3 * torch.randn_like(x0)
    V = critic(torch.tensor([2.0, 0.5]), x0 + torch.randn_like(x0), task.M, task.y, x0, D)
    assert torch.allclose(V, terminal_loss(D, x0, task.M, 2.0, 1.0))


def test_gradient_diagnostic_cosines_and_training_untouched(tiny_data, tiny_checkpoint, tmp_path):
    """--diag-every logs cos(estimator gradient, exact gradient) per batch size; the exact gradient agrees with itself
    at the full batch; and a run with diagnostics trains exactly as one without."""
    kw = dict(estimator="score", iters=2, val_every=100, checkpoint_every=2)
    a = train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, diag_every=1, diag_batch=4, **kw), progress=False,
              log=lambda *a: None)
    b = train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw), progress=False, log=lambda *a: None)
    sa, sb = load_file(str(a / STATE_FILE)), load_file(str(b / STATE_FILE))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rec = [json.loads(line) for line in (a / "stats.jsonl").read_text().splitlines()][-1]
    for k in (1, 2, 4):
        for name in ("score", "pathwise", "backprop"):
            assert -1 - 1e-6 <= rec[f"diag_cos_{name}_b{k}"] <= 1 + 1e-6
    assert rec["diag_cos_backprop_b4"] == pytest.approx(1.0, abs=1e-6)
    assert rec["diag_exact_grad_norm"] > 0


def test_validation_skips_the_benchmark_images_by_default(tiny_checkpoint, tmp_path, capsys):
    """The protocol benchmarks val.zip's first 100 images (--tune its first 16): validation starts after them."""
    from .conftest import run_cli

    assert TrainConfig(dataset="", out="", backbone="").val_offset == 100
    folder = tmp_path / "val"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(101):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    args = ["train", "--dataset", folder, "--val", folder, "--backbone", tiny_checkpoint, "--steps", "2", "--batch",
            "2", "--iters", "1", "--width", "8", "--device", "cpu", "--mask-bank", "8"]
    code, _, err = run_cli(args + ["--out", tmp_path / "r"], capsys)
    assert code == 0, err
    from aid_cli.guidance import trainer

    seen = []
    real = trainer.load_image_set

    def spy(path, **kw):
        seen.append(kw)
        return real(path, **kw)

    trainer.load_image_set, before = spy, trainer.load_image_set
    try:
        run_cli(args + ["--out", tmp_path / "s"], capsys)
    finally:
        trainer.load_image_set = before
    assert {"offset": 100, "limit": 64}.items() <= seen[-1].items()  # the one image left: 100.png
    (folder / "100.png").unlink()
    code, _, err = run_cli(args + ["--out", tmp_path / "t"], capsys)
    assert code == 2 and "no images after its first 100" in err and len(err.strip().splitlines()) == 1


def test_validation_masks_are_not_the_benchmarks_and_old_runs_keep_theirs(tiny_data, tiny_checkpoint, tmp_path):
    """Validation draws the evaluation families with a mask seed of its own (the protocol draws seed 0), so checkpoints
    are never picked on the benchmark's masks; a run saved before the setting resumes on the seed-0 masks it began on."""
    from aid_cli.data.masks import FAMILIES, VALIDATION_MASK_SEED, eval_masks
    from aid_cli.guidance.trainer import validation_masks

    assert TrainConfig(dataset="", out="", backbone="").val_mask_seed == VALIDATION_MASK_SEED != 0
    own, protocol = validation_masks(6, 64), validation_masks(6, 64, seed=0)
    assert torch.equal(protocol[0], eval_masks(FAMILIES[0], 1, 64, seed=0)[0])
    for i in (0, 2, 3, 5):  # free-form and strip masks differ; center (i = 1, 4) is the same square in every seed
        assert not torch.equal(own[i], protocol[i])
    assert torch.equal(own[1], protocol[1])

    run = train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=2), max_iters=1,
                progress=False, log=lambda *a: None)
    assert json.loads((run / "config.json").read_text())["val_mask_seed"] == VALIDATION_MASK_SEED
    saved = json.loads((run / "config.json").read_text())
    del saved["val_mask_seed"]
    (run / "config.json").write_text(json.dumps(saved))
    notes = []
    train(cfg_for(tiny_data, run, tiny_checkpoint, estimator="backprop", iters=2), resume=True, progress=False,
          log=notes.append)
    assert json.loads((run / "config.json").read_text())["val_mask_seed"] == 0
    assert any("val_mask_seed=0" in n for n in notes), notes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("estimator", ["backprop", "score"])
def test_torchrun_two_processes_train_and_validate_as_one(estimator, tiny_data, tiny_checkpoint, tmp_path):
    """`aid train` under torchrun: each process solves its slice of the same global batch and scores a share of the
    validation images (5 here: shares of 2 and 3, each with its own images' noise seeds); rank 0 gathers them. The
    state, the module and every logged validation number equal one process's."""
    import os
    import subprocess
    import sys

    args = ["-m", "aid_cli.cli", "train", "--dataset", str(tiny_data), "--val", str(tiny_data), "--val-offset", "0",
            "--val-n", "5", "--backbone", str(tiny_checkpoint), "--steps", "3", "--batch", "4", "--iters", "4",
            "--width", "8", *([] if estimator == "backprop" else ["--critic-width", "8"]), "--val-every", "2", "--checkpoint-every", "2", "--mask-bank", "16",
            "--lr-actor", "1e-3", "--estimator", estimator, "--seed", "3", "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(prefix, out):
        return subprocess.run([*prefix, *args, "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)

    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = launch(ddp, tmp_path / "ddp")
    if r.returncode != 0 and "Signal 6 (SIGABRT)" in r.stderr:  # torch's launcher's rare abort (test_bench's note)
        r = launch(ddp, tmp_path / "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    one = launch([sys.executable], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    read = lambda run: [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "one"), read(tmp_path / "ddp")
    assert [s["iteration"] for s in a] == [s["iteration"] for s in b] == [0, 1, 2, 3, 4]
    assert [s.get("processes") for s in b[1:]] == [2] * 4 and "processes" not in a[1]  # for CPU-hours
    val_keys = [k for k in a[0] if k.startswith("val_")]
    assert "val_psnr_hole_18" in val_keys and "val_texture_ratio_12" in val_keys and "val_ssim_18" in val_keys
    for sa, sb in zip(a, b):
        assert [k for k in sa if k.startswith("val_")] == [k for k in sb if k.startswith("val_")]
        for k in (k for k in sa if k.startswith("val_") or k in ("actor_loss", "terminal")):
            assert sb[k] == pytest.approx(sa[k], rel=1e-4, abs=1e-6), (sa["iteration"], k)
    # The networks compute the same functions. (Not their weights: a per-channel constant in the residual stream,
    # which every per-channel GroupNorm removes, has a zero gradient; Adam turns its float noise into ±lr steps.)
    sa, sb = load_file(str(tmp_path / "one" / STATE_FILE)), load_file(str(tmp_path / "ddp" / STATE_FILE))
    assert sa.keys() == sb.keys()
    torch.manual_seed(0)
    sigma, x, y = torch.tensor([2.0, 0.3]), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    M = torch.ones(2, 1, 16, 16)
    M[:, :, 4:12, 4:12] = 0
    critic_width = 16 if estimator == "backprop" else 8  # backprop trains no critic: --critic-width is refused there
    for net, prefix in ((Actor(channels=3, width=8, emb_dim=16), "actor."),
                        (Critic(channels=3, width=critic_width, emb_dim=16), "critic.")):
        outs = []
        for state in (sa, sb):
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            with torch.no_grad():
                outs.append(net(sigma, x, M, y))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-4 * float(outs[0].abs().max()))
    assert not torch.equal(sa["actor.out.weight"], torch.zeros_like(sa["actor.out.weight"]))  # it trained


# ------------------------------------------------------------------------------------------- tasks on whole photos

@pytest.fixture
def tiny_photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(60, 90), (96, 50), (70, 70), (45, 120)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90.0)], -1) + rng.normal(0, 10, (h, w, 3))
        Image.fromarray(np.rint(base).clip(0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_photo_tasks_are_what_aid_inpaint_presents(tiny_photos):
    """A task on a whole photo is the fitted view `aid inpaint` gives the backbone: its ground truth is the photo's
    box or window resized as fit_hole plans it, its mask that of the hole there; the bank is the same every time."""
    from aid_cli.data.datasets import load_photo_set
    from aid_cli.data.images import LoadedImage, to_task_tensors
    from aid_cli.data.photo_masks import photo_training_hole
    from aid_cli.guidance.photo_tasks import TRAIN_TASKS, photo_tasks
    from aid_cli.inpaint import InpaintOptions, Job, fit_hole

    photos = load_photo_set(tiny_photos)
    data, known = photo_tasks(photos, 24, 16, seed=5, multiscale=False)
    again, known2 = photo_tasks(photos, 24, 16, seed=5, multiscale=False)
    assert torch.equal(data.images, again.images) and torch.equal(known, known2)
    assert data.images.shape == (24, 3, 16, 16) and known.shape == (24, 1, 16, 16) and known.dtype == torch.bool
    assert (~known).flatten(1).any(1).all()  # every task has a hole
    # task 0 rebuilt by hand through inpaint's own fitting (crop: the backbone is not multiscale)
    j = int(np.random.default_rng([0x74726169, TRAIN_TASKS, 5]).integers(len(photos)))
    pixels = photos.photos[j].permute(1, 2, 0).numpy()
    _, hole = photo_training_hole(5, TRAIN_TASKS, 0, pixels.shape[:2])
    img = LoadedImage(path=Path("p"), pixels=pixels, mode="RGB", source_mode="RGB")
    item = fit_hole(Job(img.path, Path("m"), []), img, hole, 16, InpaintOptions(fit="auto"))
    x, M = to_task_tensors(img, hole, item.fit)
    assert torch.equal(known[0], M[0] > 0.5)
    assert (data.as_float(0) - x[0]).abs().max() <= 1 / 127.5 + 1e-6  # stored as uint8


def test_guidance_trains_on_whole_photos_and_resumes_exactly(tiny_photos, tiny_checkpoint, tmp_path):
    kw = dict(estimator="backprop", mask_bank=12, val_n=3)
    run = train(cfg_for(tiny_photos, tmp_path / "a", tiny_checkpoint, **kw), progress=False, log=lambda *a: None)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert "val_psnr_hole_18" in stats[-1] and np.isfinite(stats[-1]["terminal"])
    train(cfg_for(tiny_photos, tmp_path / "b", tiny_checkpoint, **kw), max_iters=3, progress=False,
          log=lambda *a: None)
    train(cfg_for(tiny_photos, tmp_path / "b", tiny_checkpoint, **kw), resume=True, progress=False,
          log=lambda *a: None)
    a, b = load_file(str(tmp_path / "a" / STATE_FILE)), load_file(str(tmp_path / "b" / STATE_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_holdout_keeps_photos_out_of_training_for_validation(tiny_photos, tiny_checkpoint, tmp_path):
    from aid_cli.data.datasets import load_photo_set
    from aid_cli.guidance.trainer import split_holdout

    photos = load_photo_set(tiny_photos)
    names = list(photos.names)
    held = split_holdout(photos, 2)
    assert held.names == [names[1], names[3]] and photos.names == [names[0], names[2]]
    assert not set(held.names) & set(photos.names) and len(held.photos) == 2
    with pytest.raises(UserError):
        split_holdout(load_photo_set(tiny_photos), 9)
    logs = []
    run = train(cfg_for(tiny_photos, tmp_path / "h", tiny_checkpoint, estimator="backprop", mask_bank=8, val_n=2,
                        holdout=2, val_dataset=None, iters=1, val_every=1), progress=False, log=logs.append)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert "val_psnr_hole_18" in stats[-1]  # validated on the held-out photos (no --val given)
