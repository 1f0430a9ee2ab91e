"""`aid pretrain`: a killed and resumed run reproduces the uninterrupted one; bad images are skipped."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aid_cli.backbones.checkpoint import load_backbone
from aid_cli.backbones.edm import build_precond
from aid_cli.errors import UserError
from aid_cli.pretrain import STATE_FILE, PretrainConfig, pretrain


@pytest.fixture
def tiny_dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def config(data, out, **kw):
    base = dict(dataset=str(data), out=str(out), resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], batch=4, lr=1e-3, lr_rampup_kimg=0.008, ema_halflife_kimg=0.01,
                duration_kimg=0.024, snapshot_kimg=0.012, checkpoint_minutes=60.0, seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def test_resume_reproduces_uninterrupted_run(tiny_dataset, tmp_path):
    pretrain(config(tiny_dataset, tmp_path / "a"), progress=False, log=lambda *a: None)
    # "kill" after 3 of 6 steps (the state is written at the end of the partial run), then resume
    pretrain(config(tiny_dataset, tmp_path / "b"), max_steps=3, progress=False, log=lambda *a: None)
    state = load_file(str(tmp_path / "b" / STATE_FILE))
    pretrain(config(tiny_dataset, tmp_path / "b"), resume=True, progress=False, log=lambda *a: None)
    a = load_file(str(tmp_path / "a" / STATE_FILE))
    b = load_file(str(tmp_path / "b" / STATE_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(state[k], b[k]) for k in b if k.startswith("net."))  # training moved on after resume


def test_run_folder_contents_and_snapshot_loads(tiny_dataset, tmp_path):
    logs = []
    run = pretrain(config(tiny_dataset, tmp_path / "r"), progress=False, log=logs.append)
    assert any("broken.png" in str(line) for line in logs)  # reported and skipped
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["kimg"] == pytest.approx(0.024) and np.isfinite(stats[-1]["loss"])
    snaps = sorted(run.glob("network-snapshot-*.safetensors"))
    assert snaps and sorted(run.glob("samples-*.png"))
    net, info = load_backbone(snaps[-1])
    assert info["resolution"] == 16 and info["provenance"]["images_seen"] == 24
    out = net(torch.zeros(1, 3, 16, 16), torch.ones(1))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_existing_run_needs_resume(tiny_dataset, tmp_path):
    pretrain(config(tiny_dataset, tmp_path / "r"), max_steps=1, progress=False, log=lambda *a: None)
    with pytest.raises(UserError, match="--resume"):
        pretrain(config(tiny_dataset, tmp_path / "r"), progress=False, log=lambda *a: None)


def test_torchrun_two_processes_match_one(tiny_dataset, tmp_path):
    """DDP under torchrun: each rank trains on its slice of the same global batch, so 2 processes equal 1."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not installed beside this Python")
    args = ["pretrain", "--dataset", str(tiny_dataset), "--resolution", "16", "--width", "16", "--channel-mult", "1,2",
            "--attn", "8", "--batch", "4", "--duration", "0.012", "--snapshot-kimg", "0", "--seed", "5",
            "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "aid_cli.cli", *args, "--out",
                    str(tmp_path / "ddp")], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "aid_cli.cli", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=300)
    a = load_file(str(tmp_path / "one" / STATE_FILE))
    b = load_file(str(tmp_path / "ddp" / STATE_FILE))
    for k in a:
        if k.startswith("net."):
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    torch.manual_seed(5)  # the initialisation pretrain uses: training must have moved away from it
    kwargs = PretrainConfig(dataset="", out="", resolution=16, model_channels=16, channel_mult=[1, 2],
                            attn_resolutions=[8]).network_kwargs()
    fresh = build_precond("EDMPrecond", kwargs).state_dict()
    assert any(not torch.equal(fresh[k[4:]], a[k]) for k in a if k.startswith("net."))


