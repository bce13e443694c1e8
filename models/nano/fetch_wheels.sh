#!/usr/bin/env bash
# The pinned wheels that models/nano/device_train.sh installs on the GPU machine (Python 3.12 there), into .whl-nano/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p .whl-nano
for p in diffusers==0.35.2 transformers==4.57.1 huggingface_hub==0.36.2 tokenizers==0.22.2 pillow==13.0.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl-nano "$p"
done
ls -la .whl-nano
