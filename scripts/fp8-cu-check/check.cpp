// Runs fp8.cu's per-thread loops on the CPU over every thread of a launch and compares them with the plain
// one-value-at-a-time definitions: the max |x| over all values, and q[i] = e4m3(x[i] / scale) for every i
// (which checks the vector path's indexing and byte order). Exit status 1 on any difference.
#include "../../src/runtime/kernels/fp8.cu"
#include <cstdio>
#include <random>
#include <vector>
int main() {
    std::mt19937 rng(7);
    int failures = 0, cases = 0;
    const long long sizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 1000, 4096 + 5, 8 * 256 * 3 + 3, 100003};
    const long long strides[] = {1, 3, 32, 256, 256 * 7, 1 << 20};
    for (long long n : sizes)
        for (int xoff = 0; xoff < 3; xoff++)      // x offset in halves: 0 (aligned), 1, 4 (unaligned)
            for (int qoff = 0; qoff < 2; qoff++)  // q offset in bytes: 0 (aligned), 3
                for (long long stride : strides) {
                    const int xo = xoff == 2 ? 4 : xoff, qo = qoff ? 3 : 0;
                    std::vector<__half> buf(n + 16);
                    alignas(16) static unsigned char qbuf[200000], qref[200000];
                    // aligned start: vector storage is 16-byte aligned by allocation in practice; force it
                    __half* base = reinterpret_cast<__half*>((reinterpret_cast<size_t>(buf.data()) + 15) & ~size_t(15));
                    std::vector<__half> store(n + 32);
                    base = reinterpret_cast<__half*>((reinterpret_cast<size_t>(store.data()) + 15) & ~size_t(15));
                    __half* x = base + xo;
                    float ref_max = 0.0f;
                    for (long long i = 0; i < n; i++) {
                        uint16_t b = (uint16_t)rng();
                        if (i % 97 == 5) b = 0x7e00;  // NaN: ignored by the max, 0x7f | sign when quantized
                        x[i].bits = b;
                        ref_max = fmaxf(ref_max, fabsf(__half2float(x[i])));
                    }
                    float m = 0.0f;
                    for (long long t = 0; t < stride; t++) m = fmaxf(m, fp8_amax_part(x, n, t, stride));
                    cases++;
                    if (__float_as_uint(m) != __float_as_uint(ref_max)) {
                        failures++;
                        std::printf("amax n=%lld xo=%d stride=%lld: %g vs %g\n", n, xo, stride, m, ref_max);
                    }
                    const float scale = ref_max > 0 ? __fdiv_rn(ref_max, E4M3_MAX) : 1.0f;
                    unsigned char* q = qbuf + qo;
                    std::memset(qbuf, 0xAA, n + 8);
                    for (long long t = 0; t < stride; t++) fp8_quantize_part(x, n, scale, q, t, stride);
                    for (long long i = 0; i < n; i++) qref[i] = e4m3(__fdiv_rn(__half2float(x[i]), scale));
                    cases++;
                    long long bad = 0;
                    for (long long i = 0; i < n; i++) bad += q[i] != qref[i];
                    if (q[n] != 0xAA) bad++;  // nothing written past the end
                    if (bad) {
                        failures++;
                        std::printf("quantize n=%lld xo=%d qo=%d stride=%lld: %lld bytes differ\n", n, xo, qo, stride, bad);
                    }
                }
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures ? 1 : 0;
}
