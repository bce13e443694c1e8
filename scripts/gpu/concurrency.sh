#!/usr/bin/env bash
# On the GPU machine (issue 15, item 5; docs/reliability.md "Fused kernels on one GPU"): several pipelines with
# fused-operator transformers generating at once on one GPU, every image compared byte for byte with the same
# request run alone (examples/concurrency.rs).
#
# Model: SD3-medium widths with random weights, LAYERS MMDiT blocks (default 6) and 1 layer per text encoder,
# exported here by models/export/export_sd3.py (fp16) to /tmp/cc-m, and rewritten to the fused operators
# (models/export/fused_kernels.py) in /tmp/cc-m-fused. Needs diffusers: carry .whl/ (pip download --no-deps
# diffusers==0.42.1 -d .whl).
# Binaries: .device-bin/concurrency-*.xz, each `cargo build --release --features cuda --example concurrency`
# (xz -9): BINS="before after" runs .device-bin/concurrency-before and -after (e.g. the kernels before and after a
# fix) on the same card in the same call, in every configuration of CONFIGS (pipelines:threads:size:steps:requests,
# ROUNDS rounds each); the last one in BINS also runs the unfused graph (a control: ONNX Runtime's own kernels
# only). Results go to $OUT: card.txt, export.log, runs.log (each run's output and exit status: 0 pass, 1 images
# differ), summary.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LAYERS=${LAYERS:-6} ROUNDS=${ROUNDS:-4}
CONFIGS=${CONFIGS:-"2:4:256:8:32 4:4:256:8:32 8:8:128:6:48 8:8:512:6:48"}
BINS=${BINS:-after}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
M=/tmp/cc-m
if [ ! -f /tmp/cc-m-fused/transformer/model.onnx ]; then
  mkdir -p /tmp/site
  [ -d /tmp/site/diffusers ] || pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
  export PYTHONPATH=/tmp/site
  E="python3 models/export/export_sd3.py --random sd3-medium --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16"
  t=$(date +%s)
  # Two folders, so the two exports never write the same file; the transformer then joins the others.
  $E --layers "$LAYERS" --components transformer --out /tmp/cc-t > /tmp/cc-export-t.log 2>&1 &
  $E --text-layers 1 --components text_encoder,text_encoder_2,text_encoder_3,vae_decoder --out $M \
    > /tmp/cc-export-m.log 2>&1 &
  wait
  rm -rf $M/transformer && cp -r /tmp/cc-t/transformer $M/
  python3 models/export/fused_kernels.py $M /tmp/cc-m-fused > /tmp/cc-fuse.log 2>&1
  { tail -5 /tmp/cc-export-t.log; tail -5 /tmp/cc-export-m.log; tail -5 /tmp/cc-fuse.log
    echo "export: $(( $(date +%s) - t )) s"; du -sh $M /tmp/cc-m-fused; } | tee "$OUT/export.log"
  [ -f /tmp/cc-m-fused/transformer/model.onnx ] || { echo "export failed"; exit 1; }
fi
run() { # label binary model pipelines threads size steps requests
  echo "== $1: $(basename "$2") on $(basename "$3"), $4 pipelines, $5 threads, ${6}x$6, $7 steps, $8 requests," \
    "$ROUNDS rounds" | tee -a "$OUT/runs.log"
  timeout "${RUN_TIMEOUT:-180}" "$2" --model "$3" --ep cuda --pipelines "$4" --threads "$5" --size "$6" --steps "$7" \
    --requests "$8" --rounds "$ROUNDS" > /tmp/cc-run.log 2>&1
  local rc=$?
  grep -v "^\s*$" /tmp/cc-run.log | tail -60 | tee -a "$OUT/runs.log"
  echo "exit $rc" | tee -a "$OUT/runs.log"
}
for b in $BINS; do
  bin=/tmp/concurrency-$b
  [ -x "$bin" ] || { xz -dc ".device-bin/concurrency-$b.xz" > "$bin" && chmod +x "$bin"; }
done
for c in $CONFIGS; do
  IFS=: read -r p t size steps n <<< "$c"
  for b in $BINS; do
    run "$b" /tmp/concurrency-$b /tmp/cc-m-fused "$p" "$t" "$size" "$steps" "$n"
  done
done
last=${BINS##* }
run "$last (control, unfused graph)" /tmp/concurrency-$last $M 2 4 256 8 32
grep -E "^(==|exit|PASS|FAIL|round)" "$OUT/runs.log" > "$OUT/summary.txt"
