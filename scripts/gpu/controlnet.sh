#!/usr/bin/env bash
# On the GPU machine: one ControlNet at SD3-medium shapes (issue 21), ours beside diffusers (PyTorch eager and
# torch.compile) in the same call on the same card: 1024x1024, 28 steps, CFG 7, float16, random weights.
# Stages (each skipped when its output exists, so a second call on a warm machine continues):
#   1. /tmp/sd3m: SD3-medium-shaped graphs (build_sd3m.sh CONTROLNET=1: text encoders 1 layer deep, not measured;
#      transformer/model_controlnet.onnx from the same weights; vae_encoder/), and /tmp/cn-sd3m: a random ControlNet
#      with InstantX/SD3-Controlnet-Canny's config (make_controlnet_sd3m.py, the weights bench_torch_controlnet.py
#      times);
#   2. ours (examples/benchmark, .device-bin/) without and with the ControlNet, then diffusers
#      (bench_torch_controlnet.py: the ControlNet + transformer calls of one pipeline step).
# STAGE=build runs stage 1 only. FUSED=0 skips the --fused-kernels variant. Results go to $OUT. Carry .whl (diffusers 0.42.1), .ort-cuda (the CUDA bundle)
# and .device-bin (benchmark or benchmark.xz, built with --features cuda).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
if [ ! -f /tmp/sd3m/transformer/model_controlnet.onnx ]; then
  CONTROLNET=1 TEXT_LAYERS=1 bash scripts/gpu/build_sd3m.sh || exit 1
  ( python3 scripts/gpu/make_controlnet_sd3m.py --out /tmp/cn-sd3m > /tmp/build-cn.log 2>&1; echo "exit $?" >> /tmp/build-cn.log ) &
fi
bash scripts/gpu/wait.sh ${BUILD_WAIT:-500} > "$OUT/build.log" 2>&1; tail -12 "$OUT/build.log"
while [ ! -f /tmp/cn-sd3m/config.json ] && ! grep -q "^exit" /tmp/build-cn.log 2>/dev/null; do sleep 5; done
tail -3 /tmp/build-cn.log
for f in /tmp/sd3m/transformer/model_controlnet.onnx /tmp/sd3m/vae_encoder/model.onnx /tmp/cn-sd3m/model.onnx; do
  [ -f $f ] || { echo "not built: $f"; exit 1; }
done
echo "stage 1: $(( $(date +%s) - t0 )) s"; du -sh /tmp/sd3m/transformer /tmp/cn-sd3m
[ "${STAGE:-all}" = build ] && exit 0
source .ort-cuda/env.sh
if [ -f .device-bin/benchmark.xz ] && [ ! -x .device-bin/benchmark ]; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/benchmark.xz .device-bin/benchmark
  chmod +x .device-bin/benchmark
fi
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu-memory.csv" &
smi=$!
ARGS="--model /tmp/sd3m --ep cuda --width 1024 --height 1024 --steps 28 --guidance 7 --runs ${RUNS:-3} --warmup 1"
# FUSED=1 (default): also the --fused-kernels rewrite of both graphs (fused_kernels.py: /tmp/sd3m-fused holds the
# fused model.onnx and model_controlnet.onnx, /tmp/cn-sd3m-fused the fused ControlNet; seconds, weights hard-linked)
VARIANTS="plain controlnet"
if [ "${FUSED:-1}" = 1 ]; then
  [ -f /tmp/sd3m-fused/transformer/model_controlnet.onnx ] || python3 models/export/fused_kernels.py /tmp/sd3m /tmp/sd3m-fused 2>&1 | tail -2
  [ -f /tmp/cn-sd3m-fused/model.onnx ] || python3 models/export/fused_kernels.py --controlnet /tmp/cn-sd3m /tmp/cn-sd3m-fused 2>&1 | tail -1
  VARIANTS="$VARIANTS controlnet-fused"
fi
for v in $VARIANTS; do
  extra="${LOOP_FLAG:-}"; model=/tmp/sd3m
  [ $v = controlnet ] && extra="$extra --controlnet /tmp/cn-sd3m --control-scale 0.7"
  [ $v = controlnet-fused ] && { model=/tmp/sd3m-fused; extra="$extra --controlnet /tmp/cn-sd3m-fused --control-scale 0.7"; }
  echo "== ours: $v ($(date +%T))" | tee -a "$OUT/gpu-memory.csv.marks"
  timeout ${OURS_TIMEOUT:-240} ./.device-bin/benchmark ${ARGS/--model \/tmp\/sd3m/--model $model} $extra --json "$OUT/ours-$v.json" \
    --output "$OUT/ours-$v.png" 2>&1 | tail -22 | tee "$OUT/ours-$v.md"
done
if [ "${TORCH:-1}" = 1 ]; then
  echo "== diffusers ($(date +%T))" | tee -a "$OUT/gpu-memory.csv.marks"
  timeout ${TORCH_TIMEOUT:-300} python3 scripts/gpu/bench_torch_controlnet.py --tokenizers-from models/fixtures/tiny-sd3 \
    ${COMPILE:+--compile} --json "$OUT/torch-controlnet.json" 2>&1 | grep -v Warning | tail -14 | tee "$OUT/torch-controlnet.md"
fi
kill $smi
echo "total: $(( $(date +%s) - t0 )) s"
