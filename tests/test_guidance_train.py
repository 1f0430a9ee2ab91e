"""Training runs of the guidance module: both networks learn, resume is exact, every estimator and variant trains,
warm starts, bf16 rollouts, SIGTERM, the EMA module, --mix-steps, the gradient diagnostic and the progress bar."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aid_cli.errors import UserError
from aid_cli.fileio import sha256_file
from aid_cli.guidance.checkpoint import load_guidance, save_guidance
from aid_cli.guidance.networks import Actor
from aid_cli.guidance.trainer import STATE_FILE, TrainConfig, bar_figures
from aid_cli.methods import get_method
from aid_cli.sampling.heun import sample, sample_generators

from .conftest import TINY_KWARGS, run_cli
from .guidance_helpers import (assert_resume_equals_uninterrupted, cfg_for, quiet_train, read_stats,  # noqa: F401
                               tiny_data, tiny_task)


def test_training_updates_both_networks_and_lowers_td_loss(tiny_data, tiny_checkpoint, tmp_path):
    # lr_actor 1e-4: eq. 11's noisy actor at 1e-3 moves the critic's target faster than it learns
    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, iters=40, val_every=20, checkpoint_every=20,
                              lr_actor=1e-4))
    stats = read_stats(run)
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
    assert_resume_equals_uninterrupted(tiny_data, tiny_checkpoint, tmp_path, stop_at=3)


def test_mix_steps_alternates_the_solves_n(tiny_net, tiny_data, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--mix-steps M: odd iterations solve at N = M, even ones at --steps, each J exactly the solve at that N; the
    stats say which N each line's solve used; the actor-critic estimators refuse it in one line."""
    from aid_cli.guidance.losses import backprop_loss, terminal_loss
    from aid_cli.guidance.rollout import rollout_steps

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
    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=4, mix_steps=2))
    lines = read_stats(run)
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
    run, a = assert_resume_equals_uninterrupted(tiny_data, tiny_checkpoint, tmp_path, stop_at=2, **kw)
    stats = read_stats(run)[1:]
    assert len(stats) == 4 and np.isfinite(stats[-1]["terminal"]) and "val_psnr_hole_18" in stats[-1]
    assert "val_lpips_18" not in stats[-1]  # 16 px: below LPIPS's smallest size
    assert ("critic_loss" in stats[-1]) == (estimator not in ("proxy", "backprop"))
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
    first = quiet_train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, estimator="backprop", iters=3))
    module = first / "guidance.safetensors"
    run = quiet_train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, estimator="backprop", iters=1, lr_actor=0.0,
                              init=str(module)))  # lr 0: the actor stays as loaded
    a, b = load_file(str(module)), load_file(str(run / "guidance.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["out.weight"].abs().sum() > 0
    val_a, val_b = read_stats(first)[-1]["val_psnr_hole_18"], read_stats(run)[0]["val_psnr_hole_18"]
    assert val_b == pytest.approx(val_a, abs=1e-5)  # the new run starts where the module ended
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init"] == str(module) and cfg["init_sha256"] == sha256_file(module)
    with pytest.raises(UserError, match="--init .* differs"):
        quiet_train(cfg_for(tiny_data, tmp_path / "c", tiny_checkpoint, width=4, init=str(module)), max_iters=0)
    # a module of another backbone (an earlier snapshot of one still in training): a warm start, and the run says so
    other = save_guidance(tmp_path / "other.safetensors", load_guidance(module)[0], load_guidance(module)[1]["actor"],
                          "e" * 64)
    lines = []
    warm = quiet_train(cfg_for(tiny_data, tmp_path / "d", tiny_checkpoint, estimator="backprop", iters=1,
                               lr_actor=0.0, init=str(other)), log=lines.append)
    assert any("trained on another backbone" in line and "warm start" in line for line in lines)
    c = load_file(str(warm / "guidance.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


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
    runs = {p: quiet_train(cfg_for(tiny_data, tmp_path / p, busy, precision=p, **kw)) for p in ("fp32", "bf16")}
    ell = {p: read_stats(r)[-1]["terminal"] for p, r in runs.items()}
    assert ell["fp32"] != ell["bf16"] and ell["bf16"] == pytest.approx(ell["fp32"], rel=0.05)
    actor = load_file(str(runs["bf16"] / STATE_FILE))
    assert all(v.dtype == torch.float32 for k, v in actor.items() if k.startswith(("actor.", "critic.")))


def test_sigterm_saves_state_and_module_then_resume_continues(tiny_data, tiny_checkpoint, tmp_path, monkeypatch):
    from .conftest import sigterm_at_call

    sigterm_at_call(monkeypatch, 2)
    logs = []
    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, iters=50, checkpoint_every=40,
                              val_every=40), log=logs.append)
    assert any("stopped at iteration 2" in str(line) for line in logs)
    assert load_guidance(run / "guidance.safetensors")[0] is not None
    monkeypatch.undo()
    quiet_train(cfg_for(tiny_data, run, tiny_checkpoint, iters=4, checkpoint_every=40, val_every=40), resume=True)
    stats = read_stats(run)
    assert [r["iteration"] for r in stats if "actor_loss" in r] == [1, 2, 3, 4]


def test_unknown_estimator_is_one_line(tiny_data, tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "r", "--backbone", tiny_checkpoint,
                            "--estimator", "magic"], capsys)
    assert code == 2 and "'magic' is not one of" in err and "Traceback" not in err  # a choice: click's usage error


def test_resume_of_a_run_older_than_a_setting_keeps_its_default(tiny_data, tiny_checkpoint, tmp_path):
    """A run whose config.json predates a setting continues with that setting's default, not the new command's value."""
    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=2), max_iters=1)
    saved = json.loads((run / "config.json").read_text())
    del saved["lambda_lpips"]
    (run / "config.json").write_text(json.dumps(saved))
    notes = []
    quiet_train(cfg_for(tiny_data, run, tiny_checkpoint, estimator="backprop", iters=2, lambda_lpips=1.0), resume=True,
                log=notes.append)  # 16 px: LPIPS would be refused, so the default 0 must hold
    assert json.loads((run / "config.json").read_text())["lambda_lpips"] == 0.0


