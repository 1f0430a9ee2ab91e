"""`aid pretrain`: a killed and resumed run reproduces the uninterrupted one; bad images are skipped."""

import json

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
