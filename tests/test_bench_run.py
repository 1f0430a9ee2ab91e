"""`aid bench` runs: resume after an interruption, results independent of the batch size and of sharding under
torchrun, --report-only, and what a run says while it works (progress, warm-up, plan, the command that resumes it)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aid_cli import inpainter as inpainter_mod
from aid_cli.bench import BenchConfig, plan_text, read_cells, run_bench
from aid_cli.errors import UserError
from aid_cli.resolve import resolve_method

from .bench_helpers import STEPS, _bench_args
from .bench_helpers import data, isolated_cache, lpips_cache, stand_in_inception  # noqa: F401 (fixtures)
from .conftest import REPO
from .test_cli_inpaint import assert_user_error, run_cli


def test_resume_skips_finished_cells_and_survives_an_interruption(tmp_path, data, tiny_checkpoint, capsys,
                                                                  monkeypatch):
    out = tmp_path / "out"
    calls, sizes, interrupt_at = [], [], [5]
    real_sample = inpainter_mod.sample

    def counting(*args, **kwargs):
        calls.append(args[2].name)
        sizes.append(len(args[1].y))
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(inpainter_mod, "sample", counting)
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace", "freeform,center", "2"), capsys)
    assert code == 130 and "--resume" in err, (code, err)
    # warm-up (untimed, then timed for the plan) + cells (replace, freeform, 0) and (replace, freeform, 1); the
    # interrupt hit the third cell
    first = (out / "cells.jsonl").read_text().splitlines()
    assert [(c["method"], c["mask"], c["seed"]) for c in read_cells(out)] == [("replace", "freeform", 0),
                                                                              ("replace", "freeform", 1)]
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace", "freeform,center", "2"), capsys)
    assert_user_error(code, "", err, "--resume")  # never silently mixed into an existing run

    with open(out / "cells.jsonl", "a") as f:
        f.write('{"method": "repl')  # a torn line, as a crash in mid-write would leave: ignored, never glued on
    calls.clear()
    sizes.clear()
    interrupt_at[0] = None
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace,copy", "freeform,center", "2", "4",
                                       "--resume"), capsys)
    assert code == 0, err
    assert "2 finished cell(s) skipped" in err
    # the warm-up, one image each: replace untimed (its finished cells timed it), copy untimed and timed; then copy's
    # 2 free-form cells, and each center seed runs replace and copy batch by batch in turn: the methods of one family
    # and seed are interleaved, so their timings are comparable
    assert calls == ["replace", "copy", "copy"] + ["copy"] * 2 + ["replace", "copy", "replace", "copy"]
    assert sizes == [1, 1, 1] + [4] * 6
    assert "its finished cells (replace)" in err and "a timed warm-up image (copy)" in err
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 9 and len(read_cells(out)) == 8
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["seeds"] == [0, 1] for r in rows)

    calls.clear()
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace,copy", "freeform,center", "2", "4",
                                       "--resume"), capsys)
    assert code == 0 and calls == []  # everything finished: reports rebuilt from the cells alone

    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "replace", "center", "2", "4", "--resume",
                                       "--mask-seed", "1"), capsys)
    assert_user_error(code, "", err, "mask_seed")  # a different setup is refused


def test_results_do_not_depend_on_batch_size(tmp_path, data, tiny_checkpoint, monkeypatch):
    seen = {}
    real_sample = inpainter_mod.sample

    def recording(net, task, method, **kwargs):
        for g, y in zip(kwargs["generators"], task.y):
            seen.setdefault(g.initial_seed(), set()).add(float(y.abs().sum()))
        return real_sample(net, task, method, **kwargs)

    monkeypatch.setattr(inpainter_mod, "sample", recording)
    cells = {}
    for batch in (1, 4):
        cfg = BenchConfig(dataset=str(data), methods=["dps", "replace"], masks=["freeform"], n=4, seeds=[0, 1],
                          steps=2, batch=batch)
        run_bench(cfg, tmp_path / f"b{batch}", model=tiny_checkpoint, device="cpu", log=lambda m: None)
        cells[batch] = read_cells(tmp_path / f"b{batch}")
    assert sorted(seen) == [s * 2 ** 20 + i for s in (0, 1) for i in range(4)]  # image i, seed s: s·2²⁰ + i
    first_draws = {float(torch.randn(1, generator=torch.Generator().manual_seed(k))) for k in seen}
    assert len(first_draws) == len(seen)  # distinct noise (torch keeps only a seed's low 32 bits)
    assert all(len(v) == 1 for v in seen.values())  # each generator always met the same image
    for a, b in zip(cells[1], cells[4]):
        assert (a["method"], a["seed"], a["batch"], b["batch"]) == (b["method"], b["seed"], 1, 4)
        for metric in ("psnr_hole", "ssim"):
            np.testing.assert_allclose(a[metric], b[metric], rtol=1e-6)


@pytest.mark.real_inception  # the workers run the real network: so does the one process they are compared with
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_shards_images_and_matches_one_process(tmp_path, data, tiny_checkpoint):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "aid_cli.cli",
           "bench", "--methods", "dps,copy", "--dataset", str(data), "--model", str(tiny_checkpoint), "--masks",
           "freeform", "-n", "3", "--seeds", "2", "--steps", STEPS, "--batch", "1", "--device", "cpu", "--out",
           str(out)]  # -n: torchrun's own parser takes --n for an ambiguous abbreviation of its options
    def launch():
        shutil.rmtree(out, ignore_errors=True)
        return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600, cwd=REPO)

    r = launch()
    if r.returncode != 0 and "Signal 6 (SIGABRT)" in r.stderr:  # a worker's rare abort inside torch's launcher (seen
        r = launch()  # twice in many runs, in code this test does not own): one more launch, the same assertions
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr)  # whole stderr: each worker's traceback (a rare SIGABRT)
    assert r.stderr.count("wrote ") == 1  # rank 0 alone reports and writes
    ddp = read_cells(out)
    assert [(c["method"], c["seed"], c["world_size"]) for c in ddp] == [("dps", 0, 2), ("copy", 0, 2), ("dps", 1, 2),
                                                                       ("copy", 1, 2)]
    cfg = BenchConfig(dataset=str(data), methods=["dps", "copy"], masks=["freeform"], n=3, seeds=[0, 1], steps=2,
                      batch=3)
    run_bench(cfg, tmp_path / "one", model=tiny_checkpoint, device="cpu", log=lambda m: None)
    for a, b in zip(ddp, read_cells(tmp_path / "one")):  # images 0, 2 on rank 0 and 1 on rank 1: same numbers
        for metric in ("psnr_hole", "ssim", "lpips_vgg"):
            np.testing.assert_allclose(a[metric], b[metric], rtol=1e-5)
        # every image's features gathered to rank 0, in image order
        np.testing.assert_allclose(np.load(out / a["features"]), np.load(tmp_path / "one" / b["features"]),
                                   rtol=1e-4, atol=1e-5)
    ddp_rows = json.loads((out / "bench.json").read_text())
    assert ddp_rows["config"]["world_size"] == 2
    one_rows = json.loads((tmp_path / "one" / "bench.json").read_text())
    for a, b in zip(ddp_rows["rows"], one_rows["rows"]):
        assert a["kid"]["mean"] == pytest.approx(b["kid"]["mean"], rel=1e-3, abs=1e-6)


def test_report_only_rebuilds_from_cells_without_running(tmp_path, data, tiny_checkpoint, capsys, monkeypatch):
    import aid_cli.bench as bench_mod

    out = tmp_path / "out"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,replace", "center", "0,", "4"), capsys)
    assert code == 0, err
    monkeypatch.setattr(bench_mod.Runner, "cell", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    (out / "bench.json").unlink()
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "copy,replace", "center", "3", "4",
                                       "--report-only"), capsys)
    assert code == 0, err
    assert "4 cell(s) not run are left out" in err
    caption = (out / "bench.md").read_text().splitlines()[0]
    assert "× 3 seeds (so far copy 1, replace 1)" in caption and "measured in the same run" in caption
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["method"], r["seeds"]) for r in rows] == [("copy", [0]), ("replace", [0])]
    assert rows[1]["psnr_hole"]["std"] is None  # one seed: no spread claimed
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps", "center", "3", "4", "--report-only"),
                                capsys)
    assert_user_error(code, stdout, err, "holds no finished cell")


def test_an_interrupted_run_prints_the_command_that_resumes_it(tmp_path, data, tiny_checkpoint, capsys, monkeypatch):
    """Without --out the run goes to a numbered folder: Ctrl-C prints the whole command to continue it (its options as
    given, --out that folder, --resume), and that command finishes the run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AID_RUNS", raising=False)
    calls, real_sample = [], inpainter_mod.sample

    def interrupting(*args, **kwargs):
        calls.append(args[2].name)
        if len(calls) == 4:  # the warm-up's two calls, the first cell, then Ctrl-C
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(inpainter_mod, "sample", interrupting)
    args = ["bench", "--methods", "replace", "--dataset", data, "--masks", "freeform,center", "--n", "4", "--seeds", "2",
            "--model", tiny_checkpoint, "--steps", STEPS, "--device", "cpu", "--no-lpips-vgg"]  # (in --help's order)
    code, _, err = run_cli(args, capsys)
    assert code == 130, err
    out = os.path.join("aid-runs", "00000-bench-data")
    command = shlex.split(err.strip().splitlines()[-1])
    assert command == ["aid", *map(str, args), "--out", out, "--resume"], err
    monkeypatch.setattr(inpainter_mod, "sample", real_sample)
    code, _, err = run_cli(command[1:], capsys)
    assert code == 0, err
    assert "1 finished cell(s) skipped, 3 to run" in err and len(read_cells(tmp_path / out)) == 4


