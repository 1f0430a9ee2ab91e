"""The GPU runbook's contracts, rehearsed on CPU with tiny data and budgets: `scripts/gpu_run.sh` checks its inputs
before it starts, runs each stage in its time box (a stage stopped at its box still saves, a failing or late stage
does not stop the next) and writes the result folder's layout; `scripts/adopt_gpu_run.py` reads that folder back into
a scratch git repository in one commit, or refuses it in one line with nothing changed. Skips where bash, GNU
timeout, sha256sum or git is missing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GPU_RUN = str(REPO / "scripts" / "gpu_run.sh")
ADOPT = str(REPO / "scripts" / "adopt_gpu_run.py")
MD_START, MD_END = "<!-- aid bench: start -->", "<!-- aid bench: end -->"


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"the rehearsal needs `{t}` on PATH")


def _zip(path: Path, n: int, seed: int) -> Path:
    """An EDM-layout zip of n smooth 16×16 RGB images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:16, 0:16]
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            a, b, c = rng.integers(0, 256, 3)
            img = np.stack([(x * 12 + a) % 256, (y * 12 + b) % 256, np.full((16, 16), c)], -1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            z.writestr(f"{i:05d}.png", buf.getvalue())
    return path


# A 16×16 backbone of ~48 k parameters trained for 2 steps, guidance runs of 2 iterations on 4-step solves, 2
# benchmark images × 1 seed. Every stage ends on its own: the boxes here are only safety nets, wide enough for a
# heavily loaded machine (the boxes themselves are rehearsed below, with a stand-in).
TINY = dict(
    DEVICE="cpu", RES="16", WIDTH="8", CMULT="1,2", DEPTH="1", ATTN="8",
    TIMING_BATCHES="2", TIMING_PRECISIONS="fp32", TIMING_OFFICIAL="0", TIMING_SAMPLE_BATCH="2", T_TIMINGS="600",
    BATCH="8", RAMPUP_KIMG="0.008", EMA_KIMG="0.01", DURATION_KIMG="0.016", PRECISION="fp32", T_BACKBONE="600",
    TUNE_METHODS="mcg", TUNE_N="2", TUNE_STEPS="2", T_TUNE="600",
    GBATCH="2", GSTEPS="4", GITERS="2", RECOMPUTE="0", VAL_OFFSET="4", VAL_N="2", VAL_EVERY="2", MASK_BANK="16",
    AC_BATCH="2", AC_DIAG_EVERY="2", AC_DIAG_BATCH="2", T_GUIDANCE="600", GUIDANCE_EXTRA="--width 4",
    BENCH_METHODS="copy,aid-18", BENCH_N="2", BENCH_SEEDS="1", BENCH_MASKS="center", BENCH_BATCH="2", T_BENCH="600",
    DEADLINE="3000", GRACE="15", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
)


def _env(tmp: Path, **extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "AID_CACHE": str(tmp / "cache"), **extra}
    env.pop("PYTHONPATH", None)  # the script puts its own checkout first
    return env


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    _need("bash", "timeout", "sha256sum")
    tmp = tmp_path_factory.mktemp("gpu-rehearsal")
    train, val = _zip(tmp / "train.zip", 16, 0), _zip(tmp / "val.zip", 6, 1)
    proc = subprocess.run(["bash", GPU_RUN, "--train", str(train), "--val", str(val), "--out", str(tmp / "out")],
                          cwd=tmp, env=_env(tmp, **TINY), capture_output=True, text=True, timeout=3000)
    return tmp, proc


def test_rehearsal_every_stage_writes_its_part_of_the_result_folder(rehearsal):
    tmp, proc = rehearsal
    out = tmp / "out"
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else proc.stderr
    assert proc.returncode == 0, log
    result = json.loads((out / "result.json").read_text())
    assert {k: v["status"] for k, v in result["stages"].items()} == dict.fromkeys(
        ("timings", "backbone", "tune", "guidance", "bench"), "done"), log
    assert all(v["seconds"] <= v["box_s"] for v in result["stages"].values())
    assert json.loads((out / "env.json").read_text())["device"] == "cpu"
    timings = json.loads((out / "timings.json").read_text())
    assert timings["forward"][0]["batch"] == 2 and timings["unguided"][0]["nfe"] == 35
    b = out / "backbone"
    sha = hashlib.sha256((b / "aid-cats64-edm.safetensors").read_bytes()).hexdigest()
    assert (b / "aid-cats64-edm.sha256").read_text().split()[0] == sha
    assert (b / "samples.png").is_file() and (b / "run" / "stats.jsonl").is_file()
    tuned = json.loads((b / "aid-cats64-edm.tuned.json").read_text())
    assert tuned["backbone_sha256"] == sha and "mcg" in tuned["methods"]
    g = out / "guidance"
    select = json.loads((g / "select.json").read_text())
    assert select["module"] == "guidance-000002.safetensors" and select["validated"][0]["iteration"] == 2
    assert (g / "guidance-best.safetensors").read_bytes() == (g / "aid/modules" / select["module"]).read_bytes()
    ac = [json.loads(line) for line in (g / "ac" / "stats.jsonl").read_text().splitlines()]
    assert any("diag_cos_score_b2" in s for s in ac)  # the actor-critic run's gradient diagnostic
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert bench["config"]["model"]["sha256"] == sha
    assert {r["method"] for r in bench["rows"]} == {"copy", "aid-18"}
    assert (out / "bench" / "asked.txt").read_text().strip() == "copy,aid-18"
    assert "scripts/adopt_gpu_run.py " + str(out) in log


FAKE_PYTHON = r"""#!/bin/bash
# stands in for python in gpu_run.sh: `aid train` runs until SIGTERM, then saves (after a second); the timings stage
# fails; the device check passes; anything else is the real interpreter
case "$1 $2 $3" in
  "-m aid_cli.cli train")
    out=$(echo "$@" | sed 's/.*--out \([^ ]*\).*/\1/')
    save() { sleep 1; mkdir -p "$out"; echo '{"iteration": 7}' > "$out/stats.jsonl"
             echo fake > "$out/guidance.safetensors"; echo "stopped at iteration 7; state and module saved"; exit 0; }
    trap save TERM
    while :; do sleep 0.1; done ;;
  "scripts/gpu_stage.py env "*) echo '{}' > "$6"; exit 0 ;;
  "scripts/gpu_stage.py timings "*) echo "timings breaks" >&2; exit 3 ;;
esac
exec REAL "$@"
"""


def test_rehearsal_boxes_stop_save_skip_and_go_on(tmp_path):
    """A stage stopped at its box saves before the next starts, a failing stage does not stop the next, and a stage
    whose box (its own, or what is left before DEADLINE) is under MIN_BOX seconds is skipped; result.json says which
    was which."""
    _need("bash", "timeout")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("REAL", sys.executable))
    fake.chmod(0o755)
    (tmp_path / "t.zip").write_bytes(b"")
    (tmp_path / "none.safetensors").write_bytes(b"")
    env = _env(tmp_path, PYTHON=str(fake), STAGES="timings guidance bench", T_GUIDANCE="6", GRACE="10", MIN_BOX="2",
               T_BENCH="1", T_REPORT="0", BACKBONE="none.safetensors")
    proc = subprocess.run(["bash", GPU_RUN, "--train", "t.zip", "--val", "t.zip", "--out", "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    out = tmp_path / "out"
    log = (out / "run.log").read_text()
    assert proc.returncode == 1, log  # a stage failed
    stages = json.loads((out / "result.json").read_text())["stages"]
    assert stages["timings"]["status"] == "failed" and stages["timings"]["exit"] == 3
    assert "timings breaks" in log
    assert stages["guidance"]["status"] == "stopped" and stages["guidance"]["box_s"] == 6
    assert 7 <= stages["guidance"]["seconds"] < 6 + 10  # SIGTERM at 6 s, the save's second waited for, no SIGKILL
    for run in ("aid", "ac"):  # both runs got the SIGTERM and saved
        assert "state and module saved" in (out / "logs" / f"guidance-{run}.log").read_text()
    assert json.loads((out / "guidance" / "select.json").read_text())["why"] == "no validated checkpoint: the latest module"
    assert stages["bench"]["status"] == "skipped", log  # a box under MIN_BOX seconds


@pytest.mark.parametrize("args, phrase", [
    (["--val", "v.zip"], "stage backbone needs --train ZIP"),
    (["--train", "missing.zip", "--val", "v.zip"], "missing.zip: no such file"),
    (["--train", "v.zip", "--val", "v.zip", "--out", "full"], "is not empty"),
    (["--train", "v.zip", "--bogus"], "unknown argument --bogus"),
    (["--train", "v.zip", "--val", "v.zip", "BACKBONE=missing.safetensors"], "missing.safetensors: no such file"),
])
def test_rehearsal_inputs_are_checked_before_anything_runs(tmp_path, args, phrase):
    _need("bash")
    (tmp_path / "v.zip").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    env = _env(tmp_path, PYTHON="/nonexistent/python", OUT=str(tmp_path / "o"))
    env.update(a.split("=", 1) for a in args if "=" in a)
    args = [a for a in args if "=" not in a]
    proc = subprocess.run(["bash", GPU_RUN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and phrase in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def _scratch_repo(root: Path) -> dict:
    """A git repository holding what adoption edits: the model catalogue, a README with the table markers."""
    (root / "aid_cli/models").mkdir(parents=True)
    shutil.copyfile(REPO / "aid_cli/models/catalogue.py", root / "aid_cli/models/catalogue.py")
    (root / "README.md").write_text(f"# aid\n\n{MD_START}\n| old |\n{MD_END}\n\nThe table above is old.\n\nEnd.\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "r@example.invalid",
           "GIT_COMMITTER_NAME": "rehearsal", "GIT_COMMITTER_EMAIL": "r@example.invalid", "OMP_NUM_THREADS": "1"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "before"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env)
    return env


def _clean(root: Path) -> bool:
    return subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""


def test_rehearsal_adoption_reads_the_folder_back_in_one_commit(rehearsal, tmp_path):
    _need("git")
    tmp, proc = rehearsal
    stages = json.loads((tmp / "out" / "result.json").read_text())["stages"] if (tmp / "out/result.json").is_file() else {}
    if proc.returncode != 0 or any(s["status"] != "done" for s in stages.values()):
        pytest.skip("the rehearsal run failed (see the test above)")
    root = tmp_path / "repo"
    env = _scratch_repo(root)

    def adopt(folder, *extra):
        return subprocess.run([sys.executable, ADOPT, str(folder), "--root", str(root), *extra], capture_output=True,
                              text=True, env=env)

    # refused in one line, nothing touched: not a result folder; a module without the backbone it was trained on;
    # a new backbone to measure without the data to measure it on
    r = adopt(tmp_path)
    assert r.returncode == 2 and "not a result folder" in r.stderr.strip().splitlines()[-1], r.stderr
    partial = tmp_path / "partial"
    shutil.copytree(tmp / "out", partial, ignore=shutil.ignore_patterns("run", "aid", "ac"))
    (partial / "backbone" / "aid-cats64-edm.safetensors").unlink()
    r = adopt(partial, "--skip-eval")
    assert r.returncode == 2 and "trained on backbone" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    r = adopt(tmp / "out")
    assert r.returncode == 2 and "needs --train ZIP" in r.stderr, r.stderr
    assert _clean(root)

    r = adopt(tmp / "out", "--skip-eval")
    assert r.returncode == 0, r.stderr
    show = subprocess.run(["git", "-C", str(root), "show", "--stat", "--format=%s", "HEAD"], capture_output=True,
                          text=True).stdout
    for rel in ("README.md", "aid_cli/models/catalogue.py", "weights/README.md", "weights/aid-cats64-guidance.md",
                "weights/aid-cats64-edm.tuned.json", "weights/aid-cats64-edm.eval.json",
                "weights/aid-cats64-edm.safetensors", "weights/aid-cats64-guidance.safetensors"):
        assert rel in show, show
    assert _clean(root)  # all of it in that one commit
    new = (root / "weights/aid-cats64-edm.safetensors").read_bytes()
    sha = hashlib.sha256(new).hexdigest()
    registry = (root / "aid_cli/models/catalogue.py").read_text()
    assert f'sha256="{sha}", size={len(new)}' in registry
    g = (root / "weights/aid-cats64-guidance.safetensors").read_bytes()
    assert g == (tmp / "out/guidance/guidance-best.safetensors").read_bytes()
    assert f'sha256="{hashlib.sha256(g).hexdigest()}", size={len(g)}' in registry
    assert json.loads((root / "weights/aid-cats64-edm.tuned.json").read_text())["backbone_sha256"] == sha
    assert sha in (root / "weights/README.md").read_text()
    readme = (root / "README.md").read_text()
    table = readme.split(MD_START)[1].split(MD_END)[0]
    assert "| aid-18 | center | 35 |" in table and "| old |" not in table
    assert "The table above is old." not in readme and readme.endswith("End.\n")
