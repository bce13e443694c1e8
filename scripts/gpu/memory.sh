#!/usr/bin/env bash
# On the GPU machine, after build_sd3m.sh: peak memory of the memory modes, one fresh process per mode.
# GPU memory: nvidia-smi polled every 20 ms during the run (peak minus the idle reading before it); host memory:
# the process's VmHWM, printed by the benchmark. 2 steps are enough: memory does not grow with the step count.
# Modes: default and --low-memory at 1024x1024; default (untiled VAE), --vae-tiling and both at 2048x2048.
# Single cold runs (no warm-up): the times include first-run costs and are not benchmarks.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-/tmp/sd3m}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "| mode | size | peak GPU memory (MiB) | peak host memory (MiB) | end to end ms | VAE ms | loads during run ms |" > "$OUT/memory.md"
echo "|---|---|---:|---:|---:|---:|---:|" >> "$OUT/memory.md"
run() {  # name size flags...
  local name=$1 size=$2; shift 2
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "/tmp/mem-$name.txt" &
  local poll=$!
  timeout ${MEM_TIMEOUT:-240} ./.device-bin/benchmark --model "$MODEL" --ep cuda --width "$size" --height "$size" \
    --steps 2 --guidance 7 --runs 1 --warmup 0 "$@" > "$OUT/memory-$name.log" 2>&1
  local rc=$?
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  local peak; peak=$(sort -n "/tmp/mem-$name.txt" | tail -1)
  local host; host=$(grep -o "VmHWM): [0-9.]*" "$OUT/memory-$name.log" | awk '{print $2}')
  local e2e vae load
  e2e=$(grep "^| end to end" "$OUT/memory-$name.log" | awk -F'|' '{print $3}' | tr -d ' ')
  vae=$(grep "^| VAE decode" "$OUT/memory-$name.log" | awk -F'|' '{print $3}' | tr -d ' ')
  load=$(grep "^| graph loads" "$OUT/memory-$name.log" | awk -F'|' '{print $3}' | tr -d ' ')
  [ $rc = 0 ] || { e2e="failed rc=$rc"; tail -3 "$OUT/memory-$name.log"; }
  echo "| $name | ${size}x${size} | $((peak - idle)) | ${host:-?} | ${e2e:-?} | ${vae:-?} | ${load:-?} |" >> "$OUT/memory.md"
}
run default 1024
run low-memory 1024 --low-memory
run default-2048 2048
run vae-tiling-2048 2048 --vae-tiling
run low-memory+vae-tiling-2048 2048 --low-memory --vae-tiling
echo "$card" | tee -a "$OUT/memory.md"
cat "$OUT/memory.md"
