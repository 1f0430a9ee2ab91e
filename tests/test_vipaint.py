"""VIPaint (method.md §10) on the one sampler loop: its levels on the EDM grid, honest NFE and backward counts (the
optimisation's included, checked against a wrapped network), exact visible pixels, determinism, any state shape, and
`aid inpaint` / `aid bench` / `aid methods` on a tiny backbone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from aid_cli.models import tuned
from aid_cli.fileio import sha256_file
from aid_cli.bench import tune_grid
from aid_cli.methods import METHODS, get_method
from aid_cli.methods.vipaint import hierarchy_levels
from aid_cli.sampling.heun import SamplerState, edm_sigmas, sample, sample_generators
from aid_cli.task import Task

from .conftest import run_cli
from .test_bench import _dataset
from .test_cli_inpaint import assert_visible_exact_and_hole_filled, make_scene, read
from .test_sampler import make_task

SMALL = {"iterations": 3, "particles": 2}  # a short fit: the counts below are the formula's at these settings


def expected_counts(N: int, levels: int = 2, iterations: int = 50, particles: int = 5) -> tuple[int, int]:
    """(nfe, backward) by hand: I·P·(K + 1) for the fit, K − 1 for the posterior's draw, DPS from n_s on."""
    n_s, _ = hierarchy_levels(edm_sigmas(N), levels, 1.0, 0.6)
    fit = iterations * particles * (levels + 1)
    return fit + (levels - 1) + 2 * (N - n_s) - 1, fit + (N - n_s)


class Counting(torch.nn.Module):
    """Wraps a denoiser: counts the rows it evaluates and the rows its backward passes go through."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows, self.backward_rows, self.calls = net, 0, 0, 0

    def _count_backward(self, grad, n):
        self.backward_rows += n

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        self.rows += x.shape[0]
        out = self.net(x, sigma, labels)
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: self._count_backward(g, n))
        return out


def gaussian_denoiser(x, sigma, labels=None):
    """The exact denoiser of N(0, σ_data² I) data, σ_data = 0.5: cheap, differentiable, any state shape."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * 0.25 / (0.25 + sigma ** 2)


def test_levels_on_the_edm_grid():
    n_s, levels = hierarchy_levels(edm_sigmas(18), 2, 1.0, 0.6)
    assert n_s == 11 and levels[0] == 1.0 and levels[1] == pytest.approx(0.5853, abs=1e-4)
    assert hierarchy_levels(edm_sigmas(12), 2, 1.0, 0.6)[0] == 7  # σ_7 = 0.658, the level nearest to 0.6
    assert hierarchy_levels(edm_sigmas(2), 2, 1.0, 0.6)[0] == 1  # the only level below σ_e: σ_min, one Euler step
    n_s, levels = hierarchy_levels(edm_sigmas(18), 4, 1.0, 0.6)
    assert n_s == 11 and len(levels) == 4 and levels[-1] == float(edm_sigmas(18)[11])
    assert all(a > b for a, b in zip(levels, levels[1:]))
    assert hierarchy_levels(edm_sigmas(18), 1, 1.0, 0.6)[1] == [float(edm_sigmas(18)[11])]
    with pytest.raises(ValueError):
        get_method("vipaint", sigma_s=2.0)  # σ_s must lie below σ_e


@pytest.mark.parametrize("N,levels", [(3, 2), (5, 3), (6, 1)])
def test_counts_are_what_the_loop_spent(tiny_net, N, levels):
    task, x0 = make_task()
    net = Counting(tiny_net)
    r = sample(net, task, get_method("vipaint", levels=levels, **SMALL), num_steps=N, seed=0)
    B = task.batch_size
    assert r.nfe * B == net.rows  # particles are rows of one call: P evaluations per image
    assert r.backward * B == net.backward_rows
    assert (r.nfe, r.backward) == expected_counts(N, levels, **SMALL)
    visible = task.M.expand_as(r.completed) > 0
    assert torch.equal(r.completed[visible], x0[visible])
    assert torch.isfinite(r.completed).all() and not r.completed.requires_grad


def test_default_cost_at_18_steps():
    task, x0 = make_task(n=1)
    net = Counting(gaussian_denoiser)
    r = sample(net, task, get_method("vipaint"), num_steps=18, seed=0)
    # 50 iterations × 5 particles × (K + 1 = 3) evaluations, 1 posterior step to σ_11, then 7 Heun steps with DPS
    assert (r.nfe, r.backward) == (750 + 1 + 13, 750 + 7) == expected_counts(18)
    assert (net.rows, net.backward_rows) == (r.nfe, r.backward)
    assert net.calls == 50 * 3 + 1 + 13  # the particles share a call


