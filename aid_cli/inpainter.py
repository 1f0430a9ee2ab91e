"""The core of the tool: a backbone, the space it works in and one method → completed pixels (design.md, "The path
of one image").

    x, M                               pixels [B, C, R, R] in [−1, 1] and their mask [B, 1, R, R], 1 = known
    task = space.task(x, M, labels)    the Task ξ = (M, y) on the backbone's grid: pixels, or the VAE's latents
    result = sample(net, task, method) the one sampler loop (sampling/heun.py), driven by one method
    space.to_pixels(x, M, completed)   back to pixels, every visible pixel of x pasted back exactly

`aid inpaint` (jobs.py, fill.py: files in, files out), `aid bench` (bench/: datasets, metrics, timing) and `aid train`'s
validation (guidance/validate.py) all complete images through `Inpainter.complete`; nothing else runs that path. Which
method runs, with which parameters and which guidance module, is decided once by resolve.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .backbones.checkpoint import load_backbone
from .backbones.spaces import LatentSpace, PixelSpace, model_space
from .sampling.heun import Method, SampleResult, sample


def trained_multiscale(info: dict) -> bool:
    """Whether a backbone was trained on photo windows at every scale (`aid pretrain --crop random`): holes may then be
    filled at native scale as well as shrunk (fill.fit_hole's auto); False for aligned sets at one scale (cat
    faces) and official nets."""
    provenance = info.get("provenance") or {}
    config = provenance.get("config") if isinstance(provenance, dict) else None
    return isinstance(config, dict) and config.get("crop") == "random"


@dataclass
class Inpainter:
    """A frozen backbone ready to inpaint: the network as it runs, its checkpoint's info, and its space."""

    net: Callable  # the denoiser D(x; σ, labels), prepared to run (devices.prepare_backbone)
    info: dict  # load_backbone's: resolution, channels, label_dim, precond, encoder, ...
    space: PixelSpace | LatentSpace
    device: torch.device = torch.device("cpu")
    checkpoint: Path | None = None

    @classmethod
    def load(cls, checkpoint: str | Path, device: torch.device, vae: str | None = None, precision: str = "auto",
             compile: bool = False, notice: Callable[[str], None] | None = None,
             check: Callable[[dict], None] | None = None) -> "Inpainter":
        """Load the backbone, then (`check(info)` first: e.g. --class against it) its space (latent backbones: the
        VAE, which fails here in one line when it is missing), then prepare it to run (precision, compile)."""
        from .devices import prepare_backbone

        net, info = load_backbone(checkpoint, device=device)
        if check is not None:
            check(info)
        space = model_space(info, vae, device=device)
        net = prepare_backbone(net, device, precision, compile, notice=notice)
        return cls(net, info, space, device, Path(checkpoint))

    @property
    def multiscale(self) -> bool:
        return trained_multiscale(self.info)

    @property
    def resolution(self) -> int:
        """The pixel side images are fitted to: the network's resolution × the space's factor (latent: the VAE's 8)."""
        return self.info["resolution"] * self.space.factor

    def complete(self, x: torch.Tensor, M: torch.Tensor, method: Method, steps: int,
                 generators: list[torch.Generator], labels: torch.Tensor | None = None, extras: dict | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, SampleResult]:
        """(completed pixels [B, C, R, R], the sampler's result) of images x with holes M (1 = known), on the device.

        Sample b draws its noise from `generators[b]`; `labels`: one-hot [B, label_dim] of a class-conditional
        backbone; `extras`: the oracles' ground truth (bench only); `progress(k)`: the NFE of each network call."""
        space = self.space.for_method(method)  # oracles are defined on pixels
        task = space.task(x, M, labels)  # latent backbones: y = E(M ⊙ x), M on the latent grid
        result = sample(self.net, task, method, num_steps=steps, generators=generators, extras=extras,
                        progress=progress)
        return space.to_pixels(x, M, result.completed), result


__all__ = ["Inpainter", "trained_multiscale"]
