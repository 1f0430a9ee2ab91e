"""Score guidance modules on `aid train`'s validation set: hole-PSNR, SSIM and LPIPS at N = 18 and 12.

    python scripts/validate_modules.py --val ../shared/data/cats64/val.zip MODULE [MODULE ...] [--json out.jsonl]

The images, masks and noise are exactly those of a training run's validation (`--val-offset 100 --val-n 64` by
default: val.zip's images 100–163, never the benchmark's first 100 nor --tune's first 16; image i gets mask i of the
evaluation family FAMILIES[i % 3]; noise seeds 0, 1, …), completed by the same code (`trainer.validation_scores`), so
a module scored here reads the same as the val_* line its run logged, plus SSIM for runs older than its logging.
Use it to pick among checkpoints of different runs before spending a protocol benchmark on one. It also gives the
fills' hole texture over the originals' (`texture_ratio`; below 1: smoother than the truth). `--by-family` adds
each mask family's own means (a third of the images each: noisier, but it shows which family a checkpoint gains on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from aid_cli.data.datasets import load_image_set
    from aid_cli.data.masks import FAMILIES, VALIDATION_MASK_SEED
    from aid_cli.fileio import sha256_file
    from aid_cli.guidance.checkpoint import load_guidance
    from aid_cli.guidance.trainer import validation_masks, validation_scores
    from aid_cli.inpainter import Inpainter
    from aid_cli.metrics.lpips import MIN_SIZE, LPIPSUnavailable, load_lpips
    from aid_cli.models.catalogue import EMBEDDED_BACKBONE
    from aid_cli.paths import weights_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="+", type=Path)
    p.add_argument("--val", type=Path, required=True, help="the validation images (folder or EDM zip)")
    p.add_argument("--val-offset", type=int, default=100)
    p.add_argument("--val-n", type=int, default=64)
    p.add_argument("--val-mask-seed", type=int, default=VALIDATION_MASK_SEED,
                   help="validation's mask seed (default: aid train's, masks.VALIDATION_MASK_SEED; 0 for runs made "
                        "before that setting, whose config.json has no val_mask_seed)")
    p.add_argument("--backbone", type=Path, default=None, help="default: the embedded backbone")
    p.add_argument("--steps", default="18,12", help="grid steps N, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per module here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--by-family", action="store_true",
                   help="also score each mask family alone (a third of the images each) and print those lines")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    backbone = a.backbone or weights_dir() / EMBEDDED_BACKBONE
    inpainter = Inpainter.load(backbone, device)
    sha = sha256_file(backbone)
    res = inpainter.resolution
    val = load_image_set(a.val, resolution=res, limit=a.val_n, offset=a.val_offset)
    images, M = val.as_float(slice(None)), validation_masks(len(val), res, a.val_mask_seed)
    try:
        lpips = load_lpips(device, offline=True) if res >= MIN_SIZE else None
    except LPIPSUnavailable as e:
        print(f"LPIPS not reported: {e}", file=sys.stderr)
        lpips = None
    steps = [int(s) for s in a.steps.split(",")]
    print(f"{len(val)} images ({a.val}, from {a.val_offset}); " + " | ".join(
        f"N = {N}: PSNR-hole SSIM LPIPS texture" for N in steps) + " (texture: the fills' over the truth's)")
    for path in a.modules:
        actor, _ = load_guidance(path, sha, device)
        rec = {"module": str(path), "sha256": sha256_file(path), "val_offset": a.val_offset, "val_n": len(val),
               "val_mask_seed": a.val_mask_seed}
        for N in steps:
            for k, v in validation_scores(inpainter, actor, images, M, N, lpips=lpips,
                                          by_family=a.by_family).items():
                rec[f"val_{k}_{N}"] = v
        print(f"{path}: " + " | ".join(
            f"{rec[f'val_psnr_hole_{N}']:.2f} {rec.get(f'val_ssim_{N}', float('nan')):.4f} "
            f"{rec.get(f'val_lpips_{N}', float('nan')):.4f} {rec.get(f'val_texture_ratio_{N}', float('nan')):.3f}"
            for N in steps), flush=True)
        if a.by_family:
            for fam in FAMILIES:
                print(f"  {fam:>8}: " + " | ".join(
                    f"{rec[f'val_psnr_hole_{fam}_{N}']:.2f} {rec.get(f'val_ssim_{fam}_{N}', float('nan')):.4f} "
                    f"{rec.get(f'val_lpips_{fam}_{N}', float('nan')):.4f} "
                    f"{rec.get(f'val_texture_ratio_{fam}_{N}', float('nan')):.3f}" for N in steps), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
