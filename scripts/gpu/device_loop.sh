#!/usr/bin/env bash
# On the GPU machine: the denoising loop on the host vs on the device (issue 19, "The loop on the device") at
# SD3-medium shapes, 1024x1024, 28 steps, CFG 7, float16, random weights. For each variant and sampler,
# examples/benchmark --loop both runs the host loop and then the device loop (one pipeline each) and prints, side by
# side: time per step, the transformer's Session::run per step, and the time outside Session::run per step (our
# overhead), then the two loops' difference (first image in 8-bit levels, final latents).
# Stages (each skipped when its output exists, so a second call on a warm machine continues):
#   1. /tmp/sd3m (build_sd3m.sh; TEXT_LAYERS=1 by default: the text encoders are not what is measured) and
#      /tmp/sd3m-fused (models/export/fused_kernels.py);
#   2. ours (.device-bin/benchmark or benchmark.xz, built with --features cuda) per variant and sampler.
# STAGE=build runs stage 1 only. VARIANTS (default "sd3m-fused sd3m"), SAMPLERS (default "euler"; e.g.
# "euler heun dpmpp_2m"), RUNS (3), STEPS (28). Results (json, logs, images) go to $OUT. Carry .ort-cuda (the CUDA
# bundle) and .device-bin.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
if [ ! -f /tmp/sd3m/transformer/model.onnx ]; then
  TEXT_LAYERS=${TEXT_LAYERS:-1} bash scripts/gpu/build_sd3m.sh || exit 1
fi
bash scripts/gpu/wait.sh ${BUILD_WAIT:-500} > "$OUT/build.log" 2>&1; tail -8 "$OUT/build.log"
[ -f /tmp/sd3m/transformer/model.onnx ] || { echo "transformer not built"; exit 1; }
if [[ " ${VARIANTS:-sd3m-fused sd3m} " == *" sd3m-fused "* ]] && [ ! -f /tmp/sd3m-fused/transformer/model.onnx ]; then
  python3 models/export/fused_kernels.py /tmp/sd3m /tmp/sd3m-fused 2>&1 | tail -2
fi
echo "stage 1: $(( $(date +%s) - t0 )) s"
[ "${STAGE:-all}" = build ] && exit 0
source .ort-cuda/env.sh
# The binary travels xz-compressed (.device-bin/benchmark.xz); a newer .xz replaces an older unpacked binary.
if [ -f .device-bin/benchmark.xz ] && { [ ! -x .device-bin/benchmark ] || [ .device-bin/benchmark.xz -nt .device-bin/benchmark ]; }; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/benchmark.xz .device-bin/benchmark
  chmod +x .device-bin/benchmark
fi
ARGS="--ep cuda --width 1024 --height 1024 --steps ${STEPS:-28} --guidance 7 --runs ${RUNS:-3} --warmup 1 --loop both"
for v in ${VARIANTS:-sd3m-fused sd3m}; do
  for s in ${SAMPLERS:-euler}; do
    echo "== ours: $v, $s ($(date +%T))"
    timeout ${OURS_TIMEOUT:-400} ./.device-bin/benchmark --model /tmp/$v $ARGS --sampler $s \
      --json "$OUT/loop-$v-$s.json" --output "$OUT/loop-$v-$s.png" 2> "$OUT/loop-$v-$s.err" | tee "$OUT/loop-$v-$s.md"
    tail -4 "$OUT/loop-$v-$s.err"
  done
done
echo "total: $(( $(date +%s) - t0 )) s"
