#!/usr/bin/env bash
# Here (no GPU), before a retrain on the shipped VAE (issue 22, run 16 on): rebuilds models/sd3-nano's VAE, decoder
# and encoder, from its ONNX graphs (from_onnx.py --components vae_decoder,vae_encoder: each checked against its
# graph under ONNX Runtime) and packs it as .nano-resume.tgz (pipeline/vae only, float32, about 2 MB), which
# device_train.sh extracts to /tmp/resume/pipeline; RETRAIN=1 then passes --vae-from /tmp/resume/pipeline.
#   bash models/nano/prepare_retrain.sh [PYTHON]       (default .venv-nano/bin/python, models/requirements.txt's pins)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${1:-.venv-nano/bin/python}
rm -rf .nano-prep && mkdir -p .nano-prep
"$PY" models/nano/from_onnx.py --model models/sd3-nano --components vae_decoder,vae_encoder --out .nano-prep/pipeline \
  --json .nano-prep/from_onnx.json
tar -C .nano-prep -czf .nano-resume.tgz pipeline/vae
ls -la .nano-resume.tgz
