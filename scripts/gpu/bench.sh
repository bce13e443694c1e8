#!/usr/bin/env bash
# On the GPU machine, after build_sd3m.sh: our pipeline (CUDA EP) and diffusers (eager, torch.compile) on the same
# card, same random weights, one 1024x1024 image, 28 steps, CFG 7. Results go to $OUT (json + logs) and a table
# is printed. Binaries come from .device-bin/ (cargo build --release --features cuda --example benchmark).
# VARIANTS (default sd3m): folders /tmp/<variant>; sd3m-fused is made from /tmp/sd3m by models/export/fused_kernels.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
ARGS="--width 1024 --height 1024 --steps 28 --guidance 7 --runs ${RUNS:-3} --warmup 1"
variants=${VARIANTS:-sd3m}
for v in $variants; do
  extra=""
  case "$v" in *-static) extra="--static"; dir=/tmp/${v%-static};; *) dir=/tmp/$v;; esac
  if [ "$v" = sd3m-fused ] && [ ! -f "$dir/transformer/model.onnx" ]; then  # /tmp/sd3m rewritten (--fused-kernels)
    python3 models/export/fused_kernels.py /tmp/sd3m "$dir" || continue
  fi
  if [ "$v" = sd3m-dyn ]; then   # the dynamo transformer with the other components of /tmp/sd3m
    for c in /tmp/sd3m/*; do [ -e "$dir/$(basename "$c")" ] || ln -s "$c" "$dir/"; done
  fi
  echo "== ours: $v"
  prof=""; [ "${PROFILE:-0}" = 1 ] && prof="--profile /tmp/prof-$v"
  timeout ${OURS_TIMEOUT:-300} ./.device-bin/benchmark --model "$dir" --ep cuda $ARGS $extra --json "$OUT/ours-$v.json" \
    --output "$OUT/ours-$v.png" $prof 2>&1 | grep -v "^profile:" | tail -16 | tee "$OUT/ours-$v.log"
  if [ -n "$prof" ]; then
    for c in transformer vae_decoder text_encoder_3; do
      f=$(ls /tmp/prof-$v/${c}_*.json 2>/dev/null | head -1)
      [ -n "$f" ] && python3 scripts/gpu/profile_summary.py "$f" --top 15
    done > "$OUT/profile-$v.md" 2>&1
    head -25 "$OUT/profile-$v.md"
  fi
done
if [ "${TORCH:-1}" = 1 ]; then
  echo "== diffusers (PyTorch)"
  timeout ${TORCH_TIMEOUT:-400} python3 scripts/gpu/bench_torch.py --variant sd3-medium \
    --tokenizers-from models/fixtures/tiny-sd3 --runs ${RUNS:-3} --json "$OUT/torch.json" 2>&1 | tail -30 | tee "$OUT/torch.log"
fi
python3 scripts/gpu/table.py "$OUT" | tee "$OUT/table.md"
