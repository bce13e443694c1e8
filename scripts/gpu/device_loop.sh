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
# CUDA_GRAPH=1 adds, and CUDA_GRAPH=only runs alone, the CUDA-graph comparison (issue 19, "CUDA graphs"):
# examples/benchmark --cuda-graph on the fused folder (/tmp/sd3m-fused), the device loop with a static shape
# without and then with CudaOptions::cuda_graph, and one table row per sampler: ms per step without / with, the
# gain, and the two runs' image and latent difference (0 levels expected; whatever it is, it is printed).
# STEP_GRAPH=1 adds, and STEP_GRAPH=only runs alone, the fused step's comparison (issue 19, our time outside ONNX
# Runtime): examples/benchmark --step-graph both on the fused folder, the device loop with its Euler steps as the
# stock operators' graph and then as our one EulerStepF16 node, for guidance 7 and 1; one row each: the steps' time
# outside Session::run per image, ms per step, and the two runs' image and latent difference (0 expected: the
# kernel computes the stock graph's values; `step_cuda` in cuda_lib_tests.sh checks that to the bit).
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
if { [[ " ${VARIANTS:-sd3m-fused sd3m} " == *" sd3m-fused "* ]] || [ "${CUDA_GRAPH:-0}" != 0 ] || [ "${STEP_GRAPH:-0}" != 0 ]; } \
    && [ ! -f /tmp/sd3m-fused/transformer/model.onnx ]; then
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
{ [ "${CUDA_GRAPH:-0}" = only ] || [ "${STEP_GRAPH:-0}" = only ]; } && VARIANTS=none
for v in ${VARIANTS:-sd3m-fused sd3m}; do
  [ "$v" = none ] && continue
  for s in ${SAMPLERS:-euler}; do
    echo "== ours: $v, $s ($(date +%T))"
    timeout ${OURS_TIMEOUT:-400} ./.device-bin/benchmark --model /tmp/$v $ARGS --sampler $s \
      --json "$OUT/loop-$v-$s.json" --output "$OUT/loop-$v-$s.png" 2> "$OUT/loop-$v-$s.err" | tee "$OUT/loop-$v-$s.md"
    tail -4 "$OUT/loop-$v-$s.err"
  done
done
if [ "${CUDA_GRAPH:-0}" != 0 ]; then
  GARGS="--ep cuda --width 1024 --height 1024 --steps ${STEPS:-28} --guidance 7 --runs ${RUNS:-3} --warmup 1 --cuda-graph"
  ROWS="$OUT/cuda-graph-rows.md"
  echo "| folder | sampler | device loop ms/step | + CUDA graph ms/step | gain | image max / mean levels | latents max diff |" > "$ROWS"
  echo "|---|---|---:|---:|---:|---|---:|" >> "$ROWS"
  for s in ${SAMPLERS:-euler}; do
    echo "== ours: sd3m-fused, $s, CUDA graph ($(date +%T))"
    base="$OUT/cudagraph-sd3m-fused-$s"
    timeout ${OURS_TIMEOUT:-400} ./.device-bin/benchmark --model /tmp/sd3m-fused $GARGS --sampler $s \
      --json "$base.json" --output "$base.png" 2> "$base.err" | tee "$base.md"
    echo "exit status: ${PIPESTATUS[0]}" >> "$base.err"
    tail -4 "$base.err"
    python3 - "$base.json" "$base.md" "$base.err" "$s" >> "$ROWS" <<'PY'
import json, re, sys
path, md, err, sampler = sys.argv[1:5]
try:
    by = json.load(open(path))["medians_ms_by_loop"]
    a = by["device loop"]["per step (whole loop / steps)"]
    b = by["device loop + CUDA graph"]["per step (whole loop / steps)"]
    m = re.search(r"first image max (\d+) levels, mean ([0-9.]+); final latents max \|diff\| (\S+)", open(md).read())
    diff = (m.group(1) + " / " + m.group(2), m.group(3)) if m else ("?", "?")
    print(f"| sd3m-fused | {sampler} | {a:.2f} | {b:.2f} | {100 * (a - b) / a:+.1f}% | {diff[0]} | {diff[1]} |")
except Exception as e:  # the run failed: say so in the row, with the error's last line
    lines = [l for l in open(err).read().splitlines() if l.strip()] if err else []
    last = lines[-2] if len(lines) >= 2 else (lines[-1] if lines else "no output")
    print(f"| sd3m-fused | {sampler} | failed: {type(e).__name__} | {last[:160]} | | | |")
PY
  done
  cat "$ROWS"
fi
if [ "${STEP_GRAPH:-0}" != 0 ]; then
  ROWS="$OUT/step-graph-rows.md"
  echo "| guidance | stock: step graphs ms/image | fused: step graphs ms/image | stock ms/step | fused ms/step | outside ORT ms (stock / fused) | image max / mean levels | latents max diff |" > "$ROWS"
  echo "|---:|---:|---:|---:|---:|---|---|---:|" >> "$ROWS"
  for g in 7 1; do
    echo "== ours: sd3m-fused, euler, guidance $g, stock vs fused step ($(date +%T))"
    base="$OUT/stepgraph-sd3m-fused-g$g"
    timeout ${OURS_TIMEOUT:-400} ./.device-bin/benchmark --model /tmp/sd3m-fused --ep cuda --width 1024 --height 1024 \
      --steps ${STEPS:-28} --guidance $g --runs ${RUNS:-3} --warmup 1 --step-graph both \
      --json "$base.json" --output "$base.png" 2> "$base.err" | tee "$base.md"
    echo "exit status: ${PIPESTATUS[0]}" >> "$base.err"
    tail -4 "$base.err"
    python3 - "$base.json" "$base.md" "$base.err" "$g" >> "$ROWS" <<'PY'
import json, re, sys
path, md, err, g = sys.argv[1:5]
try:
    by = json.load(open(path))["medians_ms_by_loop"]
    a, b = by["device loop, stock step graph"], by["device loop, fused step"]
    k = next(k for k in a if k.strip().startswith("loop inside the steps"))
    o = next(k for k in a if k.strip().startswith("outside ONNX Runtime"))
    s = "per step (whole loop / steps)"
    m = re.search(r"first image max (\d+) levels, mean ([0-9.]+); final latents max \|diff\| (\S+)", open(md).read())
    diff = (m.group(1) + " / " + m.group(2), m.group(3)) if m else ("?", "?")
    print(f"| {g} | {a[k]:.2f} | {b[k]:.2f} | {a[s]:.2f} | {b[s]:.2f} | {a[o]:.2f} / {b[o]:.2f} | {diff[0]} | {diff[1]} |")
except Exception as e:  # the run failed: say so in the row, with the error's last line
    lines = [l for l in open(err).read().splitlines() if l.strip()] if err else []
    last = lines[-2] if len(lines) >= 2 else (lines[-1] if lines else "no output")
    print(f"| {g} | failed: {type(e).__name__} | {last[:160]} | | | | | |")
PY
  done
  cat "$ROWS"
fi
echo "total: $(( $(date +%s) - t0 )) s"
