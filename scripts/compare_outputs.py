"""Record, or compare against a record, a few `aid inpaint` and `aid bench` outputs: the proof that a refactoring kept
them bit-identical.

    export AID_COMPARE_DATA=cats64/val.zip             # a 64x64 dataset zip: bench and train use its first images
    git archive OLD_COMMIT | tar -x -C /tmp/old        # the old code, beside this checkout
    PYTHONPATH=/tmp/old python scripts/compare_outputs.py record before.json
    python scripts/compare_outputs.py record after.json
    python scripts/compare_outputs.py compare before.json after.json     # exit 1 on any difference

A short `aid train` (2 iterations) is recorded too: its guidance module's tensors and its stats.jsonl.

Every command runs as its own `python -m aid_cli.cli` process (fixed seeds, --device cpu, --threads 1). Recorded: the
sha256 of each PNG `aid inpaint` writes and of each grid `aid bench` writes, bench.json's rows and cells.jsonl's
per-image metrics, without the wall-clock figures (seconds, memory, dates) that differ between any two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE, MASK = ROOT / "examples" / "chelsea.png", ROOT / "examples" / "chelsea_mask.png"
DATASET = os.environ.get("AID_COMPARE_DATA", "")  # a 64x64 dataset zip (the cat faces' val.zip) for bench and train
INPAINT_METHODS = ("aid", "repaint", "dps", "replace")
BENCH_METHODS = "replace,dps,aid-12"
VOLATILE = ("sec", "second", "time", "memory", "mem_", "date", "started", "finished", "host", "platform", "python",
            "torch", "version", "device", "threads", "out", "dataset", "model", "path", "command", "argv", "cpu",
            "session")


def _aid(*args: str, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "aid_cli.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stable(value):
    """`value` without the keys whose values change from run to run (timings, memory, paths, dates)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items())
                if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str):  # the weights of another checkout are the same files
        return re.sub(r"\S*/weights/", "weights/", value)
    return value


def record(out_json: Path) -> dict:
    result: dict = {"inpaint": {}, "bench": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in INPAINT_METHODS:
            out = tmp / f"chelsea-{method}.png"
            _aid("inpaint", str(IMAGE), "--mask", str(MASK), "-o", str(out), "--method", method, "--seed", "3",
                 "--device", "cpu", "--threads", "1", "--quiet", cwd=tmp)
            result["inpaint"][method] = _sha(out)
            print(f"inpaint {method}: {result['inpaint'][method][:16]}", flush=True)
        bench = tmp / "bench"
        _aid("bench", "--methods", BENCH_METHODS, "--dataset", DATASET, "--n", "4", "--seeds", "1", "--masks",
             "freeform", "--device", "cpu", "--threads", "1", "--out", str(bench), "--batch", "2", cwd=tmp)
        result["bench"]["grids"] = {p.name: _sha(p) for p in sorted(bench.glob("grid-*.png"))}
        result["bench"]["bench.json"] = _stable(json.loads((bench / "bench.json").read_text()))
        result["bench"]["cells"] = [_stable(json.loads(line)) for line in (bench / "cells.jsonl").read_text().splitlines()]
        print(f"bench grids: {result['bench']['grids']}", flush=True)
        run = tmp / "train"
        _aid("train", "--dataset", DATASET, "--val", DATASET, "--val-offset", "0", "--val-n", "4", "--val-every", "2",
             "--iters", "2", "--batch", "2", "--steps", "6", "--checkpoint-every", "2", "--device", "cpu", "--threads",
             "1", "--out", str(run), cwd=tmp)
        from safetensors.torch import load_file

        weights = load_file(str(run / "guidance.safetensors"))
        result["train"] = {"guidance": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in weights.items()},
                           "stats": [_stable(json.loads(line)) for line in (run / "stats.jsonl").read_text().splitlines()]}
        print(f"train: {len(weights)} tensors, {len(result['train']['stats'])} stats lines", flush=True)
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def compare(a: Path, b: Path) -> int:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for method in INPAINT_METHODS:
        same = ra["inpaint"][method] == rb["inpaint"][method]
        bad += not same
        print(f"inpaint --method {method:8s} {'identical' if same else 'DIFFERENT'} ({ra['inpaint'][method][:16]})")
    for name, sha in ra["bench"]["grids"].items():
        same = rb["bench"]["grids"].get(name) == sha
        bad += not same
        print(f"bench {name:20s} {'identical' if same else 'DIFFERENT'} ({sha[:16]})")
    same = ra["bench"]["bench.json"] == rb["bench"]["bench.json"]
    bad += not same
    print(f"bench.json (rows; timings left out): {'identical' if same else 'DIFFERENT'}")
    same = ra["bench"].get("cells") == rb["bench"].get("cells")
    bad += not same
    print(f"cells.jsonl (per-image PSNR-hole, SSIM, LPIPS; NFE): {'identical' if same else 'DIFFERENT'}")
    if "train" in ra:
        same = ra["train"] == rb.get("train")
        bad += not same
        print(f"aid train (2 iterations): guidance weights and stats.jsonl {'identical' if same else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and not os.path.isfile(DATASET):
        print("error: set AID_COMPARE_DATA to a 64x64 dataset zip (bench and train run on its first images)",
              file=sys.stderr)
        sys.exit(2)
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 3:
        record(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
