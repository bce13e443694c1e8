#!/usr/bin/env bash
# Adherence of the nano model as drawn by OUR Rust pipeline (examples/txt2img, CPU), scored by checker.py.
#   [PROMPTS=models/nano/eval_prompts_v2.json] bash models/nano/eval_rust.sh [MODEL_DIR] [OUT_DIR] [GUIDANCE] [STEPS]
# Draws every prompt of $PROMPTS (default models/nano/eval_prompts.json; use another OUT_DIR per file) twice
# (seed = prompt index): with classifier-free guidance
# (GUIDANCE, default 5) -> OUT/NNN_cfg.png, and without (guidance 1) -> OUT/NNN_nocfg.png; then prints the checker's
# per-category tables and writes OUT/adherence_{cfg,nocfg}.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODEL=${1:-models/sd3-nano}
OUT=${2:-target/nano-eval}
G=${3:-5}
STEPS=${4:-28}
PROMPTS=${PROMPTS:-models/nano/eval_prompts.json}
PY=${PYTHON:-.venv-tools/bin/python}
bash scripts/setup-ort.sh >/dev/null
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls "$PWD"/.ort/lib/libonnxruntime.so* | head -1)}
cargo build --quiet --release --example txt2img
BIN=${CARGO_TARGET_DIR:-target}/release/examples/txt2img
mkdir -p "$OUT"
n=$("$PY" -c "import json; print(len(json.load(open('$PROMPTS'))))")
for ((i = 0; i < n; i++)); do
  prompt=$("$PY" -c "import json,sys; print(json.load(open('$PROMPTS'))[$i]['prompt'])")
  name=$(printf '%03d' "$i")
  [ -f "$OUT/${name}_cfg.png" ] || "$BIN" --model "$MODEL" --prompt "$prompt" --steps "$STEPS" --guidance "$G" --seed "$i" --output "$OUT/${name}_cfg.png" >/dev/null
  [ -f "$OUT/${name}_nocfg.png" ] || "$BIN" --model "$MODEL" --prompt "$prompt" --steps "$STEPS" --guidance 1 --seed "$i" --output "$OUT/${name}_nocfg.png" >/dev/null
done
for mode in cfg nocfg; do
  echo "== $mode (guidance $([ $mode = cfg ] && echo "$G" || echo 1), $STEPS steps) =="
  "$PY" models/nano/checker.py --images "$OUT" --prompts "$PROMPTS" --pattern "{i:03d}_${mode}.png" --json "$OUT/adherence_${mode}.json"
done
