#!/usr/bin/env bash
# Here (no GPU), before the fine-tune call of issue 22: rebuilds the PyTorch modules of models/sd3-nano from its ONNX
# graphs (from_onnx.py; the training checkpoint is lost), checks them against the graphs under ONNX Runtime, and packs
# them as .nano-resume.tgz (float32, tokenizers left out: about 10 MB), which device_train.sh extracts to
# /tmp/resume/pipeline on the GPU machine. The device's own torch is not used to rebuild: its exporter need not
# reproduce the committed graphs.
#   bash models/nano/prepare_finetune.sh [PYTHON]       (default .venv-nano/bin/python, models/requirements.txt's pins)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${1:-.venv-nano/bin/python}
rm -rf .nano-prep && mkdir -p .nano-prep
"$PY" models/nano/from_onnx.py --model models/sd3-nano --out .nano-prep/pipeline --json .nano-prep/from_onnx.json
tar -C .nano-prep --exclude='pipeline/tokenizer*' -czf .nano-resume.tgz pipeline
ls -la .nano-resume.tgz
