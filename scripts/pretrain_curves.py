"""Backbone runs side by side: validation EDM loss and training loss against CPU-hours (or thousands of images).

    python scripts/pretrain_curves.py RUN [RUN ...] --out curves.png [--labels A,B] [--x cpu_hours|kimg]

RUN is an `aid pretrain` run folder (its stats.jsonl; validation needs `--val`). CPU-hours are the training loop's
seconds × processes (`processes` in the log; one where a run predates it). What the photo backbone's card draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aid_cli.plots import cpu_hours, pretrain_curves  # noqa: E402
from aid_cli.training import read_jsonl  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labels", default=None, help="comma list, one per run (default: the folders' names)")
    ap.add_argument("--x", choices=("cpu_hours", "kimg"), default="cpu_hours")
    ap.add_argument("--title", default="aid pretrain")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error("--labels needs one label per run")
    runs = {label: read_jsonl(run / "stats.jsonl") for label, run in zip(labels, args.runs)}
    for label, stats in runs.items():
        timed = [s for s in stats if "elapsed_s" in s]
        for s, hours in zip(timed, cpu_hours(timed)):
            if "val_edm_loss" in s:
                print(f"{label}: {s['kimg']:.1f} kimg, {hours:.2f} CPU-hours, validation EDM loss "
                      f"{s['val_edm_loss']:.1f}")
    pretrain_curves(runs, args.out, args.title, x=args.x)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