def test_resume_keeps_the_runs_own_hyperparameters(tiny_dataset, tmp_path):
    pretrain(config(tiny_dataset, tmp_path / "r", lr=2e-3), max_steps=1, progress=False, log=lambda *a: None)
    logs = []
    pretrain(config(tiny_dataset, tmp_path / "r", lr=5e-4, duration_kimg=0.012), resume=True, progress=False,
             log=logs.append)
    assert any("lr=0.002" in str(line) for line in logs)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 2e-3


def test_sigterm_saves_state_and_snapshot_then_resume_continues(tiny_dataset, tmp_path, monkeypatch):
    from .conftest import sigterm_at_call

    cfg = config(tiny_dataset, tmp_path / "r", duration_kimg=1.0, snapshot_kimg=0.5)
    sigterm_at_call(monkeypatch, 2)
    logs = []
    pretrain(cfg, progress=False, log=logs.append)
    monkeypatch.undo()
    state = load_file(str(tmp_path / "r" / STATE_FILE))
    assert state and any("stopped at" in str(line) for line in logs)
    assert sorted((tmp_path / "r").glob("network-snapshot-*.safetensors"))
    assert not sorted((tmp_path / "r").glob("samples-*.png"))  # a stop writes the weights at once, no sample grid
    stats = [json.loads(line) for line in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 2
    pretrain(config(tiny_dataset, tmp_path / "r", duration_kimg=0.02), resume=True, progress=False,
             log=lambda *a: None)
    stats = [json.loads(line) for line in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 5  # 20 images at batch 4


def test_bf16_autocast_trains_float32_weights_close_to_fp32(tiny_dataset, tmp_path):
    from aid_cli import devices

    if not devices._autocast_runs(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch has no bfloat16 autocast on CPU")
    logs = []
    a = pretrain(config(tiny_dataset, tmp_path / "fp32", precision="fp32"), max_steps=1, progress=False,
                 log=lambda *m: None)
    b = pretrain(config(tiny_dataset, tmp_path / "bf16", precision="bf16"), max_steps=1, progress=False,
                 log=logs.append)
    assert any("bf16 autocast" in str(line) for line in logs)
    loss_a, loss_b = (json.loads((r / "stats.jsonl").read_text().splitlines()[-1])["loss"] for r in (a, b))
    assert loss_a != loss_b and loss_b == pytest.approx(loss_a, rel=0.05)  # bf16 did run, and is close
    state = load_file(str(b / STATE_FILE))
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith(("net.", "ema.")))


def test_fp16_training_is_refused_in_one_line(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="fp16 is not offered for training"):
        pretrain(config(tiny_dataset, tmp_path / "r", precision="fp16"), max_steps=1, progress=False,
                 log=lambda *a: None)
    assert not (tmp_path / "r" / STATE_FILE).exists()


# ------------------------------------------------------------------------------------ whole photos, random-scale crops

@pytest.fixture
def tiny_photos(tmp_path):
    """Photos of several sizes, none square: `--crop auto` must train on random-scale windows of them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (33, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_random_crops_cover_the_scales_asked_for(tiny_photos):
    import math

    from aid_cli.data.datasets import crop_boxes, crop_sides, load_photo_set, random_crops

    photos = load_photo_set(tiny_photos)
    assert photos.same_square() is None and len(photos) == 3
    boxes = crop_boxes(photos, 3000, 16, torch.Generator().manual_seed(0))
    for k, top, left, side, _ in boxes:  # every window lies inside its photo, within the range asked for
        h, w = photos.photos[k].shape[1:]
        lo, hi = crop_sides(h, w, 16, None, None)
        assert (lo, hi) == (16, min(h, w))
        assert lo <= side <= hi and 0 <= top <= h - side and 0 <= left <= w - side
    # log-uniform sides: both ends reached, and half the windows below the geometric middle of the range
    for k in range(3):
        lo, hi = crop_sides(*photos.photos[k].shape[1:], 16, None, None)
        sides = np.array([b[3] for b in boxes if b[0] == k])
        assert sides.min() <= lo + 1 and sides.max() >= hi - 1
        assert np.mean(sides < math.sqrt(lo * hi)) == pytest.approx(0.5, abs=0.06)
    assert 0.45 < np.mean([b[4] for b in boxes]) < 0.55  # flips
    # a narrower range asked for is kept; the same generator draws the same crops
    boxes = crop_boxes(photos, 500, 16, torch.Generator().manual_seed(1), min_side=20, max_side=30)
    assert all(20 <= b[3] <= 30 for b in boxes)
    a = random_crops(photos, 8, 16, torch.Generator().manual_seed(2))
    b = random_crops(photos, 8, 16, torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    # a native-scale window is the photo's own pixels
    (k, top, left, side, flip), = crop_boxes(photos, 1, 16, torch.Generator().manual_seed(5), max_side=16)
    x = random_crops(photos, 1, 16, torch.Generator().manual_seed(5), max_side=16)[0]
    ref = photos.photos[k][:, top:top + 16, left:left + 16]
    assert torch.equal(x, ref.flip(-1) if flip else ref)


def test_pretrain_on_photos_trains_on_random_crops_and_resumes_exactly(tiny_photos, tmp_path):
    logs = []
    cfg = config(tiny_photos, tmp_path / "a", val=str(tiny_photos), val_n=4)
    pretrain(cfg, progress=False, log=logs.append)
    assert any("random crops" in str(line) for line in logs)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["crop"] == "random"  # auto, resolved and kept
    stats = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    vals = [s for s in stats if "val_edm_loss" in s]
    assert len(vals) == 2 and all(np.isfinite(s["val_edm_loss"]) and s["val_images"] == 4 for s in vals)
    pretrain(config(tiny_photos, tmp_path / "b"), max_steps=3, progress=False, log=lambda *a: None)
    pretrain(config(tiny_photos, tmp_path / "b"), resume=True, progress=False, log=lambda *a: None)
    a = load_file(str(tmp_path / "a" / STATE_FILE))
    b = load_file(str(tmp_path / "b" / STATE_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_crop_keeps_an_aligned_set_whole(tiny_dataset, tmp_path):
    """Square images of one size (cat faces) train whole, exactly as `--crop resize` does."""
    pretrain(config(tiny_dataset, tmp_path / "auto"), max_steps=2, progress=False, log=lambda *a: None)
    pretrain(config(tiny_dataset, tmp_path / "resize", crop="resize"), max_steps=2, progress=False,
             log=lambda *a: None)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["crop"] == "resize"
    a = load_file(str(tmp_path / "auto" / STATE_FILE))
    b = load_file(str(tmp_path / "resize" / STATE_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_curves_plot_runs_against_cpu_hours(tmp_path):
    import subprocess
    import sys

    from aid_cli.plots import cpu_hours

    # one process for an hour, then two for half an hour more: two CPU-hours
    assert cpu_hours([{"elapsed_s": 3600}, {"elapsed_s": 5400, "processes": 2}]) == [1.0, 2.0]
    for name, scale in (("a", 1.0), ("b", 1.2)):
        run = tmp_path / name
        run.mkdir()
        lines = []
        for k in range(1, 6):
            lines.append({"step": k, "kimg": k, "loss": scale * 100 / k, "elapsed_s": 600 * k, "processes": 2})
            lines.append({"step": k, "kimg": k, "val_edm_loss": scale * 90 / k, "elapsed_s": 600 * k, "processes": 2})
        (run / "stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "c.png"
    res = subprocess.run([sys.executable, "scripts/pretrain_curves.py", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(out)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert "a: 5.0 kimg, 1.67 CPU-hours, validation EDM loss 18.0" in res.stdout
    with Image.open(out) as im:
        assert im.size == (960, 400)
        px = np.asarray(im.convert("RGB"))
    assert (px != 255).any(axis=2).mean() > 0.01  # axes and curves drawn, not a blank page
