"""Choosing among guidance modules: pick a run's checkpoint (`select_checkpoint`), score modules on training's own
validation set (`validate_modules`, `aid guidance validate`), average neighbouring checkpoints (`average_modules`,
`aid guidance average`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError, UserError
from ..fileio import sha256_file
from ..training import read_jsonl
from .checkpoint import load_guidance, save_guidance, trained_churn
from .networks import Actor
from .trainer import SNAPSHOT_DIR, validation_masks, validation_scores

SELECT_RULES = ("last", "lpips")
VALIDATION_STEPS = (18, 12)  # the N that validation logs (trainer.validate)
LEVEL_DB = 0.05  # "level with the best": hole-PSNR within this many dB of the run's best, at every N
LEVEL_SSIM = 0.001  # ... and SSIM within this of the best


def snapshots(run: Path) -> dict[int, Path]:
    """iteration → the module saved at that checkpoint (RUN/modules/guidance-NNNNNN.safetensors)."""
    out = {}
    for p in (Path(run) / SNAPSHOT_DIR).glob("guidance-*.safetensors"):
        try:
            out[int(p.stem.split("-", 1)[1])] = p
        except ValueError:
            continue
    return out


def lowest_lpips_level_with_best(records: list[dict], log=None) -> dict:
    """The card's rule: among validated checkpoints whose hole-PSNR and SSIM are level with the best (LEVEL_DB,
    LEVEL_SSIM) at every N, the lowest LPIPS (mean over the N); where validation logged no LPIPS (its weights not at
    hand, or images under 31 px), the highest hole-PSNR (mean over the N) among them."""
    Ns = [N for N in VALIDATION_STEPS if all(f"val_psnr_hole_{N}" in r for r in records)]
    if not records or not Ns:
        raise UserError("select lpips needs the run's validation scores: train with --val (or --holdout)")

    def level(r: dict) -> bool:
        for N in Ns:
            for key, tol in ((f"val_psnr_hole_{N}", LEVEL_DB), (f"val_ssim_{N}", LEVEL_SSIM)):
                if key in r and r[key] < max(q.get(key, r[key]) for q in records) - tol:
                    return False
        return True

    candidates = [r for r in records if level(r)]
    mean = lambda r, metric: sum(r[f"val_{metric}_{N}"] for N in Ns) / len(Ns)  # noqa: E731
    if all(f"val_lpips_{N}" in r for r in candidates for N in Ns):
        return min(candidates, key=lambda r: (mean(r, "lpips"), -r["iteration"]))
    if log:
        log("select lpips: validation logged no LPIPS; the highest hole-PSNR level with the best is selected")
    return max(candidates, key=lambda r: (mean(r, "psnr_hole"), r["iteration"]))


def select_checkpoint(run: Path, rule: str, log=None) -> tuple[int, Path]:
    """(iteration, module file) a run's stage hands on: `last`, its final checkpoint; `lpips`, the validated checkpoint
    `lowest_lpips_level_with_best` picks."""
    saved = snapshots(run)
    if not saved:
        raise UserError(f"{run}: no saved modules to select from ({SNAPSHOT_DIR}/ is empty)")
    if rule == "last":
        it = max(saved)
    elif rule == "lpips":
        records = [r for r in read_jsonl(Path(run) / "stats.jsonl")
                   if r.get("iteration") in saved and any(k.startswith("val_psnr_hole_") for k in r)]
        it = lowest_lpips_level_with_best(records, log)["iteration"]
    else:
        raise UserError(f"unknown selection rule {rule!r}: choose one of {', '.join(SELECT_RULES)}")
    return it, saved[it]


def validate_modules(modules: list[Path], val: Path, backbone: Path, steps=VALIDATION_STEPS, offset: int = 100,
                     n: int = 64, mask_seed: int | None = None, by_family: bool = False, device="cpu",
                     log=None) -> tuple[int, Iterator[dict]]:
    """Score each module on `aid train`'s validation: images `offset`…`offset + n` of `val`, image i with mask i of
    the evaluation family FAMILIES[i % 3], noise seeds 0, 1, …, completed by the trainer's own code, so a module
    reads the same as the val_* line its run logged. Returns (images scored, one record per module as it is scored:
    val_{metric}_{N}, and per family with `by_family`, its sha256 and the set scored); files are checked first."""
    from ..data.datasets import load_image_set
    from ..data.masks import VALIDATION_MASK_SEED
    from ..inpainter import Inpainter
    from ..metrics.lpips import MIN_SIZE, LPIPSUnavailable, load_lpips

    mask_seed = VALIDATION_MASK_SEED if mask_seed is None else mask_seed
    for path in modules:
        if not Path(path).is_file():
            raise UserError(f"guidance module not found: {path}")
    device = torch.device(device)
    inpainter = Inpainter.load(backbone, device)
    sha = sha256_file(backbone)
    res = inpainter.resolution
    data = load_image_set(val, resolution=res, limit=n, offset=offset)
    images, M = data.as_float(slice(None)).to(device), validation_masks(len(data), res, mask_seed).to(device)
    try:
        lpips = load_lpips(device, offline=True) if res >= MIN_SIZE else None
    except LPIPSUnavailable as e:
        if log:
            log(f"LPIPS not reported: {e}")
        lpips = None

    def scored():
        for path in modules:
            actor, info = load_guidance(path, sha, device)
            churn = trained_churn(info)  # deployed as trained
            rec = {"module": str(path), "sha256": sha256_file(path), "val_offset": offset, "val_n": len(data),
                   "val_mask_seed": mask_seed}
            for N in steps:
                for k, v in validation_scores(inpainter, actor, images, M, N, lpips=lpips,
                                              by_family=by_family, churn=churn).items():
                    rec[f"val_{k}_{N}"] = v
            yield rec

    return len(data), scored()


def average_modules(out: Path, modules: list[Path]) -> Path:
    """Write the mean of the modules' weights to `out` (checkpoint averaging after the fact: `aid train
    --ema-halflife` does it during training). The modules must share backbone and actor; the record keeps the newest
    source's training settings and names every source ("averaged_from": file, sha256, iterations)."""
    if len(modules) < 2:
        raise UserError("give at least two modules to average")
    if any(Path(out).resolve() == Path(p).resolve() for p in modules):
        raise UserError(f"{out} is one of the modules averaged; write the mean to another file")
    sources = []
    for path in modules:
        try:
            actor, info = load_guidance(path)
        except OSError as e:
            raise CheckpointError(f"{path}: {e}") from None
        sources.append((Path(path), info, actor))
    path0, info0 = sources[0][:2]
    for path, info, _ in sources[1:]:
        for key, what in (("backbone_sha256", "backbone"), ("actor", "actor")):
            if info[key] != info0[key]:
                raise UserError(f"{path.name} has another {what} than {path0.name}")
    states = [actor.state_dict() for _, _, actor in sources]
    mean = Actor(**info0["actor"])
    mean.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]})
    newest = max((info["training"] for _, info, _ in sources), key=lambda t: t.get("iterations", 0))
    record = {**newest, "averaged_from": [{"file": path.name, "sha256": sha256_file(path),
                                           "iterations": info["training"].get("iterations")}
                                          for path, info, _ in sources]}
    return save_guidance(out, mean, info0["actor"], info0["backbone_sha256"], training=record)
