"""Where a backbone works: on pixels (EDM) or in the latent space of the Stable Diffusion VAE (EDM2, method.md §11).

The Inpainter (inpainter.py) brings an image and its mask to the backbone through one of two "spaces" with the same
interface, so every method runs unchanged on the same `Task` and the same sampler loop:

    space = space.for_method(method)  oracles are defined on pixels (below)
    task = space.task(x, M)           pixels x [B, 3, R, R] in [−1, 1], pixel mask M [B, 1, R, R] (1 = known) → Task
    result = sample(net, task, …)     the one loop, on whatever grid the task lives on
    space.to_pixels(x, M, result.completed)   the completion in pixel space, every visible pixel of x pasted back

`PixelSpace` is the identity (R = the network's resolution). `LatentSpace` wraps EDM2's `StabilityVAEEncoder`:

- **Pixels ↔ latents.** The VAE `stabilityai/sd-vae-ft-mse` (diffusers `AutoencoderKL`, the optional extra `latent`)
  takes pixels in [0, 1], as in EDM2's own encoder. A raw latent is the mean of the VAE posterior (deterministic; EDM2's
  training draws from the posterior, whose spread is tiny); the network's latent is
  `z = raw · scale + bias`, per channel, with `scale = 0.5 / raw_std` and `bias = −raw_mean · scale`
  (raw_mean = [5.81, 3.25, 0.12, −2.15], raw_std = [4.17, 4.62, 3.71, 3.28]: EDM2's constants, stored with each
  converted checkpoint). Decoding inverts the scaling, runs the VAE decoder and clamps to [0, 1]. R = 8 × the network's
  resolution (512² pixels ↔ 4×64×64 latents).
- **The observation on the latent grid.** The encoder sees the pixel observation y = M ⊙ x (the hole filled with grey,
  0 in [−1, 1]), never the pixels under the hole: the VAE's receptive field spans many latent cells, so encoding x itself
  would leak hidden pixels into the latents of visible cells (in `aid bench`, the ground truth).
- **The mask on the latent grid (conservative).** A latent cell is visible only if all of its 8×8 pixels are:
  `M_latent = 1 − maxpool₈(1 − M)`. Every hole pixel thus lies in a hole cell, which the method fills.
- **Back to pixels.** The method's completed latent (visible cells = the observation's latents, as `Task.complete` does
  in every space) is decoded, and then **every visible pixel is pasted back from x**: the decoded image only ever fills
  hole pixels, so visible pixels are exact whatever the VAE does.
- Oracles (`copy`, `greyfill`) need no network and are defined in pixel space: they run on the pixel task, so `copy` is
  still the ground truth (LPIPS 0), not its VAE reconstruction.

The VAE itself, its scaling constants and where its weights come from: vae.py.
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
