#!/usr/bin/env bash
# Generates an image with the default model in the repository, installing ONNX Runtime and building the command
# line first if needed (each once).
#   scripts/txt2img.sh                         (default prompt, writes output.png in the current folder)
#   scripts/txt2img.sh --prompt "three green squares" --seed 7 --output squares.png
# Any flag of examples/txt2img.rs can be given (scripts/txt2img.sh --help lists them); --model defaults to the
# repository's default model. Relative paths (--output, --model, --init-image, --mask, --latents, --preview-dir)
# are relative to the folder you run this from.
# SD3_ONNX_PROFILE=debug uses a debug build (the tests do; default: release).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
caller="$PWD"
profile="${SD3_ONNX_PROFILE:-release}"
case "$profile" in
  release) cargo_profile=(--release) ;;
  debug) cargo_profile=() ;;
  *) echo "error: SD3_ONNX_PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac

# ONNX Runtime, once.
if [ ! -f "$root/.ort/lib/libonnxruntime.so" ]; then
  ort_version="$(sed -n 's/^ORT_VERSION="\(.*\)"$/\1/p' "$root/scripts/setup-ort.sh")"
  echo "installing ONNX Runtime ${ort_version:-} into .ort/ (once)" >&2
fi
bash "$root/scripts/setup-ort.sh" >/dev/null
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"

# The command line, built once (later runs only check that it is up to date).
bin="$root/target/$profile/examples/txt2img"
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  bin="$CARGO_TARGET_DIR/$profile/examples/txt2img"
fi
if [ ! -x "$bin" ]; then
  echo "building txt2img (first run takes a few minutes)" >&2
  (cd "$root" && cargo build "${cargo_profile[@]}" --example txt2img)
else
  (cd "$root" && cargo build --quiet "${cargo_profile[@]}" --example txt2img)
fi

# Relative paths are the caller's: make them absolute (the binary runs from the caller's folder anyway; --model
# also needs it when given as a path relative to the caller).
path_flags=" --output -o --model --init-image --mask --latents --preview-dir "
absolute() { case "$1" in /*|hf:*) printf '%s' "$1" ;; *) printf '%s/%s' "$caller" "$1" ;; esac; }
args=()
has_model=0 has_prompt=0
while [ $# -gt 0 ]; do
  a="$1"; shift
  case "$a" in
    --model|--model=*) has_model=1 ;;
    --prompt|--prompt=*|-p) has_prompt=1 ;;
    -h|--help|-V|--version) has_prompt=1 has_model=1 ;;
  esac
  case "$a" in
    --*=*)
      flag="${a%%=*}" value="${a#*=}"
      if [[ "$path_flags" == *" $flag "* ]]; then a="$flag=$(absolute "$value")"; fi
      args+=("$a") ;;
    *)
      args+=("$a")
      # A path flag's value, when there is one (a missing value is left for txt2img to report).
      if [[ "$path_flags" == *" $a "* ]] && [ $# -gt 0 ] && [[ "$1" != --* ]]; then
        args+=("$(absolute "$1")"); shift
      fi ;;
  esac
done
# Defaults go first, so that a flag missing its value at the end is reported as such.
defaults=()
[ "$has_model" = 1 ] || defaults+=(--model "$root/models/sd3-nano")
[ "$has_prompt" = 1 ] || defaults+=(--prompt "a blue circle in the top left corner")
cd "$caller"
exec "$bin" "${defaults[@]}" "${args[@]}"