def test_deterministic_for_a_seed_and_independent_of_the_batch(tiny_net):
    task, _ = make_task(n=4)
    run = lambda t, **kw: sample(tiny_net, t, get_method("vipaint", **SMALL), num_steps=4, **kw).completed  # noqa: E731
    a, b, c = run(task, seed=3), run(task, seed=3), run(task, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    parts = [run(task[i:i + 2], generators=sample_generators(3, 2, offset=i)) for i in (0, 2)]
    assert torch.allclose(a, torch.cat(parts), atol=1e-4)


def test_diffusion_loss_has_the_gradient_of_the_prior_at_sigma_e():
    # for N(0, σ_data²) data the bound's gradient w.r.t. q(z_1) = N(μ, τ²) is that of E_q[−log p(z_1)],
    # p = N(0, σ_data² + σ_e²): μ/(σ_data² + σ_e²) per element and, summed over the elements, τ·d/(σ_data² + σ_e²)
    P = 4000
    task = Task(y=torch.zeros(1, 1, 2, 2), M=torch.ones(1, 1, 2, 2))
    method = get_method("vipaint", particles=P)
    s = SamplerState(net=gaussian_denoiser, task=task, sigmas=edm_sigmas(18), generators=sample_generators(0, 1))
    ps = dataclasses.replace(s, task=task[torch.zeros(P, dtype=torch.long)], generators=s.generators * P)
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 1, 2, 2).requires_grad_(True)
    tau = torch.tensor(0.7, requires_grad=True)
    z = mu.repeat(P, 1, 1, 1) + tau * ps.randn_like(ps.task.y)
    loss = method.diffusion_loss(ps, s.generators, z, 1.0, 80.0).mean()
    g_mu, g_tau = torch.autograd.grad(loss, (mu, tau))
    assert torch.allclose(g_mu, mu.detach() / 1.25, atol=0.1)
    assert g_tau.item() == pytest.approx(4 * 0.7 / 1.25, rel=0.1)


def test_the_fit_pulls_the_posterior_towards_the_observation():
    # the plain bound (β = 1) with the exact Gaussian denoiser: the fitted posterior's draws denoise (Tweedie at s_K,
    # what the reconstruction term sees) to something closer to y on the visible region than the initial posterior's
    task, _ = make_task(n=2)
    sigmas = edm_sigmas(18)
    _, levels = hierarchy_levels(sigmas, 2, 1.0, 0.6)
    residual = {}
    for iterations in (0, 30):
        method = get_method("vipaint", iterations=iterations, beta=1.0)
        s = SamplerState(net=gaussian_denoiser, task=task, sigmas=sigmas, generators=sample_generators(0, 2))
        posterior = method.fit(s, levels)
        assert s.nfe == s.backward == iterations * 5 * 3
        with torch.no_grad():
            draws = [gaussian_denoiser(method.draw(s, posterior, levels), levels[-1]) for _ in range(10)]
        residual[iterations] = torch.stack([(task.M * (task.y - d)).flatten(1).norm(dim=1) for d in draws]).mean(0)
    assert (residual[30] < 0.75 * residual[0]).all()


def test_any_state_shape_and_class_labels():
    # a 4-channel 8×8 state (a latent backbone's shape) with class labels: the particles' rows carry their image's label
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g) * 0.5
    M = torch.ones(2, 1, 8, 8)
    M[..., 2:6, 1:5] = 0
    labels = torch.eye(3)[[0, 2]]
    task = Task.from_image(x0, M, class_labels=labels)
    seen = []

    def net(x, sigma, class_labels):
        assert class_labels.shape == (x.shape[0], 3)
        seen.append(class_labels.argmax(1).tolist())
        return gaussian_denoiser(x, sigma) + 0.01 * class_labels.argmax(1).view(-1, 1, 1, 1)

    r = sample(net, task, get_method("vipaint", **SMALL), num_steps=4, seed=0)
    assert r.completed.shape == x0.shape
    assert torch.equal(r.completed[M.expand_as(x0) > 0], x0[M.expand_as(x0) > 0])
    assert [0, 0, 2, 2] in seen and [0, 2] in seen  # fit rows b·P + p, then one row per image


def test_frozen_network_accumulates_no_gradients(tiny_net):
    task, _ = make_task(n=1)
    tiny_net.requires_grad_(True)
    sample(tiny_net, task, get_method("vipaint", **SMALL), num_steps=3, seed=0)
    assert all(p.grad is None for p in tiny_net.parameters())


def test_listed_and_tunable(capsys):
    assert "vipaint" in METHODS
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0 and any(line.startswith("vipaint") for line in out.splitlines())
    param, grid = tune_grid("vipaint")
    assert param == "recon_scale" and 0.005 in grid


def short_fit_for(checkpoint) -> None:
    """Record SMALL as the checkpoint's tuned vipaint params: `inpaint` and `bench` then run a short fit."""
    tuned.write_tuned(checkpoint, "vipaint", {"params": dict(SMALL)}, sha256_file(checkpoint))


def test_inpaint_cli(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "cache"))
    short_fit_for(tiny_checkpoint)
    scene = make_scene(tmp_path, tiny_checkpoint)
    args = scene.args("--json")
    args[args.index("--method") + 1] = "vipaint"
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert (rec["method"], rec["params"]) == ("vipaint", SMALL)
    assert (rec["nfe"], rec["backward"]) == expected_counts(int(rec["steps"]), **SMALL)
    assert_visible_exact_and_hole_filled(read(scene.out), scene.pixels, scene.hole)


def test_bench_runs_vipaint(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "cache"))  # offline, nothing cached: LPIPS is null at 16×16 anyway
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    short_fit_for(tiny_checkpoint)
    data = _dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    code, _, err = run_cli(["bench", "--methods", "vipaint", "--dataset", data, "--model", tiny_checkpoint, "--masks",
                            "center", "--n", "2", "--seeds", "1", "--steps", "2", "--batch", "2", "--device", "cpu",
                            "--out", out], capsys)
    assert code == 0, err
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    assert (row["method"], row["nfe"], row["backward"]) == ("vipaint", *expected_counts(2, **SMALL))
    assert row["images_nonfinite"] == 0 and isinstance(row["psnr_hole"]["mean"], float)
