#!/usr/bin/env bash
# The committed nano model (models/sd3-nano) as fused float16 and FP8 (E4M3) model folders (issue 19), with the
# project's own export tools, on the CPU in about two minutes:
#   bash models/nano/export_fp8.sh OUT_DIR          [PYTHON=.venv-nano/bin/python]
#
# 1. from_onnx.py rebuilds the PyTorch modules from the committed graphs (the training checkpoint is lost; the
#    transformer's weights are the graph's int8 values dequantized) -> OUT/pt, a diffusers pipeline folder.
# 2. export_sd3.py --model OUT/pt --dtype fp16 --components transformer (TorchScript, fused attention: the graph
#    fused_kernels.py expects) -> OUT/export.
# 3. OUT/nano-fp16: models/sd3-nano with that float16 transformer (everything else hard-linked, or copied where
#    links cannot be made: text encoders, VAE, tokenizers, scheduler and model_index.json are the committed ones;
#    manifest.json is the export's, for the transformer).
# 4. fused_kernels.py OUT/nano-fp16 OUT/nano-fused (Linear / LinearConcat / LinearSplit / ModNorm / HeadRmsNorm),
#    fused_kernels.py --fp8 OUT/nano-fp16 OUT/nano-fp8 (LinearFp8 / LinearConcatFp8 / LinearSplitFp8, E4M3
#    weights with one scale each, activations scaled per tensor on the fly).
# 5. Checks the CUDA FP8 rule (src/runtime/kernels/cuda.rs, fp8_dims: K and N multiples of 16) on every FP8 weight
#    of OUT/nano-fp8 and prints the operator counts and folder sizes.
# Each step is skipped when its output exists. Needs diffusers 0.35.2 (from_onnx.py's probe exports must equal the
# committed graphs node for node): .venv-nano here; on the GPU machine, .whl-nano/ (scripts/gpu/nano_fp8.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${1:?usage: export_fp8.sh OUT_DIR}
PY=${PYTHON:-.venv-nano/bin/python}
[ -x "$PY" ] || PY=python3
SRC=models/sd3-nano
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# temporary files (the exporters' scratch folders) under OUT, not in a /tmp that other jobs may clean
mkdir -p "$OUT/tmp"; export TMPDIR=$OUT/tmp
t0=$(date +%s)
[ -f "$OUT/pt/transformer/config.json" ] || "$PY" models/nano/from_onnx.py --model "$SRC" --out "$OUT/pt" \
  > "$OUT/from_onnx.log" 2>&1 || { tail -20 "$OUT/from_onnx.log"; exit 1; }
grep -h '"max_abs_diff"' "$OUT/from_onnx.log" 2>/dev/null | sed 's/:.*"max_abs_diff": \([^,]*\).*/: rebuilt, max |torch - graph| \1/' || true
[ -f "$OUT/export/transformer/model.onnx" ] || "$PY" models/export/export_sd3.py --model "$OUT/pt" --dtype fp16 \
  --components transformer --out "$OUT/export" > "$OUT/export.log" 2>&1 || { tail -20 "$OUT/export.log"; exit 1; }
if [ ! -f "$OUT/nano-fp16/transformer/model.onnx" ]; then
  rm -rf "$OUT/nano-fp16"; mkdir -p "$OUT/nano-fp16"
  for e in "$SRC"/*; do
    n=$(basename "$e")
    case $n in transformer | manifest.json) continue ;; esac
    cp -al "$e" "$OUT/nano-fp16/$n" 2>/dev/null || cp -a "$e" "$OUT/nano-fp16/$n"
  done
  cp -a "$OUT/export/transformer" "$OUT/export/manifest.json" "$OUT/nano-fp16/"
fi
[ -f "$OUT/nano-fused/transformer/model.onnx" ] || "$PY" models/export/fused_kernels.py "$OUT/nano-fp16" "$OUT/nano-fused"
[ -f "$OUT/nano-fp8/transformer/model.onnx" ] || "$PY" models/export/fused_kernels.py --fp8 "$OUT/nano-fp16" "$OUT/nano-fp8"
"$PY" - "$OUT" <<'PY'
import collections, sys
import onnx
out = sys.argv[1]
for name in ("nano-fp16", "nano-fused", "nano-fp8"):
    m = onnx.load(f"{out}/{name}/transformer/model.onnx")
    ops = collections.Counter(n.op_type for n in m.graph.node if n.domain == "sd3onnx")
    print(f"{name}: {len(m.graph.node)} nodes; sd3onnx operators {dict(ops) or 'none'}")
m = onnx.load(f"{out}/nano-fp8/transformer/model.onnx")
inits = {t.name: t for t in m.graph.initializer}
bad, shapes = [], collections.Counter()
for n in m.graph.node:
    if n.domain != "sd3onnx" or not n.op_type.endswith("Fp8"):
        continue
    for i in n.input:
        t = inits.get(i)
        if t is not None and t.data_type == onnx.TensorProto.UINT8:
            N, K = t.dims
            shapes[(N, K)] += 1
            if K % 16 or N % 16:
                bad.append(f"{n.name}: {i} [N {N}, K {K}]")
print("FP8 weights [N, K]:", ", ".join(f"{s[0]}x{s[1]} x{c}" for s, c in sorted(shapes.items())))
if bad:
    sys.exit("CUDA FP8 needs K and N multiples of 16; not so for:\n  " + "\n  ".join(bad))
print(f"all {sum(shapes.values())} FP8 weights have K and N multiples of 16")
PY
du -sh "$OUT"/nano-fp16/transformer "$OUT"/nano-fused/transformer "$OUT"/nano-fp8/transformer "$SRC"/transformer
echo "export_fp8.sh: $(( $(date +%s) - t0 )) s -> $OUT/nano-fp16, $OUT/nano-fused, $OUT/nano-fp8"
