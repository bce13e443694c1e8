// The device loop's Euler step as one kernel (issue 19: our time outside ONNX Runtime): sd3onnx::EulerStepF16 and
// EulerStepF32 on CUDA (cuda.rs). Compiled to PTX by scripts/build_ptx.py (NVRTC from a pinned wheel) like
// mod_norm.cu.
//
// The arithmetic is the generic step graph's (src/runtime/step.rs, `step_graph`: Cast, Split, Sub, Mul, Add, Mul,
// Add, Cast, Concat as separate ONNX Runtime kernels), value by value and in the same order, with every operation
// rounded on its own: the _rn intrinsics are never contracted into fused multiply-adds, whatever --use_fast_math
// says, so one value's result does not depend on how the kernel is compiled:
//   guided = u + g * (c - u)          (with guidance; u = v[e], c = v[e + total]: the batch is [uncond..., cond...])
//   guided = v[e]                     (without)
//   x_next = x + dt * guided
//   hidden = half(x_next), written twice with guidance ([x_next, x_next]), once without
// v is converted to float exactly (half -> float is exact), and half(x_next) rounds to nearest even as
// ONNX Runtime's Cast does. Compiled without --use_fast_math (the marker "build_ptx: ieee"), so subnormals are kept
// as on the CPU and in ONNX Runtime's own kernels instead of flushed to zero.
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// One thread per value of x, over a grid-stride loop; `total` = the number of values of x (images * c * h * w),
// which the host checks fits twice in 32 bits (v and hidden hold 2 * total values with guidance).
template <typename T>
__device__ __forceinline__ void euler_step(const float* __restrict__ x, const T* __restrict__ v,
                                           float* __restrict__ x_next, T* __restrict__ hidden, unsigned int total,
                                           int guidance, float g, float dt) {
    for (unsigned int e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        float guided;
        if (guidance) {
            const float u = to_f32<T>(v[e]);
            const float c = to_f32<T>(v[e + total]);
            guided = __fadd_rn(u, __fmul_rn(g, __fsub_rn(c, u)));
        } else {
            guided = to_f32<T>(v[e]);
        }
        const float xn = __fadd_rn(x[e], __fmul_rn(dt, guided));
        x_next[e] = xn;
        const T h = from_f32<T>(xn);
        hidden[e] = h;
        if (guidance) hidden[e + total] = h;
    }
}

extern "C" __global__ void euler_step_f16(const float* __restrict__ x, const __half* __restrict__ v,
                                          float* __restrict__ x_next, __half* __restrict__ hidden, unsigned int total,
                                          int guidance, float g, float dt) {
    euler_step<__half>(x, v, x_next, hidden, total, guidance, g, dt);
}

extern "C" __global__ void euler_step_f32(const float* __restrict__ x, const float* __restrict__ v,
                                          float* __restrict__ x_next, float* __restrict__ hidden, unsigned int total,
                                          int guidance, float g, float dt) {
    euler_step<float>(x, v, x_next, hidden, total, guidance, g, dt);
}
