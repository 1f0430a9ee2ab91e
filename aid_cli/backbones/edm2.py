"""EDM2 networks (Karras et al. 2024), weight-compatible with NVlabs/edm2 `training/networks_edm2.py`.

The magnitude-preserving U-Net ("Analyzing and Improving the Training Dynamics of Diffusion Models", Figure 21) and its
preconditioner. Module and parameter names, shapes and arithmetic follow the official code exactly, so the `ema` network
of an official `edm2-*.pkl` (converted once to float32 safetensors by `aid models convert`) loads with `strict=True` and
gives the same `denoised` (method.md §11).

Weights are stored unnormalised, as in the official float16 EMA pickles: every MPConv normalises its weight at run time
(eq. 47 with the weight normalisation of eq. 66). Forced weight normalisation (overwriting the stored weight with its
normalised self) happens only in training mode, as in the official code; inference never modifies the weights.
"""

from __future__ import annotations

import numpy as np
import torch

from .edm import precond_inputs

# ----------------------------------------------------------------------------------------------------------------------
# Magnitude-preserving building blocks.


def normalize(x, dim=None, eps=1e-4):
    """Normalise x to unit magnitude over `dim` (default: all but the first), as the official `normalize`."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x, f=(1, 1), mode="keep"):
    """Up- or downsample x by 2 with the separable filter f, or keep it as is."""
    if mode == "keep":
        return x
    f = np.float32(f)
    assert f.ndim == 1 and len(f) % 2 == 0
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = np.outer(f, f)[np.newaxis, np.newaxis, :, :]
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    assert mode == "up"
    return torch.nn.functional.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def mp_silu(x):
    """Magnitude-preserving SiLU (eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving sum (eq. 88): lerp(a, b, t) / √((1 − t)² + t²)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation (eq. 103)."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / np.sqrt(Na) * (1 - t)
    wb = C / np.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features (eq. 75); frequencies and phases are stored buffers."""

    def __init__(self, num_channels, bandwidth=1):  # Fourier features: channels, frequency scale.
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32)
        y = y.ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)
        return y.to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution or fully-connected layer (eq. 47) with forced weight normalisation (eq. 66)."""

    def __init__(self, in_channels, out_channels, kernel):  # kernel: [] (fully connected) or [kh, kw].
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation (training only)
        w = normalize(w)  # traditional weight normalisation, at run time
        w = w * (gain / np.sqrt(w[0].numel()))  # magnitude-preserving scaling
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        assert w.ndim == 4
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


# ----------------------------------------------------------------------------------------------------------------------
# U-Net (Figure 21).


class Block(torch.nn.Module):
    """Encoder/decoder block with optional resampling and self-attention."""

    def __init__(self,
                 in_channels,                # Number of input channels.
                 out_channels,               # Number of output channels.
                 emb_channels,               # Number of embedding channels.
                 flavor="enc",               # Flavor: "enc" or "dec".
                 resample_mode="keep",       # Resampling: "keep", "up", or "down".
                 resample_filter=(1, 1),     # Resampling filter.
                 attention=False,            # Include self-attention?
                 channels_per_head=64,       # Number of channels per attention head.
                 dropout=0,                  # Dropout probability.
                 res_balance=0.3,            # Balance between main branch (0) and residual branch (1).
                 attn_balance=0.3,           # Balance between main branch (0) and self-attention (1).
                 clip_act=256,               # Clip output activations. None = do not clip.
                 ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Connect the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention (explicit einsums, as the official code: not scaled_dot_product_attention).
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm & split
            w = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        # Clip activations.
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """EDM2 U-Net: Fourier noise embedding (+ class embedding), encoder, decoder with mp_cat skips, gained output."""

    def __init__(self,
                 img_resolution,             # Image resolution.
                 img_channels,               # Image channels.
                 label_dim,                  # Class label dimensionality. 0 = unconditional.
                 model_channels=192,         # Base multiplier for the number of channels.
                 channel_mult=(1, 2, 3, 4),  # Per-resolution multipliers for the number of channels.
                 channel_mult_noise=None,    # Multiplier for noise embedding dimensionality. None = from channel_mult.
                 channel_mult_emb=None,      # Multiplier for final embedding dimensionality. None = from channel_mult.
                 num_blocks=3,               # Number of residual blocks per resolution.
                 attn_resolutions=(16, 8),   # List of resolutions with self-attention.
                 label_balance=0.5,          # Balance between noise embedding (0) and class embedding (1).
                 concat_balance=0.5,         # Balance between skip connections (0) and main path (1).
                 **block_kwargs,             # Arguments for Block.
                 ):
        super().__init__()
        cblock = [model_channels * x for x in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=(res in attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Preconditioning and uncertainty estimation: D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise)   (method.md §2, §11).


class Precond(torch.nn.Module):
    """EDM preconditioning (σ_data = 0.5, c_noise = ln(σ)/4) around the U-Net, plus the log-variance head u(σ)."""

    def __init__(self,
                 img_resolution,             # Image resolution.
                 img_channels,               # Image channels.
                 label_dim,                  # Class label dimensionality. 0 = unconditional.
                 use_fp16=True,              # Run the model at FP16 precision?
                 sigma_data=0.5,             # Expected standard deviation of the training data.
                 logvar_channels=128,        # Intermediate dimensionality for uncertainty estimation.
                 **unet_kwargs,              # Keyword arguments for UNet.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x, sigma, class_labels, dtype = precond_inputs(x, sigma, class_labels, self.label_dim, self.use_fp16, force_fp32)

        # Preconditioning weights.
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        # Run the model.
        x_in = (c_in * x).to(dtype)
        F_x = self.unet(x_in, c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)

        # Estimate uncertainty if requested.
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar  # u(σ) of eq. 21
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


PRECONDS = {"Precond": Precond}


def build_precond(precond: str, init_kwargs: dict) -> Precond:
    """Build an EDM2 network from the class name and `_init_kwargs` stored in an official pickle."""
    if precond not in PRECONDS:
        raise ValueError(f"unknown EDM2 preconditioner {precond!r} (known: {', '.join(PRECONDS)})")
    return PRECONDS[precond](**init_kwargs)


__all__ = ["MPConv", "MPFourier", "Block", "UNet", "Precond", "PRECONDS", "build_precond", "normalize", "mp_silu",
           "mp_sum", "mp_cat", "resample"]
