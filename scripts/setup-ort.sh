#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that sd3-onnx loads at run time (ort's `load-dynamic`).
#
# ort's own binary download (pyke's CDN) cannot be reached here, so we take the library out of the official
# `onnxruntime` wheel on PyPI (CPU build) and put it in `.ort/lib/` inside the repository. The library crate
# never looks there by itself (it loads only the builder option's path or ORT_DYLIB_PATH, see
# src/runtime/discovery.rs): the repository's scripts export ORT_DYLIB_PATH, and .cargo/config.toml sets it
# for cargo commands run inside the repository.
#
# Usage: scripts/setup-ort.sh            (idempotent; does nothing when the library is present)
set -euo pipefail
ORT_VERSION="1.31.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.ort"
lib="$dest/lib/libonnxruntime.so"
if [ -f "$lib" ] && [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$ORT_VERSION" ]; then
  echo "onnxruntime $ORT_VERSION already in $dest/lib (ORT_DYLIB_PATH=$lib)"
  exit 0
fi
echo "installing ONNX Runtime $ORT_VERSION into .ort/ (once; the onnxruntime wheel from PyPI)" >&2
py="$(command -v python3 || command -v python || true)"
[ -n "$py" ] || { echo "error: python3 (with pip) is needed to download the onnxruntime wheel" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The wheel is a zip; only pip is used to fetch it (no install into any environment).
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime==$ORT_VERSION"
whl="$(ls "$tmp"/onnxruntime-*.whl | head -n 1)"
"$py" - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
so="$(ls "$tmp"/x/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
mkdir -p "$dest/lib"
cp "$so" "$lib.tmp" && mv "$lib.tmp" "$lib"
echo "$ORT_VERSION" > "$dest/VERSION"
echo "installed onnxruntime $ORT_VERSION -> $lib (programs outside this repository: export ORT_DYLIB_PATH=$lib)"
