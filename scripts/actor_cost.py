"""Wall-clock cost of one guidance-actor call against one backbone evaluation (the embedded models by default).

    python scripts/actor_cost.py [--batch 16] [--threads 2] [--repeats 10]

AID-N adds one actor call per Heun step (N calls) to the 2N − 1 network evaluations of the ODE solve; this prints the
milliseconds of each at the same batch and noise level, in NCHW and channels-last layouts (the actor as a converted
copy with converted inputs, as methods/aid.py runs it on CPU), and the share the actor would add to a solve at N = 18. Run it alone on the machine: it is a timing.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from aid_cli.fileio import sha256_file
    from aid_cli.guidance.checkpoint import load_guidance
    from aid_cli.inpainter import Inpainter
    from aid_cli.models.catalogue import EMBEDDED_BACKBONE, EMBEDDED_GUIDANCE
    from aid_cli.paths import weights_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=str(weights_dir() / EMBEDDED_BACKBONE))
    p.add_argument("--guidance", default=str(weights_dir() / EMBEDDED_GUIDANCE))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    inpainter = Inpainter.load(a.backbone, torch.device("cpu"))
    actor, _ = load_guidance(a.guidance, sha256_file(a.backbone))
    B, C, R = a.batch, inpainter.info["channels"], inpainter.info["resolution"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, R, R, generator=g)
    M = (torch.rand(B, 1, R, R, generator=g) > 0.5).float()
    y, sigma = M * x, torch.full((B,), 2.0)
    ms = {}
    with torch.no_grad():
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
            # the actor as a copy in this layout, with its inputs, as methods/aid.py runs it on CPU
            act = copy.deepcopy(actor).to(memory_format=fmt)
            xx, MM, yy = (t.contiguous(memory_format=fmt) for t in (x, M, y))
            cond = act.condition(MM, yy)  # once per solve at deployment
            denoised = xx if act.denoised_input else None

            def backbone():
                return inpainter.net(xx, sigma)

            def guidance():
                return act(sigma, xx, MM, yy, cond, denoised)

            for name, f in (("backbone", backbone), ("actor", guidance)):
                for _ in range(3):
                    f()
                t = time.perf_counter()
                for _ in range(a.repeats):
                    f()
                ms[name, layout] = (time.perf_counter() - t) / a.repeats * 1000
                print(f"{name:8s} {layout:13s} {ms[name, layout]:8.1f} ms per call (batch {B}, {a.threads} threads)")
    for layout in ("NCHW", "channels-last"):  # deployment: backbone NCHW; actor channels-last on CPU
        share = 18 * ms["actor", layout] / (35 * ms["backbone", "NCHW"])
        print(f"AID-18, actor {layout}: 18 actor calls beside 35 network evaluations: +{100 * share:.1f} % of the "
              f"solve's network time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
