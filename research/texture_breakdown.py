"""Where one method beats another: the paired per-image difference of a metric between two methods of `aid bench`
runs, binned by how much texture the ground truth holds inside each image's hole.

    python research/texture_breakdown.py BENCH --a aid-18 --b repaint [--metric lpips] [--bins 4] [--json]
    python research/texture_breakdown.py BENCH_A --a aid-18:e --b repaint --b-run BENCH_B   # two runs, same images

Texture of image i under its mask: `metrics.quality.hole_texture` of the ground truth, the mean absolute difference
between neighbouring hole pixels' luminance (on the [0, 1] scale; horizontal and vertical pairs whose two pixels are
both in the hole). Both runs must
have drawn the same images and masks (their run.json: dataset, n, resolution, mask version and seed); per image the
metric is averaged over the noise seeds both methods ran. For each mask family and for all families together it
prints the correlation between texture and Δ = metric(a) − metric(b), and Δ's mean in equal-count bins of texture.
Where a run kept its first seed's completions (`aid bench --examples K`, OUT/examples/), it also gives the texture of
each method's fills on those K images against the ground truth's: a fill smoother than the truth reads below 1.
Reads the images from the run's dataset and redraws the masks; runs nothing but that (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def per_image(cells: list[dict], method: str, family: str, metric: str) -> dict[int, np.ndarray]:
    """{seed: the cell's per-image values} of one method and mask family (the last cell of each seed wins)."""
    out = {}
    for c in cells:
        if c["method"] == method and c["mask"] == family and c.get(metric) is not None:
            out[c["seed"]] = np.asarray(c[metric], dtype=np.float64)
    return out


def fills(run: Path, label: str, family: str, resolution: int) -> torch.Tensor | None:
    """The completions `aid bench` kept of images 0..K−1 for the grids (first seed), [K, C, H, W] in [−1, 1]."""
    from aid_cli.bench.report import load_examples

    tiles = load_examples(run, label, family, resolution, k=1 << 30)
    if not tiles:
        return None
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1


def breakdown(texture: np.ndarray, delta: np.ndarray, bins: int, lower_is_better: bool = True) -> dict:
    """Correlation of texture and Δ, and Δ's mean in `bins` equal-count bins of texture (lowest texture first);
    `a_worse` counts the images where a did worse than b."""
    ok = np.isfinite(texture) & np.isfinite(delta)
    t, d = texture[ok], delta[ok]
    order = np.argsort(t, kind="stable")
    parts = [p for p in np.array_split(order, bins) if len(p)]
    return {"n": int(len(t)), "mean_delta": float(d.mean()), "corr": float(np.corrcoef(t, d)[0, 1]) if len(t) > 2 else
            float("nan"), "bins": [{"texture_min": float(t[p].min()), "texture_max": float(t[p].max()),
                                     "n": int(len(p)), "mean_delta": float(d[p].mean()),
                                     "a_worse": int((d[p] > 0 if lower_is_better else d[p] < 0).sum())} for p in parts]}


def main(argv: list[str] | None = None) -> int:
    from aid_cli.bench.cells import read_cells
    from aid_cli.data.datasets import load_image_set
    from aid_cli.data.masks import eval_masks
    from aid_cli.metrics.quality import hole_texture, texture_ratio

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an `aid bench --out` folder (run.json, cells.jsonl)")
    p.add_argument("--a", required=True, help="method label as in the run's table, e.g. aid-18 or aid-18:e")
    p.add_argument("--b", required=True, help="the method it is compared with")
    p.add_argument("--b-run", type=Path, help="the folder --b ran in, when not RUN (same images and masks)")
    p.add_argument("--metric", default="lpips", choices=("lpips", "ssim", "psnr_hole"))
    p.add_argument("--bins", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    runs = [args.run, args.b_run or args.run]
    meta = []
    for r in runs:
        try:
            meta.append(json.loads((r / "run.json").read_text()))
        except (OSError, ValueError) as e:
            print(f"error: {r} is not an aid bench folder with a readable run.json ({e})", file=sys.stderr)
            return 2
    keys = ("dataset", "n", "resolution", "masks_version", "mask_seed")
    if any(meta[0].get(k) != meta[1].get(k) for k in keys):
        diff = ", ".join(f"{k} {meta[0].get(k)} / {meta[1].get(k)}" for k in keys if meta[0].get(k) != meta[1].get(k))
        print(f"error: the two runs drew different images or masks ({diff})", file=sys.stderr)
        return 2
    run = meta[0]
    cells_a, cells_b = read_cells(runs[0]), read_cells(runs[1])
    families = [f for f in dict.fromkeys(c["mask"] for c in cells_a if c["method"] == args.a)
                if per_image(cells_b, args.b, f, args.metric)]
    if not families:
        print(f"error: no mask family has cells of both {args.a!r} and {args.b!r} with {args.metric}", file=sys.stderr)
        return 2
    x0 = load_image_set(run["dataset"], resolution=run["resolution"], limit=run["n"]).as_float(slice(None))

    lower = args.metric == "lpips"  # PSNR and SSIM: higher is better
    result, pooled_t, pooled_d = {"a": args.a, "b": args.b, "metric": args.metric, "families": {}}, [], []
    for f in families:
        a, b = per_image(cells_a, args.a, f, args.metric), per_image(cells_b, args.b, f, args.metric)
        seeds = sorted(a.keys() & b.keys())
        if not seeds:
            continue
        delta = np.mean([a[s] - b[s] for s in seeds], axis=0)  # per image, over the seeds both ran
        M = eval_masks(f, run["n"], run["resolution"], seed=run["mask_seed"], version=run["masks_version"])
        texture = hole_texture(x0[:len(delta)], M[:len(delta)]).numpy().astype(np.float64)
        result["families"][f] = {"seeds": seeds, "mean_texture": float(np.nanmean(texture)),
                                 **breakdown(texture, delta, args.bins, lower)}
        for who, label, folder in (("a", args.a, runs[0]), ("b", args.b, runs[1])):
            kept = fills(folder, label, f, run["resolution"])
            if kept is None:
                continue
            k = min(len(kept), len(texture))
            t_fill, t_truth = hole_texture(kept[:k], M[:k]), torch.from_numpy(texture[:k])
            ok = (torch.isfinite(t_fill) & torch.isfinite(t_truth)).numpy()
            if (ratio := texture_ratio(t_fill, t_truth)) is not None:  # None: no texture in the originals' holes
                result["families"][f][f"fill_texture_{who}"] = {
                    "images": int(ok.sum()), "mean": float(t_fill[ok].mean()), "truth": float(t_truth[ok].mean()),
                    "ratio": ratio}
        pooled_t.append(texture)
        pooled_d.append(delta)
    result["all"] = breakdown(np.concatenate(pooled_t), np.concatenate(pooled_d), args.bins, lower)

    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"Δ {args.metric} = {args.a} − {args.b} per image, by the ground truth's texture in the hole "
          f"({run['n']} images of {run['dataset']}, mask seed {run['mask_seed']})")
    for name, r in [*result["families"].items(), ("all", result["all"])]:
        bins = "; ".join(f"{b['texture_min']:.3f}–{b['texture_max']:.3f}: {b['mean_delta']:+.4f} "
                         f"({b['a_worse']}/{b['n']} worse)" for b in r["bins"])
        print(f"{name:9s} n {r['n']:4d}  mean Δ {r['mean_delta']:+.4f}  corr(texture, Δ) {r['corr']:+.2f}  | {bins}")
        for who, label in (("a", args.a), ("b", args.b)):
            if f"fill_texture_{who}" in r:
                t = r[f"fill_texture_{who}"]
                print(f"{'':9s} {label}'s fills (first {t['images']} images, first seed): texture {t['mean']:.4f} "
                      f"against the truth's {t['truth']:.4f} (ratio {t['ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
