"""The terminal cost's texture terms, options beyond the paper (--lambda-texture, --lambda-gram; guidance/texture.py):
the differentiable hole texture equals the metric's, both terms vanish on the truth, reach only hole pixels, punish a
smoothed fill less as its texture comes back, and a run records them; where they cannot apply they are refused."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aid_cli.guidance.losses import terminal_cost, terminal_loss
from aid_cli.guidance.texture import gram_cost, hole_texture_t, texture_cost
from aid_cli.guidance.trainer import TrainConfig, train
from aid_cli.metrics.quality import hole_texture

from .conftest import run_cli
from .guidance_helpers import cfg_for, read_stats, tiny_32px, tiny_data, tiny_task  # noqa: F401  (a fixture)

RESTORED = (0.0, 0.25, 0.5, 0.75, 1.0)  # a in the fill blur(x0) + a·(x0 − blur(x0)): a = 1 is the truth


def _lpips_or_skip():
    from aid_cli.metrics.lpips import LPIPSUnavailable, load_lpips

    try:
        return load_lpips(offline=True)
    except LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights unavailable: {e}")


def _cfg(**kw):
    return TrainConfig(dataset="", out="", backbone="", **kw)


def _blur(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _hole_grad(cost, x, task):
    """The gradient of cost(completed image).sum() w.r.t. the fill x: (its largest |value| on visible pixels, on the
    hole's)."""
    x = x.clone().requires_grad_(True)
    cost(task.complete(x)).sum().backward()
    visible = task.M.expand_as(x).bool()
    return float(x.grad[visible].abs().max()), float(x.grad[~visible].abs().max())


def test_the_differentiable_hole_texture_equals_the_metric():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 10, generator=g) * 2 - 1
    M = (torch.rand(6, 1, 12, 10, generator=g) > 0.4).float().repeat(1, 3, 1, 1)
    M[0, 1, :4] = 1  # per-channel masks: a hole pixel is a hole in every channel
    M[1] = torch.rand(1, 12, 10, generator=g)  # fractional: M < 0.5 is the hole
    M[4] = 1.0  # no hole
    M[5] = 1.0
    M[5, :, 3, 3] = 0  # one hole pixel: no pair
    metric, ours = hole_texture(x, M), hole_texture_t(x, M)
    defined = torch.isfinite(metric)
    assert ours.dtype == torch.float32 and defined[:4].all() and not defined[4:].any()
    assert torch.allclose(ours[defined].double(), metric[defined], rtol=1e-5, atol=1e-7)
    assert torch.equal(ours[~defined], torch.zeros(2))  # 0, not nan, where the metric has no pair


def _zero_on_the_truth_hole_only_falling_as_texture_returns(cost, x0, task) -> torch.Tensor:
    """A texture cost is 0 on the truth, its gradient reaches only the hole, and a smoothed fill costs more than
    nothing, less and less as its texture comes back; returns the smoothed fill."""
    assert torch.equal(cost(x0.clone()), torch.zeros(2))
    smooth = _blur(x0)
    on_visible, on_hole = _hole_grad(cost, smooth, task)
    assert on_visible == 0 and on_hole > 0
    costs = torch.stack([cost(task.complete(smooth + a * (x0 - smooth))) for a in RESTORED])
    assert (costs[:-1] > 0).all() and (costs[1:] < costs[:-1]).all() and costs[-1].abs().max() < 1e-10
    return smooth


def test_texture_cost_is_zero_on_the_truth_reaches_only_the_hole_and_pushes_both_ways():
    task, x0 = tiny_task()
    cost = lambda c: texture_cost(c, x0, task.M)  # noqa: E731
    smooth = _zero_on_the_truth_hole_only_falling_as_texture_returns(cost, x0, task)
    # a rougher fill costs too, more the rougher it is
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    rough = torch.stack([cost(task.complete(x0 + s * noise)) for s in (0.1, 0.3, 0.9)])
    assert (rough > 0).all() and (rough[1:] > rough[:-1]).all()
    # one descent step adds texture to the smooth fill and takes it from the rough one
    for fill, sign in ((smooth, 1), (x0 + 0.9 * noise, -1)):
        fill = fill.clone().requires_grad_(True)
        cost(task.complete(fill)).sum().backward()
        before = hole_texture_t(task.complete(fill.detach()), task.M)
        after = hole_texture_t(task.complete(fill.detach() - 1e-3 * fill.grad), task.M)
        assert (sign * (after - before) > 0).all()