def test_ema_module_is_the_average_of_the_trained_weights_and_resumes_exactly(tiny_data, tiny_checkpoint, tmp_path):
    """--ema-halflife H: after every step φ̄ ← κ·φ̄ + (1 − κ)·φ with κ = 0.5^(1/H), φ̄ starting at φ after the first
    step; the module saved (and validated) is φ̄, the state keeps φ and φ̄, and a resumed run equals an uninterrupted
    one. Without the option a resume keeps the run's own half-life."""
    kw = dict(estimator="backprop", iters=4, checkpoint_every=1, val_every=2, ema_halflife=2.0)
    run = quiet_train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, **kw))
    assert json.loads((run / "config.json").read_text())["ema_halflife"] == 2.0
    kappa = 0.5 ** (1 / 2.0)
    snapshot = lambda i: load_file(str(run / "modules" / f"guidance-{i:06d}.safetensors"))
    state = load_file(str(run / STATE_FILE))
    # φ_i after each step, from the same run without averaging (the same steps: the average never feeds back)
    plain = quiet_train(cfg_for(tiny_data, tmp_path / "p", tiny_checkpoint, **{**kw, "ema_halflife": 0.0}))
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

    half = quiet_train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw), max_iters=2)
    notes = []
    quiet_train(cfg_for(tiny_data, half, tiny_checkpoint, **{**kw, "ema_halflife": None}), resume=True,
                log=notes.append)  # not given on --resume: the run's own half-life
    assert any("EMA (half-life 2" in n for n in notes)
    resumed = load_file(str(half / STATE_FILE))
    assert resumed.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], resumed[k]), k


def test_a_run_starts_averaging_on_resume(tiny_data, tiny_checkpoint, tmp_path):
    """--ema-halflife given on --resume of a run saved without φ̄: φ̄ starts as the φ of the first resumed step."""
    kw = dict(estimator="backprop", iters=3, checkpoint_every=1, val_every=10)
    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, **kw), max_iters=2)
    assert not any(k.startswith("actor_ema.") for k in load_file(str(run / STATE_FILE)))
    quiet_train(cfg_for(tiny_data, run, tiny_checkpoint, **kw, ema_halflife=5.0), resume=True)
    state = load_file(str(run / STATE_FILE))
    assert int(state["actor_ema.n_averaged"]) == 1
    assert all(torch.equal(state[k], state[f"actor_ema.module.{k[6:]}"]) for k in state if k.startswith("actor."))
    assert json.loads((run / "config.json").read_text())["ema_halflife"] == 5.0


def test_gradient_diagnostic_cosines_and_training_untouched(tiny_data, tiny_checkpoint, tmp_path):
    """--diag-every logs cos(estimator gradient, exact gradient) per batch size; the exact gradient agrees with itself
    at the full batch; and a run with diagnostics trains exactly as one without."""
    kw = dict(estimator="score", iters=2, val_every=100, checkpoint_every=2)
    a = quiet_train(cfg_for(tiny_data, tmp_path / "a", tiny_checkpoint, diag_every=1, diag_batch=4, **kw))
    b = quiet_train(cfg_for(tiny_data, tmp_path / "b", tiny_checkpoint, **kw))
    sa, sb = load_file(str(a / STATE_FILE)), load_file(str(b / STATE_FILE))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rec = read_stats(a)[-1]
    for k in (1, 2, 4):
        for name in ("score", "pathwise", "backprop"):
            assert -1 - 1e-6 <= rec[f"diag_cos_{name}_b{k}"] <= 1 + 1e-6
    assert rec["diag_cos_backprop_b4"] == pytest.approx(1.0, abs=1e-6)
    assert rec["diag_exact_grad_norm"] > 0


def test_progress_bar_shows_the_td_loss_only_for_estimators_with_a_critic(tiny_data, tiny_checkpoint, tmp_path):
    """The bar's figures come from the iteration's record: ℓ always, the critic's TD loss only where there is a critic
    (never `TD nan` under backprop)."""
    for estimator, has_critic in (("backprop", False), ("score", True), ("pathwise", True)):
        run = quiet_train(cfg_for(tiny_data, tmp_path / estimator, tiny_checkpoint, estimator=estimator, iters=1,
                                  val_every=100))
        rec = read_stats(run)[-1]
        figures = bar_figures(rec)
        assert figures.endswith(f"ℓ {rec['terminal']:.4f}") and "nan" not in figures
        assert ("TD " in figures) == has_critic, (estimator, figures)
