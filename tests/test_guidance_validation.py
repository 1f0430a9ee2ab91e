"""What a run validates on and reports: validation images after the benchmark's and masks of their own seed, tasks
on whole photos and the held-out photos, the curves, and torchrun's processes validating as one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aid_cli.errors import UserError
from aid_cli.guidance.networks import Actor, Critic
from aid_cli.guidance.trainer import STATE_FILE, TrainConfig, split_holdout

from .conftest import run_cli
from .guidance_helpers import (assert_resume_equals_uninterrupted, cfg_for, quiet_train, read_stats,  # noqa: F401
                               tiny_data, tiny_photos)


def test_curves_png_from_a_run(tiny_data, tiny_checkpoint, tmp_path):
    from aid_cli.plots import training_curves

    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint))
    im = Image.open(run / "curves.png")  # written with every checkpoint
    assert im.size == (960, 640)
    stats = read_stats(run)
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


def test_validation_skips_the_benchmark_images_by_default(tiny_checkpoint, tmp_path, capsys):
    """The protocol benchmarks val.zip's first 100 images (--tune its first 16): validation starts after them."""
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
    from aid_cli.guidance.validate import validation_masks

    assert TrainConfig(dataset="", out="", backbone="").val_mask_seed == VALIDATION_MASK_SEED != 0
    own, protocol = validation_masks(6, 64), validation_masks(6, 64, seed=0)
    assert torch.equal(protocol[0], eval_masks(FAMILIES[0], 1, 64, seed=0)[0])
    for i in (0, 2, 3, 5):  # free-form and strip masks differ; center (i = 1, 4) is the same square in every seed
        assert not torch.equal(own[i], protocol[i])
    assert torch.equal(own[1], protocol[1])

    run = quiet_train(cfg_for(tiny_data, tmp_path / "r", tiny_checkpoint, estimator="backprop", iters=2), max_iters=1)
    assert json.loads((run / "config.json").read_text())["val_mask_seed"] == VALIDATION_MASK_SEED
    saved = json.loads((run / "config.json").read_text())
    del saved["val_mask_seed"]
    (run / "config.json").write_text(json.dumps(saved))
    notes = []
    quiet_train(cfg_for(tiny_data, run, tiny_checkpoint, estimator="backprop", iters=2), resume=True, log=notes.append)
    assert json.loads((run / "config.json").read_text())["val_mask_seed"] == 0
    assert any("val_mask_seed=0" in n for n in notes), notes


def test_photo_tasks_are_what_aid_inpaint_presents(tiny_photos):
    """A task on a whole photo is the fitted view `aid inpaint` gives the backbone: its ground truth is the photo's
    box or window resized as fit_hole plans it, its mask that of the hole there; the bank is the same every time."""
    from aid_cli.data.datasets import load_photo_set
    from aid_cli.data.images import LoadedImage, to_task_tensors
    from aid_cli.data.photo_masks import photo_training_hole
    from aid_cli.guidance.photo_tasks import TRAIN_TASKS, photo_tasks
    from aid_cli.fill import InpaintOptions, fit_hole
    from aid_cli.jobs import Job

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
    run, _ = assert_resume_equals_uninterrupted(tiny_photos, tiny_checkpoint, tmp_path, stop_at=3, **kw)
    stats = read_stats(run)
    assert "val_psnr_hole_18" in stats[-1] and np.isfinite(stats[-1]["terminal"])


def test_holdout_keeps_photos_out_of_training_for_validation(tiny_photos, tiny_checkpoint, tmp_path):
    from aid_cli.data.datasets import load_photo_set

    photos = load_photo_set(tiny_photos)
    names = list(photos.names)
    held = split_holdout(photos, 2)
    assert held.names == [names[1], names[3]] and photos.names == [names[0], names[2]]
    assert not set(held.names) & set(photos.names) and len(held.photos) == 2
    with pytest.raises(UserError):
        split_holdout(load_photo_set(tiny_photos), 9)
    logs = []
    run = quiet_train(cfg_for(tiny_photos, tmp_path / "h", tiny_checkpoint, estimator="backprop", mask_bank=8, val_n=2,
                              holdout=2, val_dataset=None, iters=1, val_every=1), log=logs.append)
    stats = read_stats(run)
    assert "val_psnr_hole_18" in stats[-1]  # validated on the held-out photos (no --val given)


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
    a, b = read_stats(tmp_path / "one"), read_stats(tmp_path / "ddp")
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
