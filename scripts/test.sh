#!/usr/bin/env bash
# Everything the test suite needs, from a fresh clone: the ONNX Runtime library, then `cargo test`
# (unit tests, integration tests in tests/, the examples' build, and the doctests, which are compiled), then
# lints, docs and the package checks (scripts/package-check.sh: cargo publish --dry-run, the package's size
# and contents, downstream/ built against the packaged crate). Extra arguments go to cargo test (e.g.
# `scripts/test.sh --test golden_images`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-ort.sh
# The library loads ONNX Runtime only from ORT_DYLIB_PATH or the builder option (.cargo/config.toml sets the
# same for cargo commands; programs started outside cargo need the variable).
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"
# The FP8 kernels' per-thread loops (src/runtime/kernels/fp8.cu) on the CPU: their vector and scalar paths against
# the one-value-at-a-time definitions (a second). The GPU runs of the same kernels need an FP8 GPU (scripts/gpu/).
if command -v g++ >/dev/null 2>&1; then
  bash scripts/check_fp8_cu.sh
else
  echo "skipped scripts/check_fp8_cu.sh: no g++ on this machine" >&2
fi
echo "building and running the tests (the first build takes several minutes)" >&2
cargo test "$@"
# Hub downloads (feature `download`): the hub module's unit tests and tests/hub.rs, which serves the tiny fixture
# from a local hub on 127.0.0.1 (no network needed).
cargo test --features download --lib --test hub
cargo test --quiet --features download --doc hub
# The serde feature: requests and output summaries to and from JSON (and the request's JSON doctest).
cargo test --features serde --test serde_json
cargo test --quiet --features serde --doc GenerationRequest
# The pipeline from tokio (spawn_blocking, a run cancelled from an async task); exits non-zero on anything unexpected.
cargo run --quiet --features serde --example tokio -- models/sd3-nano
# The worker fleet (fleet/, docs/scale-out.md): its unit tests, and the chaos and drain tests against a real
# redis-server that the tests start on 127.0.0.1 at a free port (scripts/setup-redis.sh installs the Debian package
# when it is missing). `fault-injection` lets the chaos test's poison job abort workers.
bash scripts/setup-redis.sh
cargo test -p sd3-onnx-fleet --features fault-injection
# Lints and docs: warnings are errors. Clippy runs without features and with all of them: the execution-provider
# code paths (cuda, tensorrt, directml) compile behind their features without their libraries, and the example
# has code for both sides of `download`. Without clippy in the toolchain, `cargo check` does the compiling.
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --quiet --all-targets -- -D warnings
  cargo clippy --quiet --all-targets --features cuda,tensorrt,directml,download,serde -- -D warnings
  cargo clippy --quiet -p sd3-onnx-fleet --all-targets --features fault-injection,cuda,tensorrt -- -D warnings
else
  cargo check --quiet --features cuda,tensorrt,directml,download,serde --all-targets
  cargo check --quiet -p sd3-onnx-fleet --all-targets --features fault-injection,cuda,tensorrt
fi
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps --features download,serde
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps -p sd3-onnx-fleet
# The crate as published, and a project that uses it.
bash scripts/package-check.sh
