"""Where a backbone works: on pixels (EDM) or on the latents of the Stable Diffusion VAE (EDM2, method.md §11).

Both spaces have one interface, so every method runs unchanged on the same `Task` and sampler loop:
`space.for_method(method)`, `space.task(x, M)` → Task, `sample(...)`, `space.to_pixels(x, M, completed)`, which
pastes every visible pixel of x back. The VAE, its scaling constants and its weights: vae.py.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..task import Task
from .vae import VAE_BATCH, VAE_REPO, load_vae


class PixelSpace:
    """The network works on the image itself (EDM backbones)."""

    latent = False
    factor = 1

    def task(self, x: torch.Tensor, M: torch.Tensor, class_labels: torch.Tensor | None = None) -> Task:
        return Task.from_image(x, M, class_labels)

    def to_pixels(self, x: torch.Tensor, M: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
        """The completed image already is M ⊙ y + M̄ ⊙ x̂ on pixels."""
        return completed

    def for_method(self, method) -> "PixelSpace":
        return self

    def describe(self) -> str:
        return "pixels"


class LatentSpace:
    """The network works on EDM2's scaled latents of the SD VAE; observation and mask are brought to the latent grid."""

    latent = True

    def __init__(self, vae, encoder: dict, source: str = VAE_REPO, batch_size: int = VAE_BATCH):
        self.vae = vae
        self.encoder = encoder
        self.source = source
        self.batch_size = int(batch_size)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # spatial downsampling of the VAE (8 for SD)
        device = next(vae.parameters()).device
        self.scale = torch.tensor(encoder["scale"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.bias = torch.tensor(encoder["bias"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [−1, 1] → the network's latents: posterior mean of the [0, 1] image, then raw · scale + bias."""
        # The posterior mean, not a draw (its spread is tiny); scale = 0.5 / raw_std, bias = −raw_mean · scale per
        # channel, EDM2's constants, stored with each converted checkpoint.
        x = (x.to(self.scale.device, torch.float32) + 1) / 2
        raw = torch.cat([self.vae.encode(b).latent_dist.mean for b in x.split(self.batch_size)])
        return raw.to(torch.float32) * self.scale + self.bias

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The network's latents → pixels in [−1, 1]: (z − bias) / scale, the VAE decoder, clamped to [0, 1]."""
        raw = (z.to(self.scale.device, torch.float32) - self.bias) / self.scale
        x = torch.cat([self.vae.decode(b).sample for b in raw.split(self.batch_size)])
        return x.to(torch.float32).clamp(0, 1) * 2 - 1

    def latent_mask(self, M: torch.Tensor) -> torch.Tensor:
        """Pixel mask [B, 1, R, R] (1 = known) → latent mask: a cell is known only if all its pixels are."""
        if M.shape[-1] % self.factor or M.shape[-2] % self.factor:
            raise ValueError(f"mask {tuple(M.shape[-2:])} is not a multiple of the VAE's factor {self.factor}")
        return 1 - F.max_pool2d(1 - M.to(torch.float32), self.factor)

    def task(self, x: torch.Tensor, M: torch.Tensor, class_labels: torch.Tensor | None = None) -> Task:
        """The task on the latent grid: y = E(M ⊙ x) (never the hidden pixels), M_latent by the conservative rule."""
        # The VAE's receptive field spans many latent cells: encoding x itself would leak hidden pixels (in `aid
        # bench`, the ground truth) into the latents of visible cells.
        M = M.to(self.scale.device)
        z = self.encode(M * x.to(self.scale.device))
        return Task(y=z, M=self.latent_mask(M), class_labels=class_labels)

    def to_pixels(self, x: torch.Tensor, M: torch.Tensor, completed: torch.Tensor) -> torch.Tensor:
        """Decode the completed latent, then paste every visible pixel of x back (exact, whatever the decoder did)."""
        decoded = self.decode(completed).to(x.device)
        return torch.where(M.to(x.device).expand_as(x) > 0.5, x, decoded)

    def for_method(self, method) -> "LatentSpace | PixelSpace":
        """Oracles (copy, greyfill) need no network and are defined on pixels: they get the pixel task."""
        return PixelSpace() if method.oracle else self

    def describe(self) -> str:
        return f"latent (VAE {self.source}, {self.factor}x)"


def model_space(info: dict, vae: str | os.PathLike | None = None, device="cpu") -> PixelSpace | LatentSpace:
    """The space a loaded backbone (`load_backbone`'s info) works in; latent backbones load their VAE here."""
    encoder = info.get("encoder")
    if encoder is None:
        if vae is not None:
            raise UserError("--vae: this backbone works on pixels and uses no VAE; drop --vae")
        return PixelSpace()
    model, source = load_vae(encoder, vae, device=device)
    if model.config.latent_channels != info["channels"]:
        raise UserError(f"the VAE {source} has {model.config.latent_channels} latent channels, the backbone "
                        f"{info['channels']}: they do not belong together")
    return LatentSpace(model, encoder, source=source)



__all__ = ["PixelSpace", "LatentSpace", "model_space"]