def test_progress_has_its_total_from_the_start_and_the_warm_up_is_short_and_untimed(tmp_path, data, tiny_checkpoint,
                                                                                    monkeypatch):
    """The bar's total (cells × images) is known before anything is loaded and says what the warm-up does; the
    warm-up is one untimed image per method (and a timed one for the plan), never part of a cell's seconds; on
    --resume, methods timed by finished cells are not timed again, and finished methods are not warmed up at all."""
    first, real_sample = set(), inpainter_mod.sample

    def slow_first_call(net, task, method, **kwargs):  # a first call's one-time costs, made large
        if method.name not in first:
            first.add(method.name)
            time.sleep(3)
        return real_sample(net, task, method, **kwargs)

    monkeypatch.setattr(inpainter_mod, "sample", slow_first_call)
    seen, logs = [], []
    cfg = BenchConfig(dataset=str(data), methods=["replace", "copy"], masks=["freeform", "center"], n=4, seeds=[0],
                      steps=2, batch=4, realism=False, lpips_vgg=False)
    out = tmp_path / "out"
    run_bench(cfg, out, model=tiny_checkpoint, device="cpu", log=logs.append,
              progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen[0] == (0, 16, "loading the backbone, the images and the metric networks")
    assert {total for _, total, _ in seen} == {16} and seen[-1][0] == 16
    warm = [what for done, _, what in seen if what.startswith("warm-up")]
    assert warm == ["warm-up: replace on 1 image(s), untimed / freeform", "warm-up: replace, timing 1 image(s) for "
                    "the plan", "warm-up: copy on 1 image(s), untimed / freeform", "warm-up: copy, timing 1 image(s) "
                    "for the plan"]
    assert all(c["seconds"] < 3 for c in read_cells(out))  # the slow first calls were the warm-up's
    plan = [line for line in logs if line.startswith("plan:")]
    assert len(plan) == 1 and "a timed warm-up image (replace, copy); metrics included" in plan[0]

    seen.clear()
    logs.clear()
    cfg.methods, cfg.seeds = ["replace", "copy", "greyfill"], [0, 1]
    run_bench(cfg, out, model=tiny_checkpoint, device="cpu", resume=True, log=logs.append,
              progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen[0][1] == 32 and {total for _, total, _ in seen} == {32}  # 12 cells less the 4 finished, × 4 images
    assert [what for _, _, what in seen if what.startswith("warm-up")] == [
        "warm-up: replace on 1 image(s), untimed / freeform", "warm-up: copy on 1 image(s), untimed / freeform",
        "warm-up: greyfill on 1 image(s), untimed / freeform", "warm-up: greyfill, timing 1 image(s) for the plan"]
    plan = next(line for line in logs if line.startswith("plan:"))
    assert "a timed warm-up image (greyfill); its finished cells (replace, copy)" in plan


def test_the_plan_estimates_from_each_methods_seconds_and_the_metrics(tiny_checkpoint):
    spec = resolve_method("replace", 2, tiny_checkpoint)
    runner = SimpleNamespace(info={"channels": 3, "resolution": 16, "label_dim": 0}, world=1, device="cpu")
    cfg = BenchConfig(dataset="d", methods=["replace"], n=30, batch=4)
    todo = [(spec, "center", 0), (spec, "center", 1)]
    text = plan_text(runner, cfg, todo, {"replace": 2.0}, 1.0)  # 2 cells × 30 images × (2 + 1) s = 3 min
    assert text.startswith("plan: 2 cell(s) × 30 images = 60 completions (replace 3 NFE per image); about 3 min")
    assert "a timed warm-up image (replace); metrics included" in text
    runner.world = 3  # images shared by three processes
    assert "about 60 s" in plan_text(runner, cfg, todo, None, 1.0, recorded={"replace": 2.0})


def test_offset_benchmarks_the_images_after_the_first_k(tmp_path, data, tiny_checkpoint):
    """--offset K: the n images after the dataset's first K, with the masks and noise a dataset of just those images
    gets (selection on images the protocol never uses); a resume under another offset is refused."""
    rest = tmp_path / "rest"
    rest.mkdir()
    for name in sorted(p.name for p in data.iterdir())[2:]:
        shutil.copy(data / name, rest / name)
    cells = {}
    for key, dataset, offset in (("offset", data, 2), ("folder", rest, 0)):
        cfg = BenchConfig(dataset=str(dataset), methods=["replace"], masks=["freeform"], n=2, seeds=[0], steps=2,
                          offset=offset)
        run_bench(cfg, tmp_path / key, model=tiny_checkpoint, device="cpu", log=lambda m: None)
        cells[key] = read_cells(tmp_path / key)[0]
    for metric in ("psnr_hole", "ssim"):
        np.testing.assert_allclose(cells["offset"][metric], cells["folder"][metric], rtol=1e-6)
    whole = BenchConfig(dataset=str(data), methods=["replace"], masks=["freeform"], n=2, seeds=[0], steps=2)
    run_bench(whole, tmp_path / "whole", model=tiny_checkpoint, device="cpu", log=lambda m: None)
    assert read_cells(tmp_path / "whole")[0]["psnr_hole"] != cells["offset"]["psnr_hole"]
    with pytest.raises(UserError, match="offset"):
        run_bench(dataclasses.replace(whole, offset=1), tmp_path / "whole", model=tiny_checkpoint, device="cpu",
                  resume=True, log=lambda m: None)
    with pytest.raises(UserError, match="after the first 3"):
        run_bench(dataclasses.replace(whole, offset=3), tmp_path / "short", model=tiny_checkpoint, device="cpu",
                  log=lambda m: None)
