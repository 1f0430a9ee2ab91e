"""The EDM training loss (Karras et al. 2022, eq. 2 and Table 1)."""

from __future__ import annotations

import torch


class EDMLoss:
    """ln σ ~ N(P_mean, P_std²); λ(σ) = (σ² + σ_data²)/(σ·σ_data)²; loss = λ(σ)·‖D(y + n; σ) − y‖², n ~ N(0, σ²I)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def draw(self, shape, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """σ per image [B,1,1,1] and unit noise shaped like the batch, on CPU from `generator`."""
        sigma = (torch.randn([shape[0], 1, 1, 1], generator=generator) * self.P_std + self.P_mean).exp()
        return sigma, torch.randn(shape, generator=generator)

    def __call__(self, net, y: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Per-element weighted loss shaped like y (the caller sums and normalises); n = σ·z."""
        sigma, z = sigma.to(y.device), z.to(y.device)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        D_yn = net(y + sigma * z, sigma.flatten(), class_labels)
        return weight * (D_yn - y) ** 2
