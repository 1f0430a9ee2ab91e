"""Average the weights of guidance modules from one run (checkpoint averaging, "SWA" after the fact):

    python scripts/average_modules.py OUT.safetensors MODULE [MODULE ...]

A run trained at a constant learning rate wanders between checkpoints (±0.2–0.3 dB of validation hole-PSNR between
neighbours in the shipped module's run); the mean of several neighbouring checkpoints keeps what they share.
`aid train --ema-halflife` does the same during training. The modules must come from the same backbone and have the
same actor; the output records where it came from ("averaged_from": each source's file name, sha256 and iteration)
beside the newest source's training record. Score it with scripts/validate_modules.py like any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from aid_cli.errors import CheckpointError
    from aid_cli.fileio import sha256_file
    from aid_cli.guidance.checkpoint import load_guidance, save_guidance
    from aid_cli.guidance.networks import Actor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("modules", nargs="+", type=Path)
    a = p.parse_args(argv)
    if len(a.modules) < 2:
        print("average_modules.py: give at least two modules to average", file=sys.stderr)
        return 2
    sources = []
    for path in a.modules:
        try:
            actor, info = load_guidance(path)
        except (CheckpointError, OSError) as e:
            print(f"average_modules.py: {e}", file=sys.stderr)
            return 2
        sources.append((path, info, actor))
    path0, info0 = sources[0][:2]
    for path, info, _ in sources[1:]:
        for key, what in (("backbone_sha256", "backbone"), ("actor", "actor")):
            if info[key] != info0[key]:
                print(f"average_modules.py: {path.name} has another {what} than {path0.name}", file=sys.stderr)
                return 2
    kwargs = info0["actor"]
    states = [actor.state_dict() for _, _, actor in sources]
    mean = Actor(**kwargs)
    mean.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]})
    newest = max((info["training"] for _, info, _ in sources), key=lambda t: t.get("iterations", 0))
    record = {**newest, "averaged_from": [{"file": path.name, "sha256": sha256_file(path),
                                           "iterations": info["training"].get("iterations")}
                                          for path, info, _ in sources]}
    save_guidance(a.out, mean, kwargs, info0["backbone_sha256"], training=record)
    print(f"{a.out}: the mean of {len(sources)} modules, sha256 {sha256_file(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
