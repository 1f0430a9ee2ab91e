"""The realism–distortion trade-off a lever traces: KID × 1000 (± its bootstrap std) against hole-PSNR, one point per
row of each `aid bench` run given, joined in the order given, one panel per mask family.

    python research/tradeoff_plot.py RUN[=LABEL] ... --out tradeoff.png [--reference RUN=LABEL]... [--json]

Each RUN is an `aid bench --out` folder (its bench.json); LABEL names the point (default: the folder's name). The
runs of one lever (e.g. `--churn 0,2,5`) go in the order of the lever; `--reference` runs (e.g. RePaint on the same
images) are drawn as separate markers. Runs nothing but reading and drawing (seconds); needs matplotlib
(`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def points(spec: str) -> list[dict]:
    """The rows of one `RUN[=LABEL]` as {label, method, mask, psnr, kid, kid_std}."""
    path, _, label = spec.partition("=")
    run = Path(path)
    result = json.loads((run / "bench.json").read_text())
    rows = []
    for r in result["rows"]:
        kid = r.get("kid") or {}
        if kid.get("mean") is None:
            raise SystemExit(f"{run}: row {r['method']} / {r['mask']} has no KID (run the bench with --realism)")
        rows.append({"label": label or run.name, "method": r["method"], "mask": r["mask"],
                     "psnr": r["psnr_hole"]["mean"], "kid": 1000 * kid["mean"],
                     "kid_std": None if kid.get("std") is None else 1000 * kid["std"]})
    return rows


def draw(lever: list[dict], references: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = sorted({p["mask"] for p in lever + references})
    fig, axes = plt.subplots(1, len(masks), figsize=(4.2 * len(masks), 3.6), squeeze=False)
    for ax, mask in zip(axes[0], masks):
        line = [p for p in lever if p["mask"] == mask]
        ax.errorbar([p["psnr"] for p in line], [p["kid"] for p in line],
                    yerr=[p["kid_std"] or 0 for p in line], marker="o", capsize=3, label="lever")
        for p in line:
            ax.annotate(p["label"], (p["psnr"], p["kid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for p in (p for p in references if p["mask"] == mask):
            ax.errorbar([p["psnr"]], [p["kid"]], yerr=[p["kid_std"] or 0], marker="s", capsize=3, linestyle="none",
                        label=p["label"])
        ax.set_xlabel("hole-PSNR dB (higher: closer)")
        ax.set_ylabel("KID × 1000 (lower: more realistic)")
        ax.set_title(mask)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="aid bench folders of one lever, in its order (RUN or RUN=LABEL)")
    ap.add_argument("--reference", action="append", default=[], help="another method's run, drawn apart (RUN=LABEL)")
    ap.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    ap.add_argument("--title", default="realism against distortion")
    ap.add_argument("--json", action="store_true", help="also print the points as JSON")
    args = ap.parse_args(argv)
    lever = [p for spec in args.runs for p in points(spec)]
    references = [p for spec in args.reference for p in points(spec)]
    draw(lever, references, args.out, args.title)
    if args.json:
        json.dump({"lever": lever, "references": references}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
