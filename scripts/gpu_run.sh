#!/bin/bash
# A GPU session in one command (docs/gpu-session.md): timings, a new embedded backbone, the baselines' step sizes on
# it, its AID guidance module, the protocol benchmark, packed for the trip back. Run on the device machine as
#
#   scripts/gpu_run.sh                  # `run` with carry [".carry"] and timeout_s 600; everything ends by DEADLINE
#
# Stages, each in a hard time box (SIGTERM at the box, SIGKILL GRACE seconds later), each packing its results into
# $OUT the moment it ends; a failing stage is logged and the next still runs where it can:
#   1 timings   (T_TIMINGS)  torch/CUDA, forward-only img/s of the embedded and the official-size EDM-64 architectures
#                            at several batches in fp32 and bf16, the unguided 35-NFE sampler path against forward-only
#   2 backbone  (T_BACKBONE) aid pretrain, the embedded architecture, bf16, stopped by SIGTERM: EMA snapshot
#   3 tune      (T_TUNE)     aid bench --tune for the baselines on the new backbone (cheapest first)
#   4 guidance  (T_GUIDANCE) aid train, backprop recipe, checkpoint picked on held-out validation images; beside it a
#                            small faithful actor-critic run logging its gradient diagnostics (AC=0: not)
#   5 bench     (T_BENCH)    aid bench, the protocol (100 val images x 3 seeds x 3 masks), cheapest methods first,
#                            fp32, then the table rebuilt from the finished cells
#   6 pack      check what is in $OUT against the tool's rules (<= 8 files of <= 16 MiB, no deeper than OUT/a/b/file)
# $OUT ends up with at most 8 files: session.log, s1-timings.tgz, s2-backbone.tgz.part00/.part01 (cat them),
# s3-tune.tgz, s4-guidance.tgz, s5-bench.tgz. `scripts/adopt_gpu_run.py FOLDER` takes them in here, in one commit.
# Knobs are environment variables (defaults below); tests/test_gpu_rehearsal.py runs all of it on CPU in seconds.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/aid-gpu-out}
RUNS=${RUNS:-.runs/gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-timings backbone tune guidance bench}
DEADLINE=${DEADLINE:-560}      # seconds after the start by which the last stage has ended (timeout_s 600: margin)
PACK_RESERVE=${PACK_RESERVE:-10}  # seconds kept for packing after the last stage
GRACE=${GRACE:-20}             # seconds between a box's SIGTERM and its SIGKILL (saving state and a snapshot)
MIN_BOX=${MIN_BOX:-5}          # a stage that would get fewer seconds than this is skipped
T_TIMINGS=${T_TIMINGS:-25}; T_BACKBONE=${T_BACKBONE:-225}; T_TUNE=${T_TUNE:-30}; T_GUIDANCE=${T_GUIDANCE:-160}
T_BENCH=${T_BENCH:-70}; T_REPORT=${T_REPORT:-15}  # T_BENCH includes T_REPORT
TRAIN=${TRAIN:-.carry/cats64-train.zip}
VAL=${VAL:-.carry/cats64-val.zip}
SHIPPED=${SHIPPED:-weights/aid-cats64-edm.safetensors}
# the embedded architecture (4.2 M parameters; CPU users pay for each at every one of 35 evaluations)
RES=${RES:-64}; WIDTH=${WIDTH:-32}; CMULT=${CMULT:-1,2,3,4}; DEPTH=${DEPTH:-1}; ATTN=${ATTN:-16,8}
# stage 1
TIMING_BATCHES=${TIMING_BATCHES:-64,128,256,512}; TIMING_PRECISIONS=${TIMING_PRECISIONS:-fp32,bf16}
TIMING_OFFICIAL=${TIMING_OFFICIAL:-1}; TIMING_SAMPLE_BATCH=${TIMING_SAMPLE_BATCH:-128}
# stage 2
BATCH=${BATCH:-256}; LR=${LR:-1e-3}; RAMPUP_KIMG=${RAMPUP_KIMG:-200}; EMA_KIMG=${EMA_KIMG:-100}
DURATION_KIMG=${DURATION_KIMG:-1000000}; SNAPSHOT_KIMG=${SNAPSHOT_KIMG:-1000}; PRECISION=${PRECISION:-bf16}
PRETRAIN_EXTRA=${PRETRAIN_EXTRA:-}
# stage 3
TUNE_METHODS=${TUNE_METHODS:-dps,mcg,gradpaint,copaint,vipaint}; TUNE_N=${TUNE_N:-16}
# stage 4: the recipe of the "AID wins" issue (aid train --help on main)
GBATCH=${GBATCH:-128}; GSTEPS=${GSTEPS:-18}; BETA=${BETA:-0.003}; LR_ACTOR=${LR_ACTOR:-3e-4}; GITERS=${GITERS:-1000000}
RECOMPUTE=${RECOMPUTE:-1}      # 0: --no-recompute (a quarter less compute; all N steps' activations in memory)
MASK_BANK=${MASK_BANK:-4096}; TRAIN_MASKS=${TRAIN_MASKS:-freeform,box,strip}
VAL_OFFSET=${VAL_OFFSET:-100}; VAL_N=${VAL_N:-64}; VAL_EVERY=${VAL_EVERY:-20}
AC=${AC:-1}; AC_BATCH=${AC_BATCH:-64}; AC_DIAG_EVERY=${AC_DIAG_EVERY:-10}; AC_DIAG_BATCH=${AC_DIAG_BATCH:-128}
GUIDANCE_EXTRA=${GUIDANCE_EXTRA:-}
# stage 5
BENCH_METHODS=${BENCH_METHODS:-copy,greyfill,unguided,aid-18,aid-12,dps,replace,ddnm,mcg,gradpaint,copaint,repaint,vipaint}
BENCH_N=${BENCH_N:-100}; BENCH_SEEDS=${BENCH_SEEDS:-3}; BENCH_MASKS=${BENCH_MASKS:-freeform,center,strip}
BENCH_BATCH=${BENCH_BATCH:-100}; BENCH_PRECISION=${BENCH_PRECISION:-fp32}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case $RUNS in /*) ;; *) RUNS=$PWD/$RUNS ;; esac
export AID_CACHE=${AID_CACHE:-$RUNS/cache}
mkdir -p "$OUT" "$RUNS" "$AID_CACHE"
# LPIPS's weights travel only if carried: rounded to float16 (gpu_stage.py lpips-half; 4.7 MiB), or as aid's cache file
LPIPS_HALF=${LPIPS_HALF:-.carry/lpips-alex-v0.1-fp16.safetensors}
if [ -f .carry/lpips-alex-v0.1.safetensors ]; then cp .carry/lpips-alex-v0.1.safetensors "$AID_CACHE/"
elif [ -f "$LPIPS_HALF" ] && [ "${1:-}" != --guidance-pair ]; then
  "$PYTHON" scripts/gpu_stage.py lpips-widen "$LPIPS_HALF" "$AID_CACHE" > "$RUNS/lpips.log" 2>&1 || true
fi
aid=("$PYTHON" -m aid_cli.cli)
SLOG=$OUT/session.log
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(date -u +%H:%M:%S) +$(now)s] $*" | tee -a "$SLOG" >&2; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

box() {  # box NAME SECONDS CMD...: CMD in a time box (SIGTERM, then SIGKILL GRACE s later); 0 when it ran or was
  # stopped on time, else its exit code (97: skipped, no time left); the output goes to $RUNS/NAME.log
  local name=$1 want=$2; shift 2
  local left=$(( DEADLINE - PACK_RESERVE - GRACE - $(now) ))
  local secs=$(( want < left ? want : left ))
  if (( secs < MIN_BOX )); then log "$name: skipped (a box of ${secs} s; ${left} s left before the deadline)"; return 97; fi
  log "$name: start, box ${secs} s"
  local t=$(date +%s)
  timeout -s TERM -k "$GRACE" "$secs" "$@" >> "$RUNS/$name.log" 2>&1; local rc=$?
  local what="done"; [ $rc = 124 ] && what="stopped at its box (SIGTERM)"; [ $rc = 137 ] && what="KILLED after the grace"
  [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 137 ] && what="FAILED (exit $rc)"
  log "$name: $what after $(( $(date +%s) - t )) s"
  if [ $rc != 0 ] && [ $rc != 124 ]; then
    tail -n 15 "$RUNS/$name.log" | sed "s/^/    $name| /" >> "$SLOG"
  fi
  [ $rc = 124 ] && return 0
  return $rc
}

pack() {  # pack NAME DIR FILE...: OUT/NAME.tgz of the FILEs (relative to DIR) that exist; in 15 MiB parts if larger
  local name=$1 dir=$2; shift 2
  local files=() f
  for f in "$@"; do [ -e "$dir/$f" ] && files+=("$f"); done
  if [ ${#files[@]} = 0 ]; then log "$name: nothing to pack"; return 1; fi
  tar czf "$RUNS/$name.tgz" -C "$dir" "${files[@]}" || { log "$name: tar failed"; return 1; }
  if [ "$(stat -c %s "$RUNS/$name.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d -a 2 "$RUNS/$name.tgz" "$OUT/$name.tgz.part"
  else
    cp "$RUNS/$name.tgz" "$OUT/$name.tgz"
  fi
  log "$name: packed ${#files[@]} file(s), $(stat -c %s "$RUNS/$name.tgz") bytes"
}

waitfor() {  # waitfor PID: its exit code, waiting again when a trapped signal interrupts `wait`
  local r; while :; do wait "$1"; r=$?; kill -0 "$1" 2>/dev/null || return $r; done
}

guidance_pair() {  # stage 4's two runs side by side on the GPU; the box's SIGTERM reaches both and both save
  local g=$RUNS/aid a=$RUNS/aid-ac rec=() p2=""
  [ "$RECOMPUTE" = 0 ] && rec=(--no-recompute)
  local common=(--backbone "$BACKBONE" --dataset "$TRAIN" --val "$VAL" --val-offset "$VAL_OFFSET" --val-n "$VAL_N"
                --steps "$GSTEPS" --iters "$GITERS" --mask-bank "$MASK_BANK" --train-masks "$TRAIN_MASKS"
                --denoised-input --device "$DEVICE" --seed 0)
  "${aid[@]}" train "${common[@]}" --out "$g" --estimator backprop --batch "$GBATCH" --beta "$BETA" \
    --lr-actor "$LR_ACTOR" --val-every "$VAL_EVERY" --checkpoint-every "$VAL_EVERY" "${rec[@]}" $GUIDANCE_EXTRA \
    > "$RUNS/aid.log" 2>&1 &
  local p1=$!
  if [ "$AC" = 1 ]; then  # the small faithful actor-critic run: eq. 11 with the fixes, and its gradient diagnostics
    "${aid[@]}" train "${common[@]}" --out "$a" --estimator score --explore scaled --critic privileged \
      --td-lambda 1 --normalize-advantage --batch "$AC_BATCH" --beta "$BETA" --diag-every "$AC_DIAG_EVERY" \
      --diag-batch "$AC_DIAG_BATCH" --val-every $(( VAL_EVERY * 4 )) --checkpoint-every $(( VAL_EVERY * 4 )) \
      > "$RUNS/aid-ac.log" 2>&1 &
    p2=$!
  fi
  trap 'kill -TERM $p1 $p2 2>/dev/null' TERM
  waitfor $p1; local r1=$? r2=0
  [ -n "$p2" ] && { waitfor $p2; r2=$?; }
  echo "backprop run: exit $r1; actor-critic run: exit $r2"
  [ $r1 = 0 ] || [ $r1 = 143 ]  # the backprop run decides the stage (143: it took the SIGTERM before aid caught it)
}
if [ "${1:-}" = --guidance-pair ]; then guidance_pair; exit; fi

log "gpu_run: stages [$STAGES], device $DEVICE, deadline ${DEADLINE} s; commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
has timings || "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.is_available() and torch.cuda.get_device_name())' 2>&1 | tee -a "$SLOG"  # (stage 1 records it otherwise)
for f in "$TRAIN" "$VAL"; do [ -f "$f" ] || log "missing $f (scripts/pack_for_device.py; docs/gpu-session.md)"; done

# ---- 1 timings -------------------------------------------------------------------------------------------------
if has timings; then
  box timings "$T_TIMINGS" "$PYTHON" scripts/gpu_stage.py timings --out "$RUNS/timings.json" --device "$DEVICE" \
    --batches "$TIMING_BATCHES" --precisions "$TIMING_PRECISIONS" --official "$TIMING_OFFICIAL" \
    --sample-batch "$TIMING_SAMPLE_BATCH" --budget $(( T_TIMINGS - 6 )) --resolution "$RES" --width "$WIDTH" \
    --channel-mult "$CMULT" --depth "$DEPTH" --attn "$ATTN"
  (nvidia-smi > "$RUNS/nvidia-smi.txt" 2>&1 || true)
  pack s1-timings "$RUNS" timings.json timings.log nvidia-smi.txt
fi

# ---- 2 backbone ------------------------------------------------------------------------------------------------
CAND=""  # the new backbone, named as it will be shipped so that --tune's record sits beside it
if has backbone; then
  run=$RUNS/backbone
  box backbone "$T_BACKBONE" "${aid[@]}" pretrain --dataset "$TRAIN" --out "$run" --resolution "$RES" --width "$WIDTH" \
    --channel-mult "$CMULT" --depth "$DEPTH" --attn "$ATTN" --batch "$BATCH" --lr "$LR" --lr-rampup-kimg "$RAMPUP_KIMG" \
    --ema-halflife-kimg "$EMA_KIMG" --duration "$DURATION_KIMG" --snapshot-kimg "$SNAPSHOT_KIMG" \
    --checkpoint-minutes 60 --precision "$PRECISION" --device "$DEVICE" --seed 0 $PRETRAIN_EXTRA
  snap=$(ls "$run"/network-snapshot-*.safetensors 2>/dev/null | tail -1)
  if [ -n "$snap" ]; then
    mkdir -p "$RUNS/new"
    cp "$snap" "$RUNS/new/aid-cats64-edm.safetensors"
    CAND=$RUNS/new/aid-cats64-edm.safetensors
    (cd "$RUNS/new" && sha256sum aid-cats64-edm.safetensors > aid-cats64-edm.sha256)
    cp "$run/config.json" "$RUNS/new/pretrain-config.json" 2>/dev/null
    cp "$run/stats.jsonl" "$RUNS/new/pretrain-stats.jsonl" 2>/dev/null
    cp "$(ls "$run"/samples-*.png | tail -1)" "$RUNS/new/samples.png" 2>/dev/null
    cp "$RUNS/backbone.log" "$RUNS/new/backbone.log"
    pack s2-backbone "$RUNS/new" aid-cats64-edm.safetensors aid-cats64-edm.sha256 pretrain-config.json \
      pretrain-stats.jsonl samples.png backbone.log
  else
    log "backbone: no snapshot; the next stages use the shipped backbone $SHIPPED"
    pack s2-backbone "$RUNS" backbone.log
  fi
fi
BACKBONE=${CAND:-${BACKBONE:-$SHIPPED}}  # BACKBONE=FILE: the backbone when stage 2 does not run
log "backbone for the next stages: $BACKBONE"

# ---- 3 tune ----------------------------------------------------------------------------------------------------
if has tune; then
  if [ -n "$CAND" ]; then
    box tune "$T_TUNE" "$PYTHON" scripts/gpu_stage.py tune --model "$CAND" --dataset "$VAL" --methods "$TUNE_METHODS" \
      --n "$TUNE_N" --batch "$TUNE_N" --device "$DEVICE" --precision fp32
    cp "$RUNS/tune.log" "$RUNS/new/tune.log"
    pack s3-tune "$RUNS/new" aid-cats64-edm.tuned.json tune.log
  else
    log "tune: skipped (no new backbone; the shipped one keeps its tuned step sizes)"
  fi
fi

# ---- 4 guidance ------------------------------------------------------------------------------------------------
BEST=""
if has guidance; then
  g=$RUNS/aid; a=$RUNS/aid-ac
  export BACKBONE
  box guidance "$T_GUIDANCE" bash "$0" --guidance-pair
  mkdir -p "$RUNS/g"
  if "$PYTHON" scripts/gpu_stage.py select "$g" >> "$RUNS/guidance.log" 2>&1; then
    BEST=$RUNS/g/guidance-best.safetensors
    cp "$g/guidance-best.safetensors" "$BEST"
    cp "$g/select.json" "$RUNS/g/select.json"
    log "guidance: $(tail -1 "$RUNS/guidance.log")"
  else
    log "guidance: no module to select"
  fi
  for f in config.json stats.jsonl curves.png guidance.safetensors; do
    [ -f "$g/$f" ] && cp "$g/$f" "$RUNS/g/aid-$f"; [ -f "$a/$f" ] && cp "$a/$f" "$RUNS/g/ac-$f"
  done
  cp "$RUNS/aid.log" "$RUNS/aid-ac.log" "$RUNS/guidance.log" "$RUNS/g/" 2>/dev/null
  pack s4-guidance "$RUNS/g" guidance-best.safetensors select.json aid-config.json aid-stats.jsonl aid-curves.png \
    aid-guidance.safetensors ac-config.json ac-stats.jsonl ac-curves.png aid.log aid-ac.log guidance.log
fi

# ---- 5 bench ---------------------------------------------------------------------------------------------------
if has bench; then
  gopt=(); [ -n "$BEST" ] && gopt=(--guidance "$BEST")
  methods=$BENCH_METHODS
  if [ -z "$BEST" ] && [ "$BACKBONE" != "$SHIPPED" ]; then  # no module for this backbone: no AID rows
    methods=$(echo ",$methods," | sed 's/,aid-1[28][^,]*//g; s/^,//; s/,$//')
  fi
  # --no-realism --no-lpips-vgg: FID/KID's Inception (92 MiB) and VGG16's weights (59 MiB) do not travel in the carry;
  # the box is for sampling
  bargs=(--methods "$methods" --dataset "$VAL" --n "$BENCH_N" --seeds "$BENCH_SEEDS" --masks "$BENCH_MASKS"
         --model "$BACKBONE" --batch "$BENCH_BATCH" --precision "$BENCH_PRECISION" --device "$DEVICE" --offline
         --no-realism --no-lpips-vgg --out "$RUNS/bench" "${gopt[@]}")
  mkdir -p "$RUNS/bench" && echo "$methods" > "$RUNS/bench/asked.txt"
  box bench $(( T_BENCH - T_REPORT )) "${aid[@]}" bench "${bargs[@]}"
  # a bench stopped at its box wrote no table: rebuild it from the cells it finished
  [ -f "$RUNS/bench/bench.md" ] || box bench-report "$T_REPORT" "${aid[@]}" bench "${bargs[@]}" --report-only
  cp "$RUNS/bench.log" "$RUNS/bench/bench.log" 2>/dev/null
  [ -f "$RUNS/bench-report.log" ] && cp "$RUNS/bench-report.log" "$RUNS/bench/"
  pack s5-bench "$RUNS/bench" asked.txt bench.md bench.json bench.csv cells.jsonl run.json quality-speed.png \
    $(cd "$RUNS/bench" 2>/dev/null && ls grid-*.png 2>/dev/null) bench.log bench-report.log
fi

# ---- 6 pack ----------------------------------------------------------------------------------------------------
log "gpu_run: finished after $(now) s"
"$PYTHON" scripts/gpu_stage.py check-out "$OUT" 2>&1 | tee -a "$SLOG"
