"""The sampler loop and its hooks: NFE accounting, per-sample seeding, the unguided and replace methods."""

import torch

from aid_cli.methods import METHODS, get_method
from aid_cli.sampling.heun import Method, sample
from aid_cli.task import Task

from .conftest import method_params


def make_task(n=3, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    M = torch.ones(n, 1, res, res)
    M[:, :, 4:12, 3:10] = 0  # hole
    return Task.from_image(x0, M), x0


def test_nfe_is_2n_minus_1(tiny_net):
    task, _ = make_task()
    for steps in (2, 5, 12):
        assert sample(tiny_net, task, num_steps=steps).nfe == 2 * steps - 1


def test_results_do_not_depend_on_batch_size(tiny_net):
    task, _ = make_task(n=4)
    for name in ("unguided", "replace"):
        whole = sample(tiny_net, task, get_method(name), num_steps=4, seed=7).completed
        from aid_cli.sampling.heun import sample_generators

        parts = [sample(tiny_net, task[i:i + 2], get_method(name), num_steps=4,
                        generators=sample_generators(7, 2, offset=i)).completed for i in (0, 2)]
        assert torch.allclose(whole, torch.cat(parts), atol=1e-5), name


def test_same_seed_same_output_other_seed_differs(tiny_net):
    task, _ = make_task()
    a = sample(tiny_net, task, get_method("replace"), num_steps=4, seed=1).completed
    b = sample(tiny_net, task, get_method("replace"), num_steps=4, seed=1).completed
    c = sample(tiny_net, task, get_method("replace"), num_steps=4, seed=2).completed
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_every_method_keeps_visible_pixels_exact(tiny_net):
    task, x0 = make_task()
    for name, cls in METHODS.items():
        extras = {"x0": x0} if cls.oracle else None  # only oracles get the ground truth (as only `aid bench` gives it)
        out = sample(tiny_net, task, get_method(name, **method_params(name)), num_steps=3, seed=0, extras=extras).completed
        visible = task.M.expand_as(out) > 0
        assert torch.equal(out[visible], (task.M * x0).expand_as(out)[visible]), name
        if name != "greyfill":  # greyfill's hole is 0 by definition
            assert not torch.allclose(out[~visible], torch.zeros_like(out[~visible])), name


def test_replace_ends_on_observation_and_differs_from_unguided(tiny_net):
    task, x0 = make_task()
    rep = sample(tiny_net, task, get_method("replace"), num_steps=4, seed=0)
    ung = sample(tiny_net, task, get_method("unguided"), num_steps=4, seed=0)
    # replacement's final state already equals y on the visible region (σ_N = 0), before any pasting
    assert torch.allclose((task.M * rep.x), task.y, atol=1e-6)
    assert not torch.allclose(rep.completed, ung.completed)


def test_drift_hook_adds_u_dt(tiny_net):
    task, _ = make_task(n=1)

    class ConstantDrift(Method):
        name = "const"

        def drift(self, s, n, x, denoised, sigma):
            return torch.ones_like(x)

    base = sample(tiny_net, task, Method(), num_steps=2, seed=0).x
    # with a two-step grid, the drift of step 0 (Δt = 1/2) passes through step 1's Heun/Euler update
    driven = sample(tiny_net, task, ConstantDrift(), num_steps=2, seed=0).x
    assert not torch.allclose(base, driven)


def test_time_travel_schedule_renoises_and_counts_nfe(tiny_net):
    task, _ = make_task(n=1)

    class Back(Method):
        name = "back"

        def schedule(self, num_steps):
            return [0, 1, 2, 1, 2, 3]

    r = sample(tiny_net, task, Back(), num_steps=3, seed=0)
    assert r.nfe == 2 + 2 + 2 + 1  # steps 0→1, 1→2, 1→2 again (Heun), 2→3 (Euler)
