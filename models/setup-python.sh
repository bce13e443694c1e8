#!/usr/bin/env bash
# Creates .venv-tools/ in the repository root with the exact Python packages that models/make_fixtures.py needs
# (models/requirements.txt). Python 3.11 is what produced the committed fixtures.
#
#   bash models/setup-python.sh && .venv-tools/bin/python models/make_fixtures.py
#
# Override the interpreter with PYTHON=/path/to/python3.11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tools"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import sys; v = sys.version_info; print(f"using Python {v.major}.{v.minor}.{v.micro}"); \
  sys.exit(0) if v[:2] == (3, 11) else print("warning: fixtures were generated with Python 3.11", file=sys.stderr)'
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade pip
"$VENV/bin/python" -m pip install --disable-pip-version-check -r "$ROOT/models/requirements.txt"
"$VENV/bin/python" -c 'import torch, diffusers, transformers, optimum.onnxruntime, onnxruntime, open_clip, sentencepiece; \
  print("ok: torch", torch.__version__, "diffusers", diffusers.__version__, "onnxruntime", onnxruntime.__version__)'
