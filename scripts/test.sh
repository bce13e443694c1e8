#!/usr/bin/env bash
# Everything the test suite needs, from a fresh clone: the ONNX Runtime library, then `cargo test`
# (unit tests, integration tests in tests/, the examples' build, and the doctests, which run against the
# tiny fixture). Extra arguments go to cargo test (e.g. `scripts/test.sh --test golden_images`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-ort.sh
cargo test "$@"
# The execution-provider code paths compile behind their features (their libraries are not needed to build).
cargo check --quiet --features cuda,tensorrt,directml --all-targets
# Lints and docs: warnings are errors (skipped where the toolchain has no clippy).
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --quiet --all-targets -- -D warnings
fi
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps
