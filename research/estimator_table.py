"""The estimator table of the guidance card: gradient cosines to J's exact gradient, per run and batch size.

    python research/estimator_table.py RUN [RUN ...]        # run folders of `aid train ... --diag-every K`

For each run: its estimator options (from config.json), then for each batch size k the mean and range over the run's
diagnostics of cos(ĝ_k, g*_k), the cosine between the estimator's actor gradient on k tasks and the exact (backprop)
gradient on the same k tasks and initial noise; `backprop` rows give cos(g*_k, g*_B), how far k tasks' exact gradient
is from the diagnostic batch's. Also the critic's explained variance (median over the run's iterations).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(run: Path) -> list[str]:
    cfg = json.loads((run / "config.json").read_text())
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if line.strip()]
    diags = [s for s in stats if any(k.startswith("diag_cos_") for k in s)]
    if not diags:
        return []
    options = (f"{cfg['estimator']}: explore {cfg.get('explore', 'constant')}, critic {cfg.get('critic', 'plain')}, "
               f"λ {cfg.get('td_lambda', 0.0):g}" + (", normalised" if cfg.get("normalize_advantage") else ""))
    ev = [s["critic_ev"] for s in stats if s.get("critic_ev") is not None]
    sizes = sorted({int(k.rsplit("_b", 1)[1]) for k in diags[0] if k.startswith("diag_cos_backprop_b")})
    names = sorted({k[len("diag_cos_"):].rsplit("_b", 1)[0] for k in diags[0] if k.startswith("diag_cos_")})
    out = []
    for name in names:
        cells = []
        for k in sizes:
            v = [d[f"diag_cos_{name}_b{k}"] for d in diags if f"diag_cos_{name}_b{k}" in d]
            cells.append(f"{statistics.mean(v):+.3f} [{min(v):+.2f}, {max(v):+.2f}]")
        label = "exact, k tasks vs all" if name == "backprop" else name
        out.append(f"| {run.name} ({options}) | {label} | {len(diags)} | " + " | ".join(cells) +
                   f" | {statistics.median(ev) if ev else float('nan'):.3f} |")
    return out, sizes


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    lines, sizes = [], None
    for arg in argv:
        got = rows(Path(arg))
        if got:
            body, sizes = got
            lines += body
    if not lines:
        print("no diagnostics in these runs (aid train --diag-every K)", file=sys.stderr)
        return 2
    print("| run | gradient | diagnostics | " + " | ".join(f"cos at k = {k}" for k in sizes) +
          " | critic explained variance |")
    print("|---|---|--:|" + "--:|" * len(sizes) + "--:|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
