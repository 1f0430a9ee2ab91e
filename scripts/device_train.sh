#!/bin/bash
# One call of a GPU session on the device machine (docs/gpu-session.md explains the order and the numbers).
#
#   scripts/device_train.sh backbone   # train, or --resume, the embedded 64x64 backbone for $BUDGET seconds
#   scripts/device_train.sh guidance   # train AID guidance modules (score, pathwise, proxy side by side) on the
#                                      # newest backbone snapshot for $BUDGET seconds, or --resume them
#
# Runs from the repo root with the device's own python3 (torch is there; aid is not installed: PYTHONPATH=.).
# Needs .carry/cats64-train.zip and .carry/cats64-val.zip (scripts/pack_for_device.py). Runs live in $RUNS (default
# .runs/, git-ignored, so they stay on the machine between calls while it is warm). Everything worth keeping lands in
# $OUT: files over 15 MiB in parts (`cat NAME.part.* > NAME` here), the small ones in one tarball.
# Both stages stop on time by SIGTERM, which aid pretrain/train turn into "save the state and leave".
set -uo pipefail
stage=${1:?usage: device_train.sh backbone|guidance}
budget=${BUDGET:-510}
out=${OUT:-/tmp/aid-out}
runs=${RUNS:-.runs}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out" "$runs"
aid=(python3 -m aid_cli.cli)
ship() {  # ship FILE [NAME]: copy into $OUT, in 15 MiB parts when larger (the tool returns files of 16 MiB at most)
  local name=${2:-$(basename "$1")}
  if [ "$(stat -c %s "$1")" -gt $((15 * 1024 * 1024)) ]; then split -b 15M -d "$1" "$out/$name.part."; else cp "$1" "$out/$name"; fi
}
timed() {  # timed CMD...: run for at most $budget seconds; a run stopped on time is a success
  timeout -s TERM -k "${KILL_AFTER:-90}" "$budget" "$@"; local rc=$?
  [ $rc = 0 ] || [ $rc = 124 ] || { echo "failed with exit code $rc: $*" >&2; return $rc; }
}
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

case $stage in
backbone)
  run=$runs/cats64
  resume=(); [ -f "$run/training-state.safetensors" ] && resume=(--resume)
  # The embedded default's architecture (4.2 M parameters: CPU users pay for every one at each of 35 evaluations),
  # trained far longer than the CPU could: EDM's learning rate and a longer warm-up and EMA for millions of images.
  timed "${aid[@]}" pretrain --dataset .carry/cats64-train.zip --out "$run" --resolution 64 --width 32 --channel-mult 1,2,3,4 \
    --depth 1 --attn 16,8 --batch "${BATCH:-256}" --lr 1e-3 --lr-rampup-kimg 200 --ema-halflife-kimg 100 \
    --duration 1000000 --snapshot-kimg "${SNAPSHOT_KIMG:-2000}" --checkpoint-minutes 3 --seed 0 "${resume[@]}" \
    ${EXTRA:-} || exit
  snap=$(ls "$run"/network-snapshot-*.safetensors | tail -1)
  ship "$snap"
  sha256sum "$snap" > "$run/snapshot.sha256"
  tar czf "$out/backbone-logs.tgz" -C "$run" config.json stats.jsonl snapshot.sha256 $(cd "$run" && ls samples-*.png | tail -1)
  ;;
guidance)
  snap=$(ls "$runs"/cats64/network-snapshot-*.safetensors 2>/dev/null | tail -1)
  snap=${BACKBONE:-$snap}
  [ -n "$snap" ] || { echo "no backbone: run the backbone stage first, or set BACKBONE=FILE" >&2; exit 2; }
  pids=()
  for est in ${ESTIMATORS:-score pathwise proxy}; do  # small networks: three runs share the GPU
    run=$runs/aid-$est
    resume=(); [ -f "$run/training-state.safetensors" ] && resume=(--resume)
    lr=(); [ "$est" = proxy ] && lr=(--lr-actor 3e-4)  # as the shipped CPU module (weights/aid-cats64-guidance.md)
    timed "${aid[@]}" train --backbone "$snap" --dataset .carry/cats64-train.zip --val .carry/cats64-val.zip --out "$run" \
      --estimator "$est" --steps 18 --batch "${GBATCH:-64}" --iters 1000000 --checkpoint-every 100 \
      --val-every "${VAL_EVERY:-250}" "${lr[@]}" "${resume[@]}" ${EXTRA:-} > "$runs/aid-$est.log" 2>&1 &
    pids+=($!)
  done
  rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  files=()
  for est in ${ESTIMATORS:-score pathwise proxy}; do
    run=$runs/aid-$est
    [ -f "$run/guidance.safetensors" ] && ship "$run/guidance.safetensors" "guidance-$est.safetensors"
    files+=("aid-$est.log" "aid-$est/stats.jsonl" "aid-$est/config.json" "aid-$est/curves.png")
  done
  (cd "$runs" && tar czf "$out/guidance-logs.tgz" --ignore-failed-read "${files[@]}" 2>/dev/null)
  exit $rc
  ;;
*) echo "unknown stage $stage (backbone|guidance)" >&2; exit 2 ;;
esac
