"""Where a backbone works: on pixels (EDM) or in the latent space of the Stable Diffusion VAE (EDM2, method.md §11).

Every entry point (`aid inpaint`, `aid bench`) brings an image and its mask to the backbone through one of two "spaces"
with the same interface, so every method runs unchanged on the same `Task` and the same sampler loop:

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

The VAE weights come from the Hugging Face Hub at a pinned revision, checked by sha256, through the ordinary HF cache
(`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` are honoured), or from a local diffusers folder (`--vae DIR`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, UserError
from ..task import Task

# EDM2's latent scaling (training/encoders.py StabilityVAEEncoder defaults; method.md §11).
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5

# The VAE, pinned: repository, commit, and the sha256 of its weights file.
VAE_REPO = "stabilityai/sd-vae-ft-mse"
VAE_REVISION = "31f26fdeee1355a5c34592e401dd41e45d25a493"
VAE_CONFIG = "config.json"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS_SHA256 = "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"
VAE_BATCH = 8  # images per VAE call, as EDM2's encoder

ENCODER_CLASS = "StabilityVAEEncoder"
INSTALL_HINT = 'pip install "aid-inpaint[latent]"'


def stability_encoder(vae_name: str = VAE_REPO, raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean=FINAL_MEAN,
                      final_std=FINAL_STD) -> dict:
    """The `aid.encoder` record of EDM2's StabilityVAEEncoder: scale and bias computed in float32 as the official code."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    return {"class_name": ENCODER_CLASS, "vae_name": vae_name, "scale": [float(v) for v in scale],
            "bias": [float(v) for v in bias]}


def check_encoder(encoder, channels: int) -> None:
    """Raise ValueError unless `encoder` is a usable `aid.encoder` record for a network with `channels` channels."""
    if not isinstance(encoder, dict) or encoder.get("class_name") != ENCODER_CLASS:
        raise ValueError(f"unsupported encoder record (supported: {ENCODER_CLASS})")
    if not isinstance(encoder.get("vae_name"), str) or not encoder["vae_name"]:
        raise ValueError("encoder record without vae_name")
    for key in ("scale", "bias"):
        values = encoder.get(key)
        if (not isinstance(values, list) or len(values) != channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)):
            raise ValueError(f"encoder {key} must be {channels} finite numbers, one per latent channel")
    if any(v == 0 for v in encoder["scale"]):
        raise ValueError("encoder scale must not be 0")


def class_labels(label: int | None, label_dim: int, batch: int) -> torch.Tensor | None:
    """One-hot labels [batch, label_dim] for `--class N` (None for unconditional backbones); user errors otherwise."""
    if label_dim == 0:
        if label is not None:
            raise UserError(f"--class {label}: this backbone is unconditional; drop --class")
        return None
    if label is None:
        raise UserError(f"this backbone is class-conditional ({label_dim} classes): pass --class N with "
                        f"0 <= N < {label_dim}")
    if not 0 <= label < label_dim:
        raise UserError(f"--class {label} is out of range: this backbone has classes 0..{label_dim - 1}")
    return F.one_hot(torch.full((batch,), int(label)), label_dim).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Spaces.


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


# ----------------------------------------------------------------------------------------------------------------------
# The VAE.


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError(f"this backbone works in the latent space of the Stable Diffusion VAE, which needs diffusers: "
                        f"{INSTALL_HINT}") from None
    return AutoencoderKL


def load_vae(encoder: dict, vae: str | os.PathLike | None = None, device="cpu"):
    """(AutoencoderKL in eval mode on `device`, where it came from): `vae` (a local diffusers folder, or a hub name), else
    the checkpoint's `vae_name` from the hub."""
    AutoencoderKL = _autoencoder_class()
    if vae is not None and Path(vae).expanduser().exists():
        folder = Path(vae).expanduser()
        if not (folder / VAE_CONFIG).is_file():
            raise UserError(f"--vae {folder}: not a diffusers AutoencoderKL folder (no {VAE_CONFIG})")
        source = str(folder)
    else:
        source = str(vae) if vae is not None else encoder["vae_name"]
        folder = fetch_vae(source)
    try:
        import logging

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        line = next((t.strip() for t in str(e).splitlines() if t.strip()), type(e).__name__)
        raise CheckpointError(f"{folder}: cannot load the VAE ({line})") from None
    return model.eval().requires_grad_(False).to(device), source


def _offline() -> bool:
    """HF_HUB_OFFLINE as the hub library reads it (also when set after it was imported)."""
    import huggingface_hub.constants as hf

    return bool(hf.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub's host, so that no network fails in seconds instead of after the hub library's
    retries (about 25 s per file). Behind a proxy (HTTPS_PROXY/HTTP_PROXY set) the hub library is left to find out."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hf

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(hf.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _vae_unavailable(why: str) -> UserError:
    return UserError(f"cannot get the VAE {VAE_REPO} (revision {VAE_REVISION[:10]}) that this latent backbone needs: "
                     f"{why}. Where there is internet run `hf download {VAE_REPO} --revision {VAE_REVISION}` (it fills "
                     f"the Hugging Face cache, HF_HOME), or pass --vae DIR with a local copy")


def fetch_vae(repo: str) -> Path:
    """The local snapshot folder of the pinned VAE: from the HF cache, else downloaded; weights checked by sha256."""
    if repo != VAE_REPO:
        raise UserError(f"the VAE {repo!r} is not one aid knows a pinned revision of (only {VAE_REPO}); download it "
                        f"yourself and pass --vae DIR")
    from huggingface_hub import hf_hub_download

    from .checkpoint import sha256_file

    files = (VAE_CONFIG, VAE_WEIGHTS)
    try:  # the cache first: no network at all when the pinned files are there
        paths = [Path(hf_hub_download(VAE_REPO, f, revision=VAE_REVISION, local_files_only=True)) for f in files]
    except Exception:  # noqa: BLE001 (not cached, in whatever way the hub library says it)
        if _offline():
            raise _vae_unavailable("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        if not _hub_reachable():
            raise _vae_unavailable("it is not in the Hugging Face cache and the hub cannot be reached") from None
        try:
            paths = [Path(hf_hub_download(VAE_REPO, f, revision=VAE_REVISION)) for f in files]
        except Exception as e:  # noqa: BLE001 (unreachable, refused, not found: all mean "not here")
            why = next((t.strip() for t in str(e).splitlines() if t.strip()), type(e).__name__)
            raise _vae_unavailable(f"{type(e).__name__}: {why[:160]}") from None
    weights = paths[1]
    digest = sha256_file(weights)
    if digest != VAE_WEIGHTS_SHA256:
        raise CheckpointError(f"{weights}: sha256 {digest[:16]}… is not the pinned {VAE_REPO} weights' "
                              f"({VAE_WEIGHTS_SHA256[:16]}…); delete it and download again")
    return weights.parent


__all__ = ["PixelSpace", "LatentSpace", "model_space", "load_vae", "fetch_vae", "stability_encoder", "check_encoder",
           "class_labels", "RAW_MEAN", "RAW_STD", "VAE_REPO", "VAE_REVISION"]
