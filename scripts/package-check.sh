#!/usr/bin/env bash
# The crate as crates.io would get it, and a project that depends on it (CI, from scripts/test.sh):
#   1. `cargo package` packages the crate (Cargo.toml's `include` allowlist) and builds it from the packaged
#      files; `cargo publish --dry-run` runs publish's checks on the same package and stops before the upload;
#   2. the .crate file is at most 10 MB and holds the files a user needs (licences, changelog, README, the PTX
#      the CUDA kernels embed) and no models, tests or training code;
#   3. the packaged crate's unit tests and doctests (default features), run from the unpacked package (the
#      integration tests need the repository's fixtures and goldens, which the package does not hold);
#   4. downstream/ (its own Cargo.toml, `sd3-onnx = "0.1"`) built against the unpacked package through a
#      [patch.crates-io] on the command line, then run from an empty directory elsewhere: it must draw an image
#      with the repository's default model, and print readable errors (Display, with the fix; never the Debug
#      form) for a missing ONNX Runtime, a bad size and a missing model folder;
#   5. `cargo check` of the features that hand ONNX Runtime to ort's build script (ort-download-binaries,
#      ort-copy-dylibs, without load-dynamic), with ORT_SKIP_DOWNLOAD=1: ort's build script is compiled but
#      downloads nothing (this machine cannot reach pyke's CDN) and nothing is linked, so this checks that our
#      code and the feature forwarding compile, not that the download works;
#   6. `cargo check` of the packaged crate with the oldest ort its requirement allows (2.0.0-rc.15 since the
#      CUDA-graph loop; rc.14 before).
# Steps 1, 2 and 5 use target/ with the main build; the builds of the unpacked package (3, 4, 6) use their own
# target/package-check/: the packaged crate's unit-test binary has the same name and hash as the repository's, so
# in a shared folder the next `cargo test` of the repository could run the packaged one (seen: its fixture test,
# skipped here, then failed for want of the repository's fixtures).
# Needs crates.io (cargo publish --dry-run reads the index). Usage: bash scripts/package-check.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="$root/target"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
max_bytes=10000000
name=sd3-onnx
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
crate="$root/target/package/$name-$version.crate"
unpacked="$root/target/package/$name-$version"

echo "== 1. cargo package (builds the packaged crate), cargo publish --dry-run"
# --allow-dirty: what is checked is the package's content, which is the working tree's. The tests, the benchmark
# and the repository's tool examples stay in the repository: cargo's notes about each are filtered out.
quiet_notes() { grep -v "^warning: ignoring \(test\|benchmark\|example\) " || true; }
rm -rf "$crate" "$unpacked"
cargo package --locked --allow-dirty 2>&1 | quiet_notes
# The same package through publish's own checks, up to the upload (its build is the one above).
cargo publish --dry-run --locked --allow-dirty --no-verify 2>&1 | quiet_notes

echo "== 2. package size and contents"
bytes="$(stat -c %s "$crate")"
files="$(tar tzf "$crate" | grep -vc '/$')"
echo "$crate: $bytes bytes, $files files"
if [ "$bytes" -gt "$max_bytes" ]; then
  echo "error: the package is $bytes bytes, over the $max_bytes-byte limit (check Cargo.toml's include list)" >&2
  exit 1
fi
list="$(tar tzf "$crate" | sed "s|^$name-$version/||")"
for f in Cargo.toml CRATE-README.md CHANGELOG.md LICENSE-MIT LICENSE-APACHE src/lib.rs src/runtime/kernels/mod_norm.ptx \
  examples/txt2img.rs; do
  grep -qx "$f" <<<"$list" || { echo "error: the package lacks $f" >&2; exit 1; }
done
if unexpected="$(grep -E '^(models|tests|benches|fuzz|scripts|docs|downstream|\.ort|\.ci|\.cargo)/|\.onnx$' <<<"$list")"; then
  echo "error: the package holds files it should not:" >&2
  echo "$unexpected" >&2
  exit 1
fi

# The package's README (crates.io's page) is CRATE-README.md: absolute links only, so it reads the same wherever
# the repository is hosted (tests/readme.rs checks its links and that its example is downstream/'s program).

