#!/usr/bin/env bash
# On the GPU machine: the VAE decoder of the two exporters side by side (issue 19's end-to-end time). Our GPU
# builds (build_sd3m.sh) export the CLIPs and the VAE decoder with dynamo: its decoder has 30 ONNX
# GroupNormalization nodes (174 nodes in all); export_sd3.py's default, TorchScript, writes the GroupNorms as
# Reshape + InstanceNormalization + Mul/Add (475 nodes). The VAE decode took 83-106 ms per 1024x1024 image in the
# GPU rounds of 2026-11-26 and 138-188 ms in those of 2026-12-03/04 (docs/gpu-results/2026-12-04-h200-round21),
# both with dynamo decoders by the record (whose node types then are not on record). This times today's dynamo
# and TorchScript decoders on the same latents, with an ONNX Runtime profile of each (which ops take the time).
#   1. /tmp/vae-ts: the same random VAE decoder (export_sd3.py --random, same seed: same weights) with TorchScript;
#   2. /tmp/sd3m-fused-vaets: the fused SD3-medium folder (fp8.sh's build) with that decoder (hard links);
#   2b. /tmp/sd3m-fused-vaein: the same with a dynamo decoder whose group norms are rewritten as
#      InstanceNormalization (--groupnorm instancenorm; the builds keep ONNX GroupNormalization, export_sd3.py's
#      default). Round 23 (docs/gpu-results/2026-12-04-h200-round23): 3,969 ms against 72.8 (GroupNormalization)
#      and 83.1 (TorchScript): its InstanceNormalization nodes ran on the CPU provider;
#   3. examples/benchmark on all three (1024x1024, 2 steps: the VAE does not depend on them; RUNS=3 after 1 warm-up),
#      each with ONNX Runtime profiles (--profile) summarised for the decoder (profile_summary.py), and the two
#      images compared (same latents, same weights: the exporters' arithmetic only).
# Needs fp8.sh's /tmp/sd3m-fused, diffusers in /tmp/site, the CUDA bundle, $BIN (default /tmp/fp8-bin/benchmark).
# $OUT gets vae.txt (timings, the op tables, the image difference). For a try of the script itself on a machine
# without a GPU: EP=cpu SIZE=256 MODEL=<a fused folder> BIN=target/release/examples/benchmark PY=<python with
# diffusers> (the export then uses that folder's random seed and variant: RANDOM_VARIANT, default sd3-medium).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BIN=${BIN:-/tmp/fp8-bin/benchmark}
EP=${EP:-cuda}; SIZE=${SIZE:-1024}; MODEL=${MODEL:-/tmp/sd3m-fused}; PY=${PY:-python3}
[ -f "$MODEL/transformer/model.onnx" ] || { echo "no $MODEL: run fp8.sh STAGE=build first"; exit 1; }
[ "$EP" = cuda ] && source .ort-cuda/env.sh
{
  if [ ! -f /tmp/vae-ts/vae_decoder/model.onnx ]; then
    t=$(date +%s)
    $PY models/export/export_sd3.py --random ${RANDOM_VARIANT:-sd3-medium} --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16 \
      --exporter torchscript --components vae_decoder --out /tmp/vae-ts 2>&1 | grep -E "vae_decoder\].*nodes|rror" | cut -c1-200
    echo "TorchScript VAE export: $(( $(date +%s) - t )) s"
  fi
  # 2b. the dynamo decoder with --groupnorm instancenorm (not the default: see the header)
  if [ ! -f /tmp/vae-in/vae_decoder/model.onnx ]; then
    t=$(date +%s)
    $PY models/export/export_sd3.py --random ${RANDOM_VARIANT:-sd3-medium} --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16 \
      --exporter dynamo --groupnorm instancenorm --components vae_decoder --out /tmp/vae-in 2>&1 | grep -E "vae_decoder\].*nodes|rror" | cut -c1-200
    echo "dynamo VAE export with InstanceNormalization: $(( $(date +%s) - t )) s"
  fi
  link_with() {  # $1: folder to make, $2: the decoder folder to put in it (everything else: $MODEL's, hard links)
    [ -d "$1" ] && return
    mkdir -p "$1"
    for e in "$MODEL"/*; do
      [ "$(basename "$e")" = vae_decoder ] && continue
      cp -al "$e" "$1/"
    done
    cp -al "$2" "$1/vae_decoder"
  }
  TS=$MODEL-vaets; IN=$MODEL-vaein
  link_with "$TS" /tmp/vae-ts/vae_decoder
  link_with "$IN" /tmp/vae-in/vae_decoder
  $PY -c "import json,sys; print('the build\'s vae_decoder manifest entry, group norms rewritten:', json.load(open(sys.argv[1]))['components'].get('vae_decoder', {}).get('groupnorm_as_instancenorm', 'none'))" "$MODEL/manifest.json" 2>&1 | tail -1
  for m in "$MODEL" "$TS" "$IN"; do
    v=$(basename "$m")
    echo "== $v ($(date +%T))"
    rm -rf "/tmp/vprof-$v"; mkdir -p "/tmp/vprof-$v"
    timeout ${OURS_TIMEOUT:-150} "$BIN" --model "$m" --ep "$EP" --width "$SIZE" --height "$SIZE" --steps 2 --guidance 7 \
      --runs ${RUNS:-3} --warmup 1 --output "/tmp/vae-$v.png" 2>&1 | grep -E "error|VAE decode|end to end" | head -4
    timeout ${OURS_TIMEOUT:-150} "$BIN" --model "$m" --ep "$EP" --width "$SIZE" --height "$SIZE" --steps 2 --guidance 7 \
      --runs 1 --warmup 1 --profile "/tmp/vprof-$v" > /dev/null 2>&1
    p=$(ls /tmp/vprof-$v/vae_decoder_*.json 2>/dev/null | head -1)
    [ -n "$p" ] && $PY scripts/gpu/profile_summary.py "$p" --top 12
  done
  $PY - "/tmp/vae-$(basename "$MODEL").png" "/tmp/vae-$(basename "$TS").png" "/tmp/vae-$(basename "$IN").png" <<'PY'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1])).astype(np.float64)
for other, what in ((sys.argv[2], "TorchScript"), (sys.argv[3], "dynamo with InstanceNormalization")):
    b = np.asarray(Image.open(other)).astype(np.float64)
    e = np.abs(a - b); mse = ((a - b) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
    print(f"the build's VAE decoder vs {what}, same latents and weights: max {e.max():.0f} levels, "
          f"mean {e.mean():.3f}, PSNR {psnr:.2f} dB")
PY
} 2>&1 | tee "$OUT/vae.txt"
