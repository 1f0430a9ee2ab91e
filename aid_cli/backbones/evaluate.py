"""Quality of a backbone: the EDM denoising loss on held-out images, and FID of unconditional samples.

Both are deterministic for a given seed, so the model card's figures can be re-measured exactly by the command it gives.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.datasets import ImageSet
from ..sampling.heun import sample, sample_generators
from ..task import Task
from .loss import EDMLoss

VAL_SIGMAS = (0.05, 0.2, 0.5, 2.0, 10.0)


@torch.no_grad()
def validation_loss(net, data: ImageSet, seed: int = 0, batch: int = 100, device="cpu") -> dict:
    """EDM loss (λ(σ)-weighted, σ ~ the training distribution; summed over pixels, mean over images) on `data`,
    plus the plain per-pixel MSE of D at a few fixed noise levels.

    Image i draws its σ and noise from its own generator (seed + i), so the figures do not depend on `batch`.
    """
    loss_fn = EDMLoss()
    total, per_sigma = 0.0, {s: 0.0 for s in VAL_SIGMAS}
    for i in range(0, len(data), batch):
        y = data.as_float(slice(i, i + batch)).to(device)
        draws = [loss_fn.draw((1, *y.shape[1:]), g) + tuple(torch.randn((1, *y.shape[1:]), generator=g)
                                                              for _ in VAL_SIGMAS)
                 for g in sample_generators(seed, y.shape[0], offset=i)]
        sigma, z = (torch.cat([d[k] for d in draws]) for k in (0, 1))
        total += loss_fn(net, y, sigma, z).sum().item()
        for k, s in enumerate(VAL_SIGMAS):
            zs = torch.cat([d[2 + k] for d in draws]).to(device)
            D = net(y + s * zs, torch.full((y.shape[0],), s, device=device), None)
            per_sigma[s] += ((D - y) ** 2).mean(dim=(1, 2, 3)).sum().item()
    n = len(data)
    return {"edm_loss": total / n, "mse_at_sigma": {str(s): v / n for s, v in per_sigma.items()}, "images": n,
            "seed": seed}


@torch.no_grad()
def generate(net, n: int, resolution: int, steps: int = 18, seed: int = 0, batch: int = 250, device="cpu",
             on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """n unconditional samples as uint8 [n, 3, R, R], sample i seeded with seed + i (same loop as inpainting)."""
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        empty = Task(y=torch.zeros(b, 3, resolution, resolution, device=device),
                     M=torch.zeros(b, 1, resolution, resolution, device=device))
        x = sample(net, empty, num_steps=steps, generators=sample_generators(seed, b, offset=i)).completed
        out.append(((x.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        if on_batch:
            on_batch(b)
    return torch.cat(out)


def reference_key(data: ImageSet) -> str:
    """A content hash of a reference image set, to cache its Inception statistics."""
    h = hashlib.sha256()
    h.update(str(tuple(data.images.shape)).encode())
    h.update(data.images.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_stats(cache_dir: Path, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """(μ, Σ) of a reference set from `cache_dir/fid-ref-KEY.npz`, computed and stored on first use."""
    from ..fileio import atomic_write

    path = Path(cache_dir) / f"fid-ref-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return f["mu"], f["sigma"]
    mu, sigma = compute()
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)

    atomic_write(path, write)
    return mu, sigma
