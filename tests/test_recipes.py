"""`aid train --recipe`: the shipped recipe's stages chain, resume and select as the card says; options of another
estimator are refused; a dataset that does not fit the backbone is named in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from aid_cli.fileio import sha256_file
from aid_cli.guidance.recipe import load_recipe, recipe_file
from aid_cli.guidance.selection import lowest_lpips_level_with_best

from .conftest import TINY_KWARGS, random_images, run_cli


@pytest.fixture
def images16(tmp_path):
    return random_images(tmp_path / "imgs", 4)


def tiny_budget(data, backbone, out):
    """The shipped recipe on the tiny backbone: 2 iterations a stage (a checkpoint at each, validation of one image at
    the start and the end), short solves, no LPIPS term (its network needs 31 px)."""
    return ["train", "--recipe", "cats64", "--dataset", data, "--val", data, "--val-offset", "0", "--val-n", "1",
            "--out", out, "--backbone", backbone, "--iters", "2", "--batch", "2", "--width", "8", "--steps", "3",
            "--mix-steps", "2", "--lambda-lpips", "0", "--val-every", "2", "--checkpoint-every", "1",
            "--mask-bank", "8", "--device", "cpu"]


def test_shipped_recipe_chains_resumes_and_selects(images16, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import aid_cli.guidance.trainer as trainer

    stages = load_recipe(recipe_file("cats64"), known={"iters", "seed", "steps", "beta", "lr-actor", "train-masks",
                                                       "mask-bank", "lambda-lpips", "lambda-ssim", "lambda-hole",
                                                       "mix-steps", "ema-halflife", "backbone", "estimator", "batch",
                                                       "denoised-input", "val-every", "val-n", "checkpoint-every"})
    assert [s.options["seed"] for s in stages] == [0, 3, 5, 7, 11, 19]
    assert [s.select for s in stages] == ["last"] * 5 + ["lpips"]
    out = tmp_path / "cats64"
    real, calls = trainer.train, []

    def stop_in_stage_3(cfg, **kw):  # the third run is stopped after one iteration, as by a signal
        calls.append(cfg.out)
        return real(cfg, **kw, max_iters=1 if len(calls) == 3 else None)

    monkeypatch.setattr(trainer, "train", stop_in_stage_3)
    code, _, err = run_cli(tiny_budget(images16, tiny_checkpoint, out), capsys)
    assert code == 0 and "continue with the same command and --resume" in err, err
    assert (out / "stage-2" / "selected.json").is_file() and not (out / "stage-3" / "selected.json").exists()
    before = (out / "stage-1" / "stats.jsonl").read_text()
    code, _, err = run_cli(tiny_budget(images16, tiny_checkpoint, out), capsys)
    assert code == 2 and "already holds a recipe run" in err  # never started over without --resume
    code, _, err = run_cli(tiny_budget(images16, tiny_checkpoint, out) + ["--seed", "4", "--resume"], capsys)
    assert code == 2 and "another recipe or other options" in err
    monkeypatch.setattr(trainer, "train", real)
    code, _, err = run_cli(tiny_budget(images16, tiny_checkpoint, out) + ["--resume"], capsys)
    assert code == 0, err
    assert "stage 1/6: done before" in err and "stage 2/6: done before" in err
    assert (out / "stage-1" / "stats.jsonl").read_text() == before  # finished stages are not trained again
    stats3 = [json.loads(line) for line in (out / "stage-3" / "stats.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in stats3] == [0, 1, 2]  # resumed at 1, not started again
    selected = [json.loads((out / f"stage-{k}" / "selected.json").read_text()) for k in range(1, 7)]
    configs = [json.loads((out / f"stage-{k}" / "config.json").read_text()) for k in range(1, 7)]
    # each stage starts from the module the stage before selected
    assert configs[0]["init"] is None
    for k in range(1, 6):
        module = out / f"stage-{k}" / selected[k - 1]["module"]
        assert configs[k]["init"] == str(module) and configs[k]["init_sha256"] == selected[k - 1]["sha256"]
        assert sha256_file(module) == selected[k - 1]["sha256"]
    # the card's settings per stage, the command line's over every stage
    assert [c["seed"] for c in configs] == [0, 3, 5, 7, 11, 19]
    assert configs[0]["steps"] == configs[5]["steps"] == 3 and configs[0]["lambda_lpips"] == 0.0
    assert (configs[0]["beta"], configs[1]["beta"], configs[5]["lambda_hole"]) == (0.1, 0.003, 0.0)
    assert configs[4]["ema_halflife"] == 35 and configs[3]["ema_halflife"] == 0  # stage 5 averages once continued
    assert configs[0]["denoised_input"] and configs[0]["estimator"] == "backprop"
    # stages 1-5 hand on their last checkpoint (stage 5 continued to 2 + 2), the last one the card's rule's pick
    assert [s["iteration"] for s in selected[:5]] == [2, 2, 2, 2, 4]
    assert all(s["select"] == "last" for s in selected[:5]) and selected[5]["select"] == "lpips"
    stats6 = [json.loads(line) for line in (out / "stage-6" / "stats.jsonl").read_text().splitlines()]
    validated = [s for s in stats6 if s["iteration"] and "val_psnr_hole_18" in s]
    assert selected[5]["iteration"] == lowest_lpips_level_with_best(validated)["iteration"] == 2
    assert sha256_file(out / "guidance.safetensors") == selected[5]["sha256"]
    assert err.strip().endswith(f"done: {out / 'guidance.safetensors'}")
    code, _, err = run_cli(["train", "--dataset", images16, "--backbone", tiny_checkpoint, "--out", out, "--resume"],
                           capsys)
    assert code == 2 and "holds a recipe's stages: resume it with the command that started it" in err


def test_the_card_rule_picks_the_lowest_lpips_level_with_the_best():
    def rec(it, psnr, ssim, lpips):
        return {"iteration": it, **{f"val_psnr_hole_{N}": psnr for N in (18, 12)},
                **{f"val_ssim_{N}": ssim for N in (18, 12)}, **{f"val_lpips_{N}": lpips for N in (18, 12)}}

    records = [rec(25, 16.85, 0.772, 0.080), rec(50, 16.50, 0.772, 0.070), rec(75, 16.84, 0.7719, 0.079),
               rec(100, 16.86, 0.760, 0.060)]
    # 50: lowest LPIPS but 0.36 dB down; 100: SSIM down; of 25 and 75 (level), 75 has the lower LPIPS
    assert lowest_lpips_level_with_best(records)["iteration"] == 75
    no_lpips = [{k: v for k, v in r.items() if "lpips" not in k} for r in records]
    assert lowest_lpips_level_with_best(no_lpips)["iteration"] == 25  # the highest hole-PSNR among the level ones


@pytest.mark.parametrize("args, phrase", [
    (["--gamma", "0.05"], "--gamma acts only under --estimator score or pathwise"),
    (["--critic-width", "16"], "--critic-width acts only under --estimator score or pathwise"),
    (["--estimator", "score", "--mix-steps", "12"], "--mix-steps acts only under --estimator backprop"),
    (["--estimator", "pathwise", "--no-recompute"], "--recompute acts only under --estimator backprop"),
    (["--estimator", "pathwise", "--normalize-advantage"], "--normalize-advantage acts only under --estimator score"),
    (["--recipe", "cats64", "--estimator", "score"], "recipe cats64, stage 4: --mix-steps acts only under"),
    (["--recipe", "cats64", "--init", "m.safetensors"], "--init m.safetensors: no such guidance module"),
    (["--recipe", "nosuch"], "unknown recipe 'nosuch': shipped ones are cats64"),
    (["--recipe", "cats64"], "stage 6: it selects its module on validation: give --val"),
])
def test_options_of_another_estimator_and_bad_recipe_use_are_refused(args, phrase, images16, tiny_checkpoint,
                                                                     tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--dataset", images16, "--backbone", tiny_checkpoint, "--out", out, *args], capsys)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_recipe_file_with_a_key_the_command_gives_is_refused(images16, tiny_checkpoint, tmp_path, capsys):
    own = tmp_path / "own.toml"
    own.write_text('[options]\nbatch = 2\n[[stage]]\niters = 1\ndataset = "cats"\n')
    code, _, err = run_cli(["train", "--config", own, "--dataset", images16, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "stage 1 sets 'dataset', which the command gives" in err
    own.write_text('[[stage]]\niters = 1\nlambda_lpips = 0.2\n')
    code, _, err = run_cli(["train", "--config", own, "--dataset", images16, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "'lambda_lpips' is not an option here" in err
    own.write_text('[[stage]]\niters = 0\n')
    code, _, err = run_cli(["train", "--config", own, "--dataset", images16, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "stage 1: iters = 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_dataset_that_does_not_fit_the_backbone_is_named(images16, tmp_path, capsys, tiny_net):
    from aid_cli.backbones.checkpoint import save_backbone

    cats = save_backbone(tmp_path / "cats16.safetensors", tiny_net, "EDMPrecond", dict(TINY_KWARGS),
                         provenance={"config": {"dataset": "cats16/train.zip"}})
    big = tmp_path / "ffhq"
    big.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(big / f"{i}.png")
    code, _, err = run_cli(["train", "--dataset", big, "--backbone", cats, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "its images are 32x32, the backbone cats16.safetensors makes 16x16" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    faces = tmp_path / "ffhq16"
    faces.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(faces / f"{i}.png")
    code, _, err = run_cli(["train", "--dataset", faces, "--backbone", cats, "--out", tmp_path / "r", "--iters", "1",
                            "--batch", "2", "--width", "8", "--steps", "3", "--mask-bank", "4"], capsys)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "holds FFHQ faces, but the backbone cats16.safetensors was trained on cat faces" in warning[0]
    assert "TD " not in err  # the backprop bar shows no critic's TD loss


def test_help_of_every_command_shows_no_type_beside_a_flag_and_train_reads_at_80_columns(capsys, monkeypatch):
    from aid_cli.cli import app
    from typer.main import get_command

    monkeypatch.setenv("COLUMNS", "80")
    root = get_command(app)
    paths = [[name] for name in root.commands]
    paths += [[name, sub] for name, cmd in root.commands.items() for sub in getattr(cmd, "commands", {})]
    for path in paths:
        code, out, err = run_cli([*path, "--help"], capsys)
        assert code == 0 and "Usage: aid " + " ".join(path) in out, path
        assert "<bool>" not in out, path
    code, out, _ = run_cli(["train", "-h"], capsys)
    assert "…" not in out and len(out.splitlines()) < 270
    for panel in ("Data", "Model and loss", "Estimator: backprop", "Estimator: score/pathwise", "Validation", "Recipe",
                  "Run"):
        assert f"─ {panel} ─" in out, panel
    assert "--normalize-advantage" in out and "actor-critic" in out.split("╭")[0]  # the docstring names both


def test_init_warm_starts_a_recipes_first_stage_only(images16, tiny_checkpoint, tmp_path, capsys):
    """--init MODULE beside a recipe: stage 1 starts from it (here a module of another backbone, said in one line),
    stage 2 from what stage 1 selected."""
    from aid_cli.guidance.checkpoint import save_guidance
    from aid_cli.guidance.networks import Actor

    module = save_guidance(tmp_path / "other.safetensors", Actor(width=8), {"channels": 3, "width": 8, "emb_dim": 16},
                           "e" * 64)
    recipe = tmp_path / "two.toml"
    recipe.write_text("[options]\nestimator = \"backprop\"\n[[stage]]\niters = 1\n[[stage]]\niters = 1\nseed = 2\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", recipe, "--dataset", images16, "--backbone", tiny_checkpoint, "--out",
                            out, "--init", module, "--batch", "2", "--width", "8", "--steps", "3", "--mask-bank", "4",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    configs = [json.loads((out / f"stage-{k}" / "config.json").read_text()) for k in (1, 2)]
    assert configs[0]["init"] == str(module) and configs[0]["init_sha256"] == sha256_file(module)
    selected = json.loads((out / "stage-1" / "selected.json").read_text())
    assert configs[1]["init"] == str(out / "stage-1" / selected["module"])
    assert "trained on another backbone" in err and "warm start" in err
