#!/usr/bin/env bash
# Here (no GPU), before a device session: makes every ignored thing the device calls of scripts/gpu/ and
# models/nano/ carry, where it is missing or stale. A renewed checkout has none of them (they are not in git).
#   .ort-cuda/         ONNX Runtime 1.31.1 with CUDA, in pieces (../shared/device/make-ort-cuda-bundle.sh)
#   .whl/              diffusers 0.42.1 for the SD3-medium builds and the PyTorch rows (build_sd3m.sh, bench_torch.py)
#   .whl-nano/         the nano training's pinned wheels (models/nano/fetch_wheels.sh)
#   .nano-resume.tgz   the shipped nano VAE for a retrain (models/nano/prepare_retrain.sh; needs .venv-nano or
#                      PYTHON=.venv-tools/bin/python: models/requirements.txt's pins)
#   .device-bin/       --features cuda release builds of HEAD: benchmark, txt2img and the lib tests, stripped and xz'd,
#                      each checked for the CUDA provider and the FP8 kernels; BUILT.txt names the commit
#                      (rebuilt when HEAD's Rust sources differ from the commit it names)
# Usage: bash scripts/gpu/prepare_here.sh [ort-cuda] [whl] [whl-nano] [nano-resume] [device-bin]  (default: all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
want=("$@"); [ ${#want[@]} -gt 0 ] || want=(ort-cuda whl whl-nano nano-resume device-bin)
has() { local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
pdl() {  # a cp312 manylinux wheel for the device's Python, no dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "$2"
}

if has ort-cuda; then
  [ -d ../shared/device ] || { echo "../shared/device is missing: run from the project checkout"; exit 1; }
  bash ../shared/device/make-ort-cuda-bundle.sh
fi
if has whl; then
  ls .whl/diffusers-0.42.1-*.whl >/dev/null 2>&1 || pdl .whl diffusers==0.42.1
  ls -la .whl
fi
if has whl-nano; then
  [ -n "$(ls .whl-nano/*.whl 2>/dev/null)" ] || bash models/nano/fetch_wheels.sh
fi
if has nano-resume; then
  if [ ! -f .nano-resume.tgz ]; then
    PY=${PYTHON:-.venv-nano/bin/python}
    [ -x "$PY" ] || PY=.venv-tools/bin/python
    [ -x "$PY" ] || { echo "no Python environment: bash models/setup-python.sh first"; exit 1; }
    bash models/nano/prepare_retrain.sh "$PY"
  fi
fi
if has device-bin; then
  head=$(git rev-parse --short HEAD)
  built=$(sed -n 's/^commit //p' .device-bin/BUILT.txt 2>/dev/null || true)
  rust=(src Cargo.toml Cargo.lock examples)
  git diff --quiet HEAD -- "${rust[@]}" || head="$head+uncommitted"   # a build of the working tree says so
  if [ -n "$built" ] && [ "${built%+uncommitted}" = "$built" ] && git diff --quiet "$built" HEAD -- "${rust[@]}" 2>/dev/null \
     && git diff --quiet HEAD -- "${rust[@]}" \
     && [ -f .device-bin/benchmark.xz ] && [ -f .device-bin/sd3onnx-lib-tests.xz ]; then
    echo ".device-bin is up to date (built from $built; no Rust change since)"
  else
    export CARGO_TARGET_DIR=target-cuda
    cargo build --release --features cuda --example benchmark --example txt2img
    tests=$(cargo test --release --features cuda --lib --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"): print(m["executable"])' \
      | tail -n 1)
    [ -x "$tests" ] || { echo "no lib test binary found"; exit 1; }
    mkdir -p .device-bin
    for pair in "target-cuda/release/examples/benchmark:benchmark" "target-cuda/release/examples/txt2img:txt2img" \
                "$tests:sd3onnx-lib-tests"; do
      src=${pair%%:*}; name=${pair##*:}
      strip -o ".device-bin/$name" "$src"
      for needle in CUDAExecutionProvider fp8_reciprocal; do
        [ "$(grep -c "$needle" ".device-bin/$name")" -gt 0 ] || { echo "$name lacks $needle: not a cuda build of HEAD"; exit 1; }
      done
      xz -9 -f ".device-bin/$name"
    done
    printf 'commit %s\nbuilt %s with --features cuda (CARGO_TARGET_DIR=target-cuda), stripped, xz -9\n' \
      "$head" "$(date -u +%FT%TZ)" > .device-bin/BUILT.txt
  fi
  ls -la .device-bin
fi
