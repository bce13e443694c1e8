// FP8 (issue 19): per-tensor amax and E4M3 quantization of float16 activations for sd3onnx::LinearFp8,
// LinearConcatFp8 and LinearSplitFp8 on CUDA (the products themselves are cuBLASLt FP8 matmuls, cuda.rs).
// Compiled to PTX by scripts/build_ptx.py (NVRTC from a pinned wheel) like mod_norm.cu; loaded by cuda.rs only
// after the device's compute capability was checked (>= 8.9).
//
// The arithmetic is the CPU kernels' (src/runtime/kernels/fp8.rs), bit for bit:
//   amax  = max |x| (NaNs ignored: fmaxf), scale = amax > 0 ? amax / 448 : 1 (IEEE division: __fdiv_rn, which
//           --use_fast_math does not change)
//   q     = e4m3(x / scale): round to nearest even, saturating at +-448, NaN -> 0x7f | sign
// E4M3 (OCP OFP8 spec rev. 1.0, table 1): bias 7, largest finite 448 = 0x7e, subnormals m * 2^-9. The conversion
// is written out rather than taken from cuda_fp8.h so that it is the same on every architecture this PTX is
// compiled for (cuda_fp8.h's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) computes the same values).
#include <cuda_fp16.h>

#define E4M3_MAX 448.0f

__device__ __forceinline__ unsigned char e4m3(float x) {
    const unsigned int bits = __float_as_uint(x);
    const unsigned char sign = (unsigned char)((bits >> 24) & 0x80u);
    const unsigned int ab = bits & 0x7fffffffu;
    if (ab > 0x7f800000u) return sign | 0x7f;          // NaN
    const float a = __uint_as_float(ab);
    if (a >= E4M3_MAX) return sign | 0x7e;             // saturate (infinities too)
    if (a < 0.015625f) {                               // below 2^-6: multiples of 2^-9, a * 512 exact
        return sign | (unsigned char)__float2int_rn(a * 512.0f);  // rn: ties to even
    }
    const int e = (int)(ab >> 23) - 127;               // -6 ..= 8
    const unsigned int m = ab & 0x7fffffu, keep = m >> 20, rest = m & 0xfffffu;
    const unsigned int up = (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) ? 1u : 0u;
    const unsigned int code = ((unsigned int)(e + 7) << 3) + keep + up;
    return sign | (unsigned char)(code < 0x7eu ? code : 0x7eu);
}

// amax_bits (one uint, zeroed before the launch): max |x| over n values, as float bits (non-negative floats
// order like their bit patterns, so atomicMax on the bits is a float max).
extern "C" __global__ void fp8_amax_f16(const __half* __restrict__ x, long long n, unsigned int* amax_bits) {
    __shared__ float shared[32];
    float m = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        m = fmaxf(m, fabsf(__half2float(x[i])));
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = m;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        float t = lane < warps ? shared[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
        if (lane == 0) atomicMax(amax_bits, __float_as_uint(t));
    }
}

// q[i] = e4m3(x[i] / scale) for n values. scale = *stored when given (a calibrated scale from the graph), else
// amax / 448 from fp8_amax_f16's result (1 for an all-zero tensor); block 0 writes it to *scale_out for cuBLASLt's
// B scale pointer (every block computes the same value from amax_bits, so the write needs no ordering).
extern "C" __global__ void fp8_quantize_f16(const __half* __restrict__ x, long long n, const float* stored,
                                            const unsigned int* amax_bits, float* scale_out,
                                            unsigned char* __restrict__ q) {
    float scale;
    if (stored != nullptr) {
        scale = *stored;
    } else {
        const float amax = __uint_as_float(*amax_bits);
        scale = amax > 0.0f ? __fdiv_rn(amax, E4M3_MAX) : 1.0f;
        if (blockIdx.x == 0 && threadIdx.x == 0 && scale_out != nullptr) *scale_out = scale;
    }
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        q[i] = e4m3(__fdiv_rn(__half2float(x[i]), scale));
    }
}
