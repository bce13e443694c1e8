#!/usr/bin/env bash
# On the GPU machine: builds SD3-medium-shaped ONNX graphs with random weights (models/export/export_sd3.py) in
# /tmp/sd3m (TorchScript + ORT fusions, fp16, T5 mixed precision) and a dynamo-exported transformer variant in
# /tmp/sd3m-dyn, as background jobs logging to /tmp/build-*.log. Wait for them with scripts/gpu/wait.sh.
# Needs diffusers: carry .whl/ (pip download --no-deps diffusers==0.42.1 -d .whl).
# RANDOM_VARIANT (default sd3-medium; e.g. sd3.5-medium) and DIR (default /tmp/sd3m) pick another model and folder.
# BUILD_TAG (e.g. sd35m) names the job files /tmp/build-TAG-*.log/.done (wait.sh reads the same variable), so that
# two builds can run at once.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p /tmp/site
[ -d /tmp/site/diffusers ] || pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
export PYTHONPATH=/tmp/site
python3 -c "import torch, transformers, diffusers, onnx, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
RANDOM_VARIANT=${RANDOM_VARIANT:-sd3-medium}; DIR=${DIR:-/tmp/sd3m}; TAG=${BUILD_TAG:+$BUILD_TAG-}
E="python3 models/export/export_sd3.py --random $RANDOM_VARIANT --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16"
# TEXT_LAYERS=N: text encoders at full width but N layers (quick builds for transformer-only measurements).
ET="$E ${TEXT_LAYERS:+--text-layers $TEXT_LAYERS}"
# Smoke test the tool on this machine's library versions first (seconds).
python3 models/export/export_sd3.py --random tiny --tokenizers-from models/fixtures/tiny-sd3 --dtype fp16 --out /tmp/tiny-smoke$TAG > /tmp/build-${TAG}smoke.log 2>&1 || { tail -30 /tmp/build-${TAG}smoke.log; exit 1; }
echo "smoke export ok"
start() { # name, command...
  local name=$1; shift
  ( t=$(date +%s); "$@" > "/tmp/build-$TAG$name.log" 2>&1; rc=$?
    echo "exit $rc after $(( $(date +%s) - t )) s" >> "/tmp/build-$TAG$name.log"; touch "/tmp/build-$TAG$name.done" ) &
}
rm -f /tmp/build-${TAG}{t5,transformer,dynamo}.done
start t5 $ET --components text_encoder_3 --out $DIR
# Transformer: TorchScript + ORT fusions (round 1 on an H200: 49.7 ms/step vs 55.1 for the dynamo export).
# CLIPs and VAE: dynamo, whose ONNX Attention fuses their attention (the TorchScript path leaves the VAE's
# 16384-token attention unfused at 1024 px).
# CONTROLNET=1: also transformer/model_controlnet.onnx (--controlnet-graph, same weights) and vae_encoder/ (control
# images go through it).
CN_FLAG=""; VAES=vae_decoder
if [ "${CONTROLNET:-0}" = 1 ]; then CN_FLAG="--controlnet-graph"; VAES=vae_decoder,vae_encoder; fi
start transformer bash -c "$E --components transformer $CN_FLAG --out $DIR && { $ET --exporter dynamo --components text_encoder,text_encoder_2,$VAES --out $DIR || { echo 'dynamo failed: TorchScript encoders'; $ET --components text_encoder,text_encoder_2,$VAES --out $DIR; }; }"
if [ "${DYNAMO_TRANSFORMER:-0}" = 1 ]; then
  start dynamo $E --exporter dynamo --components transformer --out /tmp/sd3m-dyn
else
  touch /tmp/build-${TAG}dynamo.done; echo "skipped" > /tmp/build-${TAG}dynamo.log
fi
echo "started: t5, transformer (+clip, vae)"