echo "== 3. unit tests and doctests of the packaged crate (default features)"
# Some unit tests read the repository's fixtures (models/fixtures, not packaged): the kernel panic test (a real
# session on the fused fixture) and the FP8 tests (torch's E4M3 table, the FP8 operator and transformer graphs and
# their emulated outputs). They run in the repository's own `cargo test` above and are skipped here by name.
pkg_target="$root/target/package-check"
skips=(--skip a_kernel_panic_inside_a_session_fails_the_run_not_the_process
       --skip conversions_match_torch_float8_e4m3fn
       --skip decoding_through_the_rgb_graph_gives_the_host_conversion_bytes
       --skip fixed_buffers_give_the_device_loops_latents_and_images_to_the_bit
       --skip the_static_shapes_overrides_leave_no_shape_nodes
       --skip fp8_kernels_match_the_emulation_node_by_node_on_real_activations
       --skip fp8_operators_match_the_python_emulation
       --skip fp8_transformers_match_the_python_emulation
       --skip fp8_merged_qkv_equals_three_separate_nodes_to_the_bit
       --skip fp8_fast_accumulation_keeps_the_cpu_values_and_bad_values_are_refused
       --skip fp8_merged_feed_forward_equals_the_two_nodes_to_the_bit)
(cd "$unpacked" && CARGO_TARGET_DIR="$pkg_target" cargo test --quiet --locked --lib -- "${skips[@]}" &&
  CARGO_TARGET_DIR="$pkg_target" cargo test --quiet --locked --doc)

echo "== 4. downstream/ against the packaged crate"
patch="patch.crates-io.$name.path=\"$unpacked\""
CARGO_TARGET_DIR="$pkg_target" cargo build --quiet --locked --manifest-path downstream/Cargo.toml --config "$patch"
bin="$pkg_target/debug/sd3-onnx-downstream"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work" # not the repository: nothing may be found relative to it
"$bin" "$root/models/sd3-nano" "three red circles" >out.txt
cat out.txt
grep -q "^128x128 image" out.txt || { echo "error: downstream did not draw a 128x128 image" >&2; exit 1; }
[ -s image.png ] || { echo "error: downstream wrote no image.png" >&2; exit 1; }
# Each failure: exit status 1, the Display text with its fix on stderr, no Debug form.
expect_error() {
  local want="$1"
  shift
  local status=0
  "$@" >/dev/null 2>err.txt || status=$?
  cat err.txt
  if [ "$status" -ne 1 ] || ! grep -qF -- "$want" err.txt || grep -qE '[A-Za-z] \{ [a-z_]+:' err.txt; then
    echo "error: expected exit status 1 and a readable error containing '$want' (status $status)" >&2
    exit 1
  fi
}
mkdir -p .ort/lib && cp "$ORT_DYLIB_PATH" .ort/lib/libonnxruntime.so # a library here must not be picked up
expect_error "Fix: get an ONNX Runtime" env -u ORT_DYLIB_PATH "$bin" "$root/models/sd3-nano"
expect_error "nearest valid sizes: 128x128" "$bin" "$root/models/sd3-nano" "three red circles" 1000x1000
expect_error "The model folder does not exist" "$bin" "$work/no-such-model"
cd "$root"

echo "== 5. ort-download-binaries / ort-copy-dylibs compile (no download, no link)"
features=(--lib --no-default-features --features ort-download-binaries,ort-copy-dylibs)
if cargo clippy --version >/dev/null 2>&1; then
  ORT_SKIP_DOWNLOAD=1 cargo clippy --quiet --locked "${features[@]}" -- -D warnings
else
  ORT_SKIP_DOWNLOAD=1 cargo check --quiet --locked "${features[@]}"
fi

echo "== 6. the packaged crate with the oldest ort it allows"
oldest="$root/target/package-ort-oldest"
rm -rf "$oldest" && cp -r "$unpacked" "$oldest"
(cd "$oldest" && cargo update --quiet -p ort --precise 2.0.0-rc.15 &&
  CARGO_TARGET_DIR="$pkg_target" cargo check --quiet --lib --features cuda,tensorrt,directml,download)
echo "package checks passed"
