#!/usr/bin/env bash
# On the GPU machine: the fused operators (src/runtime/kernels, CUDA versions) against their CPU versions and
# against the unfused float16 graph, on the tiny fixture (models/fixtures/export-tiny-fp16{,-fused} in a copy of
# tiny-sd3), through .device-bin/txt2img (built with --features cuda). Prints the pixel differences; writes the
# images to $OUT. With a second argument pair A B (two model folders, e.g. /tmp/sd3m /tmp/sd3m-fused) it also
# compares one full-size image of each.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for v in plain fused; do
  d=/tmp/tf-$v; rm -rf "$d"; cp -r models/fixtures/tiny-sd3 "$d"
  src=models/fixtures/export-tiny-fp16; [ "$v" = fused ] && src=models/fixtures/export-tiny-fp16-fused
  cp "$src/transformer/model.onnx" "$d/transformer/model.onnx"
  for ep in cpu cuda; do
    ./.device-bin/txt2img --model "$d" --prompt "a red circle above a blue square" --width 64 --height 96 \
      --steps 8 --seed 7 --ep "$ep" --output "$OUT/tiny-$v-$ep.png" 2>&1 | grep -E "error|wrote|transformer" | tail -3
  done
done
if [ $# -ge 2 ]; then
  for m in "$1" "$2"; do
    ./.device-bin/txt2img --model "$m" --prompt "a photo of a cat" --width 1024 --height 1024 --steps 4 --seed 1 \
      --ep cuda --output "$OUT/full-$(basename "$m").png" 2>&1 | grep -E "error|wrote|transformer" | tail -3
  done
fi
python3 - "$OUT" "$@" <<'PY'
import sys, os
import numpy as np
from PIL import Image
out = sys.argv[1]
def img(n):
    p = os.path.join(out, n)
    return np.asarray(Image.open(p)).astype(np.int32) if os.path.exists(p) else None
pairs = [("tiny-fused-cuda.png", "tiny-fused-cpu.png", "fused ops: CUDA vs CPU kernels"),
         ("tiny-fused-cuda.png", "tiny-plain-cuda.png", "CUDA: fused vs unfused fp16 graph"),
         ("tiny-plain-cuda.png", "tiny-plain-cpu.png", "unfused fp16 graph: CUDA vs CPU")]
if len(sys.argv) >= 4:
    a, b = (os.path.basename(x.rstrip("/")) for x in sys.argv[2:4])
    pairs.append((f"full-{b}.png", f"full-{a}.png", f"1024x1024, 4 steps: {b} vs {a} (CUDA)"))
for x, y, what in pairs:
    a, b = img(x), img(y)
    if a is None or b is None:
        print(f"{what}: missing image"); continue
    d = np.abs(a - b)
    print(f"{what}: max {d.max()} levels, mean {d.mean():.4f}, pixels > 2 levels {100 * (d.max(-1) > 2).mean():.3f}%")
PY
