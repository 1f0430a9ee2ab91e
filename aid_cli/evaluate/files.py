"""`aid metrics`: one image scored against its reference, as files (the benchmark scores tensors: bench/).

Both images are read as RGB (EXIF orientation applied, alpha ignored, greyscale replicated) at their exact pixel values
k / max, as float64 in [−1, 1]; PSNR and the metrics of metrics/bundle.py are computed on them (LPIPS casts to
float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError


def score_files(ref: Path, img: Path, mask: Path | None = None, invert_mask: bool = False,
                offline: bool | None = None, notice: Callable[[str], None] = print) -> tuple[dict, bool | None]:
    """({psnr, [psnr_hole], ssim, lpips}, whether the mask has hole pixels (None without a mask)); a metric that cannot
    be computed is None, with a notice saying why."""
    import numpy as np
    import torch

    from ..data.images import INVERTED_WARNING_FRACTION, load_image, load_mask, mask_stats
    from ..metrics.bundle import inpainting_metrics, load_lpips_models
    from ..metrics.quality import finite_or_none, psnr

    a, b = load_image(ref), load_image(img)
    if a.size != b.size:
        raise UserError(f"images differ in size: {ref} is {a.size[0]}x{a.size[1]}, {img} is {b.size[0]}x{b.size[1]}")
    # float64 [1, 3, H, W] in [−1, 1], exact pixel values k / max (rgb01 is float32); LPIPS casts to float32
    x_ref, x = (torch.from_numpy(np.rint(i.rgb01() * np.float64(i.max_value)) / i.max_value).permute(2, 0, 1)[None]
                * 2 - 1 for i in (a, b))
    result: dict = {"psnr": finite_or_none(float(psnr(x, x_ref)[0]))}
    has_hole, M = None, None
    if mask is not None:
        hole = load_mask(mask, b.size, invert=invert_mask)
        if mask_stats(hole) > INVERTED_WARNING_FRACTION:
            notice(f"note: the mask fills {100 * mask_stats(hole):.0f}% of the image; if white should be kept, "
                   f"pass --invert-mask")
        has_hole = bool(hole.any())
        if not has_hole:
            notice("note: the mask has no hole pixels; psnr_hole is null")
        M = torch.from_numpy((~hole).astype(np.float32))[None, None]
    lpips_model, _ = load_lpips_models(offline=offline, note=notice)
    scores = inpainting_metrics(x, x_ref, M, lpips_model, note=notice)
    if M is not None:
        result["psnr_hole"] = finite_or_none(float(scores["psnr_hole"][0]))
    for name in ("ssim", "lpips"):
        result[name] = None if scores[name] is None else float(scores[name][0])
    return result, has_hole


__all__ = ["score_files"]
