"""Training tasks on whole photos, made the way `aid inpaint` presents a hole to the backbone.

A task is a training photo, a hole drawn on it at its own scale (data/photo_masks.py's families, on the training
stream), and the view of it `aid inpaint` would give the backbone: the same `fit_hole` (a box around the hole, or for a
thin stroke spread wide, one of the windows at native scale along it), then `to_task_tensors`. For a window, the hole
pixels of the windows before it count as known (in deployment they hold that window's fills by then; here the truth
stands in for them). So the module learns on exactly the inputs it will meet, not on 64×64 crops with masks of their
own.

The tasks are drawn once per run (a bank, as the cat runs' `--mask-bank`): task k of a bank depends only on (seed,
stream, k), the photos and the backbone's resolution, so a resumed run sees the same bank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.datasets import ImageSet, PhotoSet
from ..data.images import LoadedImage, to_task_tensors
from ..data.masks import TRAIN_STREAM
from ..data.photo_masks import PHOTO_FAMILIES, photo_training_hole
from ..fill import InpaintOptions, fit_hole
from ..jobs import Job

TRAIN_TASKS, VALIDATION_TASKS = 0x7461736B, 0x76616C74  # "task", "valt": a training bank and a validation set


def photo_tasks(photos: PhotoSet, n: int, resolution: int, seed: int, stream: int = TRAIN_TASKS,
                multiscale: bool = True, families=PHOTO_FAMILIES) -> tuple[ImageSet, torch.Tensor]:
    """`n` tasks: (their ground truths as an ImageSet of uint8 [n, 3, R, R], their masks bool [n, 1, R, R], 1 = known).
    `multiscale`: the backbone was trained on windows at every scale (fit_hole's auto chooses windows for strokes)."""
    rng = np.random.default_rng([TRAIN_STREAM, stream, int(seed)])
    opts = InpaintOptions(fit="auto")
    images, known, names = [], [], []
    for k in range(n):
        j = int(rng.integers(len(photos)))
        pixels = photos.photos[j].permute(1, 2, 0).numpy()
        img = LoadedImage(path=Path(photos.names[j]), pixels=pixels, mode="RGB", source_mode="RGB")
        family, hole = photo_training_hole(seed, stream, k, pixels.shape[:2], families)
        item = fit_hole(Job(img.path, Path(family), []), img, hole, resolution, opts, multiscale=multiscale)
        if isinstance(item.fit, list):  # windows along a stroke: one of them, the earlier ones already filled
            w = int(rng.integers(len(item.fit)))
            unfilled = hole.copy()
            for _, fills in item.fit[:w]:
                unfilled &= ~fills
            x, M = to_task_tensors(img, unfilled, item.fit[w][0])
        else:
            x, M = item.x, item.M
        images.append(((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        known.append(M[0] > 0.5)
        names.append(f"{photos.names[j]}#{family}{k}")
    data = ImageSet(images=torch.stack(images), names=names, source=f"{photos.source} ({n} photo tasks, seed {seed})")
    return data, torch.stack(known)


__all__ = ["photo_tasks", "TRAIN_TASKS", "VALIDATION_TASKS"]
