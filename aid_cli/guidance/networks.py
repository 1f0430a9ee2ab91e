"""Actor μ_φ(t, x; ξ) and critic V_θ(t, x; ξ) of AID (method.md §7, paper App. G).

Both are separate small conv nets on (t, x, M, y):
  - a conditioning stem reads the task ξ = (M, y) (two residual blocks at width C);
  - its output is concatenated with the state x and a sinusoidal embedding of the noise level;
  - a four-block residual trunk at width C follows;
  - the actor projects back to the state's channels (a field shaped like x), the critic takes the spatial mean and a
    linear map to a scalar. The critic is for training only and never ships.

Noise conditioning: the nets see σ through EDM's c_noise = ln(σ)/4, not the step index n, so one trained field serves any
grid (N = 18 and N = 12 alike; method.md §3). **(reconstructed)** Input and output scaling follow EDM's preconditioning
idea: the state enters as c_in(σ)·x with c_in = 1/√(σ² + σ_data²), so every noise level sees unit-scale inputs, and the
actor's field leaves as c_u(σ)·F with c_u = √(σ² + σ_data²), the scale of the state it steers; its last conv starts at
zero, so training starts from the unguided sampler (u ≡ 0).

`denoised_input` (an option beside the paper's nets, off by default): the trunk also reads the backbone's estimate
D(x; σ) of the step it steers and its residual on the visible pixels, M ⊙ (y − D(x; σ)). D is a fixed function of
(σ, x), so the field is still a feedback control μ(t, x; ξ) of eq. 1; the Heun step computes D(x_n; σ_n) anyway, so
reading it costs no network evaluation, and it gives the small net the backbone's global view of the image.

The trunk's first conv is linear in its input channels, so it runs as three parts (same weights, same sums): the
task's stem features (fixed along a solve: `condition` returns their part once per solve), the noise embedding
(constant over the image: its part is a 3×3 conv of the embedding, spread over the rows and columns by
`constant_map_conv`; one map for a batch that shares σ), and the state's few channels, the only part each step must convolve in full.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import silu

SIGMA_DATA = 0.5


def noise_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of c_noise = ln(σ)/4 (transformer-style frequencies)."""
    c_noise = sigma.reshape(-1).log() / 4
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    angles = c_noise[:, None].float() * freqs[None] * 100  # c_noise spans about [−1.6, 1.1]: spread it over the bands
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def constant_map_conv(e: torch.Tensor, weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """conv2d(e spread over an H×W map, weight, padding=1) for e [B, E] and a 3×3 weight [O, E, 3, 3], without the
    H×W convolution: the output takes one value in the interior and others only along the edges and corners (where
    the zero padding drops kernel taps), so it is the conv of a 3×3 map with its middle row and column repeated."""
    H, W = size
    small = torch.nn.functional.conv2d(e[:, :, None, None].expand(-1, -1, min(H, 3), min(W, 3)), weight, padding=1)

    def spread(n):  # index of the small map's row (column) that each of the n output rows (columns) equals
        return torch.tensor([0] + [1] * (n - 2) + [2], device=e.device) if n > 3 else torch.arange(n, device=e.device)

    return small[:, :, spread(H)][:, :, :, spread(W)]


def _silu(h: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor (a norm's output): in place when no graph is recorded (deployment), which saves the
    small net a full-resolution write per activation; with gradients, out of place (its backward reads its input)."""
    return silu(h, inplace=not torch.is_grad_enabled())


def _groups(channels: int) -> int:
    return max(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(width), width)
        self.conv0 = nn.Conv2d(width, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h):
        return self.conv1(_silu(self.norm1(self.conv0(_silu(self.norm0(h)))))).add_(h)  # the conv's output: in place


class GuidanceNet(nn.Module):
    """The shared body: conditioning stem on (M, y), then [stem, c_in·x, emb(σ)] through a residual trunk."""

    def __init__(self, channels: int = 3, width: int = 16, emb_dim: int = 16, stem_blocks: int = 2,
                 trunk_blocks: int = 4, denoised_input: bool = False):
        super().__init__()
        self.channels, self.width, self.emb_dim = channels, width, emb_dim
        self.denoised_input = bool(denoised_input)
        self.stem_in = nn.Conv2d(channels + 1, width, 3, padding=1)  # (M, y)
        self.stem = nn.Sequential(*[ResBlock(width) for _ in range(stem_blocks)])
        extra = 2 * channels if self.denoised_input else 0  # D(x; σ) and M ⊙ (y − D(x; σ))
        self.trunk_in = nn.Conv2d(width + channels + extra + emb_dim, width, 3, padding=1)
        self.trunk = nn.Sequential(*[ResBlock(width) for _ in range(trunk_blocks)])
        self.norm_out = nn.GroupNorm(_groups(width), width)

    def condition(self, M: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task ξ = (M, y)'s part of the trunk's first layer: trunk_in (its stem-feature channels, and its bias)
        applied to the conditioning stem's features. It does not change along a solve."""
        cond = self.stem(self.stem_in(torch.cat([M, y], dim=1)))
        return torch.nn.functional.conv2d(cond, self.trunk_in.weight[:, :self.width], self.trunk_in.bias, padding=1)

    def features(self, sigma: torch.Tensor, x: torch.Tensor, M: torch.Tensor, y: torch.Tensor,
                 cond: torch.Tensor | None = None, denoised: torch.Tensor | None = None) -> torch.Tensor:
        """`cond`: `condition(M, y)` computed once per solve (deployment), or None to compute it here.
        `denoised`: D(x; σ), read only by a net built with `denoised_input` (which requires it). `sigma`: one value
        per image, or a single value the batch shares (a solve's step), whose embedding map is then made once."""
        e = noise_embedding(sigma, self.emb_dim).to(x.dtype)  # [1 or B, emb_dim], as σ was given
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype).expand(x.shape[0], 1, 1, 1)
        c_in = 1 / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        if cond is None:
            cond = self.condition(M, y)
        inputs = [c_in * x]
        if self.denoised_input:
            if denoised is None:
                raise ValueError("this guidance net reads the denoiser's estimate D(x; σ): pass `denoised`")
            inputs += [denoised, M * (y - denoised)]
        # trunk_in on [stem features, state, emb(σ)], as the sum of its parts (module docstring)
        w = self.trunk_in.weight
        k = self.width + sum(t.shape[1] for t in inputs)
        h = torch.nn.functional.conv2d(torch.cat(inputs, dim=1), w[:, self.width:k], padding=1)
        h = h.add_(cond).add_(constant_map_conv(e, w[:, k:], x.shape[-2:]))  # the conv's own output: in place
        return _silu(self.norm_out(self.trunk(h)))


class Actor(GuidanceNet):
    """μ_φ(σ, x; M, y): a field shaped like x, scaled by c_u(σ) = √(σ² + σ_data²)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.out = nn.Conv2d(self.width, self.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # u ≡ 0 at initialisation: the unguided sampler
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def output_scale(sigma: torch.Tensor) -> torch.Tensor:
        """c_u(σ) = √(σ² + σ_data²), the scale of the field at noise level σ (same shape as σ)."""
        return (sigma ** 2 + SIGMA_DATA ** 2).sqrt()

    def forward(self, sigma, x, M, y, cond=None, denoised=None):
        c_u = self.output_scale(sigma.reshape(-1, 1, 1, 1).to(x.dtype))
        return c_u * self.out(self.features(sigma, x, M, y, cond, denoised))


class Critic(GuidanceNet):
    """V_θ(σ, x; M, y): spatial mean of the trunk's features, then a linear map to a scalar."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.head = nn.Linear(self.width, 1)

    def forward(self, sigma, x, M, y):
        return self.head(self.features(sigma, x, M, y).mean(dim=(2, 3))).squeeze(1)


class PrivilegedCritic(nn.Module):
    """V_θ(σ, x; x0, M, y), a training-only critic that also reads the ground truth x0 and the backbone's estimate
    D(x; σ) (both fixed functions of the task and the state: a valid baseline for eq. 11, never an input of the actor):

        V_θ = ℓ(D(x; σ); x0, M) + head(mean over pixels of trunk([c_in·x, x0, M, y, D, D − x0, emb(σ)]))

    ℓ(D) is an analytic baseline (what the terminal loss would be if the solve stopped at its current estimate), so
    the net learns only the correction. No normalisation sits between the trunk and the spatial mean, so the scale of
    the features (and of V) survives it. Saved in the training state only; a deployable module holds the actor alone.
    """

    privileged = True

    def __init__(self, channels: int = 3, width: int = 16, emb_dim: int = 16, blocks: int = 4,
                 lambda_vis: float = 1.0, lambda_hole: float = 1.0):
        super().__init__()
        self.channels, self.width, self.emb_dim = channels, width, emb_dim
        self.lambda_vis, self.lambda_hole = lambda_vis, lambda_hole
        self.inp = nn.Conv2d(5 * channels + 1 + emb_dim, width, 3, padding=1)
        self.trunk = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)  # V = ℓ(D) at initialisation
        nn.init.zeros_(self.head.bias)

    def baseline(self, D: torch.Tensor, x0: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """ℓ(D; x0, M) per image (eq. 2, means over all entries)."""
        err2 = (D - x0) ** 2
        return (self.lambda_vis / 2) * (M * err2).mean(dim=(1, 2, 3)) + \
            (self.lambda_hole / 2) * ((1 - M) * err2).mean(dim=(1, 2, 3))

    def forward(self, sigma, x, M, y, x0, D):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype).expand(x.shape[0], 1, 1, 1)
        c_in = 1 / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        emb = noise_embedding(sigma, self.emb_dim)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        h = self.trunk(self.inp(torch.cat([c_in * x, x0, M, y, D, D - x0, emb], dim=1)))
        return self.baseline(D, x0, M) + self.head(silu(h).mean(dim=(2, 3))).squeeze(1)
