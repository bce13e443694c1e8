#!/usr/bin/env bash
# Generates an image with the default model in the repository, installing ONNX Runtime first if needed.
#   scripts/txt2img.sh                         (default prompt, writes output.png)
#   scripts/txt2img.sh --prompt "three green squares" --seed 7 --output squares.png
# Any flag of examples/txt2img.rs can be given; --model defaults to the repository's default model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-ort.sh >/dev/null
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"
DEFAULT_MODEL="models/sd3-nano"
args=("$@")
has() { local f; for f in "${args[@]}"; do [ "$f" = "$1" ] && return 0; done; return 1; }
has --model || args=(--model "$DEFAULT_MODEL" "${args[@]}")
has --prompt || args+=(--prompt "a blue circle in the top left corner")
has --output || args+=(--output output.png)
exec cargo run --quiet --release --example txt2img -- "${args[@]}"
