"""`aid bench` without --dataset: a small first look on images the backbone draws itself."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..fileio import atomic_write

# `aid bench` without --dataset: a small benchmark on images the backbone draws itself. Their seeds lie far from the
# benchmark's noise seeds (0, 1, 2, …): no fill may start from the very noise its reference image came from.
SAMPLES_SEED = 1_000_000
SAMPLES_N = 8


def backbone_samples(checkpoint: Path | None, folder: Path, n: int, steps: int = 18, device="cpu",
                     log: Callable[[str], None] = print) -> Path:
    """n images of the backbone's own distribution for a benchmark without --dataset: its unconditional samples by
    the benchmark's Heun ODE (`steps` grid steps, image i seeded with SAMPLES_SEED + i), written once into `folder`
    as PNGs (each atomically; a folder that already holds them is reused, so --resume sees the same images). An easy
    test set by construction (in-distribution for this backbone, no dataset's licence to mind), for a first look; numbers
    to report come from a held-out dataset (--dataset)."""
    from PIL import Image

    from ..backbones.checkpoint import load_backbone
    from ..backbones.evaluate import generate
    from ..models.catalogue import resolve_backbone

    folder = Path(folder)
    names = [f"sample-{SAMPLES_SEED + i}.png" for i in range(n)]
    if all((folder / name).is_file() for name in names):
        return folder
    checkpoint = resolve_backbone(checkpoint)
    net, info = load_backbone(checkpoint, device=device)
    if info.get("encoder") is not None or info.get("label_dim", 0):
        raise UserError("aid bench without --dataset draws its images from a pixel-space unconditional backbone; "
                        "this one is latent or class-conditional: pass --dataset (e.g. a validation split)")
    log(f"no --dataset: drawing {n} images from the backbone itself ({steps}-step Heun ODE, seeds {SAMPLES_SEED}…"
        f"{SAMPLES_SEED + n - 1}) into {folder}; in-distribution by construction, an easy test: pass --dataset for "
        f"numbers to report")
    images = generate(net, n, info["resolution"], steps=steps, seed=SAMPLES_SEED, batch=min(n, 32), device=device)
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images.permute(0, 2, 3, 1).numpy()):
        atomic_write(folder / name, lambda tmp, a=image: Image.fromarray(a).save(tmp, format="PNG"))
    return folder
