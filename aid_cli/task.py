"""The inpainting task ξ = (M, y) at model resolution (method.md §1).

Inside the tool everything is float32 NCHW in [−1, 1], and the mask tensor is 1 = visible (known), 0 = hole, as in the paper.
The ground truth x0 is *not* part of a task: methods see only what deployment sees. Training and benchmarking keep x0 beside
the task themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass
class Task:
    y: torch.Tensor  # observation M ⊙ x0, [B, C, H, W] in [−1, 1] (latent backbones: EDM2's latents, backbones/spaces.py)
    M: torch.Tensor  # mask, [B, 1, H, W] (broadcast over channels), 1 = known, 0 = hole
    class_labels: torch.Tensor | None = None  # one-hot [B, label_dim] for class-conditional backbones

    def __post_init__(self):
        if self.y.ndim != 4 or self.M.ndim != 4:
            raise ValueError("Task tensors must be NCHW")
        if self.M.shape[0] != self.y.shape[0] or self.M.shape[-2:] != self.y.shape[-2:]:
            raise ValueError(f"mask {tuple(self.M.shape)} does not fit observation {tuple(self.y.shape)}")
        self.y = self.M * self.y  # y = M ⊙ x0: whatever was under the hole is not observed

    @classmethod
    def from_image(cls, x0: torch.Tensor, M: torch.Tensor, class_labels: torch.Tensor | None = None) -> "Task":
        """Observe x0 through M (y = M ⊙ x0)."""
        return cls(y=M * x0, M=M, class_labels=class_labels)

    @property
    def batch_size(self) -> int:
        return self.y.shape[0]

    @property
    def hole(self) -> torch.Tensor:
        """M̄ = 1 − M."""
        return 1 - self.M

    def complete(self, x_hat: torch.Tensor) -> torch.Tensor:
        """Completed image M ⊙ y + M̄ ⊙ x̂: visible pixels pasted back (every method, before metrics)."""
        return self.M * self.y + (1 - self.M) * x_hat

    def to(self, device) -> "Task":
        labels = self.class_labels.to(device) if self.class_labels is not None else None
        return Task(y=self.y.to(device), M=self.M.to(device), class_labels=labels)

    def __getitem__(self, index) -> "Task":
        """A sub-batch (slice or index tensor)."""
        labels = self.class_labels[index] if self.class_labels is not None else None
        return Task(y=self.y[index], M=self.M[index], class_labels=labels)


def one_hot(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """int64 class indices [B] → the float32 one-hot [B, label_dim] a class-conditional backbone reads."""
    return torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)


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
    return one_hot(torch.full((batch,), int(label)), label_dim)
