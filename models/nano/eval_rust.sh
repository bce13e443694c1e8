#!/usr/bin/env bash
# Adherence of the nano model as drawn by OUR Rust pipeline (examples/txt2img), scored by checker.py.
#   [PROMPTS=models/nano/eval_prompts_v2.json] [EP=cpu|cuda] [MODES="cfg nocfg"] \
#     bash models/nano/eval_rust.sh [MODEL_DIR] [OUT_DIR] [GUIDANCE] [STEPS]
# Draws every prompt of $PROMPTS (default models/nano/eval_prompts.json; use another OUT_DIR per file) twice
# (seed = prompt index): with classifier-free guidance
# (GUIDANCE, default 5) -> OUT/NNN_cfg.png, and without (guidance 1) -> OUT/NNN_nocfg.png; then prints the checker's
# per-category tables and writes OUT/adherence_{cfg,nocfg}.json.
# One txt2img process per mode (`--prompts-from`: the graphs load once, not once per image); images already in
# OUT_DIR are kept (`--skip-existing`), so an interrupted run continues. MODES="cfg" draws and scores only the
# guided half. EP (default cpu) goes to txt2img's --ep (cpu, cuda, cuda:1, ...). TXT2IMG=path uses that binary
# instead of building examples/txt2img here (e.g. a --features cuda build on the GPU machine); ORT_DYLIB_PATH, when
# set, is the ONNX Runtime library to load (the GPU build for EP=cuda), else scripts/setup-ort.sh's CPU one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODEL=${1:-models/sd3-nano}
OUT=${2:-target/nano-eval}
G=${3:-5}
STEPS=${4:-28}
PROMPTS=${PROMPTS:-models/nano/eval_prompts.json}
EP=${EP:-cpu}
MODES=${MODES:-cfg nocfg}
PY=${PYTHON:-.venv-tools/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  case $EP in cpu) ;; *) echo "EP=$EP: set ORT_DYLIB_PATH to an ONNX Runtime build with that provider" >&2; exit 2 ;; esac
  bash scripts/setup-ort.sh >/dev/null
  ORT_DYLIB_PATH=$(ls "$PWD"/.ort/lib/libonnxruntime.so* | head -1)
fi
export ORT_DYLIB_PATH
if [ -n "${TXT2IMG:-}" ]; then
  BIN=$TXT2IMG
else
  cargo build --quiet --release --example txt2img
  BIN=${CARGO_TARGET_DIR:-target}/release/examples/txt2img
fi
mkdir -p "$OUT"
for mode in $MODES; do
  g=$([ "$mode" = cfg ] && echo "$G" || echo 1)
  "$BIN" --model "$MODEL" --prompts-from "$PROMPTS" --output-dir "$OUT" --name-suffix "_${mode}.png" --skip-existing \
    --steps "$STEPS" --guidance "$g" --ep "$EP" -q
done
for mode in $MODES; do
  echo "== $mode (guidance $([ "$mode" = cfg ] && echo "$G" || echo 1), $STEPS steps, $EP) =="
  "$PY" models/nano/checker.py --images "$OUT" --prompts "$PROMPTS" --pattern "{i:03d}_${mode}.png" --json "$OUT/adherence_${mode}.json"
done
