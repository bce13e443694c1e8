// A CPU stand-in for the parts of CUDA that src/runtime/kernels/fp8.cu uses, so that its per-thread loops
// (fp8_amax_part, fp8_quantize_part) can run on the CPU (scripts/check_fp8_cu.sh). Not for the kernels' launches.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
struct __half { uint16_t bits; };
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }  // default rounding: ties to even
inline float __fdiv_rn(float a, float b) { volatile float q = a / b; return q; }
inline float __half2float(__half h) {  // IEEE binary16 -> binary32, exact
    const unsigned int s = (h.bits >> 15) & 1, e = (h.bits >> 10) & 31, m = h.bits & 1023;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline float __shfl_xor_sync(unsigned int, float v, int) { return v; }
inline void __syncthreads() {}
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { unsigned int o = *a; if (v > o) *a = v; return o; }
