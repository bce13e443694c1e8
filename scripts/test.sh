#!/usr/bin/env bash
# Everything the test suite needs, from a fresh clone: the ONNX Runtime library, then `cargo test`.
# Extra arguments go to cargo test (e.g. `scripts/test.sh --test golden_images`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-ort.sh
cargo test --all-targets "$@"
# Doctests (the crate docs' quick start runs against the tiny fixture).
cargo test --doc "$@"
