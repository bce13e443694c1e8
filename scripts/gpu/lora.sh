#!/usr/bin/env bash
# On the GPU machine: LoRA switching and its per-step cost at SD3-medium shapes, ours beside diffusers (PyTorch)
# in the same call on the same card. Stages (each skipped when its output exists, so a second call on a warm
# machine continues):
#   1. /tmp/sd3m: SD3-medium-shaped random graphs (build_sd3m.sh, text encoders 1 layer deep: they are not measured),
#      /tmp/sd3m-fused: the --fused-kernels rewrite; both transformers made LoRA-ready (lora_inputs.py);
#   2. two random rank-64 LoRAs on every attention and feed-forward projection (make_lora.py);
#   3. ours (examples/lora_bench, .device-bin/) on both folders, then diffusers (bench_torch_lora.py).
# STAGE=build runs stage 1-2 only. Results go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
if [ ! -f /tmp/sd3m/transformer/model.onnx ]; then
  TEXT_LAYERS=1 bash scripts/gpu/build_sd3m.sh || exit 1
fi
bash scripts/gpu/wait.sh 480 > "$OUT/build.log" 2>&1; tail -8 "$OUT/build.log"
[ -f /tmp/sd3m/transformer/model.onnx ] || { echo "transformer not built"; exit 1; }
if [ ! -f /tmp/sd3m-fused/transformer/model.onnx ]; then
  python3 models/export/fused_kernels.py /tmp/sd3m /tmp/sd3m-fused 2>&1 | tail -2
fi
for d in /tmp/sd3m /tmp/sd3m-fused; do
  [ -f $d/transformer/lora_targets.json ] || python3 models/export/lora_inputs.py $d --components transformer 2>&1 | tail -2
done
for s in a:1 b:2; do
  f=/tmp/lora-${s%%:*}.safetensors
  [ -f $f ] || python3 scripts/gpu/make_lora.py /tmp/sd3m/transformer/lora_targets.json --rank 64 --seed ${s##*:} --out $f
done
echo "stages 1-2: $(( $(date +%s) - t0 )) s"; ls -la /tmp/lora-*.safetensors; du -sh /tmp/sd3m/transformer /tmp/sd3m-fused/transformer
[ "${STAGE:-all}" = build ] && exit 0
source .ort-cuda/env.sh
# The binary travels xz-compressed when the tree is tight (64 MiB per call).
if [ -f .device-bin/lora_bench.xz ] && [ ! -x .device-bin/lora_bench ]; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/lora_bench.xz .device-bin/lora_bench
  chmod +x .device-bin/lora_bench
fi
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu-memory.csv" &
smi=$!
for v in ${VARIANTS:-sd3m sd3m-fused}; do
  echo "== ours: $v ($(date +%T))" >> "$OUT/gpu-memory.csv.marks"
  timeout ${OURS_TIMEOUT:-240} ./.device-bin/lora_bench --model /tmp/$v --ep cuda --lora /tmp/lora-a.safetensors \
    --lora /tmp/lora-b.safetensors --width 1024 --height 1024 --steps ${STEPS:-10} --guidance 7 --runs ${RUNS:-3} \
    --json "$OUT/lora-$v.json" 2> "$OUT/lora-$v.err" | tee "$OUT/lora-$v.md"
  tail -3 "$OUT/lora-$v.err"
done
if [ "${TORCH:-1}" = 1 ]; then
  echo "== diffusers ($(date +%T))" >> "$OUT/gpu-memory.csv.marks"
  timeout ${TORCH_TIMEOUT:-300} python3 scripts/gpu/bench_torch_lora.py --tokenizers-from models/fixtures/tiny-sd3 \
    --lora /tmp/lora-a.safetensors --lora /tmp/lora-b.safetensors ${COMPILE:+--compile} --json "$OUT/torch-lora.json" \
    2>&1 | grep -v Warning | tail -14 | tee "$OUT/torch-lora.md"
fi
kill $smi
echo "total: $(( $(date +%s) - t0 )) s"
