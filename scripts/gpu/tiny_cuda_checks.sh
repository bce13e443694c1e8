#!/usr/bin/env bash
# On the GPU machine, minutes: the CUDA code paths on the tiny fixtures, against the CPU provider, with no
# full-size build. (1) scripts/gpu/fused_check.sh: the fused operators (incl. SD3.5-medium's dual-attention rewrite)
# CUDA vs CPU kernels and fused vs unfused; (2) the device loop on CUDA vs the host loop (examples/benchmark --loop
# both prints the two loops' image and latent difference); (3) a ControlNet on CUDA (the residual mix on the device)
# vs the same request on the CPU provider. Needs .ort-cuda and .device-bin/benchmark(.xz), built with --features cuda.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source .ort-cuda/env.sh
if [ -f .device-bin/benchmark.xz ] && { [ ! -x .device-bin/benchmark ] || [ .device-bin/benchmark.xz -nt .device-bin/benchmark ]; }; then
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" .device-bin/benchmark.xz .device-bin/benchmark
  chmod +x .device-bin/benchmark
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
echo "== 1. fused operators"
bash scripts/gpu/fused_check.sh 2>&1 | tee "$OUT/fused_check.txt"
echo "== 2. device loop vs host loop on CUDA"
for m in tiny-sd3 tiny-sd35; do
  ./.device-bin/benchmark --model models/fixtures/$m --ep cuda --width 128 --height 128 --steps 8 --runs 1 --warmup 0 \
    --loop both 2>&1 | grep -i -E "differ|levels|latent|error|panicked" | tee -a "$OUT/device_loop.txt"
done
echo "== 3. ControlNet: CUDA vs CPU"
d=/tmp/cn-tiny; rm -rf $d; cp -r models/fixtures/tiny-sd3 $d; cp models/fixtures/controlnet/transformer/model_controlnet.onnx $d/transformer/
for ep in cpu cuda; do
  ./.device-bin/benchmark --model $d --ep $ep --width 64 --height 64 --steps 4 --runs 1 --warmup 0 --loop host \
    --controlnet models/fixtures/controlnet/instantx --output "$OUT/cn-$ep.png" 2>&1 | grep -E "error|panicked|ControlNet Session" | tail -3
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/controlnet.txt"
import sys, numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"{sys.argv[1]}/cn-{e}.png")).astype(int) for e in ("cuda", "cpu"))
print(f"ControlNet tiny, CUDA vs CPU provider: max {np.abs(a - b).max()} levels, mean {np.abs(a - b).mean():.4f}")
PY
