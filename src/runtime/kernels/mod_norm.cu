// sd3onnx::ModNorm on CUDA: h' = h + gate * y (stored in float16), n = LayerNorm(h') * (1 + scale) + shift,
// one thread block per row, float32 arithmetic. gate/shift/scale are [offset, offset + D) slices of per-sample
// modulation vectors [B, M]. Compiled to PTX by scripts/build_ptx.py (NVRTC from a pinned wheel); the PTX is
// committed next to this file and loaded by cuda.rs through the CUDA driver.
#include <cuda_fp16.h>

__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // shared may still be read from the previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    float t = lane < warps ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// d2 = D / 2 (D even); strides and offsets in half2 units.
extern "C" __global__ void mod_norm_f16(const __half2* __restrict__ h, const __half2* __restrict__ y,
                                        const __half2* __restrict__ gmod, const __half2* __restrict__ nmod,
                                        __half2* __restrict__ h_out, __half2* __restrict__ n_out,
                                        int rows_per_batch, int d2, int gmod_stride2, int nmod_stride2,
                                        int gate_off2, int shift_off2, int scale_off2, float eps) {
    __shared__ float shared[32];
    const long long row = blockIdx.x;
    const int b = (int)(row / rows_per_batch);
    const __half2* hr = h + row * d2;
    const __half2* src = hr;
    float sum = 0.0f;
    if (y != nullptr) {
        const __half2* yr = y + row * d2;
        const __half2* gr = gmod + (long long)b * gmod_stride2 + gate_off2;
        __half2* hor = h_out + row * d2;
        for (int c = threadIdx.x; c < d2; c += blockDim.x) {
            float2 hv = __half22float2(hr[c]);
            float2 yv = __half22float2(yr[c]);
            float2 gv = __half22float2(gr[c]);
            __half2 s = __floats2half2_rn(hv.x + gv.x * yv.x, hv.y + gv.y * yv.y);
            hor[c] = s;
            float2 sv = __half22float2(s);
            sum += sv.x + sv.y;
        }
        src = hor;
    } else {
        for (int c = threadIdx.x; c < d2; c += blockDim.x) {
            float2 hv = __half22float2(hr[c]);
            sum += hv.x + hv.y;
        }
    }
    const float inv_d = 1.0f / (2.0f * d2);
    const float mean = block_sum(sum, shared) * inv_d;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < d2; c += blockDim.x) {
        float2 v = __half22float2(src[c]);
        sq += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean);
    }
    const float rstd = rsqrtf(block_sum(sq, shared) * inv_d + eps);
    const __half2* sh = nmod + (long long)b * nmod_stride2 + shift_off2;
    const __half2* sc = nmod + (long long)b * nmod_stride2 + scale_off2;
    __half2* nr = n_out + row * d2;
    for (int c = threadIdx.x; c < d2; c += blockDim.x) {
        float2 v = __half22float2(src[c]);
        float2 s = __half22float2(sc[c]);
        float2 t = __half22float2(sh[c]);
        nr[c] = __floats2half2_rn((v.x - mean) * rstd * (1.0f + s.x) + t.x, (v.y - mean) * rstd * (1.0f + s.y) + t.y);
    }
}

// sd3onnx::HeadRmsNorm on CUDA: SD3.5's q/k RMS-norm on the joint [B, S, N * H] tensor, one warp per (row, head):
// y = x * rsqrt(mean(x^2) + eps) * w, with w = w_a for the first rows_a rows of each batch (image tokens) and w_b
// for the rest (context tokens). h2 = H / 2 (H even); float32 arithmetic.
extern "C" __global__ void head_rms_norm_f16(const __half2* __restrict__ x, const __half2* __restrict__ w_a,
                                             const __half2* __restrict__ w_b, __half2* __restrict__ y,
                                             long long segments, int heads, int rows, int rows_a, int h2,
                                             float eps) {
    const long long seg = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (seg >= segments) return;
    const int lane = threadIdx.x & 31;
    const long long row = seg / heads;
    const __half2* w = (row % rows) < rows_a ? w_a : w_b;
    const __half2* xs = x + seg * h2;
    float sq = 0.0f;
    for (int c = lane; c < h2; c += 32) {
        float2 v = __half22float2(xs[c]);
        sq += v.x * v.x + v.y * v.y;
    }
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float r = rsqrtf(sq / (2.0f * h2) + eps);
    __half2* ys = y + seg * h2;
    for (int c = lane; c < h2; c += 32) {
        float2 v = __half22float2(xs[c]);
        float2 g = __half22float2(w[c]);
        ys[c] = __floats2half2_rn(v.x * r * g.x, v.y * r * g.y);
    }
}
