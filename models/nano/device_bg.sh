#!/usr/bin/env bash
# On the GPU machine: device_train.sh as a background job that outlives the call, so that one training run can use
# most of a session's device time across several calls (each call at most 10 minutes; the machine stays warm
# about 30 s between calls, so make the next call at once).
#   PHASE=stash   carry .whl-nano alone: keeps the wheels in /tmp/nano-whl for PHASE=start (the tree, the wheels and
#                 .nano-resume.tgz together pass a call's 64 MiB).
#   PHASE=start   carry .nano-resume.tgz (and .whl-nano, unless stashed): copies models/ and them to /tmp/nano-tree and starts
#                 `device_train.sh "$@"` there (setsid; OUT=/tmp/nano-out, RUN=/tmp/nano-run, TRAIN_LIMIT as
#                 given, default 1500 s), then waits like PHASE=wait.
#   PHASE=wait    waits up to WAIT seconds (default 540) or until the run has ended, printing the log's tail.
#                 STOP=1 first asks the run to end its training now (train.py --stop-file /tmp/nano-stop).
#                 FP8_CHECK=1 (carry .ort-cuda/env.sh, the bundle's pieces and .device-bin/sd3onnx-lib-tests.xz)
#                 runs the crate's FP8 and RGB CUDA lib tests first (they take seconds of GPU time beside the run).
#   PHASE=collect waits like PHASE=wait, then puts results.tgz (train.log, train_log.json, eval_*.png, gpu.txt,
#                 clip_token_ids.json) and pipeline.tgz.part-* under $OUT.
# Example (issue 22, run 15): PHASE=start TRAIN_LIMIT=1500 FINETUNE=1 bash models/nano/device_bg.sh --n-train 300000 ...
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PHASE=${PHASE:-wait}
TREE=/tmp/nano-tree
LOG=/tmp/nano-bg.log

running() { [ -f /tmp/nano-bg.pid ] && kill -0 "$(cat /tmp/nano-bg.pid)" 2>/dev/null; }

wait_run() {
  local t0; t0=$(date +%s)
  while running && [ $(( $(date +%s) - t0 )) -lt "${WAIT:-540}" ]; do sleep 10; done
  echo "== $(date +%T) running=$(running && echo yes || echo no) after $(( $(date +%s) - t0 )) s"
  grep -v -E "^\s*$" "$LOG" 2>/dev/null | tail -n "${TAIL:-25}"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

# the CUDA bundle's pieces carried by this call, kept under /opt/ort for a later FP8_CHECK=1
[ -f .ort-cuda/env.sh ] && ( source .ort-cuda/env.sh ) > /dev/null 2>&1
case "$PHASE" in
  stash)
    # the wheels alone (26 MB): with the tree and .nano-resume.tgz they would pass the call's 64 MiB
    [ -d .whl-nano ] || { echo "carry .whl-nano"; exit 1; }
    rm -rf /tmp/nano-whl && cp -r .whl-nano /tmp/nano-whl && ls /tmp/nano-whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ;;
  start)
    if running; then echo "a run is already going (pid $(cat /tmp/nano-bg.pid))"; wait_run; exit 0; fi
    [ -d .whl-nano ] || [ -d /tmp/nano-whl ] || { echo "carry .whl-nano (models/nano/fetch_wheels.sh)"; exit 1; }
    rm -rf "$TREE" /tmp/nano-out /tmp/nano-run /tmp/nano-stop && mkdir -p "$TREE"
    cp -r models "$TREE"/ && { [ ! -f .nano-resume.tgz ] || cp .nano-resume.tgz "$TREE"/; }
    if [ -d .whl-nano ]; then cp -r .whl-nano "$TREE"/; else cp -r /tmp/nano-whl "$TREE"/.whl-nano; fi
    # (not in a ( subshell ): that one keeps the call's output pipe open until the run ends)
    here=$PWD; cd "$TREE" || exit 1
    OUT=/tmp/nano-out RUN=/tmp/nano-run TRAIN_LIMIT=${TRAIN_LIMIT:-1500} \
      setsid nohup bash models/nano/device_train.sh --stop-file /tmp/nano-stop "$@" > "$LOG" 2>&1 < /dev/null &
    echo $! > /tmp/nano-bg.pid; cd "$here" || exit 1
    echo "started pid $(cat /tmp/nano-bg.pid) at $(date +%T), TRAIN_LIMIT=${TRAIN_LIMIT:-1500}"
    sleep 5; wait_run ;;
  wait|collect)
    [ "${STOP:-0}" = 1 ] && touch /tmp/nano-stop && echo "asked the run to stop its training ($(date +%T))"
    if [ "${FP8_CHECK:-0}" = 1 ]; then
      source .ort-cuda/env.sh
      bash scripts/gpu/cuda_lib_tests.sh .device-bin/sd3onnx-lib-tests.xz 2>&1 | tee "$OUT/fp8_cuda_tests.txt"
    fi
    wait_run
    if [ "$PHASE" = collect ]; then
      running && echo "the run has not ended: collecting what is there"
      tar -C /tmp/nano-out -czf "$OUT/results.tgz" --exclude='pipeline.tgz.part-*' . && cp "$LOG" "$OUT/nano-bg.log"
      cp /tmp/nano-out/pipeline.tgz.part-* "$OUT"/ 2>/dev/null
      ls -la "$OUT"
    fi ;;
  *) echo "PHASE: stash | start | wait | collect"; exit 2 ;;
esac
