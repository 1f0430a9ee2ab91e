"""Does a training set fit the backbone? Its image size must be the backbone's (an aligned set is not silently
resized); a set named for other subjects than the backbone's (FFHQ faces for a cat-face backbone) is worth a warning."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

# a subject, and the words that name it in a dataset's name or path, or in a backbone's provenance
SUBJECTS = {"cats": ("cat",), "ffhq": ("ffhq",), "afhqv2": ("afhq",), "imagenet": ("imagenet", "img512", "img64")}
NAMES = {"cats": "cat faces", "ffhq": "FFHQ faces", "afhqv2": "AFHQv2 animal faces", "imagenet": "ImageNet"}
LATENT_FACTOR = 8  # the SD VAE's downsampling (backbones/spaces.py: 2^(levels - 1)), the one latent space aid loads


def subject(text: str) -> str | None:
    """The subject a name starts a word with (`cats64/train.zip`: cats; `education`: none)."""
    import re

    text = text.lower()
    return next((name for name, words in SUBJECTS.items()
                 if any(re.search(rf"(?<![a-z]){w}", text) for w in words)), None)


def backbone_facts(backbone: Path) -> tuple[int | None, str | None]:
    """(pixel resolution, subject) of a backbone from its metadata alone: (None, None) where it does not say."""
    from ..backbones.checkpoint import read_metadata
    from ..errors import CheckpointError

    try:
        meta = read_metadata(backbone)
        kwargs = json.loads(meta.get("aid.init_kwargs", "{}"))
        provenance = json.loads(meta.get("aid.provenance", "{}"))
    except (CheckpointError, ValueError):
        return None, None  # the trainer's load_backbone says what is wrong with the file
    res = kwargs.get("img_resolution")
    if isinstance(res, int) and "aid.encoder" in meta:
        res *= LATENT_FACTOR
    config = provenance.get("config") if isinstance(provenance.get("config"), dict) else {}
    source = " ".join(str(v) for v in (config.get("dataset"), provenance.get("source")) if v)
    return (res if isinstance(res, int) else None), (subject(source) if source else None)


def check_dataset(given: str, path: Path, backbone: Path, log) -> None:
    """Refuse an aligned set whose image size is not the backbone's; warn (one line) when its name says other
    subjects than the backbone was trained on. Whole photos of any size train on windows at the backbone's scale."""
    from ..data.datasets import load_image_set, whole_photos

    res, trained_on = backbone_facts(backbone)
    if res is not None and not whole_photos(path):
        size = load_image_set(path, limit=1).images.shape[-1]
        if size != res:
            raise UserError(f"--dataset {given}: its images are {size}x{size}, the backbone {Path(backbone).name} "
                            f"makes {res}x{res}; give a dataset at {res}x{res} (or a backbone of its size)")
    named = subject("/".join(Path(given).parts[-2:]))
    if named and trained_on and named != trained_on:
        log(f"warning: --dataset {given} holds {NAMES[named]}, but the backbone {Path(backbone).name} was trained "
            f"on {NAMES[trained_on]}: the module would learn to complete one with a model of the other")
