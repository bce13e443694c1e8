#!/usr/bin/env bash
# Builds SD3-medium-shaped ONNX folders with random weights on the GPU machine (see README.md, "Benchmark run").
# One step per device call:  bash models/export/device_export.sh encoders|ts|dy|plain [variant]
#   encoders  CLIP-L, CLIP-G, T5 (real widths, 2 layers) and the VAE decoder, fp16, into /tmp/<variant>-{ts,dy,plain}
#   ts        transformer: TorchScript + ORT optimizer (MultiHeadAttention, adaLN in LayerNorm, FastGelu)
#   dy        transformer: dynamo opset 23 (ONNX Attention, adaLN in LayerNorm, BiasGelu)
#   plain     transformer: plain opset-17 export (MatMul/Softmax attention, like optimum)
# PYTHON=... picks the interpreter (default: python). Needs the diffusers wheel in .whl/ (pip download --no-deps diffusers==0.35.2 -d .whl), carried with the call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
step=${1:?usage: device_export.sh encoders|ts|dy|plain [sd3-medium|sd3.5-medium|sd3.5-large]}
variant=${2:-sd3-medium}
py=${PYTHON:-python}
if ! "$py" -c "import diffusers" 2>/dev/null; then
    [ -d /tmp/site/diffusers ] || "$py" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export_sd3() {
    "$py" models/export/export_sd3.py --random "$variant" --tokenizers-from models/fixtures/tiny-sd3 \
        --dtype fp16 --text-layers 2 "$@"
}
case "$step" in
    encoders)
        export_sd3 --components text_encoder,text_encoder_2,text_encoder_3,vae_decoder --out "/tmp/$variant-ts"
        for v in dy plain; do rm -rf "/tmp/$variant-$v"; cp -r "/tmp/$variant-ts" "/tmp/$variant-$v"; done ;;
    ts) export_sd3 --components transformer --exporter torchscript --out "/tmp/$variant-ts" ;;
    dy) export_sd3 --components transformer --exporter dynamo --out "/tmp/$variant-dy" ;;
    plain) export_sd3 --components transformer --attention plain --out "/tmp/$variant-plain" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
esac
du -sh "/tmp/$variant-"* 2>/dev/null || true
