#!/usr/bin/env bash
# Regenerates every golden under models/goldens from the committed fixtures, with the given diffusers release on
# the diffusers side, and reports which goldens changed and by how much (models/golden_diff.py).
#
#   bash models/regen_goldens.sh            # the release below
#   bash models/regen_goldens.sh 0.43.0     # another one: resolves and pins models/requirements-diffusers-0.43.0.txt
#
# A version bump is the DIFFUSERS_VERSION line below (commit the requirements file the first run writes).
#
# Two pinned environments, because optimum-onnx needs transformers < 4.58 and current diffusers needs transformers 5:
#   .venv-tools                   models/requirements.txt (diffusers 0.35.2, optimum, open_clip): the diffusers
#                                 checkpoints of the fixtures (same seeds and library versions as the committed ONNX
#                                 weights; the fixtures themselves are not rewritten) and every optimum/ONNX Runtime
#                                 output: optimum.png, optimum_final_latents.npy, tiny-sd3-fp16.
#   .venv-diffusers-VERSION       models/requirements-diffusers-VERSION.txt: every diffusers output (images,
#                                 embeddings, sigmas, latents, samplers, img2img, inpaint, SLG, tiling, tokenizers,
#                                 torch.randn), with SD3_GOLDENS_OPTIMUM=keep so the optimum outputs stay as the first
#                                 environment wrote them.
# Not regenerated here: models/goldens/sd3-nano (models/nano/parity_diffusers.py needs train.py's saved pipeline,
# which is not committed; see docs/diffusers-versions.md).
#
# Python 3.11 (PYTHON=... to override). Build folder: $SD3_FIXTURE_BUILD (default /tmp/sd3-onnx-fixture-build).
# 2 to 4 minutes on this 2-core machine once both environments exist (measured 2m13s and 3m33s; the first
# install downloads torch with its nvidia-* wheels: each environment is about 7 GB installed).
set -euo pipefail
DIFFUSERS_VERSION="${1:-0.42.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export SD3_FIXTURE_BUILD="${SD3_FIXTURE_BUILD:-/tmp/sd3-onnx-fixture-build}"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
OLD=.venv-tools/bin/python
NEW_VENV=".venv-diffusers-$DIFFUSERS_VERSION"
NEW="$NEW_VENV/bin/python"
REQ="models/requirements-diffusers-$DIFFUSERS_VERSION.txt"

# 1. the optimum environment (models/requirements.txt)
[[ -x "$OLD" ]] || PYTHON="$PYTHON" bash models/setup-python.sh

# 2. the diffusers environment: from its pins, or resolved once and pinned (torch as in models/requirements.txt)
if [[ ! -x "$NEW" ]]; then
  "$PYTHON" -m venv "$NEW_VENV"
  "$NEW" -m pip install --disable-pip-version-check --quiet --upgrade pip
  if [[ -f "$REQ" ]]; then
    "$NEW" -m pip install --disable-pip-version-check -r "$REQ"
  else
    pin() { grep -i "^$1==" models/requirements.txt; }
    "$NEW" -m pip install --disable-pip-version-check "diffusers==$DIFFUSERS_VERSION" transformers huggingface_hub \
      tokenizers accelerate "$(pin torch)" "$(pin numpy)" "$(pin onnx)" "$(pin onnxruntime)" "$(pin pillow)" \
      "$(pin sentencepiece)" "$(pin protobuf)" "$(pin safetensors)" "$(pin ftfy)"
    { echo "# Exact pins for the diffusers side of the goldens (models/regen_goldens.sh $DIFFUSERS_VERSION), resolved by it."
      "$NEW" -m pip freeze --disable-pip-version-check; } > "$REQ"
    echo "wrote $REQ: commit it"
  fi
fi
"$NEW" -c "import diffusers, sys; sys.exit(diffusers.__version__ != '$DIFFUSERS_VERSION')" \
  || { echo "$NEW_VENV does not have diffusers $DIFFUSERS_VERSION" >&2; exit 1; }

BEFORE="$SD3_FIXTURE_BUILD/goldens-before"
rm -rf "$BEFORE" && mkdir -p "$SD3_FIXTURE_BUILD" && cp -r models/goldens "$BEFORE"

# 3. optimum side (and a diffusers 0.35.2 pass that step 4 overwrites)
"$OLD" models/make_fixtures.py --stages tokenizers,checkpoints,goldens,options,fp16-golden
"$OLD" models/make_feature_goldens.py

# 4. diffusers side
export SD3_GOLDENS_OPTIMUM=keep
"$NEW" models/make_fixtures.py --stages goldens,options,scheduler,tokjson
"$NEW" models/make_feature_goldens.py
"$NEW" models/make_sampler_goldens.py
"$NEW" models/make_rng_goldens.py
unset SD3_GOLDENS_OPTIMUM
# the committed skip-layer graph still equals this diffusers' transformer(skip_layers=[1]) (writes nothing)
"$NEW" models/export/make_skip_fixture.py --checkpoint "$SD3_FIXTURE_BUILD/tiny-sd35-diffusers/transformer" --check-only

# 5. report
echo
echo "== goldens changed by the regeneration (diffusers $DIFFUSERS_VERSION), vs. the tree before this run =="
"$NEW" models/golden_diff.py "$BEFORE" models/goldens --json "$SD3_FIXTURE_BUILD/golden-diff.json"
echo "(JSON: $SD3_FIXTURE_BUILD/golden-diff.json)"
changed_fixtures="$(git status --short models/fixtures | grep -v ' models/fixtures/README.md$' || true)"
if [[ -n "$changed_fixtures" ]]; then
  echo "error: the fixtures changed (they must not):" >&2; echo "$changed_fixtures" >&2; exit 1
fi
echo "fixtures unchanged. models/fixtures/README.md documents the goldens; refresh it with:"
echo "  SD3_GOLDENS_OPTIMUM=keep $NEW models/make_fixtures.py --stages readme"
