"""The training-free baselines and oracles (method.md §10) on the one sampler loop: exact visible pixels, honest NFE and
backward counts, reductions to simpler methods at zero step size, RePaint's 350-NFE budget, the oracles."""

import pytest
import torch

from aid_cli.errors import UserError
from aid_cli.methods import METHODS, get_method
from aid_cli.methods.gradpaint import alignment_loss
from aid_cli.methods.repaint import jump_schedule
from aid_cli.sampling.heun import sample

from .conftest import method_params
from .test_sampler import make_task

N = 3
# Hand counts (nfe, backward) per image on an N-step grid. Heun costs 2 NFE a step, the last (Euler) step 1: 2N − 1.
COUNTS = {
    "unguided": (2 * N - 1, 0),
    "replace": (2 * N - 1, 0),
    "ddnm": (2 * N - 1, 0),  # combine-image changes what D returns, not how often it is called
    # DPS, MCG, GradPaint differentiate the Heun step's own evaluation D(x_n; σ_n): no extra forward, 1 backward a step
    "dps": (2 * N - 1, N),
    "mcg": (2 * N - 1, N),
    "gradpaint": (2 * N - 1, N),
    # defaults jump_length = 1, jump_n_sample = 10: every step done ten times
    "repaint": (10 * (2 * N - 1), 0),
    # G = 2: per step 1 forward at x_n, G trial forwards (each reused for the next gradient), G backwards, then the Heun
    # step reuses the last evaluation and adds its second one (none on the last step): (G + 2)N − 1, plus one per retry
    "copaint": ((2 + 2) * N - 1, 2 * N),
    # iterations I = 2, particles P = 2 (conftest), K = 2: each iteration evaluates K + 1 = 3 times per particle and
    # backpropagates through all of them; then 1 posterior step to σ_s (σ_2 = 0.002 at N = 3), and the last step DPS
    "vipaint": (2 * 2 * 3 + 1 + 1, 2 * 2 * 3 + 1),
    "aid": (2 * N - 1, 0),  # the actor is a separate small net: backbone forwards only, no backward at deployment
    "copy": (0, 0),
    "greyfill": (0, 0),
    # classical inpainting: no network at all
    "biharmonic": (0, 0),
    "telea": (0, 0),
    "ns": (0, 0),
}


