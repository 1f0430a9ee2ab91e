"""The Stable Diffusion VAE of latent (EDM2) backbones: EDM2's latent scaling, the `aid.encoder` record, and the pinned
VAE itself, from the Hugging Face cache or hub (method.md §11).

The VAE `stabilityai/sd-vae-ft-mse` (diffusers `AutoencoderKL`, the optional extra `latent`) takes pixels in [0, 1], as in
EDM2's own encoder. The network's latent is `z = raw · scale + bias`, per channel, with `scale = 0.5 / raw_std` and
`bias = −raw_mean · scale` (raw_mean = [5.81, 3.25, 0.12, −2.15], raw_std = [4.17, 4.62, 3.71, 3.28]: EDM2's
constants, stored with each converted checkpoint). The weights come from the hub at a pinned revision, checked by
sha256, through the ordinary HF cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` are honoured), or from a local
diffusers folder (`--vae DIR`). How images travel through it: spaces.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UserError, one_line
from ..fileio import sha256_file
from ..paths import offline_mode

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
        raise CheckpointError(f"{folder}: cannot load the VAE ({one_line(e)})") from None
    return model.eval().requires_grad_(False).to(device), source


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

    files = (VAE_CONFIG, VAE_WEIGHTS)
    try:  # the cache first: no network at all when the pinned files are there
        paths = [Path(hf_hub_download(VAE_REPO, f, revision=VAE_REVISION, local_files_only=True)) for f in files]
    except Exception:  # noqa: BLE001 (not cached, in whatever way the hub library says it)
        if offline_mode(hub_library=True):
            raise _vae_unavailable("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        if not _hub_reachable():
            raise _vae_unavailable("it is not in the Hugging Face cache and the hub cannot be reached") from None
        try:
            paths = [Path(hf_hub_download(VAE_REPO, f, revision=VAE_REVISION)) for f in files]
        except Exception as e:  # noqa: BLE001 (unreachable, refused, not found: all mean "not here")
            raise _vae_unavailable(f"{type(e).__name__}: {one_line(e)[:160]}") from None
    weights = paths[1]
    digest = sha256_file(weights)
    if digest != VAE_WEIGHTS_SHA256:
        raise CheckpointError(f"{weights}: sha256 {digest[:16]}… is not the pinned {VAE_REPO} weights' "
                              f"({VAE_WEIGHTS_SHA256[:16]}…); delete it and download again")
    return weights.parent


__all__ = ["load_vae", "fetch_vae", "stability_encoder", "check_encoder", "RAW_MEAN", "RAW_STD", "VAE_REPO",
           "VAE_REVISION"]
