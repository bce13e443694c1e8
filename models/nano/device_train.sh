#!/usr/bin/env bash
# On the GPU machine (see ../shared/device/README.md): trains the nano SD3 and puts the result under $OUT.
#   carry: .whl-nano (models/nano/requirements.txt's pure-Python and cp312 wheels, fetched by fetch_wheels.sh)
#   bash models/nano/device_train.sh [train.py options]
# The device image's own torch is used (its version is recorded in train_log.json); diffusers, transformers,
# tokenizers, huggingface_hub and Pillow come from the carried wheels, pinned as here.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-nano/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nano-out}
RUN=${RUN:-.nano-run}   # ignored folder: kept on a warm machine, so a next call can --resume from it
mkdir -p "$OUT" "$RUN"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, transformers, PIL, numpy; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "Pillow", PIL.__version__, "numpy", numpy.__version__)' | tee -a "$OUT/gpu.txt"
python3 models/nano/train.py --out "$RUN" --workers 16 "$@" 2>&1 | grep -v -i warn | tee "$OUT/train.log"
cp "$RUN"/train_log.json "$RUN"/clip_token_ids.json "$RUN"/eval_*.png "$OUT"/ 2>/dev/null
# the pipeline without its tokenizers (they come from the repository), in pieces under $OUT's 16 MiB per file
tar -C "$RUN" --exclude='pipeline/tokenizer*' -czf "$RUN/pipeline.tgz" pipeline && split -b 15M "$RUN/pipeline.tgz" "$OUT/pipeline.tgz.part-"
ls -la "$OUT"
