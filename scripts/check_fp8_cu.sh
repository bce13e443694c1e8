#!/usr/bin/env bash
# Runs the per-thread loops of src/runtime/kernels/fp8.cu (fp8_amax_part, fp8_quantize_part: the FP8 kernels'
# vector and scalar paths) on the CPU with g++, over every thread of launches of several sizes, alignments and
# grid strides, against the one-value-at-a-time definitions (scripts/fp8-cu-check/check.cpp; a CPU stand-in for
# the CUDA types it uses in scripts/fp8-cu-check/cuda_fp16.h). For the kernels' indexing and byte order, which
# the GPU test (`fp8_cuda_kernels_match_the_python_emulation`, --ignored, needs an FP8 GPU) checks end to end.
# Needs g++ (C++17). Exit status 1 on any difference.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$(mktemp -d)/fp8check"
trap 'rm -rf "$(dirname "$bin")"' EXIT
g++ -O2 -std=c++17 -fno-strict-aliasing -Wno-unknown-pragmas -I"$here/fp8-cu-check" -o "$bin" "$here/fp8-cu-check/check.cpp"
"$bin"
