#!/usr/bin/env bash
# On the GPU machine: the fused operators (src/runtime/kernels, CUDA versions) against their CPU versions and
# against the unfused float16 graphs, on the tiny fixtures (models/fixtures/export-tiny-fp16{,-fused},
# export-tiny-qk-fp16{,-fused} and export-tiny-dual-fp16{,-fused} (dual attention), each in a copy of tiny-sd3),
# through $BIN (default .device-bin/benchmark, built with --features cuda; one run, its fixed seed). Prints the pixel
# differences; writes the images to $OUT. Arguments, in pairs A B (two model folders, e.g. /tmp/sd3m
# /tmp/sd3m-fused): one full-size image of each (1024x1024, 4 steps, CUDA), compared.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BIN=${BIN:-./.device-bin/benchmark}
for v in tiny tiny-fused tiny-qk tiny-qk-fused tiny-dual tiny-dual-fused; do
  d=/tmp/tf-$v; rm -rf "$d"; cp -r models/fixtures/tiny-sd3 "$d"
  src=models/fixtures/export-${v/-fused/}-fp16; [ "${v%-fused}" != "$v" ] && src=$src-fused
  cp "$src/transformer/model.onnx" "$d/transformer/model.onnx"
  for ep in cpu cuda; do
    "$BIN" --model "$d" --prompt "a red circle above a blue square" --width 64 --height 96 \
      --steps 8 --runs 1 --warmup 0 --ep "$ep" --output "$OUT/$v-$ep.png" 2>&1 | grep -E "error|panicked" | tail -3
  done
done
pairs=()
while [ $# -ge 2 ]; do
  for m in "$1" "$2"; do
    "$BIN" --model "$m" --prompt "a photo of a cat" --width 1024 --height 1024 --steps 4 \
      --runs 1 --warmup 0 --ep cuda --output "$OUT/full-$(basename "$m").png" 2>&1 | grep -E "error|panicked" | tail -3
  done
  pairs+=("$(basename "$1")" "$(basename "$2")"); shift 2
done
python3 - "$OUT" "${pairs[@]}" <<'PY'
import sys, os
import numpy as np
from PIL import Image
out = sys.argv[1]
def img(n):
    p = os.path.join(out, n)
    return np.asarray(Image.open(p)).astype(np.int32) if os.path.exists(p) else None
pairs = []
for t in ("tiny", "tiny-qk", "tiny-dual"):
    pairs += [(f"{t}-fused-cuda.png", f"{t}-fused-cpu.png", f"{t}: fused ops, CUDA vs CPU kernels"),
              (f"{t}-fused-cuda.png", f"{t}-cuda.png", f"{t}: CUDA, fused vs unfused fp16 graph"),
              (f"{t}-cuda.png", f"{t}-cpu.png", f"{t}: unfused fp16 graph, CUDA vs CPU")]
rest = sys.argv[2:]
for a, b in zip(rest[::2], rest[1::2]):
    pairs.append((f"full-{b}.png", f"full-{a}.png", f"1024x1024, 4 steps: {b} vs {a} (CUDA)"))
for x, y, what in pairs:
    a, b = img(x), img(y)
    if a is None or b is None:
        print(f"{what}: missing image"); continue
    d = np.abs(a - b)
    print(f"{what}: max {d.max()} levels, mean {d.mean():.4f}, pixels > 2 levels {100 * (d.max(-1) > 2).mean():.3f}%")
PY
