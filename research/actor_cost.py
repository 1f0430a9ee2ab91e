"""Wall-clock cost of one guidance-actor call against one backbone evaluation (the embedded models by default).

    python research/actor_cost.py [--batch 16] [--threads 2] [--repeats 10] [--solves 4]

AID-N adds one actor call per Heun step (N calls) to the 2N − 1 network evaluations of the ODE solve; this prints the
milliseconds of each at the same batch and noise level, in NCHW and channels-last layouts (the actor as a converted
copy with converted inputs, as methods/aid.py runs it on CPU), and the share the actor would add to a solve at
N = 18. `--solves R`: R rounds of whole 18-step solves of the batch, unguided and AID-18 in turn, with the seconds
inside the backbone and the actor. Run it alone on the machine: it is a timing.
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
    p.add_argument("--solves", type=int, default=0, help="also time this many rounds of whole solves, unguided and "
                   "AID-18 in turn, with the actor's share of each (0: skip)")
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
    if a.solves:
        solve_shares(inpainter, actor, x.clamp(-1, 1), M, a.solves)
    return 0


def solve_shares(inpainter, actor, x, M, rounds: int) -> None:
    """Whole 18-step solves of one batch, unguided and AID in turn (the order alternating), each timed with the
    seconds spent inside the backbone and inside the actor (as methods/aid.py runs it): the actor's share of a real
    solve, and the two solves' ratio, measured seconds apart so that the machine's drift cancels."""
    from aid_cli.methods.aid import AID

    spent = {"net": 0.0, "actor": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t
            return out
        return wrapper

    inpainter.net.forward = timed(inpainter.net.forward, "net")
    deployed = AID._deployed
    AID._deployed = timed(deployed, "actor")
    try:
        _alternate(inpainter, actor, x, M, rounds, spent)
    finally:
        AID._deployed = deployed
        del inpainter.net.forward  # the instance's wrapper: the class's method again


def _alternate(inpainter, actor, x, M, rounds: int, spent: dict) -> None:
    """The rounds of `solve_shares`, with the timers in place (`spent` is what they fill)."""
    import statistics

    from aid_cli.bench.runner import bench_generators
    from aid_cli.methods import get_method

    methods = {"unguided": get_method("unguided"), "aid-18": get_method("aid", actor=actor)}
    gens = range(x.shape[0])

    def solve(name):
        spent.update(net=0.0, actor=0.0)
        t = time.perf_counter()
        inpainter.complete(x, M, methods[name], 18, bench_generators(0, gens))
        return time.perf_counter() - t, spent["net"], spent["actor"]

    for name in methods:  # warm-up
        solve(name)
    ratios, shares = [], []
    with torch.no_grad():
        for r in range(rounds):
            times = {}
            for name in (methods if r % 2 == 0 else list(methods)[::-1]):
                times[name] = solve(name)
                total, net, act = times[name]
                print(f"round {r} {name:8s} solve {total:6.2f} s  backbone {net:6.2f} s  actor {act:5.2f} s "
                      f"({100 * act / total:.1f} %)")
            ratios.append(times["aid-18"][0] / times["unguided"][0])
            shares.append(times["aid-18"][2] / times["aid-18"][0])
    print(f"AID-18 / unguided solve time: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}); the actor's share of an AID-18 solve: median {100 * statistics.median(shares):.1f} %")


if __name__ == "__main__":
    raise SystemExit(main())
