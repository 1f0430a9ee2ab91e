"""EDM's churn on AID's solve (sampling/heun.py `Churn`): the rule of Algorithm 2, stochastic deployment reproducible
per seed, training through it, a module deployed with the churn it was trained with, and the options' errors."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.guidance.checkpoint import save_guidance
from aid_cli.guidance.networks import Actor
from aid_cli.guidance.rollout import differentiable_solve
from aid_cli.methods import get_method
from aid_cli.sampling.heun import Churn, SamplerState, churn_step, edm_sigmas, sample, sample_generators
from aid_cli.task import Task

from .conftest import run_cli
from .guidance_helpers import tiny_data, tiny_task  # noqa: F401


def _actor(seed=0, width=8):
    torch.manual_seed(seed)
    actor = Actor(width=width).requires_grad_(False)
    torch.nn.init.normal_(actor.out.weight, std=0.05)  # a non-zero field (the output layer starts at zero)
    return actor


def test_gamma_follows_edm_algorithm_2():
    c = Churn(s_churn=40, s_tmin=0.05, s_tmax=50)
    assert c.gamma(1.0, 18) == pytest.approx(math.sqrt(2) - 1)  # min(40/18, √2 − 1)
    assert Churn(s_churn=3).gamma(1.0, 18) == pytest.approx(3 / 18)
    assert c.gamma(0.01, 18) == 0 and c.gamma(80.0, 18) == 0 and c.gamma(0.0, 18) == 0  # outside [S_tmin, S_tmax]
    assert Churn.of(0) is None and Churn.of(None) is None and Churn.of(5).s_churn == 5
    assert Churn.of(c.record()) == c and Churn.of(Churn(s_churn=2).record()) == Churn(s_churn=2)  # S_tmax = ∞ as null
    with pytest.raises(ValueError):
        Churn(s_churn=-1)


def test_churn_step_raises_the_noise_level_with_fresh_noise(tiny_net):
    task, _ = tiny_task()
    s = SamplerState(net=tiny_net, task=task, sigmas=edm_sigmas(6), generators=sample_generators(3, 2))
    x = torch.zeros_like(task.y)
    x_hat, sigma_hat = churn_step(s, Churn(s_churn=2.0), 2, x)
    gamma = 2.0 / 6
    assert sigma_hat == pytest.approx(float(s.sigmas[2]) * (1 + gamma))
    z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in sample_generators(3, 2)])
    assert torch.allclose(x_hat, math.sqrt(float(sigma_hat) ** 2 - float(s.sigmas[2]) ** 2) * z, atol=1e-5)
    same, sigma = churn_step(s, None, 2, x)
    assert same is x and sigma == s.sigmas[2]


def test_stochastic_deployment_is_reproducible_per_seed_and_independent_of_batch(tiny_net):
    task, _ = tiny_task(n=3)
    actor = _actor()
    solve = lambda churn, seed, t=task: sample(tiny_net, t, get_method("aid", actor=actor, churn=churn),  # noqa: E731
                                               num_steps=5, seed=seed).completed
    deterministic = solve(None, 0)
    assert torch.equal(solve(0.0, 0), deterministic)  # S_churn = 0: the ODE, bit for bit
    a, again, other = solve(10.0, 0), solve(10.0, 0), solve(10.0, 1)
    assert torch.equal(a, again)  # the same seed: the same fill
    hole = task.M < 0.5
    assert not torch.allclose(a[hole.expand_as(a)], deterministic[hole.expand_as(a)])
    # sample b's noise is its own seed's (seed + b): the batch's second image equals it solved alone at seed 1
    alone = sample(tiny_net, Task(y=task.y[1:2], M=task.M[1:2]), get_method("aid", actor=actor, churn=10.0), num_steps=5,
                   seed=1).completed
    assert torch.allclose(alone[0], a[1], atol=1e-5) and not torch.allclose(other[0], a[0])


def test_training_solve_with_churn_has_the_same_gradient_recomputed(tiny_net):
    """The churn noise is drawn outside each step, so a step recomputed in the backward pass sees the same x̂_n: the
    gradient with --recompute equals the one that keeps every step's activations."""
    task, x0 = tiny_task()
    grads = []
    for recompute in (False, True):
        actor = _actor().requires_grad_(True)
        X_N, E = differentiable_solve(tiny_net, actor, task, 4, sample_generators(0, 2), recompute=recompute,
                                      churn=5.0)
        (((X_N - x0) ** 2).mean() + E.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in actor.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    plain, _ = differentiable_solve(tiny_net, _actor(), task, 4, sample_generators(0, 2))
    assert not torch.allclose(X_N, plain)


def _image_and_mask(tmp_path, tiny_data):  # noqa: F811
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((6, 6), 255, np.uint8), 5)).save(mask)
    return tiny_data / "0.png", mask


def test_inpaint_churn_is_recorded_reproducible_and_refused_for_other_methods(tiny_data, tiny_checkpoint,  # noqa: F811
                                                                              tmp_path, capsys):
    from aid_cli.fileio import sha256_file

    image, mask = _image_and_mask(tmp_path, tiny_data)
    guidance = save_guidance(tmp_path / "g.safetensors", _actor(), dict(channels=3, width=8, emb_dim=16),
                             sha256_file(tiny_checkpoint))
    base = ["inpaint", image, "--mask", mask, "--model", tiny_checkpoint, "--guidance", guidance, "--steps", "4",
            "--json"]
    outs = {}
    for name, extra in {"a": ["--churn", "8"], "b": ["--churn", "8"], "c": ["--churn", "8", "--seed", "1"],
                        "ode": []}.items():
        code, stdout, err = run_cli([*base, "-o", tmp_path / f"{name}.png", *extra], capsys)
        assert code == 0, err
        outs[name] = (np.asarray(Image.open(tmp_path / f"{name}.png")), json.loads(stdout.strip().splitlines()[-1]))
    assert outs["a"][1]["params"]["churn"] == 8.0 and "churn" not in outs["ode"][1]["params"]
    assert np.array_equal(outs["a"][0], outs["b"][0])
    assert not np.array_equal(outs["a"][0], outs["c"][0]) and not np.array_equal(outs["a"][0], outs["ode"][0])
    code, _, err = run_cli(["inpaint", image, "--mask", mask, "-o", tmp_path / "r.png", "--model", tiny_checkpoint,
                            "--method", "repaint", "--churn", "5"], capsys)
    assert code == 2 and "--churn" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r.png").exists()


def test_a_module_trained_with_churn_records_it_and_deploys_with_it(tiny_data, tiny_checkpoint, tmp_path,  # noqa: F811
                                                                     capsys):
    from aid_cli.resolve import resolve_method

    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", out, "--backbone", tiny_checkpoint, "--steps",
                            "3", "--batch", "2", "--iters", "2", "--width", "8", "--device", "cpu", "--churn", "4"],
                           capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["churn"] == 4.0
    module = out / "guidance.safetensors"
    assert resolve_method("aid-18", 18, tiny_checkpoint, guidance=module).params["churn"] == 4.0
    assert "churn" not in resolve_method("aid-18", 18, tiny_checkpoint, guidance=module, churn=0.0).params
    assert resolve_method("aid-18", 18, tiny_checkpoint, guidance=module, churn=2.5).build().churn == Churn(2.5)
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "ac", "--backbone", tiny_checkpoint,
                            "--estimator", "score", "--churn", "4"], capsys)
    assert code == 2 and "--churn" in err and not (tmp_path / "ac").exists()
