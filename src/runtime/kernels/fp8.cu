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

// Both kernels read x 16 bytes (8 halves) at a time when x is 16-byte aligned (and write q 8 bytes at a time when
// q is 8-byte aligned), with the values past the last whole vector (n % 8) and unaligned tensors taken one by one.
// The first versions read one half and wrote one byte per thread: on an H200 at SD3-medium shapes (8,858 x 1,536
// activations) fp8_quantize_f16 took 50 us and fp8_amax_f16 22 us per call (ncu, docs/gpu-results/
// 2026-12-04-h200-round21), 0.5-1 TB/s against the card's 4.8, and together more time than the FP8 matmuls
// they feed. Each value's arithmetic is unchanged (the max is order-free; the quantization is per value).

// Per thread, over grid-stride indices: the vectors v = tid, tid + stride, ... < n / 8 (vector path) or the
// values i = tid, ... < n (scalar path); fp8_amax_part and fp8_quantize_part are the kernels' loops, separate so
// that scripts/check_fp8_cu.sh can run them on the CPU over every (tid, stride) of a launch.
// The two halves of a 32-bit word of x: the one at the lower address is the word's low 16 bits (little-endian).
__device__ __forceinline__ float low_half(unsigned int w) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float high_half(unsigned int w) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }
__device__ __forceinline__ float abs_max2(unsigned int w) { return fmaxf(fabsf(low_half(w)), fabsf(high_half(w))); }

__device__ __forceinline__ float fp8_amax_part(const __half* __restrict__ x, long long n, long long tid,
                                               long long stride) {
    float m = 0.0f;
    long long done = 0;
    if ((reinterpret_cast<size_t>(x) & 15) == 0) {
        const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x);
        const long long nv = n >> 3;
        long long i = tid;
        for (; i + stride < nv; i += 2 * stride) {  // two loads in flight per thread
            const uint4 a = xv[i], b = xv[i + stride];
            const unsigned int w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int k = 0; k < 8; k++) m = fmaxf(m, abs_max2(w[k]));
        }
        if (i < nv) {
            const uint4 a = xv[i];
            const unsigned int w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int k = 0; k < 4; k++) m = fmaxf(m, abs_max2(w[k]));
        }
        done = nv << 3;
    }
    for (long long i = done + tid; i < n; i += stride) m = fmaxf(m, fabsf(__half2float(x[i])));
    return m;
}

__device__ __forceinline__ void fp8_quantize_part(const __half* __restrict__ x, long long n, float scale,
                                                  unsigned char* __restrict__ q, long long tid, long long stride) {
    long long done = 0;
    if ((reinterpret_cast<size_t>(x) & 15) == 0 && (reinterpret_cast<size_t>(q) & 7) == 0) {
        const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x);
        uint2* __restrict__ qv = reinterpret_cast<uint2*>(q);
        const long long nv = n >> 3;
        for (long long i = tid; i < nv; i += stride) {
            const uint4 a = xv[i];
            const unsigned int w[4] = {a.x, a.y, a.z, a.w};
            unsigned int out[2] = {0u, 0u};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const unsigned int lo = e4m3(__fdiv_rn(low_half(w[k]), scale));
                const unsigned int hi = e4m3(__fdiv_rn(high_half(w[k]), scale));
                out[k >> 1] |= (lo | (hi << 8)) << ((k & 1) * 16);
            }
            qv[i] = make_uint2(out[0], out[1]);
        }
        done = nv << 3;
    }
    for (long long i = done + tid; i < n; i += stride) q[i] = e4m3(__fdiv_rn(__half2float(x[i]), scale));
}

// amax_bits (one uint, zeroed before the launch): max |x| over n values, as float bits (non-negative floats
// order like their bit patterns, so atomicMax on the bits is a float max).
extern "C" __global__ void fp8_amax_f16(const __half* __restrict__ x, long long n, unsigned int* amax_bits) {
    __shared__ float shared[32];
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float m = fp8_amax_part(x, n, tid, (long long)gridDim.x * blockDim.x);
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
    fp8_quantize_part(x, n, scale, q, (long long)blockIdx.x * blockDim.x + threadIdx.x,
                      (long long)gridDim.x * blockDim.x);
}

// *inv = 1 / *scale (IEEE division), for cuBLASLt's D scale (a multiplier) of an FP8 product that writes E4M3 with
// a stored activation scale (MlpFp8: the feed-forward's first product writes the second's input). One thread.
extern "C" __global__ void fp8_reciprocal(const float* scale, float* inv) { *inv = __fdiv_rn(1.0f, *scale); }
