#!/usr/bin/env bash
# On the GPU machine, after build_sd3m.sh: our pipeline with ONNX Runtime's attention kernel choices
# (default; cuDNN SDPA forced on with ORT_ENABLE_CUDNN_FLASH_ATTENTION=1; flash attention off with
# ORT_DISABLE_FLASH_ATTENTION=1), then diffusers eager / torch.compile in the same call. Writes $OUT/table.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
ARGS="--width 1024 --height 1024 --steps 28 --guidance 7 --runs ${RUNS:-3} --warmup 1"
for v in sd3m sd3m-cudnn sd3m-noflash; do
  case "$v" in
    sd3m-cudnn) envs="ORT_ENABLE_CUDNN_FLASH_ATTENTION=1";;
    sd3m-noflash) envs="ORT_DISABLE_FLASH_ATTENTION=1";;
    *) envs="";;
  esac
  echo "== ours: $v $envs"
  env $envs timeout 240 ./.device-bin/benchmark --model /tmp/sd3m --ep cuda $ARGS --json "$OUT/ours-$v.json" 2>&1 \
    | grep -E "^\| (end to end|  transformer|VAE)" | tee "$OUT/ours-$v.log"
done
if [ "${TORCH:-1}" = 1 ]; then
  timeout ${TORCH_TIMEOUT:-360} python3 scripts/gpu/bench_torch.py --variant sd3-medium \
    --tokenizers-from models/fixtures/tiny-sd3 --runs ${RUNS:-3} --json "$OUT/torch.json" 2>&1 | grep -E "^(eager|compile):"
fi
python3 scripts/gpu/table.py "$OUT" | tee "$OUT/table.md"
