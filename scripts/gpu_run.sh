#!/bin/bash
# The GPU stages, each in a hard time box, on any CUDA machine; one result folder (docs/gpu-runbook.md).
#
#   scripts/gpu_run.sh --train TRAIN.zip --val VAL.zip [--out DIR]    # in a clone, after `pip install -e .`
#   python scripts/adopt_gpu_run.py DIR                               # then, in a checkout: take DIR in, one commit
#
# Stages (STAGES, in this order; a box sends SIGTERM, then SIGKILL GRACE seconds later; a failing stage is logged and
# the next runs where it can; no box runs past DEADLINE seconds after the start):
#   timings   T_TIMINGS   forward-only img/s of the embedded and the official-size EDM-64 architectures, and the
#                         unguided 35-NFE sampler path against forward-only                          -> timings.json
#   backbone  T_BACKBONE  aid pretrain of the embedded architecture, stopped by SIGTERM: its EMA snapshot -> backbone/
#   tune      T_TUNE      aid bench --tune for the baselines on the new backbone, cheapest first
#                                                                              -> backbone/aid-cats64-edm.tuned.json
#   guidance  T_GUIDANCE  aid train (backprop), the checkpoint best on held-out validation images; beside it a small
#                         actor-critic run logging its gradient diagnostics (AC=0: not)                -> guidance/
#   bench     T_BENCH     aid bench, the protocol, cheapest methods first; a run stopped at its box gets its table
#                         rebuilt from the finished cells (T_REPORT of T_BENCH)                          -> bench/
# The result folder:
#   run.log, result.json (each stage: status, box, seconds, exit code), env.json, logs/STAGE.log, timings.json,
#   backbone/{aid-cats64-edm.safetensors, .sha256, .tuned.json, samples.png, run/},
#   guidance/{guidance-best.safetensors, select.json, aid/, ac/}, bench/{bench.md, bench.json, cells.jsonl, asked.txt, ...}
# Without a new backbone the later stages use BACKBONE (default: the shipped one). Knobs are environment variables
# (defaults below). Exit 2: bad inputs, nothing run; 1: a stage failed or was killed; 0: each stage ran, or was
# stopped at its box or skipped. tests/test_gpu_rehearsal.py rehearses the stages on CPU with tiny budgets.
set -uo pipefail
T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case $1 in /*|"") echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

if [ "${1:-}" != --guidance-pair ]; then
  while [ $# -gt 0 ]; do
    case $1 in
      --train|--val|--out) [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; } ;;&
      --train) TRAIN=$2; shift 2 ;;
      --val) VAL=$2; shift 2 ;;
      --out) OUT=$2; shift 2 ;;
      -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown argument $1 (scripts/gpu_run.sh --help)" >&2; exit 2 ;;
    esac
  done
fi
OUT=$(abspath "${OUT:-}"); TRAIN=$(abspath "${TRAIN:-}"); VAL=$(abspath "${VAL:-}")
BACKBONE=$(abspath "${BACKBONE:-}")
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/.runs/gpu-$(date -u +%Y%m%d-%H%M%S)}  # .runs/ is git-ignored
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-timings backbone tune guidance bench}
DEADLINE=${DEADLINE:-560}      # seconds after the start by which the last stage has ended
GRACE=${GRACE:-20}             # seconds between a box's SIGTERM and its SIGKILL (saving state and a snapshot)
MIN_BOX=${MIN_BOX:-5}          # a stage that would get fewer seconds than this is skipped
T_TIMINGS=${T_TIMINGS:-25}; T_BACKBONE=${T_BACKBONE:-225}; T_TUNE=${T_TUNE:-30}; T_GUIDANCE=${T_GUIDANCE:-160}
T_BENCH=${T_BENCH:-70}; T_REPORT=${T_REPORT:-15}  # T_BENCH includes T_REPORT
SHIPPED=$REPO/weights/aid-cats64-edm.safetensors
# the embedded architecture
RES=${RES:-64}; WIDTH=${WIDTH:-32}; CMULT=${CMULT:-1,2,3,4}; DEPTH=${DEPTH:-1}; ATTN=${ATTN:-16,8}
# timings
TIMING_BATCHES=${TIMING_BATCHES:-64,128,256,512}; TIMING_PRECISIONS=${TIMING_PRECISIONS:-fp32,bf16}
TIMING_OFFICIAL=${TIMING_OFFICIAL:-1}; TIMING_SAMPLE_BATCH=${TIMING_SAMPLE_BATCH:-128}
# backbone
BATCH=${BATCH:-256}; LR=${LR:-1e-3}; RAMPUP_KIMG=${RAMPUP_KIMG:-200}; EMA_KIMG=${EMA_KIMG:-100}
DURATION_KIMG=${DURATION_KIMG:-1000000}; SNAPSHOT_KIMG=${SNAPSHOT_KIMG:-1000}; PRECISION=${PRECISION:-bf16}
PRETRAIN_EXTRA=${PRETRAIN_EXTRA:-}
# tune
TUNE_METHODS=${TUNE_METHODS:-dps,mcg,gradpaint,copaint,vipaint}; TUNE_N=${TUNE_N:-16}; TUNE_STEPS=${TUNE_STEPS:-18}
# guidance
GBATCH=${GBATCH:-128}; GSTEPS=${GSTEPS:-18}; BETA=${BETA:-0.003}; LR_ACTOR=${LR_ACTOR:-3e-4}; GITERS=${GITERS:-1000000}
RECOMPUTE=${RECOMPUTE:-1}      # 0: --no-recompute (a quarter less compute; all N steps' activations in memory)
MASK_BANK=${MASK_BANK:-4096}; TRAIN_MASKS=${TRAIN_MASKS:-freeform,box,strip}
VAL_OFFSET=${VAL_OFFSET:-100}; VAL_N=${VAL_N:-64}; VAL_EVERY=${VAL_EVERY:-20}
AC=${AC:-1}; AC_BATCH=${AC_BATCH:-64}; AC_DIAG_EVERY=${AC_DIAG_EVERY:-10}; AC_DIAG_BATCH=${AC_DIAG_BATCH:-128}
GUIDANCE_EXTRA=${GUIDANCE_EXTRA:-}
# bench (BENCH_EXTRA: FID/KID and LPIPS-VGG are left out by default; the box is for sampling)
BENCH_METHODS=${BENCH_METHODS:-copy,greyfill,unguided,aid-18,aid-12,dps,replace,ddnm,mcg,gradpaint,copaint,repaint,vipaint}
BENCH_N=${BENCH_N:-100}; BENCH_SEEDS=${BENCH_SEEDS:-3}; BENCH_MASKS=${BENCH_MASKS:-freeform,center,strip}
BENCH_BATCH=${BENCH_BATCH:-100}; BENCH_PRECISION=${BENCH_PRECISION:-fp32}
[ -n "${BENCH_EXTRA+set}" ] || BENCH_EXTRA="--no-realism --no-lpips-vgg"

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
aid=("$PYTHON" -m aid_cli.cli)
LOGS=$OUT/logs
SLOG=$OUT/run.log
RESULT=""  # the stages' records of result.json, as JSON members
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(date -u +%H:%M:%S) +$(now)s] $*" | tee -a "$SLOG" >&2; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

record() {  # record NAME STATUS BOX SECONDS EXIT: one stage into result.json
  RESULT+="${RESULT:+, }\"$1\": {\"status\": \"$2\", \"box_s\": $3, \"seconds\": $4, \"exit\": $5}"
  write_result
}
write_result() {  # result.json, rewritten whole and atomically
  printf '{"stages": {%s}, "device": "%s", "deadline_s": %s, "commit": "%s"}\n' "$RESULT" "$DEVICE" "$DEADLINE" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$OUT/.result.json" && mv "$OUT/.result.json" "$OUT/result.json"
}

box() {  # box NAME SECONDS CMD...: CMD in a time box; 0 when it ran or was stopped on time, 97 when skipped, else
  # its exit code; its output goes to logs/NAME.log
  local name=$1 want=$2; shift 2
  local left=$(( DEADLINE - GRACE - $(now) ))
  local secs=$(( want < left ? want : left ))
  if (( secs < MIN_BOX )); then
    log "$name: skipped (a box of ${secs} s; ${left} s left before the deadline)"
    record "$name" skipped "$secs" 0 97
    return 97
  fi
  log "$name: start, box ${secs} s"
  local t=$(date +%s)
  timeout -s TERM -k "$GRACE" "$secs" "$@" >> "$LOGS/$name.log" 2>&1; local rc=$?
  local what="done" status=done
  [ $rc = 124 ] && what="stopped at its box (SIGTERM)" && status=stopped
  [ $rc = 137 ] && what="KILLED after the grace" && status=killed
  [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 137 ] && what="FAILED (exit $rc)" && status=failed
  log "$name: $what after $(( $(date +%s) - t )) s"
  record "$name" "$status" "$secs" $(( $(date +%s) - t )) "$rc"
  if [ $rc != 0 ] && [ $rc != 124 ]; then
    tail -n 15 "$LOGS/$name.log" | sed "s/^/    $name| /" >> "$SLOG"
  fi
  [ $rc = 124 ] && return 0
  return $rc
}

waitfor() {  # waitfor PID: its exit code, waiting again when a trapped signal interrupts `wait`
  local r; while :; do wait "$1"; r=$?; kill -0 "$1" 2>/dev/null || return $r; done
}

guidance_pair() {  # the guidance stage's two runs side by side; the box's SIGTERM reaches both and both save
  local g=$OUT/guidance/aid a=$OUT/guidance/ac rec=() p2=""
  [ "$RECOMPUTE" = 0 ] && rec=(--no-recompute)
  local common=(--backbone "$BACKBONE" --dataset "$TRAIN" --val "$VAL" --val-offset "$VAL_OFFSET" --val-n "$VAL_N"
                --steps "$GSTEPS" --iters "$GITERS" --mask-bank "$MASK_BANK" --train-masks "$TRAIN_MASKS"
                --denoised-input --device "$DEVICE" --seed 0)
  "${aid[@]}" train "${common[@]}" --out "$g" --estimator backprop --batch "$GBATCH" --beta "$BETA" \
    --lr-actor "$LR_ACTOR" --val-every "$VAL_EVERY" --checkpoint-every "$VAL_EVERY" "${rec[@]}" $GUIDANCE_EXTRA \
    > "$LOGS/guidance-aid.log" 2>&1 &
  local p1=$!
  if [ "$AC" = 1 ]; then  # the small actor-critic run (eq. 11 with the fixes) and its gradient diagnostics
    "${aid[@]}" train "${common[@]}" --out "$a" --estimator score --explore scaled --critic privileged \
      --td-lambda 1 --normalize-advantage --batch "$AC_BATCH" --beta "$BETA" --diag-every "$AC_DIAG_EVERY" \
      --diag-batch "$AC_DIAG_BATCH" --val-every $(( VAL_EVERY * 4 )) --checkpoint-every $(( VAL_EVERY * 4 )) \
      > "$LOGS/guidance-ac.log" 2>&1 &
    p2=$!
  fi
  trap 'kill -TERM $p1 $p2 2>/dev/null' TERM
  waitfor $p1; local r1=$? r2=0
  [ -n "$p2" ] && { waitfor $p2; r2=$?; }
  echo "backprop run: exit $r1; actor-critic run: exit $r2"
  [ $r1 = 0 ] || [ $r1 = 143 ]  # the backprop run decides the stage (143: it took the SIGTERM before aid caught it)
}
if [ "${1:-}" = --guidance-pair ]; then guidance_pair; exit; fi

# ---- inputs: checked before anything runs -------------------------------------------------------------------
need() {  # need VAR STAGE...: the file in VAR exists when one of the stages runs
  local var=$1 s; shift
  for s in "$@"; do
    if has "$s"; then
      [ -n "${!var}" ] || { echo "error: stage $s needs --${var,,} ZIP (an EDM-layout dataset zip)" >&2; exit 2; }
      [ -f "${!var}" ] || { echo "error: --${var,,} ${!var}: no such file" >&2; exit 2; }
      return
    fi
  done
}
need TRAIN backbone guidance
need VAL tune guidance bench
[ -z "$BACKBONE" ] || [ -f "$BACKBONE" ] || { echo "error: BACKBONE=$BACKBONE: no such file" >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT is not empty: give a new --out folder" >&2; exit 2
fi
mkdir -p "$OUT" "$LOGS" || { echo "error: cannot create $OUT" >&2; exit 2; }
log "gpu_run: stages [$STAGES], device $DEVICE, deadline ${DEADLINE} s, into $OUT"
write_result
if ! "$PYTHON" scripts/gpu_stage.py env --device "$DEVICE" --out "$OUT/env.json" >> "$SLOG" 2>&1; then
  tail -n 1 "$SLOG" >&2
  exit 2
fi

# ---- timings ------------------------------------------------------------------------------------------------
if has timings; then
  box timings "$T_TIMINGS" "$PYTHON" scripts/gpu_stage.py timings --out "$OUT/timings.json" --device "$DEVICE" \
    --batches "$TIMING_BATCHES" --precisions "$TIMING_PRECISIONS" --official "$TIMING_OFFICIAL" \
    --sample-batch "$TIMING_SAMPLE_BATCH" --budget $(( T_TIMINGS > 10 ? T_TIMINGS - 6 : T_TIMINGS / 2 )) \
    --resolution "$RES" --width "$WIDTH" --channel-mult "$CMULT" --depth "$DEPTH" --attn "$ATTN"
  (nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true)
fi

# ---- backbone -----------------------------------------------------------------------------------------------
CAND=""  # the new backbone, named as it will be shipped so that --tune's record sits beside it
if has backbone; then
  B=$OUT/backbone
  box backbone "$T_BACKBONE" "${aid[@]}" pretrain --dataset "$TRAIN" --out "$B/run" --resolution "$RES" --width "$WIDTH" \
    --channel-mult "$CMULT" --depth "$DEPTH" --attn "$ATTN" --batch "$BATCH" --lr "$LR" --lr-rampup-kimg "$RAMPUP_KIMG" \
    --ema-halflife-kimg "$EMA_KIMG" --duration "$DURATION_KIMG" --snapshot-kimg "$SNAPSHOT_KIMG" \
    --checkpoint-minutes 60 --precision "$PRECISION" --device "$DEVICE" --seed 0 $PRETRAIN_EXTRA
  snap=$(ls "$B"/run/network-snapshot-*.safetensors 2>/dev/null | tail -1)
  if [ -n "$snap" ]; then
    cp "$snap" "$B/aid-cats64-edm.safetensors"
    CAND=$B/aid-cats64-edm.safetensors
    (cd "$B" && sha256sum aid-cats64-edm.safetensors > aid-cats64-edm.sha256)
    grid=$(ls "$B"/run/samples-*.png 2>/dev/null | tail -1)
    [ -n "$grid" ] && cp "$grid" "$B/samples.png"
  else
    log "backbone: no snapshot; the next stages use ${BACKBONE:-$SHIPPED}"
  fi
fi
BACKBONE=${CAND:-${BACKBONE:-$SHIPPED}}  # BACKBONE=FILE: the backbone when the backbone stage does not run
log "backbone for the next stages: $BACKBONE"

# ---- tune ---------------------------------------------------------------------------------------------------
if has tune; then
  if [ -n "$CAND" ]; then
    box tune "$T_TUNE" "$PYTHON" scripts/gpu_stage.py tune --model "$CAND" --dataset "$VAL" --methods "$TUNE_METHODS" \
      --n "$TUNE_N" --steps "$TUNE_STEPS" --batch "$TUNE_N" --device "$DEVICE" --precision fp32
  else
    log "tune: skipped (no new backbone; the shipped one keeps its tuned step sizes)"
    record tune skipped 0 0 97
  fi
fi

# ---- guidance -----------------------------------------------------------------------------------------------
BEST=""
if has guidance; then
  mkdir -p "$OUT/guidance"
  export BACKBONE OUT TRAIN VAL
  box guidance "$T_GUIDANCE" bash "$0" --guidance-pair
  if "$PYTHON" scripts/gpu_stage.py select "$OUT/guidance/aid" --into "$OUT/guidance" >> "$LOGS/guidance.log" 2>&1; then
    BEST=$OUT/guidance/guidance-best.safetensors
    log "guidance: $(tail -1 "$LOGS/guidance.log")"
  else
    log "guidance: no module to select"
  fi
fi

# ---- bench --------------------------------------------------------------------------------------------------
if has bench; then
  gopt=(); [ -n "$BEST" ] && gopt=(--guidance "$BEST")
  methods=$BENCH_METHODS
  if [ -z "$BEST" ] && [ "$BACKBONE" != "$SHIPPED" ]; then  # no module for this backbone: no AID rows
    methods=$(echo ",$methods," | sed 's/,aid-1[28][^,]*//g; s/^,//; s/,$//')
  fi
  bargs=(--methods "$methods" --dataset "$VAL" --n "$BENCH_N" --seeds "$BENCH_SEEDS" --masks "$BENCH_MASKS"
         --model "$BACKBONE" --batch "$BENCH_BATCH" --precision "$BENCH_PRECISION" --device "$DEVICE"
         --out "$OUT/bench" "${gopt[@]}" $BENCH_EXTRA)
  mkdir -p "$OUT/bench" && echo "$methods" > "$OUT/bench/asked.txt"
  box bench $(( T_BENCH - T_REPORT )) "${aid[@]}" bench "${bargs[@]}"
  # a bench stopped at its box wrote no table: rebuild it from the cells it finished
  [ -f "$OUT/bench/bench.md" ] || box bench-report "$T_REPORT" "${aid[@]}" bench "${bargs[@]}" --report-only
fi

log "gpu_run: finished after $(now) s; take it in with: python scripts/adopt_gpu_run.py $OUT"
[[ $RESULT != *'"status": "failed"'* && $RESULT != *'"status": "killed"'* ]]  # exit 1 when a stage failed