def test_every_method_has_a_hand_count():
    assert set(COUNTS) == set(METHODS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_visible_pixels_exact_and_counts_honest(tiny_net, name):
    task, x0 = make_task()
    params = method_params(name)
    extras = {"x0": x0} if METHODS[name].oracle else None
    r = sample(tiny_net, task, get_method(name, **params), num_steps=N, seed=0, extras=extras)
    visible = task.M.expand_as(r.completed) > 0
    assert torch.equal(r.completed[visible], x0[visible]), name
    assert (r.nfe, r.backward) == COUNTS[name], name
    assert not r.x.requires_grad and not r.completed.requires_grad, name  # nothing leaks out of the loop


def test_copaint_line_search_only_adds_forwards(tiny_net):
    task, _ = make_task()
    r = sample(tiny_net, task, get_method("copaint", lr=50.0), num_steps=N, seed=0)  # a step this big gets retried
    assert r.backward == 2 * N and r.nfe > COUNTS["copaint"][0]


def test_repaint_defaults_spend_350_nfe_at_18_steps():
    task, _ = make_task(n=1)
    calls = []

    def stub(x, sigma, labels):  # the loop's count, not the network, is under test
        calls.append(1)
        return torch.zeros_like(x)

    r = sample(stub, task, get_method("repaint"), num_steps=18, seed=0)
    assert r.nfe == len(calls) == 350  # 10 × 35: "10 resamplings of the 35-NFE base"


def test_jump_schedule_is_the_reference_walk():
    assert jump_schedule(2, 1, 2) == [0, 1, 0, 1, 2, 1, 2]
    assert jump_schedule(4, 2, 2) == [0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4]
    assert jump_schedule(5, 1, 1) == list(range(6))
    for n, length, count in ((18, 1, 10), (18, 10, 10), (12, 3, 4), (250, 10, 10)):
        order = jump_schedule(n, length, count)
        assert order[0] == 0 and order[-1] == n
        assert all(abs(b - a) == 1 for a, b in zip(order, order[1:]))
        if length == 1:  # every step σ_i → σ_{i+1} done jump_n_sample times
            forward = [a for a, b in zip(order, order[1:]) if b == a + 1]
            assert all(forward.count(i) == count for i in range(n))
    # general case: on 18 steps, 10/10 has one jump point (σ = 0) going back up 10 levels nine times: 35 + 9·19
    order = jump_schedule(18, 10, 10)
    forward = [a for a, b in zip(order, order[1:]) if b == a + 1]
    assert sum(2 if a < 17 else 1 for a in forward) == 35 + 9 * 19


def test_zero_step_size_is_exactly_the_base_method(tiny_net):
    task, _ = make_task()
    run = lambda name, **p: sample(tiny_net, task, get_method(name, **p), num_steps=N, seed=0).completed  # noqa: E731
    unguided, replace, ddnm = run("unguided"), run("replace"), run("ddnm")
    assert torch.equal(run("dps", zeta=0.0), unguided)
    assert torch.equal(run("mcg", alpha=0.0), replace)  # same evaluations, same noise draws
    assert torch.equal(run("gradpaint", alpha=0.0), ddnm)
    assert torch.equal(run("copaint", lr=0.0), unguided)


def _visible_residual(task, x):
    return torch.linalg.vector_norm((task.M * (x - task.y)).flatten(1), dim=1)


def test_nonzero_step_size_moves_the_result(tiny_net):
    task, _ = make_task()
    run = lambda name, **p: sample(tiny_net, task, get_method(name, **p), num_steps=N, seed=0).x  # noqa: E731
    unguided, ddnm = run("unguided"), run("ddnm")
    assert torch.allclose(task.M * ddnm, task.y, atol=1e-6)  # combine-image's last (Euler) step lands on M ⊙ y + M̄ ⊙ D
    assert not torch.allclose(task.M * unguided, task.y, atol=1e-1)
    # DPS's and CoPaint's final states (before pasting) move towards y: at σ ≈ 0, D ≈ x and a DPS step of ζ shortens the
    # residual by about ζ; CoPaint's default steps then are large (lr grows ×7 by the last of three steps)
    assert (_visible_residual(task, run("dps", zeta=1.0)) < _visible_residual(task, unguided) - 0.5).all()
    assert (_visible_residual(task, run("copaint")) < 0.9 * _visible_residual(task, unguided)).all()
    # GradPaint's last normalised step alone moves each image by α
    moved = torch.linalg.vector_norm((run("gradpaint") - ddnm).flatten(1), dim=1)
    assert (moved > 0.5 * 0.005).all()


def test_guidance_reaches_the_hole():
    # the random tiny network barely couples pixels, so what the visible region does to the hole (combine-image, MCG's
    # hole-only gradient) shows on a blur denoiser
    task, _ = make_task()

    def blur(x, sigma, labels):
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    run = lambda name, **p: sample(blur, task, get_method(name, **p), num_steps=N, seed=0).completed  # noqa: E731
    assert (run("ddnm") - run("unguided")).abs().max() > 1e-2
    assert (run("mcg", alpha=1.0) - run("replace")).abs().max() > 1e-3


def test_frozen_network_accumulates_no_gradients(tiny_net):
    task, _ = make_task(n=1)
    tiny_net.requires_grad_(True)  # even a network left trainable by mistake
    for name in ("dps", "mcg", "gradpaint", "copaint"):
        sample(tiny_net, task, get_method(name), num_steps=2, seed=0)
    assert all(p.grad is None for p in tiny_net.parameters())


def test_oracles_run_no_network():
    task, x0 = make_task()

    def no_net(*args):
        raise AssertionError("an oracle called the network")

    copy = sample(no_net, task, get_method("copy"), num_steps=N, extras={"x0": x0})
    assert torch.equal(copy.completed, x0) and copy.nfe == 0 and copy.backward == 0
    grey = sample(no_net, task, get_method("greyfill"), num_steps=N)
    assert torch.equal(grey.completed, task.M * x0) and grey.nfe == 0  # hole = 0, visible = y
    with pytest.raises(UserError, match="copy is an oracle"):
        sample(no_net, task, get_method("copy"), num_steps=N)


def test_alignment_loss_sees_only_jumps_across_the_border():
    M = torch.ones(1, 1, 16, 16)
    M[..., 8:] = 0  # left half visible, right half hole: the border's normal is horizontal
    across = torch.zeros(1, 3, 16, 16)
    across[..., 8:] = 1.0  # a jump across the border: unit gradient ∥ normal on one column
    along = torch.linspace(-1, 1, 16).view(1, 1, 16, 1).expand(1, 3, 16, 16)  # changes along the border only
    assert torch.allclose(alignment_loss(across, M), torch.tensor([16 / 256]))  # H pixels of (±1)², over H·W
    assert torch.equal(alignment_loss(along, M), torch.zeros(1))
    assert torch.equal(alignment_loss(torch.zeros(1, 3, 16, 16), M), torch.zeros(1))
