#!/usr/bin/env python3
"""Compiles src/runtime/kernels/*.cu to PTX with NVRTC (the nvidia-cuda-nvrtc-cu12==12.8.93 wheel that
.venv-tools pins through torch) and writes the .ptx beside each source. The crate embeds the PTX (include_str!);
the CUDA driver compiles it for the GPU at load time, so nothing here needs a GPU or nvcc.

    .venv-tools/bin/python scripts/build_ptx.py          # rebuild
    .venv-tools/bin/python scripts/build_ptx.py --check  # fail if a committed .ptx is stale
"""
import argparse
import ctypes
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src" / "runtime" / "kernels"
# compute_75: PTX the driver can compile for Turing and every later GPU (H100/H200 are sm_90).
ARCH = b"--gpu-architecture=compute_75"


def nvrtc():
    import nvidia.cuda_nvrtc  # noqa: F401  (the wheel's package; its lib/ holds libnvrtc.so.12)
    lib = pathlib.Path(nvidia.cuda_nvrtc.__path__[0]) / "lib" / "libnvrtc.so.12"
    return ctypes.CDLL(str(lib))


def compile_ptx(lib, src: pathlib.Path) -> str:
    prog = ctypes.c_void_p()
    code = src.read_bytes()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    import nvidia.cuda_runtime  # cuda_fp16.h (nvidia-cuda-runtime-cu12==12.8.90)
    inc = pathlib.Path(nvidia.cuda_runtime.__path__[0]) / "include"
    # --use_fast_math for every kernel but those marked "build_ptx: ieee" (step.cu: its values must be the stock
    # graph's, so no flush of subnormals to zero either)
    fast = [] if b"build_ptx: ieee" in code else [b"--use_fast_math"]
    opts = [ARCH, b"--std=c++17", *fast, b"-I" + str(inc).encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"{src.name}: NVRTC failed ({rc}):\n{log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    lib = nvrtc()
    stale = []
    for src in sorted(KERNELS.glob("*.cu")):
        ptx = compile_ptx(lib, src)
        dst = src.with_suffix(".ptx")
        if args.check:
            if not dst.exists() or dst.read_text() != ptx:
                stale.append(dst.name)
        else:
            dst.write_text(ptx)
            print(f"wrote {dst.relative_to(ROOT)} ({len(ptx)} bytes)")
    if stale:
        sys.exit(f"stale PTX (run scripts/build_ptx.py): {', '.join(stale)}")


if __name__ == "__main__":
    main()
