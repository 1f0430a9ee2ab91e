#!/bin/bash
# How two `aid inpaint` runs side by side slow each other down, under each thread policy.
#
#   research/concurrency.sh [REPEATS]      # from the repo root, with `aid` on PATH (or AID=path); on an otherwise quiet machine
#
# For each policy: REPEATS (default 5) solo runs, then REPEATS pairs started together (as `xargs -P 2` does), each a
# full process (start-up included) inpainting examples/chelsea.png with the default method at 35 NFE. Prints the median
# wall time of a solo run, of a run in a pair, and their ratio (the target: at most 2.5). Policies:
#   default        aid's own choice (threads = usable CPUs less busy ones, OMP_WAIT_POLICY=PASSIVE)
#   spin-300k      aid's choice, but each idle thread spins GOMP_SPINCOUNT=300000 times before it sleeps (libgomp's
#                  own default when OMP_WAIT_POLICY is unset; ~3 ms); spin-30k: 30000 (~0.3 ms)
#   torch-default  what torch does unaided: one thread per core, OpenMP's active wait (AID_THREADS=<cores>, ACTIVE)
#   one-thread     AID_THREADS=1
set -euo pipefail
repeats=${1:-5}
aid=${AID:-aid}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cores=$(nproc)
args=(inpaint examples/chelsea.png --mask examples/chelsea_mask.png --quiet)

one() {  # one timed run: prints seconds
  local start end
  start=$(date +%s.%N)
  env "$@" "$aid" "${args[@]}" -o "$tmp/$RANDOM$RANDOM.png" >/dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

measure() {  # policy name, then env assignments
  local name=$1
  shift
  one "$@" >/dev/null  # warm the page cache
  local solo pair
  solo=$(for _ in $(seq "$repeats"); do one "$@"; done | median)
  pair=$(for _ in $(seq "$repeats"); do
    one "$@" >"$tmp/a" & one "$@" >"$tmp/b" & wait
    cat "$tmp/a" "$tmp/b"
  done | median)
  printf '%-14s solo %6.2f s   in a pair %6.2f s   ratio %.2f\n' "$name" "$solo" "$pair" "$(echo "$pair / $solo" | bc -l)"
}

echo "$(date -u +%FT%TZ)  $cores CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $repeats repeats"
measure default -u GOMP_SPINCOUNT -u AID_THREADS -u OMP_NUM_THREADS -u OMP_WAIT_POLICY
measure spin-300k -u AID_THREADS -u OMP_NUM_THREADS -u OMP_WAIT_POLICY GOMP_SPINCOUNT=300000
measure spin-30k -u AID_THREADS -u OMP_NUM_THREADS -u OMP_WAIT_POLICY GOMP_SPINCOUNT=30000
measure torch-default -u GOMP_SPINCOUNT -u OMP_NUM_THREADS AID_THREADS="$cores" OMP_WAIT_POLICY=ACTIVE
measure one-thread -u GOMP_SPINCOUNT -u OMP_NUM_THREADS -u OMP_WAIT_POLICY AID_THREADS=1
