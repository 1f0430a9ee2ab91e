"""The Python parts of `scripts/gpu_run.sh`:

    python scripts/gpu_stage.py env --device cuda --out ENV.json   # versions and the device; exit 2 when it is missing
    python scripts/gpu_stage.py timings --out T.json [--device cuda] [--batches 64,128,256,512] ...
    python scripts/gpu_stage.py tune --model CKPT --dataset VAL [--methods dps,mcg,...] [--n 16] ...
    python scripts/gpu_stage.py select RUN [--into DIR]   # the best module on validation -> DIR/guidance-best.safetensors

Each writes its results as it goes (atomically), so a stage stopped at its time box keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# EDM's official 64x64 DDPM++ (FFHQ/AFHQv2-64, `--arch=ddpmpp --cres=1,2,2,2`): 61,805,571 parameters
OFFICIAL_EDM64 = dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16],
                      dropout=0.05, augment_dim=9)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _write_json(path: Path, obj) -> None:
    """Atomically (a stage stopped mid-write keeps the previous version); no aid import, which would import torch."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------------------- env

def env(args) -> None:
    """torch, CUDA and the device, as JSON; one line and exit 2 when the named device is missing."""
    import platform

    import torch

    from aid_cli.devices import resolve_device
    from aid_cli.errors import UserError

    try:
        device = resolve_device(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    rec = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    _write_json(Path(args.out), rec)
    print(json.dumps(rec))


# ---------------------------------------------------------------------------------------------------------- timings

def timings(args) -> None:
    """torch/CUDA, forward-only throughput of the embedded architecture (and of the official EDM-64 DDPM++) at each
    batch and precision, and the sampler path of `aid bench --methods unguided` (35 NFE) against forward-only."""
    import platform

    import torch

    from aid_cli.backbones.edm import build_precond, count_parameters
    from aid_cli.devices import prepare_backbone, resolve_device
    from aid_cli.methods import get_method
    from aid_cli.pretrain import PretrainConfig
    from aid_cli.sampling.heun import nfe_of_grid, sample
    from aid_cli.task import Task

    t_start = time.time()
    device = resolve_device(args.device)
    res = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "forward": [], "unguided": [], "notes": []}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
        res["sm_count"] = p.multi_processor_count
        res["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # fp32 convolutions run TF32 when True
    out = Path(args.out)
    _write_json(out, res)

    def left() -> float:
        return args.budget - (time.time() - t_start)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    emb = PretrainConfig(dataset="", out="", resolution=args.resolution, model_channels=args.width,
                         channel_mult=_ints(args.channel_mult), num_blocks=args.depth,
                         attn_resolutions=_ints(args.attn)).network_kwargs()
    archs = [("embedded", emb)]
    if args.official:
        archs.append(("official-edm64-ddpmpp", dict(emb, **OFFICIAL_EDM64)))
    precisions = [p for p in args.precisions.split(",") if p]
    R = args.resolution
    for name, kw in archs:
        torch.manual_seed(0)
        net = build_precond("EDMPrecond", kw).eval().requires_grad_(False).to(device)
        params = count_parameters(net)
        for precision in precisions:
            try:
                denoise = prepare_backbone(net, device, precision)
            except Exception as e:  # noqa: BLE001 (a precision this device lacks: say so, go on)
                res["notes"].append(f"{name} {precision}: {e}")
                continue
            for B in _ints(args.batches):
                if left() < 2:
                    res["notes"].append("time box reached: the remaining measurements were skipped")
                    _write_json(out, res)
                    return
                x = torch.randn(B, 3, R, R, device=device)
                sigma = torch.full((B,), 1.0, device=device)
                try:
                    with torch.no_grad():
                        for _ in range(args.warmup):
                            denoise(x, sigma)
                        sync()
                        t0, k = time.time(), 0
                        while k < args.reps or (time.time() - t0 < args.min_seconds and k < 10 * args.reps):
                            denoise(x, sigma)
                            k += 1
                        sync()
                        dt = time.time() - t0
                except torch.cuda.OutOfMemoryError:
                    res["notes"].append(f"{name} {precision} batch {B}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                rec = {"arch": name, "parameters": params, "precision": precision, "batch": B, "evals": k,
                       "seconds": round(dt, 4), "img_per_s": round(B * k / dt, 1),
                       "ms_per_eval": round(1000 * dt / k, 3)}
                if device.type == "cuda":
                    rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                res["forward"].append(rec)
                _write_json(out, res)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # The sampler path of `aid bench --methods unguided` (the same loop, method and per-image generators), timed
    # against 2N-1 forward-only evaluations at the same batch and precision: the goal is >= 60 % of forward-only.
    torch.manual_seed(0)
    net = build_precond("EDMPrecond", emb).eval().requires_grad_(False).to(device)
    for precision in precisions:
        if left() < 3:
            res["notes"].append("time box reached before the unguided sampler path")
            break
        denoise = prepare_backbone(net, device, precision)
        B, N = args.sample_batch, 18
        M = torch.zeros(B, 1, R, R, device=device)
        M[..., : R // 2, :] = 1
        task = Task(y=torch.zeros(B, 3, R, R, device=device), M=M)
        with torch.no_grad():
            sample(denoise, task, get_method("unguided"), num_steps=N, seed=0)  # warm-up
            sync()
            t0 = time.time()
            r = sample(denoise, task, get_method("unguided"), num_steps=N, seed=1)
            sync()
            dt = time.time() - t0
        fwd = next((f for f in res["forward"] if f["arch"] == "embedded" and f["precision"] == precision
                    and f["batch"] == B), None)
        rec = {"precision": precision, "batch": B, "nfe": r.nfe, "seconds": round(dt, 4),
               "sec_per_image": round(dt / B, 6)}
        if fwd is not None:
            ideal = nfe_of_grid(N) * fwd["ms_per_eval"] / 1000
            rec["forward_only_sec_per_image"] = round(ideal / B, 6)
            rec["fraction_of_forward_only"] = round(ideal / dt, 3)
        res["unguided"].append(rec)
        _write_json(out, res)
    res["seconds"] = round(time.time() - t_start, 1)
    _write_json(out, res)


# ------------------------------------------------------------------------------------------------------------- tune

def tune(args) -> None:
    """`aid bench --tune M` for each method in turn, in one process (one start-up); each choice is written beside the
    checkpoint (STEM.tuned.json) as soon as it is made, so a stage stopped at its box keeps the methods it finished."""
    from aid_cli.bench import tune as tune_one
    from aid_cli.devices import resolve_device

    device = resolve_device(args.device)
    done = []
    for method in [m for m in args.methods.split(",") if m]:
        t0 = time.time()
        entry = tune_one(method, args.dataset, Path(args.model), n=args.n, steps=args.steps, batch=args.batch,
                         device=device, log=lambda m: print(m, flush=True), precision=args.precision)
        done.append(method)
        print(f"tuned {method}: {entry['param']} = {entry['params'][entry['param']]:g} in {time.time() - t0:.1f} s",
              flush=True)
    print(f"tuned: {','.join(done)}", flush=True)


# ----------------------------------------------------------------------------------------------------------- select

def select(args) -> None:
    """Checkpoint selection on validation: of the modules kept at every checkpoint (RUN/modules/guidance-NNNNNN), the
    one whose validation PSNR-hole at N = 18 was best (images the benchmark does not use: aid train's --val-offset).
    Writes guidance-best.safetensors and select.json into --into (default RUN); with no validated checkpoint, the
    latest module."""
    run = Path(args.run)
    into = Path(args.into) if args.into else run
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "stats.jsonl").is_file() else []
    key = args.metric
    start = next((s[key] for s in stats if s.get("iteration") == 0 and key in s), None)
    scored = []
    for s in stats:
        path = run / "modules" / f"guidance-{s.get('iteration', -1):06d}.safetensors"
        if key in s and s.get("iteration", 0) > 0 and path.is_file():
            scored.append((s[key], s["iteration"], path))
    if scored:
        value, it, path = max(scored, key=lambda t: (t[0], -t[1]))
        why = f"best {key} of {len(scored)} validated checkpoints"
    elif (run / "guidance.safetensors").is_file():
        value, it, path = None, max((s.get("iteration", 0) for s in stats), default=0), run / "guidance.safetensors"
        why = "no validated checkpoint: the latest module"
    else:
        raise SystemExit(f"{run}: no guidance module to select")
    shutil.copyfile(path, into / "guidance-best.safetensors")
    rec = {"module": path.name, "iteration": it, "metric": key, "value": value, "unguided_start": start, "why": why,
           "last_iteration": max((s.get("iteration", 0) for s in stats), default=0),
           "validated": [{"iteration": i, key: v} for v, i, _ in sorted(scored, key=lambda t: t[1])]}
    _write_json(into / "select.json", rec)
    print(f"selected {path.name} (iteration {it}): {why}" + (f", {key} {value:.2f} (start {start})"
                                                              if value is not None and start is not None else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timings")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="auto")
    t.add_argument("--batches", default="64,128,256,512")
    t.add_argument("--precisions", default="fp32,bf16")
    t.add_argument("--official", type=int, default=1, help="also time the official-size EDM-64 DDPM++ (61.8 M)")
    t.add_argument("--sample-batch", type=int, default=128, help="batch of the unguided 35-NFE sampler timing")
    t.add_argument("--budget", type=float, default=20.0, help="seconds: skip what would not fit")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--reps", type=int, default=5)
    t.add_argument("--min-seconds", type=float, default=0.2)
    t.add_argument("--resolution", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--channel-mult", default="1,2,3,4")
    t.add_argument("--depth", type=int, default=1)
    t.add_argument("--attn", default="16,8")
    u = sub.add_parser("tune")
    u.add_argument("--model", required=True)
    u.add_argument("--dataset", required=True)
    u.add_argument("--methods", default="dps,mcg,gradpaint,copaint,vipaint")
    u.add_argument("--n", type=int, default=16)
    u.add_argument("--steps", type=int, default=18)
    u.add_argument("--batch", type=int, default=16)
    u.add_argument("--device", default="auto")
    u.add_argument("--precision", default="fp32")
    s = sub.add_parser("select")
    s.add_argument("run")
    s.add_argument("--metric", default="val_psnr_hole_18")
    s.add_argument("--into", help="the folder to write into (default: RUN)")
    e = sub.add_parser("env")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    {"env": env, "timings": timings, "tune": tune, "select": select}[args.cmd](args)


if __name__ == "__main__":
    main()
