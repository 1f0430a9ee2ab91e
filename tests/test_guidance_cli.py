"""`aid guidance validate` and `aid guidance average`, through the command line."""

from __future__ import annotations

import json

import pytest
import torch

from aid_cli.data.masks import VALIDATION_MASK_SEED
from aid_cli.fileio import sha256_file
from aid_cli.guidance.checkpoint import load_guidance, save_guidance
from aid_cli.guidance.networks import Actor
from aid_cli.guidance.trainer import TrainConfig, train

from .conftest import run_cli
from .guidance_helpers import tiny_data  # noqa: F401  (a fixture: six 16x16 images)




def test_validate_reads_the_same_as_the_runs_validation(tiny_data, tiny_checkpoint, tmp_path, capsys):
    """A saved module scored by `aid guidance validate` on the run's own validation images, masks and noise: its
    numbers equal the val_* line the run logged for that iteration; `--by-family` adds each mask family's own means
    (one image each here: they average to the whole set's)."""
    cfg = TrainConfig(dataset=str(tiny_data), out=str(tmp_path / "r"), backbone=str(tiny_checkpoint), steps=3, batch=2,
                      iters=2, width=8, critic_width=8, val_every=2, val_n=3, checkpoint_every=2,
                      val_dataset=str(tiny_data), val_offset=0, mask_bank=16, estimator="backprop", seed=1)
    run = train(cfg, progress=False, log=lambda *a: None)
    logged = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()][-1]
    module = run / "modules" / "guidance-000002.safetensors"
    code, out, err = run_cli(["guidance", "validate", module, "--val", tiny_data, "--val-offset", "0", "--val-n", "3",
                              "--backbone", tiny_checkpoint, "--json", "--by-family", "--device", "cpu"], capsys)
    assert code == 0, err
    scored = json.loads(out.strip())
    for key in ("val_psnr_hole_18", "val_psnr_hole_12", "val_ssim_18", "val_ssim_12"):
        assert scored[key] == pytest.approx(logged[key], rel=1e-5), key
        metric, N = key[4:].rsplit("_", 1)
        by_family = [scored[f"val_{metric}_{f}_{N}"] for f in ("freeform", "center", "strip")]
        assert sum(by_family) / 3 == pytest.approx(scored[key], rel=1e-5) and len(set(by_family)) > 1, key
    assert scored["val_texture_ratio_18"] == pytest.approx(logged["val_texture_ratio_18"], rel=1e-5)
    assert all(scored[f"val_texture_ratio_{f}_18"] > 0 for f in ("freeform", "center", "strip"))
    assert (scored["val_offset"], scored["val_n"], scored["val_mask_seed"]) == (0, 3, VALIDATION_MASK_SEED)
    assert scored["sha256"] == sha256_file(module)
    assert "guidance-000002" in err and "freeform:" in err and "strip:" in err
    code, _, err = run_cli(["guidance", "validate", tmp_path / "nosuch.safetensors", "--val", tiny_data,
                            "--backbone", tiny_checkpoint], capsys)
    assert code == 2 and "guidance module not found" in err and len(err.strip().splitlines()) == 1


def test_average_writes_the_mean_with_its_sources(tmp_path, capsys):
    """The mean of the modules' weights, loadable as a module, its sources recorded; a module of another backbone, a
    single module, or an output that is one of the inputs is refused in one line, nothing written."""
    kw = dict(channels=3, width=8, emb_dim=16)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        actor = Actor(width=8)
        torch.nn.init.normal_(actor.out.weight, std=0.05)
        paths.append(save_guidance(tmp_path / f"g{i}.safetensors", actor, kw, "a" * 64,
                                   training={"iterations": 25 * (i + 1)}))
    out = tmp_path / "mean.safetensors"
    code, _, err = run_cli(["guidance", "average", out, *paths], capsys)
    assert code == 0 and "the mean of 3 modules" in err
    mean, info = load_guidance(out, backbone_sha256="a" * 64)
    sources = [load_guidance(q)[0].state_dict() for q in paths]
    for k, v in mean.state_dict().items():
        assert torch.allclose(v, sum(sd[k] for sd in sources) / 3, atol=1e-7), k
    assert [s["iterations"] for s in info["training"]["averaged_from"]] == [25, 50, 75]
    assert info["training"]["averaged_from"][0]["sha256"] == sha256_file(paths[0])
    assert info["training"]["iterations"] == 75
    other = save_guidance(tmp_path / "other.safetensors", Actor(width=8), kw, "b" * 64)
    bad = tmp_path / "bad.safetensors"
    for args, phrase in (([paths[0], other], "another backbone"), ([paths[0]], "at least two modules"),
                         ([paths[0], paths[1]], None)):
        target = paths[1] if phrase is None else bad
        before = sha256_file(paths[1])
        code, _, err = run_cli(["guidance", "average", target, *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (phrase or "is one of the modules averaged") in err
        assert not bad.exists() and sha256_file(paths[1]) == before
