#!/usr/bin/env bash
# On the GPU machine: SD3.5-medium (MMDiT-X: dual attention in blocks 0-12, q/k RMS-norm) with the --fused-kernels
# rewrite of its dual-attention blocks (issue 19), beside the unfused float16 graph and diffusers (PyTorch eager and
# torch.compile) in the same call on the same card: random weights, fp16, 1024x1024, CFG 7 (batch 2).
# Stages (each skipped when its output exists, so a later call on a warm machine continues):
#   build   /tmp/sd35m: SD3.5-medium-shaped random graphs (build_sd3m.sh RANDOM_VARIANT=sd3.5-medium; text encoders
#           1 layer deep at full width: they are not what is measured), /tmp/sd35m-fused: the same folder with the
#           transformer rewritten by models/export/fused_kernels.py (hard links, seconds);
#   check   fused_check.sh: the tiny fixtures (tiny-dual included) CUDA vs CPU kernels and fused vs unfused, and the
#           full-size fused vs unfused image (1024x1024, 4 steps, CUDA);
#   time    ours (examples/benchmark: 28 steps, medians of RUNS=3 after 1 warm-up) on both folders with the peak
#           GPU memory of each process (nvidia-smi every 20 ms, minus the idle reading), then diffusers' transformer
#           alone (bench_torch.py --transformer-only: eager, then torch.compile; CUDA events over 20 calls);
#           the table (table.py) goes to $OUT/table.md.
# STAGE=build | check | time | measure (check + time) | all (default). Needs .whl (diffusers 0.42.1, for the build
# and PyTorch), .ort-cuda (the CUDA bundle, in pieces) and .device-bin (benchmark or benchmark.xz, built with
# --features cuda; the rewrite uses only the operators of round 8 + HeadRmsNorm, so any binary since HeadRmsNorm
# runs it). A call moves at most 64 MiB, tree included (about 30.6 MiB), so they may come in different calls: each
# call keeps what it carried on the machine (diffusers in /tmp/site, the bundle's pieces in /opt/ort/parts through
# .ort-cuda/env.sh, the binary in /tmp/sd35m-bin), e.g.
#   1. STAGE=build    carry .whl .device-bin/benchmark.xz .ort-cuda/env.sh .ort-cuda/VERSION   (~38 MiB, 5-9 min)
#   2. STAGE=build    carry .ort-cuda/env.sh .ort-cuda/VERSION .ort-cuda/parts/a              (~63 MiB, seconds)
#   3. STAGE=measure  carry .ort-cuda/env.sh .ort-cuda/VERSION .ort-cuda/parts/b              (~57 MiB, 6-8 min)
# each call within the machine's warm window of the previous one. STAGE=check (~2-3 min) and STAGE=time (~4-5 min)
# split the last call if needed; CHECK_TIMEOUT, OURS_TIMEOUT and TORCH_TIMEOUT bound each step. Everything is written to
# /tmp/sd35m-results; $OUT gets at most 8 files (what the device tool brings back): table.md, fused_check.txt,
# log.txt (build, rewrite, our runs, peaks, PyTorch), ours-sd35m{,-fused}.json, torch.json and the two full-size
# images of the check (full-sd35m{,-fused}.png).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FINAL=$OUT; OUT=/tmp/sd35m-results; mkdir -p "$OUT"
STAGE=${STAGE:-all}
collect() {  # at most 8 files back
  tail -n +1 "$OUT"/card.txt "$OUT"/build.log "$OUT"/rewrite.log "$OUT"/ours-*.log "$OUT"/peak-*.txt "$OUT"/torch.log \
    2>/dev/null > "$FINAL/log.txt"
  for f in table.md fused_check.txt ours-sd35m.json ours-sd35m-fused.json torch.json check/full-sd35m.png \
           check/full-sd35m-fused.png; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"
  done
}
trap collect EXIT
want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ] || { [ "$STAGE" = measure ] && [ "$1" != build ]; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
# keep what this call carried (see above)
[ -f .ort-cuda/env.sh ] && ( source .ort-cuda/env.sh )
BIN=/tmp/sd35m-bin/benchmark; mkdir -p /tmp/sd35m-bin
if [ -x .device-bin/benchmark ]; then
  cp .device-bin/benchmark "$BIN"
elif [ -f .device-bin/benchmark.xz ]; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/benchmark.xz "$BIN"
  chmod +x "$BIN"
fi
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
fi
if want build || [ ! -f /tmp/sd35m-fused/transformer/model.onnx ]; then
  if [ ! -f /tmp/sd35m/transformer/model.onnx ] && [ ! -f /tmp/sd35m.started ]; then  # once: the jobs run on
    touch /tmp/sd35m.started                                                            # after a call that ends
    RANDOM_VARIANT=sd3.5-medium DIR=/tmp/sd35m TEXT_LAYERS=1 BUILD_TAG=sd35m bash scripts/gpu/build_sd3m.sh || exit 1
  fi
  BUILD_TAG=sd35m bash scripts/gpu/wait.sh ${BUILD_WAIT:-480} > "$OUT/build.log" 2>&1; tail -8 "$OUT/build.log"
  for c in transformer text_encoder text_encoder_2 text_encoder_3 vae_decoder; do
    [ -f /tmp/sd35m/$c/model.onnx ] || { echo "not built (yet): /tmp/sd35m/$c"; exit 1; }
  done
  if [ ! -f /tmp/sd35m-fused/transformer/model.onnx ]; then
    python3 models/export/fused_kernels.py /tmp/sd35m /tmp/sd35m-fused 2>&1 | tail -2 | tee "$OUT/rewrite.log"
  fi
  echo "build: $(( $(date +%s) - t0 )) s"; du -sh /tmp/sd35m/transformer
fi
[ "$STAGE" = build ] && exit 0
source .ort-cuda/env.sh
[ -f "$(dirname "${ORT_DYLIB_PATH:-/opt/ort/x}")/libonnxruntime_providers_cuda.so" ] \
  || { echo "the CUDA bundle is not complete: carry its other pieces (.ort-cuda/parts/a or b)"; exit 1; }
[ -x "$BIN" ] || { echo "no benchmark binary: carry .device-bin/benchmark.xz"; exit 1; }
if want check; then
  echo "== fused_check ($(date +%T))"
  BIN="$BIN" OUT="$OUT/check" timeout ${CHECK_TIMEOUT:-300} bash scripts/gpu/fused_check.sh /tmp/sd35m /tmp/sd35m-fused 2>&1 | tee "$OUT/fused_check.txt"
  collect  # also after each step: a command killed at the device tool's limit keeps what was done
fi
if want time; then
  for v in sd35m sd35m-fused; do
    # a later call (after one cut at the device tool's limit) keeps what was measured
    [ -f "$OUT/ours-$v.json" ] && { echo "== ours: $v measured before, kept"; continue; }
    echo "== ours: $v ($(date +%T))"
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "/tmp/mem-$v.txt" &
    poll=$!
    timeout ${OURS_TIMEOUT:-240} "$BIN" --model /tmp/$v --ep cuda --width 1024 --height 1024 --steps 28 \
      --guidance 7 --runs ${RUNS:-3} --warmup 1 --json "$OUT/ours-$v.json" --output "$OUT/ours-$v.png" 2>&1 \
      | tail -16 | tee "$OUT/ours-$v.log"
    kill $poll 2>/dev/null; sleep 0.2
    peak=$(sort -n "/tmp/mem-$v.txt" | tail -1)
    if [ -n "$peak" ]; then echo "$(( peak - idle )) MiB (peak minus idle $idle MiB)"; else echo "not sampled"; fi \
      | tee "$OUT/peak-$v.txt"
    python3 scripts/gpu/table.py "$OUT" > "$OUT/table.md"; collect
  done
  if [ "${TORCH:-1}" = 1 ] && [ ! -f "$OUT/torch.json" ]; then
    echo "== diffusers, transformer only ($(date +%T))"
    timeout ${TORCH_TIMEOUT:-360} python3 scripts/gpu/bench_torch.py --variant sd3.5-medium --transformer-only \
      --tokenizers-from models/fixtures/tiny-sd3 --json "$OUT/torch.json" 2>&1 | grep -v Warning | tail -8 | tee "$OUT/torch.log"
  fi
  python3 scripts/gpu/table.py "$OUT" | tee "$OUT/table.md"
fi
echo "total: $(( $(date +%s) - t0 )) s"
