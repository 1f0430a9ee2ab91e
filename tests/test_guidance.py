"""The terminal cost's options beyond the paper (--lambda-lpips, --lambda-ssim) in training and validation. The other
guidance tests: test_guidance_module.py, test_guidance_losses.py, test_guidance_train.py, test_guidance_validation.py,
test_guidance_cli.py (aid guidance validate|average), test_recipes.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from aid_cli.guidance.trainer import STATE_FILE, TrainConfig, train

from .guidance_helpers import cfg_for, tiny_32px, tiny_data, tiny_task  # noqa: F401  (a fixture; test_hardening imports both)


def _lpips_or_skip():
    from aid_cli.metrics.lpips import LPIPSUnavailable, load_lpips

    try:
        return load_lpips(offline=True)
    except LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights unavailable: {e}")


def test_terminal_cost_adds_lpips_of_the_completed_image():
    """--lambda-lpips: ℓ (eq. 2) + λ·LPIPS(M ⊙ x0 + M̄ ⊙ x, x0); its gradient reaches only the hole's pixels."""
    from aid_cli.guidance.losses import terminal_cost, terminal_loss

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
    from aid_cli.guidance.losses import terminal_cost, terminal_loss
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


def test_lambda_lpips_trains_at_32_pixels_and_is_refused_below_31(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from .conftest import run_cli

    _lpips_or_skip()
    code, _, err = run_cli(["train", "--dataset", tiny_data, "--out", tmp_path / "r", "--backbone", tiny_checkpoint,
                            "--lambda-lpips", "1"], capsys)
    assert code == 2 and "at least 31x31 pixels" in err and len(err.strip().splitlines()) == 1
    net32, folder = tiny_32px(tmp_path)
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
