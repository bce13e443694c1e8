#!/usr/bin/env bash
# On the GPU machine (compute capability 8.9 or newer: H100/H200, L4/L40, RTX 40xx): the FP8 matrix products of
# issue 19 (`models/export/fused_kernels.py --fp8`: LinearFp8 / LinearConcatFp8 / LinearSplitFp8, cuBLASLt E4M3
# matmuls; src/runtime/kernels). First H200 run (2026-12-03, docs/gpu-results/2026-12-03-h200-round19): the
# kernel check passed after two fixes; the full-size FP8 rewrite then failed on the machine's onnx 1.23 (hard-linked
# external data, since fixed in fused_kernels.py), so the FP8 rows of the time stage are still to be measured.
# Stages (each skipped when its output exists, so a later call on a warm machine continues):
#   build   /tmp/sd3m (build_sd3m.sh: SD3-medium shapes, random weights, fp16; TEXT_LAYERS=1 by default: the text
#           encoders are not what is measured), /tmp/sd3m-fused (fused_kernels.py) and /tmp/sd3m-fp8
#           (fused_kernels.py --fp8: the same rewrite with E4M3 weights, in transformer/model_fp8.onnx_data;
#           hard links for the rest, seconds);
#   check   (1) the FP8 kernels on CUDA against the Python emulation of the FP8 operators, through the crate's lib
#           test binary built with --features cuda (`fp8_cuda_kernels_match_the_python_emulation`: the operator
#           graph models/fixtures/fp8/ops.onnx and both tiny FP8 transformers; prints max / mean differences);
#           (2) the tiny FP8 fixtures (export-tiny{,-dual}-fp16-fused-fp8 in a copy of tiny-sd3) on CUDA vs the CPU
#           kernels and vs the float16 fused graphs (images, examples/benchmark);
#           (3) SD3-medium shapes at 1024x1024, 28 steps, CFG 7, same seed: fp8 vs fp16-fused on CUDA, final latents
#           (examples/benchmark --latents: max and mean |diff|, relative to the fp16 latents' mean magnitude) and
#           image PSNR / max / mean levels;
#   time    examples/benchmark (28 steps, medians of RUNS=3 after 1 warm-up) on sd3m-fused, sd3m-fp8 (q/k/v merged:
#           LinearConcat3Fp8), sd3m-fp8s (static scales), sd3m-fp8sf (FAST=1: sd3m-fp8s with cuBLASLt's fast
#           accumulation, fused_kernels.py --fp8-fast-accum), sd3m-fp8sfm (MLP=1: sd3m-fp8sf with the
#           feed-forwards as MlpFp8, --fp8-merge-mlp; MLP=2 also sd3m-fp8sm from sd3m-fp8s) and sd3m-fp8sep
#           (SEPARATE=1: --fp8-separate-qkv) with peak
#           GPU memory (nvidia-smi every 20 ms minus idle), then diffusers eager / torch.compile on the transformer
#           alone (bench_torch.py --transformer-only; TORCH_FULL=1: the whole pipeline; TORCH=0 skips it), the table
#           (table.py) to $OUT/table.md.
# If cuBLASLt has no FP8 algorithm for a shape, the kernel's error names it ("cuBLASLt found no algorithm for
# ..."): the tiny fixtures' K = 16 is the likeliest such case (SD3's widths are multiples of 64).
# STAGE=build | check | time | measure (check + time) | all (default). Carry: .whl (diffusers 0.42.1, for the build
# and PyTorch), .ort-cuda (the CUDA bundle, in pieces as sd35m.sh says), .device-bin/benchmark(.xz) and
# .device-bin/sd3onnx-lib-tests(.xz): both built with --features cuda from this commit or later, e.g.
#   cargo build --release --features cuda --example benchmark
#   cargo test --release --features cuda --lib --no-run   # prints the test binary: copy it to .device-bin/
#                                                         # sd3onnx-lib-tests and xz it if large
# BENCH_ARGS: more flags for the time stage's examples/benchmark runs (e.g. "--step-graph stock": the device loop's
# Euler steps as the stock operators' graph instead of the fused EulerStepF16 node, should that node fail on the
# GPU). CHECK_TIMEOUT, OURS_TIMEOUT and TORCH_TIMEOUT bound each step. Results in /tmp/fp8-results; $OUT gets at most 8
# files: table.md, check.txt, log.txt, torch.json, the two full-size images (full-sd3m-fused.png, full-sd3m-fp8.png)
# and ours.tar (ours-*.json of each variant, full-sd3m-fp8s.png).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FINAL=$OUT; OUT=/tmp/fp8-results; mkdir -p "$OUT/check"
STAGE=${STAGE:-all}
collect() {  # at most 8 files back
  tail -n +1 "$OUT"/card.txt "$OUT"/build.log "$OUT"/rewrite.log "$OUT"/ours-*.log "$OUT"/peak-*.txt "$OUT"/torch.log \
    2>/dev/null > "$FINAL/log.txt"
  for f in table.md check.txt torch.json check/full-sd3m-fused.png check/full-sd3m-fp8.png; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"
  done
  ( cd "$OUT" && tar cf "$FINAL/ours.tar" ours-*.json check/full-sd3m-fp8s*.png 2>/dev/null )
}
trap collect EXIT
# The quality figures from whatever images and latents $OUT/check holds (check 2 and 3, or the time stage).
quality() {
  python3 - "$OUT/check" <<'PY'
import os, sys
import numpy as np
from PIL import Image
d = sys.argv[1]
def img(n):
    p = os.path.join(d, n)
    return np.asarray(Image.open(p)).astype(np.float64) if os.path.exists(p) else None
def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
for t in ("tiny", "tiny-dual"):
    for x, y, what in [(f"{t}-fp16-fused-fp8-cuda.png", f"{t}-fp16-fused-fp8-cpu.png", f"{t}: FP8 ops, CUDA vs CPU kernels"),
                       (f"{t}-fp16-fused-fp8-cuda.png", f"{t}-fp16-fused-cuda.png", f"{t}: CUDA, FP8 vs float16 fused"),
                       (f"{t}-fp16-fused-fp8-cpu.png", f"{t}-fp16-fused-cpu.png", f"{t}: CPU, FP8 vs float16 fused")]:
        a, b = img(x), img(y)
        if a is None or b is None:
            print(f"{what}: missing image"); continue
        e = np.abs(a - b)
        print(f"{what}: max {e.max():.0f} levels, mean {e.mean():.4f}, PSNR {psnr(a, b):.2f} dB")
a, b = img("full-sd3m-fp8.png"), img("full-sd3m-fused.png")
if a is not None and b is not None:
    e = np.abs(a - b)
    print(f"SD3-medium 1024x1024 28 steps: FP8 vs float16 fused image: max {e.max():.0f} levels, mean {e.mean():.3f}, "
          f"PSNR {psnr(a, b):.2f} dB")
for v, what in (("sd3m-fp8s", "FP8 static scales"), ("sd3m-fp8sf", "FP8 static scales, fast accumulation"),
                ("sd3m-fp8sm", "FP8 static scales, MlpFp8"), ("sd3m-fp8sfm", "FP8 static, fast accumulation, MlpFp8")):
    a = img(f"full-{v}.png")
    if a is not None and b is not None:
        e = np.abs(a - b)
        print(f"SD3-medium 1024x1024 28 steps: {what} vs float16 fused image: max {e.max():.0f} levels, "
              f"mean {e.mean():.3f}, PSNR {psnr(a, b):.2f} dB")
# q/k/v merged (sd3m-fp8) against separate (sd3m-fp8sep): the same arithmetic, so 0 expected
la, lb = (os.path.join(d, f"latents-{x}.f32") for x in ("sd3m-fp8", "sd3m-fp8sep"))
if os.path.exists(la) and os.path.exists(lb):
    e = np.abs(np.fromfile(la, "<f4") - np.fromfile(lb, "<f4"))
    print(f"SD3-medium final latents, FP8 q/k/v merged vs separate: max |diff| {e.max():.4g}, mean {e.mean():.4g}")
for v, what in (("sd3m-fp8", "FP8"), ("sd3m-fp8s", "FP8 static scales"),
                ("sd3m-fp8sf", "FP8 static scales, fast accumulation"), ("sd3m-fp8sm", "FP8 static scales, MlpFp8"),
                ("sd3m-fp8sfm", "FP8 static, fast accumulation, MlpFp8")):
    la, lb = (os.path.join(d, f"latents-{x}.f32") for x in (v, "sd3m-fused"))
    if os.path.exists(la) and os.path.exists(lb):
        x, y = np.fromfile(la, "<f4"), np.fromfile(lb, "<f4")
        e = np.abs(x - y)
        print(f"SD3-medium final latents, {what} vs float16 fused: max |diff| {e.max():.4g}, mean {e.mean():.4g} "
              f"(float16 latents' mean |value| {np.abs(y).mean():.4g}; relative mean {e.mean() / np.abs(y).mean():.4g})")
PY
}
want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ] || { [ "$STAGE" = measure ] && [ "$1" != build ]; }; }
unxz() {  # .device-bin/NAME or NAME.xz -> /tmp/fp8-bin/NAME
  mkdir -p /tmp/fp8-bin
  if [ -x ".device-bin/$1" ]; then cp ".device-bin/$1" "/tmp/fp8-bin/$1"
  elif [ -f ".device-bin/$1.xz" ]; then
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" ".device-bin/$1.xz" "/tmp/fp8-bin/$1"
  fi
  [ -f "/tmp/fp8-bin/$1" ] && chmod +x "/tmp/fp8-bin/$1"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/card.txt"
t0=$(date +%s)
[ -f .ort-cuda/env.sh ] && ( source .ort-cuda/env.sh )
unxz benchmark; unxz sd3onnx-lib-tests
BIN=/tmp/fp8-bin/benchmark
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  mkdir -p /tmp/site && pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
fi
if want build || [ ! -f /tmp/sd3m-fp8/transformer/model.onnx ]; then
  if [ ! -f /tmp/sd3m/transformer/model.onnx ] && [ ! -f /tmp/sd3m.started ]; then
    # check what the build needs before leaving the marker: a marker left by a build that never started made
    # the next call wait for nothing (2026-12-03, a fresh machine without .whl: the device time ran out)
    python3 -c "import diffusers" 2>/dev/null || { echo "no diffusers on this machine: carry .whl (a fresh machine?)"; exit 1; }
    touch /tmp/sd3m.started
    TEXT_LAYERS=${TEXT_LAYERS:-1} bash scripts/gpu/build_sd3m.sh || { rm -f /tmp/sd3m.started; exit 1; }
  fi
  bash scripts/gpu/wait.sh ${BUILD_WAIT:-500} > "$OUT/build.log" 2>&1; tail -8 "$OUT/build.log"
  for c in transformer text_encoder text_encoder_2 text_encoder_3 vae_decoder; do
    [ -f /tmp/sd3m/$c/model.onnx ] || { echo "not built (yet): /tmp/sd3m/$c"; exit 1; }
  done
  [ -f /tmp/sd3m-fused/transformer/model.onnx ] \
    || python3 models/export/fused_kernels.py /tmp/sd3m /tmp/sd3m-fused 2>&1 | tail -2 | tee "$OUT/rewrite.log"
  # STATIC=1 (default): also /tmp/sd3m-fp8s, the same FP8 graph with calibrated static activation scales
  # (fp8_calibrate.py on the float16 fused graph: numpy, random latents 32x32 and conditioning, margin 1.5), so
  # that the time stage measures what dynamic scaling (the amax pass) costs against static scales. The
  # calibration (minutes of numpy) runs beside the FP8 rewrite.
  calib=""
  if [ "${STATIC:-1}" = 1 ] && [ ! -f /tmp/sd3m-fp8s/transformer/model.onnx ] && [ ! -f /tmp/fp8-scales.json ]; then
    ( ts=$(date +%s)
      python3 models/export/fp8_calibrate.py /tmp/sd3m-fused/transformer/model.onnx /tmp/fp8-scales.json --runs 3 \
        --margin 1.5 --latent 32x32 --context 333 > /tmp/fp8-calibrate.log 2>&1
      echo "calibration: exit $? after $(( $(date +%s) - ts )) s" >> /tmp/fp8-calibrate.log ) &
    calib=$!
  fi
  [ -f /tmp/sd3m-fp8/transformer/model.onnx ] \
    || python3 models/export/fused_kernels.py --fp8 /tmp/sd3m /tmp/sd3m-fp8 2>&1 | tail -2 | tee -a "$OUT/rewrite.log"
  echo "build: $(( $(date +%s) - t0 )) s"; du -sh /tmp/sd3m/transformer /tmp/sd3m-fp8/transformer/model_fp8.onnx_data
  # SEPARATE=1 (default): also /tmp/sd3m-fp8sep (--fp8-separate-qkv: q, k and v as three LinearConcatFp8 nodes,
  # each quantizing the same activations, as before share_qkv_fp8), so that the time stage measures the merge
  [ "${SEPARATE:-1}" = 1 ] && [ ! -f /tmp/sd3m-fp8sep/transformer/model.onnx ] \
    && python3 models/export/fused_kernels.py --fp8 --fp8-separate-qkv /tmp/sd3m /tmp/sd3m-fp8sep 2>&1 | tail -2 \
      | tee -a "$OUT/rewrite.log"
  if [ "${STATIC:-1}" = 1 ] && [ ! -f /tmp/sd3m-fp8s/transformer/model.onnx ]; then
    ts=$(date +%s)
    [ -n "$calib" ] && wait "$calib"
    tail -3 /tmp/fp8-calibrate.log 2>/dev/null | tee -a "$OUT/rewrite.log"
    [ -f /tmp/fp8-scales.json ] && python3 models/export/fused_kernels.py --fp8 --fp8-scales /tmp/fp8-scales.json \
      /tmp/sd3m /tmp/sd3m-fp8s 2>&1 | tail -2 | tee -a "$OUT/rewrite.log"
    echo "static scales (after the FP8 rewrite): $(( $(date +%s) - ts )) s" | tee -a "$OUT/rewrite.log"
  fi
fi
# FAST=1 (default): /tmp/sd3m-fp8sf, sd3m-fp8s with fast_accum=1 on its FP8 nodes (cuBLASLt's fast accumulation;
# fused_kernels.py --fp8-fast-accum on the FP8 folder: the graph only, every weight file hard-linked, seconds).
# Outside the build stage too, so that a machine where sd3m-fp8s exists already gets it without a rebuild.
if [ "${FAST:-1}" = 1 ] && [ -f /tmp/sd3m-fp8s/transformer/model.onnx ] && [ ! -f /tmp/sd3m-fp8sf/transformer/model.onnx ]; then
  python3 models/export/fused_kernels.py --fp8-fast-accum /tmp/sd3m-fp8s /tmp/sd3m-fp8sf 2>&1 | tail -1 \
    | tee -a "$OUT/rewrite.log"
fi
# MLP=1 (default): /tmp/sd3m-fp8sfm, sd3m-fp8sf with each feed-forward's two FP8 products as one MlpFp8
# (fused_kernels.py --fp8-merge-mlp, graph only: the first product writes E4M3 for the second, no float16 tensor
# and no quantization pass between them); MLP=2 also /tmp/sd3m-fp8sm (the same from sd3m-fp8s, without fast
# accumulation); MLP=0 neither. Each timed variant costs about half a minute of the call.
if [ "${MLP:-1}" != 0 ]; then
  pairs="sd3m-fp8sf sd3m-fp8sfm"
  [ "${MLP:-1}" = 2 ] && pairs="sd3m-fp8s sd3m-fp8sm,$pairs"
  IFS=, read -ra pairs <<< "$pairs"
  for pair in "${pairs[@]}"; do
    set -- $pair
    [ -f /tmp/$1/transformer/model.onnx ] && [ ! -f /tmp/$2/transformer/model.onnx ] \
      && python3 models/export/fused_kernels.py --fp8-merge-mlp /tmp/$1 /tmp/$2 2>&1 | tail -1 | tee -a "$OUT/rewrite.log"
  done
fi
[ "$STAGE" = build ] && exit 0
source .ort-cuda/env.sh
[ -f "$(dirname "${ORT_DYLIB_PATH:-/opt/ort/x}")/libonnxruntime_providers_cuda.so" ] \
  || { echo "the CUDA bundle is not complete: carry its other pieces (.ort-cuda/parts/a or b)"; exit 1; }
[ -x "$BIN" ] || { echo "no benchmark binary: carry .device-bin/benchmark.xz"; exit 1; }
if want check; then
  {
    echo "== 1. FP8 kernels on CUDA vs the Python emulation ($(date +%T))"
    if [ "${SKIP_LIB:-0}" = 1 ]; then
      echo "skipped (SKIP_LIB=1: run before in the same session)"
    elif [ -x /tmp/fp8-bin/sd3onnx-lib-tests ]; then
      # SD3ONNX_REPO: the fixtures of this checkout (the binary was built elsewhere)
      SD3ONNX_REPO=$PWD timeout ${CHECK_TIMEOUT:-300} /tmp/fp8-bin/sd3onnx-lib-tests --ignored --nocapture \
        --test-threads 1 fp8_cuda 2>&1 \
        | grep -E "CUDA|test result|panicked|FP8 needs" | tail -20
    else
      echo "no lib test binary: carry .device-bin/sd3onnx-lib-tests(.xz)"
    fi
    echo "== 2. tiny FP8 fixtures: CUDA vs CPU kernels, FP8 vs float16 fused ($(date +%T))"
    for v in tiny-fp16-fused tiny-fp16-fused-fp8 tiny-dual-fp16-fused tiny-dual-fp16-fused-fp8; do
      d=/tmp/fp8-$v; rm -rf "$d"; cp -r models/fixtures/tiny-sd3 "$d"
      cp "models/fixtures/export-$v/transformer/model.onnx" "$d/transformer/model.onnx"
      for ep in cpu cuda; do
        timeout ${CHECK_TIMEOUT:-300} "$BIN" --model "$d" --prompt "a red circle above a blue square" --width 64 \
          --height 96 --steps 8 --runs 1 --warmup 0 --ep "$ep" --output "$OUT/check/$v-$ep.png" 2>&1 \
          | grep -E "error|panicked|FP8 needs" | tail -3
      done
    done
    echo "== 3. SD3-medium shapes, 1024x1024, 28 steps: FP8 vs float16 fused on CUDA ($(date +%T))"
    # FULL_CHECK=0: skipped here; the time stage writes the same images and latents (its first run, same seed)
    [ "${FULL_CHECK:-1}" = 1 ] && for v in sd3m-fused sd3m-fp8 sd3m-fp8s sd3m-fp8sf sd3m-fp8sm sd3m-fp8sfm sd3m-fp8sep; do
      [ -f /tmp/$v/transformer/model.onnx ] || continue
      timeout ${CHECK_TIMEOUT:-300} "$BIN" --model /tmp/$v --ep cuda --width 1024 --height 1024 --steps 28 \
        --guidance 7 --runs 1 --warmup 0 --output "$OUT/check/full-$v.png" --latents "$OUT/check/latents-$v.f32" 2>&1 \
        | grep -E "error|panicked|FP8 needs" | tail -3
    done
    quality
  } 2>&1 | tee "$OUT/check.txt"
  collect  # also after each step: a command killed at the device tool's limit keeps what was done
fi
if want time; then
  for v in sd3m-fused sd3m-fp8 sd3m-fp8s sd3m-fp8sf sd3m-fp8sm sd3m-fp8sfm sd3m-fp8sep; do
    [ -f /tmp/$v/transformer/model.onnx ] || { echo "== ours: $v not built, skipped"; continue; }
    # a later call (after one cut at the device tool's limit) keeps what was measured
    [ -f "$OUT/ours-$v.json" ] && { echo "== ours: $v measured before, kept"; continue; }
    echo "== ours: $v ($(date +%T))"
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "/tmp/mem-$v.txt" &
    poll=$!
    timeout ${OURS_TIMEOUT:-240} "$BIN" --model /tmp/$v --ep cuda --width 1024 --height 1024 --steps 28 \
      --guidance 7 --runs ${RUNS:-3} --warmup 1 ${BENCH_ARGS:-} --json "$OUT/ours-$v.json" --output "$OUT/check/full-$v.png" \
      --latents "$OUT/check/latents-$v.f32" 2>&1 \
      | tail -16 | tee "$OUT/ours-$v.log"
    kill $poll 2>/dev/null; sleep 0.2
    peak=$(sort -n "/tmp/mem-$v.txt" | tail -1)
    if [ -n "$peak" ]; then echo "$(( peak - idle )) MiB (peak minus idle $idle MiB)"; else echo "not sampled"; fi \
      | tee "$OUT/peak-$v.txt"
    python3 scripts/gpu/table.py "$OUT" > "$OUT/table.md"; collect
  done
  if [ "${TORCH:-1}" = 1 ] && [ ! -f "$OUT/torch.json" ]; then
    echo "== diffusers ($(date +%T))"
    # the transformer alone by default (as sd35m.sh: the step is what FP8 changes); TORCH_FULL=1 for the whole
    # pipeline (full-size random text encoders: slower to build)
    timeout ${TORCH_TIMEOUT:-420} python3 scripts/gpu/bench_torch.py --variant sd3-medium \
      $([ "${TORCH_FULL:-0}" = 1 ] || echo --transformer-only) --tokenizers-from models/fixtures/tiny-sd3 \
      --json "$OUT/torch.json" 2>&1 | grep -v Warning | tail -8 | tee "$OUT/torch.log"
  fi
  python3 scripts/gpu/table.py "$OUT" | tee "$OUT/table.md"
  echo "== quality from the timed runs' images and latents" | tee -a "$OUT/check.txt"
  quality 2>&1 | tee -a "$OUT/check.txt"
fi
echo "total: $(( $(date +%s) - t0 )) s"
