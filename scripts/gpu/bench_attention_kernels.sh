#!/usr/bin/env bash
# On the GPU machine, after build_sd3m.sh: the transformer's time per step with each attention kernel ONNX Runtime's
# CUDA provider offers for the fused MultiHeadAttention (benchmark --attention: the provider's sdpa_kernel option).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee "$OUT/attention.md"
echo "| attention | transformer ms/step | loop ms/step | end to end ms | VAE ms |" >> "$OUT/attention.md"
echo "|---|---:|---:|---:|---:|" >> "$OUT/attention.md"
for k in ${KERNELS:-auto flash efficient cudnn}; do
  timeout 150 ./.device-bin/benchmark --model /tmp/sd3m --ep cuda --width 1024 --height 1024 --steps 28 --guidance 7 \
    --runs ${RUNS:-3} --warmup 1 --attention "$k" > "$OUT/attention-$k.log" 2>&1 || { echo "$k failed"; tail -5 "$OUT/attention-$k.log"; }
  v() { grep "^| $1" "$OUT/attention-$k.log" | head -1 | awk -F'|' '{print $3}' | tr -d ' '; }
  echo "| $k | $(v '  transformer') | $(v '  per step') | $(v 'end to end') | $(v 'VAE decode') |" >> "$OUT/attention.md"
done
cat "$OUT/attention.md"
