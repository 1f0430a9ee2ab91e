"""The inpainting metrics aid reports, in one place: hole PSNR, SSIM, LPIPS (AlexNet) and LPIPS-VGG of completed
images against their originals (method.md §9), for `aid metrics`, the benchmark and training's validation. The
definitions are metrics/quality.py's and metrics/lpips.py's."""

from __future__ import annotations

from typing import Callable

import torch

from .quality import psnr_hole, ssim_01

METRICS = ("psnr_hole", "ssim", "lpips", "lpips_vgg")


def load_lpips_models(device="cpu", offline: bool | None = None, vgg: bool = False,
                      note: Callable[[str], None] | None = None) -> tuple:
    """(LPIPS AlexNet, LPIPS VGG16 or None without `vgg`) on `device`; a model whose weights cannot be had is None,
    with `note` saying why."""
    from .lpips import LPIPSUnavailable, load_lpips

    models = []
    for net, name, wanted in (("alex", "lpips", True), ("vgg", "lpips_vgg", vgg)):
        model = None
        if wanted:
            try:
                model = load_lpips(device=device, offline=offline, notice=note, net=net)
            except LPIPSUnavailable as e:
                if note:
                    note(f"{e}; {name} is null")
        models.append(model)
    return tuple(models)


def _device_of(model, default: torch.device) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return default


@torch.no_grad()
def inpainting_metrics(x: torch.Tensor, ref: torch.Tensor, M: torch.Tensor | None = None, lpips=None, lpips_vgg=None,
                       region: tuple[int, int, int, int] | None = None,
                       note: Callable[[str], None] | None = None) -> dict[str, torch.Tensor | None]:
    """Each image's metrics, x and ref [N, 3, H, W] in [−1, 1], M [N, 1, H, W] with 1 = known (`Task.M`):

    psnr_hole (with M; over the whole image's hole), ssim (`ssim_01`), lpips and lpips_vgg (with their models, run on
    the device of their weights) → [N] tensors on x's device. `region` (left, top, right, bottom): SSIM and LPIPS see
    that box only. A metric without its model, or that cannot take images of this size, is None (`note` says why).
    """
    scores: dict[str, torch.Tensor | None] = {}
    if M is not None:
        scores["psnr_hole"] = psnr_hole(x, ref, M)
    if region is not None:
        left, top, right, bottom = region
        x, ref = x[..., top:bottom, left:right], ref[..., top:bottom, left:right]
    try:
        scores["ssim"] = ssim_01(x, ref)
    except ValueError as e:
        scores["ssim"] = None
        if note:
            note(f"note: ssim is null: {e}")
    for name, model in (("lpips", lpips), ("lpips_vgg", lpips_vgg)):
        scores[name] = None
        if model is not None:
            device = _device_of(model, x.device)
            try:
                scores[name] = model(x.to(device), ref.to(device)).to(x.device)
            except ValueError as e:  # images below the trunk's size
                if note:
                    note(f"note: {name} is null: {e}")
    return scores


def per_image(scores: dict[str, torch.Tensor | None], name: str, n: int) -> list:
    """One metric of `inpainting_metrics` as a list of n floats (n Nones where it is None)."""
    value = scores.get(name)
    return [None] * n if value is None else value.tolist()


__all__ = ["METRICS", "inpainting_metrics", "load_lpips_models", "per_image"]
