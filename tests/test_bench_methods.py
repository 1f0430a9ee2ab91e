"""`aid bench` and its methods: every method keeps the visible pixels, names and options fail in one line, guidance
variants side by side, and --tune's records (written, merged, refused for another backbone, used by inpaint and
bench)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli import inpainter as inpainter_mod
from aid_cli.bench import BenchConfig, run_bench, tune_grid
from aid_cli.fileio import sha256_file
from aid_cli.methods import METHODS, Method
from aid_cli.models import tuned
from aid_cli.resolve import resolve_method

from .bench_helpers import STEPS, _bench_args, _guidance
from .bench_helpers import data, isolated_cache, lpips_cache, stand_in_inception  # noqa: F401 (fixtures)
from .test_cli_inpaint import assert_user_error, run_cli


def test_tune_records_params_that_inpaint_and_bench_use(tmp_path, data, tiny_checkpoint, capsys):
    code, _, err = run_cli(["bench", "--tune", "dps", "--dataset", data, "--model", tiny_checkpoint, "--n", "2",
                            "--steps", STEPS, "--device", "cpu", "--json", tmp_path / "tune.json"], capsys)
    assert code == 0, err
    sidecar = tiny_checkpoint.with_name("tiny.tuned.json")
    record = json.loads(sidecar.read_text())
    assert record["backbone_sha256"] == sha256_file(tiny_checkpoint)
    entry = record["methods"]["dps"]
    param, grid = tune_grid("dps")
    assert param == "zeta" and set(grid) <= set(entry["grid"]) and len(grid) == 5 and 0.5 in grid
    assert 5 <= len(entry["grid"]) <= 13 and [s["zeta"] for s in entry["scores"]] == entry["grid"] == sorted(entry["grid"])
    assert entry["params"]["zeta"] in entry["grid"]
    assert entry["criterion"].startswith("max mean psnr_hole")
    assert (entry["dataset"], entry["n"], entry["masks"], entry["steps"]) == (str(data), 2, "freeform v1", 2)
    assert "date" in entry and json.loads((tmp_path / "tune.json").read_text())["params"] == entry["params"]
    zeta = entry["params"]["zeta"]

    # merging: a second method's record keeps the first
    tuned.write_tuned(tiny_checkpoint, "mcg", {"params": {"alpha": 0.25}}, sha256_file(tiny_checkpoint))
    assert tuned.tuned_params(tiny_checkpoint, "dps") == {"zeta": zeta}
    assert tuned.tuned_params(tiny_checkpoint, "mcg") == {"alpha": 0.25}
    assert tuned.tuned_params(tiny_checkpoint, "replace") == {}

    # bench uses it, and says so
    spec = resolve_method("dps", 2, tiny_checkpoint)
    assert spec.params == {"zeta": zeta} and spec.params_source.startswith("tuned")
    # inpaint uses it: the method is built with the tuned value
    img, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(img)
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(mask)
    code, stdout, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "out.png", "--model", tiny_checkpoint,
                                 "--method", "dps", "--steps", STEPS, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["params"] == {"zeta": zeta} and "tuned" in err


def test_tuned_record_for_another_backbone_is_refused(tmp_path, tiny_checkpoint):
    sidecar = tuned.tuned_sidecar(tiny_checkpoint)
    sidecar.write_text(json.dumps({"backbone_sha256": "0" * 64, "methods": {"dps": {"params": {"zeta": 9.0}}}}))
    notes = []
    assert tuned.tuned_params(tiny_checkpoint, "dps", notice=notes.append) == {}
    assert len(notes) == 1 and "sha256" in notes[0] and "defaults" in notes[0]
    assert resolve_method("dps", 18, tiny_checkpoint).params == {}


def test_tuned_record_goes_to_the_cache_when_the_folder_is_read_only(tmp_path, tiny_checkpoint, monkeypatch,
                                                                     isolated_cache):
    folder = str(tiny_checkpoint.resolve().parent)
    real_access = tuned.os.access
    monkeypatch.setattr(tuned.os, "access", lambda p, mode: False if str(p) == folder else real_access(p, mode))
    sha = sha256_file(tiny_checkpoint)
    path = tuned.write_tuned(tiny_checkpoint, "gradpaint", {"params": {"alpha": 0.01}}, sha)
    assert path == isolated_cache / "tuned" / f"{sha}.json"
    assert not tuned.tuned_sidecar(tiny_checkpoint).exists()
    assert tuned.tuned_params(tiny_checkpoint, "gradpaint") == {"alpha": 0.01}


def test_every_method_keeps_visible_pixels_exact(tmp_path, data, tiny_checkpoint, monkeypatch):
    real_sample = inpainter_mod.sample
    checked = set()

    def checking(net, task, method, **kwargs):
        result = real_sample(net, task, method, **kwargs)
        vis = task.M.expand_as(task.y) > 0.5
        assert torch.equal(result.completed[vis], task.y[vis]), method.name
        checked.add(method.name)
        return result

    monkeypatch.setattr(inpainter_mod, "sample", checking)
    guidance = _guidance(tmp_path / "guidance.safetensors", sha256_file(tiny_checkpoint))
    names = sorted(METHODS) + ["aid-12"]  # every registered method, and an AID operating point
    cfg = BenchConfig(dataset=str(data), methods=names, masks=["freeform"], n=2, seeds=[0], steps=2, batch=2,
                      guidance=str(guidance))
    result = run_bench(cfg, tmp_path / "all", model=tiny_checkpoint, device="cpu", log=lambda m: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert checked == set(METHODS) and list(rows) == names
    assert (rows["aid"]["nfe"], rows["aid-12"]["nfe"], rows["aid-12"]["steps"]) == (3, 23, 12)  # 2N − 1
    assert result["config"]["methods"]["aid-12"]["resources"] == {"guidance_sha256": sha256_file(guidance)}

    class Broken(Method):  # forgets to paste the visible pixels back
        name = "broken"

        def finish(self, s, x):
            return x

    monkeypatch.setattr(inpainter_mod, "sample", real_sample)  # the bench's own check must catch it
    monkeypatch.setitem(METHODS, "broken", Broken)
    cfg = BenchConfig(dataset=str(data), methods=["broken"], masks=["center"], n=2, seeds=[0], steps=2, batch=2)
    with pytest.raises(RuntimeError, match="visible pixels"):
        run_bench(cfg, tmp_path / "broken", model=tiny_checkpoint, device="cpu", log=lambda m: None)


def test_method_names_and_bad_options_fail_with_one_line(tmp_path, data, tiny_checkpoint, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps,nope"), capsys)
    assert_user_error(code, stdout, err, "unknown method 'nope'")
    foreign = _guidance(tmp_path / "foreign.safetensors", "0" * 64)  # trained on another backbone
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "aid-18", "center", "1", "4", "--guidance",
                                            foreign), capsys)
    assert_user_error(code, stdout, err, "trained on backbone")
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps", "freeform,circle"), capsys)
    assert_user_error(code, stdout, err, "circle")
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps", "center", "x"), capsys)
    assert_user_error(code, stdout, err, "--seeds")
    code, stdout, err = run_cli(["bench", "--methods", "dps", "--dataset", data, "--model", tiny_checkpoint, "--n",
                                 "9", "--out", out, "--device", "cpu"], capsys)
    assert_user_error(code, stdout, err, "only 4")
    code, stdout, err = run_cli(["bench", "--tune", "replace", "--dataset", data, "--model", tiny_checkpoint], capsys)
    assert_user_error(code, stdout, err, "--tune")

    # operating points: aid-12 / aid-18 are method `aid` at 12 / 18 steps
    sha = sha256_file(tiny_checkpoint)
    guidance = str(_guidance(tmp_path / "g.safetensors", sha))
    for label, steps in (("aid-12", 12), ("aid-18", 18)):
        spec = resolve_method(label, 5, tiny_checkpoint, sha, guidance=guidance)
        assert (spec.method, spec.steps, spec.params) == ("aid", steps, {"guidance": str(Path(guidance).resolve())})


def test_guidance_variants_side_by_side(tmp_path, data, tiny_checkpoint, capsys):
    """aid-18:NAME runs AID with the module given as --guidance NAME=PATH, so estimators share one table."""
    sha = sha256_file(tiny_checkpoint)
    a = _guidance(tmp_path / "a.safetensors", sha)
    b = _guidance(tmp_path / "b.safetensors", sha, seed=5)
    assert sha256_file(a) != sha256_file(b)
    out = tmp_path / "out"
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, out, "aid-18:one,aid-12:two,aid-18", "center", "1", "4",
                                       "--guidance", f"one={a}", "--guidance", f"two={b}", "--guidance", a), capsys)
    assert code == 0, err
    result = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["aid-18:one", "aid-12:two", "aid-18"]
    assert (rows["aid-18:one"]["nfe"], rows["aid-12:two"]["nfe"]) == (35, 23)
    methods = result["config"]["methods"]
    assert methods["aid-18:one"]["resources"]["guidance_sha256"] == sha256_file(a)
    assert methods["aid-12:two"]["resources"]["guidance_sha256"] == sha256_file(b)
    assert rows["aid-18:one"]["psnr_hole"] == rows["aid-18"]["psnr_hole"]  # the same module gives the same numbers
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "aid-18:three", "center", "1", "4",
                                            "--guidance", f"one={a}"), capsys)
    assert_user_error(code, stdout, err, "no guidance module named 'three'")
    code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "dps:one", "center", "1", "4",
                                            "--guidance", f"one={a}"), capsys)
    assert_user_error(code, stdout, err, "only AID takes a guidance variant")


def test_churn_runs_aid_stochastically_and_the_tables_say_so(tmp_path, data, tiny_checkpoint, capsys):
    """--churn S: AID's solves take EDM's churn (other methods run as they are), the cells record it, a resume under
    another S reruns the AID cells, and both tables name it; --offset shows in the caption."""
    guidance = _guidance(tmp_path / "g.safetensors", sha256_file(tiny_checkpoint))
    runs = {}
    for key, extra in (("ode", []), ("churn", ["--churn", "3"])):
        out = tmp_path / key
        code, stdout, err = run_cli(_bench_args(data, tiny_checkpoint, out, "aid-18,replace", "center", "1", "4",
                                                "--guidance", guidance, "--offset", "0", *extra), capsys)
        assert code == 0, err
        runs[key] = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
        runs[key + "-md"] = (out / "bench.md").read_text()
    assert runs["churn"]["aid-18"]["params"]["churn"] == 3.0 and "churn" not in runs["ode"]["aid-18"]["params"]
    assert runs["churn"]["aid-18"]["psnr_hole"] != runs["ode"]["aid-18"]["psnr_hole"]
    assert runs["churn"]["replace"]["psnr_hole"] == runs["ode"]["replace"]["psnr_hole"]  # only AID takes churn
    assert "| aid-18 (churn 3) |" in runs["churn-md"] and "| aid-18 |" in runs["ode-md"]
    assert "| replace |" in runs["churn-md"] and "after its first" not in runs["churn-md"]
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, tmp_path / "short", "replace", "center", "1", "4",
                                       "--offset", "1"), capsys)
    assert code == 2 and "only 3 readable images after the first 1" in err  # --n 4 of 4 images after skipping 1
    code, _, err = run_cli(_bench_args(data, tiny_checkpoint, tmp_path / "skip", "replace", "center", "1", "4",
                                       "--offset", "2", "--n", "2"), capsys)
    assert code == 0, err
    assert "2 images of `data` after its first 2" in (tmp_path / "skip" / "bench.md").read_text()


@pytest.mark.parametrize("shape, expect", [("rising", [0.05, 0.1581, 0.5, 1.581, 5, 15.81, 50, 158.1, 500, 1581, 5000, 1.581e4, 5e4]),
                                           ("peaked", [0.05, 0.1581, 0.5, 1.581, 5]),
                                           ("falling", [0.005, 0.01581, 0.05, 0.1581, 0.5, 1.581, 5]),
                                           ])
def test_tune_steps_past_a_winning_edge(shape, expect, tmp_path, data, tiny_checkpoint, monkeypatch):
    """A best value on the grid's edge is no optimum: the grid grows half a decade at a time while the edge wins."""
    import math

    import aid_cli.bench as bench_mod

    def psnr(z):  # a made-up response of the hole PSNR to ζ
        lz = math.log10(z)
        return {"rising": lz, "peaked": -abs(lz + 0.3), "falling": -lz if z > 0.01 else -lz - 10}[shape]

    def cell(self, spec, family, seed, batch, **kw):
        return {"psnr_hole": [psnr(spec.params["zeta"])], "ssim": [0.5], "lpips": [0.1], "images_nonfinite": 0,
                "sec_per_image": 0.1, "nfe": 35}

    monkeypatch.setattr(bench_mod.Runner, "cell", cell)
    entry = bench_mod.tune("dps", str(data), tiny_checkpoint, n=2, steps=2, write=False, log=lambda m: None)
    assert entry["grid"] == expect and [s["zeta"] for s in entry["scores"]] == expect
    assert entry["params"]["zeta"] == {"rising": 5e4, "peaked": 0.5, "falling": 0.01581}[shape]
