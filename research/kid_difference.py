"""Is one method's realism really ahead of another's? The paired bootstrap of the KID difference of two methods of one
`aid bench` run, per mask family, from the Inception features the run kept (OUT/features/).

    python research/kid_difference.py BENCH --a aid-18 --b repaint [--draws 200] [--seed 0] [--json]

Per mask family: Δ = KID(a) − KID(b) against the same originals (each the mean over the noise seeds both methods ran),
its std over `--draws` paired bootstrap resamples of the images (metrics/realism.py `kid_difference`: the same draw for
both methods and every seed), and the share of resamples in which a's KID is the higher (a behind). KID × 1000 printed.
Runs nothing but that (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def features(run: Path, cells: list[dict], method: str, family: str) -> dict:
    """{seed: the features of the cell} of one method and mask family (the last cell of each seed wins)."""
    from aid_cli.bench.cells import load_cell_features

    out = {}
    for c in cells:
        if c["method"] == method and c["mask"] == family:
            f = load_cell_features(run, c)
            if f is not None:
                out[c["seed"]] = f
    return out


def compare(run: Path, a: str, b: str, draws: int = 200, seed: int = 0) -> dict:
    """{family: {"delta", "std", "a_worse", "draws", "seeds"}} for every mask family both methods have features of."""
    import numpy as np

    from aid_cli.bench.cells import FEATURES_DIR, ORIGINALS_FILE, read_cells
    from aid_cli.metrics.realism import kid_difference

    ref_path = run / FEATURES_DIR / ORIGINALS_FILE
    if not ref_path.is_file():
        raise SystemExit(f"{run}: no {FEATURES_DIR}/{ORIGINALS_FILE}: a run without --realism (or from an older aid)")
    ref = np.load(ref_path)
    cells = read_cells(run)
    out = {}
    for family in dict.fromkeys(c["mask"] for c in cells):
        fa, fb = features(run, cells, a, family), features(run, cells, b, family)
        seeds = sorted(set(fa) & set(fb))
        if seeds:
            d = kid_difference([fa[s] for s in seeds], [fb[s] for s in seeds], ref, draws=draws, seed=seed)
            out[family] = {**d, "seeds": seeds}
    if not out:
        raise SystemExit(f"{run}: no mask family with features of both {a!r} and {b!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="an `aid bench` --out folder")
    ap.add_argument("--a", required=True, help="method label, e.g. aid-18")
    ap.add_argument("--b", required=True, help="method label, e.g. repaint")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="of the bootstrap's draws")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        result = compare(args.bench, args.a, args.b, args.draws, args.seed)
    except SystemExit as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for family, r in result.items():
            print(f"{family}: KID×10³ {args.a} − {args.b} = {1000 * r['delta']:+.2f} ± {1000 * r['std']:.2f} "
                  f"({r['draws']} paired resamples, seeds {','.join(map(str, r['seeds']))}); {args.a} behind in "
                  f"{100 * r['a_worse']:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