def test_texture_cost_stays_finite_on_flat_truths_and_holes_without_pairs():
    task, x0 = tiny_task()
    flat = torch.zeros_like(x0)
    x = (torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_(True)
    c = texture_cost(task.complete(x), flat, task.M)
    c.sum().backward()
    assert torch.isfinite(c).all() and (c > 0).all() and torch.isfinite(x.grad).all()
    no_hole = torch.ones_like(task.M)
    assert torch.equal(texture_cost(x.detach(), flat, no_hole), torch.zeros(2))


def test_terminal_cost_adds_the_texture_and_gram_terms():
    task, x0 = tiny_task()
    x = torch.rand_like(x0) * 2 - 1
    ell = terminal_cost(_cfg(lambda_texture=0.4), x, x0, task)
    expected = terminal_loss(x, x0, task.M, 2.0, 1.0) + 0.4 * texture_cost(task.complete(x), x0, task.M)
    assert torch.allclose(ell, expected, rtol=1e-6) and (ell > terminal_loss(x, x0, task.M, 2.0, 1.0)).all()
    with pytest.raises(ValueError, match="LPIPS model"):
        terminal_cost(_cfg(lambda_gram=1.0), x, x0, task)


def test_gram_cost_is_zero_on_the_truth_reaches_only_the_hole_and_falls_as_texture_returns():
    model = _lpips_or_skip()
    task, x0 = tiny_task(res=32)
    cost = lambda c: gram_cost(model, c, x0, task.M)  # noqa: E731
    _zero_on_the_truth_hole_only_falling_as_texture_returns(cost, x0, task)
    x = torch.rand_like(x0) * 2 - 1
    gram_only = _cfg(lambda_vis=0.0, lambda_hole=0.0, lambda_gram=0.5)
    assert torch.allclose(terminal_cost(gram_only, x, x0, task, model), 0.5 * cost(task.complete(x)), rtol=1e-6)


def test_lambda_texture_trains_is_recorded_and_is_refused_where_it_cannot_apply(tiny_data, tiny_checkpoint, tmp_path,
                                                                               capsys):
    kw = dict(estimator="backprop", iters=2, batch=2, val_every=2, checkpoint_every=2)
    runs = {lam: train(cfg_for(tiny_data, tmp_path / f"lam{lam}", tiny_checkpoint, lambda_texture=lam, **kw),
                       progress=False, log=lambda *a: None) for lam in (0.0, 1.0)}
    stats = {lam: read_stats(run) for lam, run in runs.items()}
    # the same tasks, so the first iteration's terminal cost differs by the texture term alone (> 0)
    assert stats[1.0][1]["terminal"] > stats[0.0][1]["terminal"]
    assert 0 < stats[1.0][-1]["val_texture_ratio_18"]  # validation shows the texture ratio the term acts on
    saved = json.loads((runs[1.0] / "config.json").read_text())
    assert saved["lambda_texture"] == 1.0 and saved["lambda_gram"] == 0.0
    for args, phrase in ((["--lambda-texture", "0.5", "--estimator", "score", "--critic", "privileged"],
                          "drop --lambda-texture and --lambda-gram"),
                         (["--lambda-gram", "1"], "--lambda-gram: AlexNet's trunk needs images of at least 31x31"),
                         (["--lambda-texture", "-1"], "--lambda-texture")):
        out = tmp_path / "refused"
        code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", out, "--backbone", tiny_checkpoint, *args],
                               capsys)
        assert code == 2 and phrase in err and not out.exists(), err
        if "privileged" in args or "--lambda-gram" in args:
            assert len(err.strip().splitlines()) == 1


def test_a_recipe_gives_lambda_texture_and_lambda_gram(tiny_checkpoint, tmp_path, capsys):
    """`aid train --config FILE` takes both terms; the Gram term trains at 32 px and loads the LPIPS trunk itself."""
    _lpips_or_skip()
    net32, folder = tiny_32px(tmp_path)
    recipe = tmp_path / "texture.toml"
    recipe.write_text('[options]\nlambda-texture = 0.5\nlambda-gram = 2.0\n[[stage]]\niters = 1\n')
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", recipe, "--dataset", folder, "--backbone", net32, "--out", out,
                            "--batch", "2", "--width", "8", "--steps", "3", "--mask-bank", "4", "--device", "cpu"],
                           capsys)
    assert code == 0, err
    saved = json.loads((out / "stage-1" / "config.json").read_text())
    assert saved["lambda_texture"] == 0.5 and saved["lambda_gram"] == 2.0
    assert np.isfinite(read_stats(out / "stage-1")[-1]["terminal"])
