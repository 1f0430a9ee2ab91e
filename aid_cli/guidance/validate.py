"""Validation of a guidance module: the deterministic actor completes fixed images and masks as `aid inpaint` does,
scored by hole PSNR, SSIM, LPIPS and the hole texture ratio."""

from __future__ import annotations

import torch

from ..data.masks import FAMILIES, VALIDATION_MASK_SEED, eval_masks
from ..inpainter import Inpainter
from ..methods.aid import AID
from ..metrics.bundle import inpainting_metrics
from ..metrics.quality import hole_texture, texture_ratio
from ..sampling.heun import sample_generators


@torch.no_grad()
def validation_per_image(inpainter: Inpainter, actor, images: torch.Tensor, M: torch.Tensor, steps: int,
                         batch: int = 64, labels: torch.Tensor | None = None, lpips=None,
                         first: int = 0, churn: float = 0.0) -> dict[str, torch.Tensor]:
    """Each image's hole PSNR (on pixels), SSIM, LPIPS (where the model is given) and hole texture of the fill and of
    the truth, the deterministic actor (the policy's mean) completing them as `aid inpaint` does. `first`: the index
    of `images[0]` in the whole validation set, whose noise seed it keeps (image i: seed i), so a share of the set
    scored by one process reads as it does in the whole (SSIM only for images of at least 11 × 11 pixels, the size
    its window needs). `churn`: the module's EDM S_churn (its solve then draws noise from those seeds)."""
    policy = AID(actor=actor, gamma=0.0, churn=churn)
    parts: dict[str, list[torch.Tensor]] = {"psnr_hole": [], "ssim": [], "lpips": [], "texture": [],
                                            "texture_truth": []}
    for i in range(0, len(images), batch):
        x0, m = images[i:i + batch], M[i:i + batch]
        completed, _ = inpainter.complete(x0, m, policy, steps, sample_generators(0, len(x0), offset=first + i),
                                          None if labels is None else labels[i:i + batch])
        scores = inpainting_metrics(completed, x0, m, lpips=lpips)  # the bundle aid bench and aid metrics report
        for k in ("psnr_hole", "ssim", "lpips"):
            if scores[k] is not None:  # SSIM: None below its window's 11 × 11 pixels
                parts[k].append(scores[k])
        parts["texture"].append(hole_texture(completed, m))
        parts["texture_truth"].append(hole_texture(x0, m))
    return {k: torch.cat(v) for k, v in parts.items() if v}


def summarize_validation(per_image: dict[str, torch.Tensor], by_family: bool = False) -> dict[str, float]:
    """The means of `validation_per_image`'s values over the whole set (image i in order: mask family
    FAMILIES[i % 3] of `validation_masks`); `by_family`: also each family's means, as `psnr_hole_freeform`,
    `lpips_strip`, …; `texture_ratio`: the fills' hole texture over the truth's (`metrics.quality.hole_texture`,
    summed over the images; below 1: fills smoother than the originals)."""
    per_image = dict(per_image)
    fill, truth = (per_image.pop(k) for k in ("texture", "texture_truth"))
    family = torch.arange(len(fill)) % len(FAMILIES)
    scores = {}
    for k, values in per_image.items():
        scores[k] = float(values.mean())
        if by_family:
            scores.update({f"{k}_{f}": float(values[family == j].mean())
                           for j, f in enumerate(FAMILIES) if (family == j).any()})
    for suffix, rows in [("", slice(None))] + ([(f"_{f}", family == j) for j, f in enumerate(FAMILIES)
                                                 if (family == j).any()] if by_family else []):
        if (ratio := texture_ratio(fill[rows], truth[rows])) is not None:  # None: flat originals
            scores[f"texture_ratio{suffix}"] = ratio
    return scores


def validation_scores(inpainter: Inpainter, actor, images: torch.Tensor, M: torch.Tensor, steps: int, batch: int = 64,
                      labels: torch.Tensor | None = None, lpips=None, by_family: bool = False,
                      churn: float = 0.0) -> dict[str, float]:
    """Mean hole PSNR, SSIM, LPIPS (where the model is given) and texture ratio of the deterministic actor on fixed
    images and masks (`validation_per_image`, `summarize_validation`)."""
    return summarize_validation(validation_per_image(inpainter, actor, images, M, steps, batch, labels, lpips,
                                                     churn=churn),
                                by_family)


def validation_masks(n: int, resolution, seed: int = VALIDATION_MASK_SEED) -> torch.Tensor:
    """The fixed masks of validation: image i gets mask i of the evaluation family FAMILIES[i % 3] (v1, `seed`), so
    checkpoints are chosen on all three families the benchmark reports, by default on masks of a seed of their own
    (the protocol's are seed 0: center is the same square in every seed)."""
    per_family = {f: eval_masks(f, n, resolution, seed=seed) for f in FAMILIES}
    return torch.stack([per_family[FAMILIES[i % len(FAMILIES)]][i] for i in range(n)]) if n else \
        eval_masks("freeform", 0, resolution)
