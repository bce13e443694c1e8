#!/usr/bin/env bash
# On the GPU machine: the crate's CUDA lib tests (ignored by default), the FP8 kernels against the Python emulation
# (fp8_cuda), the GPU RGB conversion against the host's (rgb_cuda) and the device loop's fused Euler step and stock
# step graph on CUDA against the CPU, to the bit (step_cuda), with the lines that say how they went
# (cuBLASLt's per-call trace lines left out).
#   bash scripts/gpu/cuda_lib_tests.sh BINARY      (the unpacked `cargo test --features cuda --lib` binary, or its .xz)
# Needs `source .ort-cuda/env.sh` first. Used by round19.sh PHASE=tiny and models/nano/device_bg.sh FP8_CHECK=1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
b=${1:?the lib test binary (or its .xz)}
if [[ "$b" == *.xz ]]; then
  [ -f "$b" ] || { echo "no $b: carry .device-bin"; exit 1; }
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$b" /tmp/sd3onnx-lib-tests \
    && chmod +x /tmp/sd3onnx-lib-tests && b=/tmp/sd3onnx-lib-tests
fi
[ -x "$b" ] || { echo "no lib test binary at $b: carry .device-bin/sd3onnx-lib-tests.xz"; exit 1; }
echo "== lib tests on CUDA ($(date +%T))"
SD3ONNX_REPO=$PWD CUBLASLT_LOG_LEVEL=2 timeout 300 "$b" --ignored --nocapture --test-threads 1 fp8_cuda 2>&1 \
  | grep -v "\[Trace\]" | grep -E "CUDA|test result|panicked|FP8 needs|error|cublasLt" | tail -30
SD3ONNX_REPO=$PWD timeout 120 "$b" --ignored --nocapture --test-threads 1 rgb_cuda 2>&1 \
  | grep -E "CUDA|test result|panicked|error" | tail -6
SD3ONNX_REPO=$PWD timeout 120 "$b" --ignored --nocapture --test-threads 1 step_cuda 2>&1 \
  | grep -E "CUDA|test result|panicked|error" | tail -20
