"""Interrupted training runs: a torn log line, stale temp files and a corrupt config or state are cut back, cleaned up
or refused in one line; resume logs each iteration once."""

from __future__ import annotations

import json

import pytest

from aid_cli.errors import UserError

from .conftest import run_cli


from .test_guidance import cfg_for as _train_cfg  # noqa: E402  the training tests' tiny actor-critic run
from .test_guidance import tiny_data  # noqa: E402,F401  (a fixture: six 16x16 images)


def test_read_stats_drops_a_torn_last_line_with_a_notice(tmp_path):
    from aid_cli.training import read_jsonl as read_stats

    path = tmp_path / "stats.jsonl"
    path.write_text('{"iteration": 1, "actor_loss": 0.1}\n{"iteration": 2}\n{"iteration": 61, "actor_loss": 0.12')
    notes = []
    assert [r["iteration"] for r in read_stats(path, notice=notes.append)] == [1, 2]
    assert len(notes) == 1 and "dropped 1" in notes[0]


def test_torn_stats_line_then_resume_trains_on_and_logs_each_iteration_once(tiny_data, tiny_checkpoint, tmp_path):
    from aid_cli.guidance.trainer import train

    run = tmp_path / "r"
    train(_train_cfg(tiny_data, run, tiny_checkpoint), max_iters=3, progress=False, log=lambda *a: None)
    stats = run / "stats.jsonl"
    # a killed run logged iteration 4 after its last checkpoint (3), then died while appending iteration 5
    with open(stats, "a") as f:
        f.write('{"iteration": 4, "actor_loss": 0.5}\n{"iteration": 5, "actor_loss": 0.12')
    (run / ".training-state.safetensors.abcd.tmp.safetensors").write_bytes(b"\0" * 100)  # a write killed half-way
    logs = []
    train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=logs.append)
    recs = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [r["iteration"] for r in recs if "actor_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["iteration"] == 6 and recs[-1]["actor_loss"] != 0.5
    assert any("cut back to iteration 3" in str(line) for line in logs)
    assert any("stale temp" in str(line) for line in logs)
    assert not list(run.glob(".*.tmp*"))
    from aid_cli.guidance.checkpoint import load_guidance

    assert load_guidance(run / "guidance.safetensors")[1]["training"]["iterations"] == 6  # the module kept up


def test_resume_with_corrupt_config_or_state_is_one_line(tiny_data, tiny_checkpoint, tmp_path, capsys):
    from aid_cli.guidance.trainer import STATE_FILE, train

    run = tmp_path / "r"
    train(_train_cfg(tiny_data, run, tiny_checkpoint, iters=3), progress=False, log=lambda *a: None)
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config[:40])
    with pytest.raises(UserError, match="config.json is missing or corrupt"):
        train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=lambda *a: None)
    (run / "config.json").write_text(config)
    state = (run / STATE_FILE).read_bytes()
    (run / STATE_FILE).write_bytes(state[: len(state) // 2])
    with pytest.raises(UserError, match="training state .* corrupt"):
        train(_train_cfg(tiny_data, run, tiny_checkpoint), resume=True, progress=False, log=lambda *a: None)
    (run / STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":')
    code, out, err = run_cli(["train", "--dataset", tiny_data, "--out", run, "--backbone", tiny_checkpoint,
                              "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_pretrain_resume_cuts_its_log_back_too(tmp_path):
    from aid_cli.training import truncate_log

    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    assert truncate_log(path, "step", 4) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]


def test_fractional_snapshot_kimg_keeps_every_snapshot(tiny_data, tmp_path):
    from aid_cli.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(dataset=str(tiny_data), out=str(tmp_path / "p"), resolution=16, model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], batch=4, lr=1e-3,
                         lr_rampup_kimg=0.008, ema_halflife_kimg=0.01, duration_kimg=0.016, snapshot_kimg=0.008,
                         checkpoint_minutes=60.0, seed=3)
    run = pretrain(cfg, progress=False, log=lambda *a: None)
    names = sorted(p.name for p in run.glob("network-snapshot-*.safetensors"))
    assert names == ["network-snapshot-000000.008.safetensors", "network-snapshot-000000.016.safetensors"]
