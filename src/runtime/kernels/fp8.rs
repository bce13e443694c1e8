//! FP8 E4M3 (`float8_e4m3fn`) numbers for the FP8 matrix-product operators (issue 19): the conversions and the
//! per-tensor scales, shared by the CPU kernels (which compute with them) and the CUDA kernels (whose `fp8.cu` does
//! the same arithmetic on the GPU).
//!
//! E4M3 (OCP 8-bit Floating Point Specification (OFP8) rev. 1.0, 2023, table 1; `torch.float8_e4m3fn`, NVIDIA's
//! `__nv_fp8_e4m3`): 1 sign, 4 exponent (bias 7) and 3 mantissa bits; no infinities; `S.1111.111` is NaN; the
//! largest finite value is `S.1111.110` = 448 (`torch.finfo(torch.float8_e4m3fn).max`); subnormals are
//! `m * 2^-9` (exponent field 0), the smallest normal is `2^-6`.
//!
//! Conversion from float32 rounds to nearest, ties to even, and saturates: finite values and infinities beyond
//! ±448 become ±448 (what CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` does). torch's own cast
//! turns values beyond 464 into NaN instead, so the tests compare with `x.clamp(-448, 448).to(float8_e4m3fn)`
//! (models/fixtures/fp8/e4m3_torch.txt, made by models/export/e4m3_table.py). NaN stays NaN (code `0x7f`, with
//! the sign bit of the input).
//!
//! Scaling: a tensor `t` is stored as `q = e4m3(t / s)` with one float32 scale `s = amax(|t|) / 448`, so its
//! largest magnitude lands on the largest E4M3 value; `t ≈ s * q`. A product of two scaled tensors is
//! `x @ w ≈ (x_s * w_s) * (q_x @ q_w)`, the form cuBLASLt's FP8 matmul computes (A/B scale pointers).

/// The largest finite E4M3 value (OCP OFP8 spec rev. 1.0, table 1; `torch.finfo(torch.float8_e4m3fn).max`).
pub(crate) const E4M3_MAX: f32 = 448.0;

/// The value of an E4M3 code (exact in float32).
pub(crate) const fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0x0f) as i32;
    let m = (code & 0x07) as f32;
    if code & 0x7f == 0x7f {
        // a quiet NaN with the code's sign (from bits: the sign of NAN * -1.0 is not specified)
        return f32::from_bits(if code & 0x80 != 0 { 0xffc0_0000 } else { 0x7fc0_0000 });
    }
    let v = if e == 0 {
        m * (1.0 / 512.0) // subnormal: m * 2^-9
    } else {
        // (1 + m / 8) * 2^(e - 7), built from float32 bits: exponent e - 7 + 127, mantissa m << 20
        f32::from_bits((((e + 120) as u32) << 23) | (((code & 0x07) as u32) << 20))
    };
    sign * v
}

/// All 256 codes' values.
pub(crate) static TABLE: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode(i as u8);
        i += 1;
    }
    t
};

/// The E4M3 code nearest to `x` (ties to even), saturating at ±448; NaN becomes `0x7f` with `x`'s sign.
pub(crate) fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    if a < 1.0 / 64.0 {
        // below the smallest normal 2^-6: multiples of 2^-9 (a * 512 is exact), 8 * 2^-9 being code 0x08 = 2^-6
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // normal: keep 3 of float32's 23 mantissa bits, rounding to nearest even; a carry into the exponent is the
    // next binade (code arithmetic carries it: mantissa 8 = exponent + 1)
    let abits = a.to_bits();
    let e = (abits >> 23) as i32 - 127; // -6 ..= 8 here
    let m = abits & 0x7f_ffff;
    let keep = m >> 20;
    let rest = m & 0xf_ffff;
    let half = 0x8_0000;
    let up = rest > half || (rest == half && keep & 1 == 1);
    let code = (((e + 7) as u32) << 3) + keep + up as u32;
    // a < 448 rounds to at most 448 = 0x7e
    sign | code.min(0x7e) as u8
}

/// The per-tensor scale of a tensor whose largest magnitude is `amax`: `amax / 448`, or 1 for an all-zero
/// tensor (any scale quantizes zeros to zero). The CUDA kernel (`fp8.cu`, `fp8_scale`) computes the same.
pub(crate) fn scale_of(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / E4M3_MAX
    } else {
        1.0
    }
}

/// The largest magnitude in `x`, NaNs ignored (as CUDA's `fmaxf`).
pub(crate) fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// `x` quantized with `scale` and read back: `decode(encode(x / scale))` per value (the E4M3 value, unscaled).
pub(crate) fn quantize(x: &[f32], scale: f32) -> Vec<f32> {
    x.iter().map(|v| TABLE[encode(v / scale) as usize]).collect()
}

/// The oldest GPUs with FP8 tensor cores (and cuBLASLt FP8 matmuls): compute capability 8.9 (Ada; Hopper is 9.0).
/// cuBLAS documentation, cublasLtMatmul, "FP8" data type table: E4M3 A/B need compute capability 8.9 or newer.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA kernels and the tests
pub(crate) const MIN_CAPABILITY: (i32, i32) = (8, 9);

/// An FP8 graph on a GPU without FP8 matrix products.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA kernels and the tests
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fp8Unsupported {
    pub major: i32,
    pub minor: i32,
}

impl std::fmt::Display for Fp8Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FP8 needs compute capability {}.{} or newer (Ada/Hopper); this GPU is {}.{}: export without --fp8",
            MIN_CAPABILITY.0, MIN_CAPABILITY.1, self.major, self.minor
        )
    }
}

impl std::error::Error for Fp8Unsupported {}

/// Whether a GPU of compute capability `major.minor` runs the FP8 operators.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // used by the CUDA kernels and the tests
pub(crate) fn check_capability(major: i32, minor: i32) -> Result<(), Fp8Unsupported> {
    if (major, minor) >= MIN_CAPABILITY {
        Ok(())
    } else {
        Err(Fp8Unsupported { major, minor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_needs_ada_or_hopper() {
        assert!(check_capability(8, 9).is_ok() && check_capability(9, 0).is_ok() && check_capability(10, 0).is_ok());
        let e = check_capability(8, 6).unwrap_err();
        assert_eq!(
            e.to_string(),
            "FP8 needs compute capability 8.9 or newer (Ada/Hopper); this GPU is 8.6: export without --fp8"
        );
        assert!(check_capability(7, 5).is_err() && check_capability(8, 0).is_err());
    }

    /// torch 2.8.0's conversions (models/export/e4m3_table.py): every code's value, and the saturating conversion
    /// of round-trip values, ties and their neighbours, subnormals, saturation, NaN and random values.
    #[test]
    fn conversions_match_torch_float8_e4m3fn() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/fp8/e4m3_torch.txt");
        let text = std::fs::read_to_string(&path).expect("models/fixtures/fp8/e4m3_torch.txt");
        let hex = |s: &str| u32::from_str_radix(s, 16).expect("hex");
        let (mut decoded, mut encoded, mut bad) = (0, 0, Vec::new());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            match f[0] {
                "d" => {
                    let (code, want) = (hex(f[1]) as u8, f32::from_bits(hex(f[2])));
                    let got = TABLE[code as usize];
                    let same = (got.is_nan() && want.is_nan()) || got.to_bits() == want.to_bits();
                    if !same {
                        bad.push(format!("decode {code:#04x}: {got} (torch {want})"));
                    }
                    decoded += 1;
                }
                "e" => {
                    let (x, want) = (f32::from_bits(hex(f[1])), hex(f[2]) as u8);
                    if encode(x) != want {
                        bad.push(format!("encode {x:e} ({:#010x}): {:#04x} (torch {want:#04x})", hex(f[1]), encode(x)));
                    }
                    encoded += 1;
                }
                _ => {}
            }
        }
        assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
        assert_eq!(decoded, 256);
        assert!(encoded > 2000, "{encoded}");
    }

    #[test]
    fn every_code_round_trips() {
        for c in 0..=255u8 {
            let v = TABLE[c as usize];
            if c & 0x7f == 0x7f {
                assert!(v.is_nan() && encode(v) == c, "{c:#04x}");
            } else {
                assert_eq!(encode(v), c, "{c:#04x} = {v}");
            }
        }
    }

    #[test]
    fn ties_saturation_subnormals_and_nan() {
        assert_eq!(TABLE[0x7e], 448.0);
        assert_eq!(TABLE[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(TABLE[0x08], 2f32.powi(-6)); // smallest normal
        assert_eq!(encode(1.0625), 0x38); // tie between 1.0 (0x38, even) and 1.125 (0x39)
        assert_eq!(encode(1.1875), 0x3a); // tie between 1.125 (0x39) and 1.25 (0x3a, even)
        assert_eq!(encode(2f32.powi(-10)), 0x00); // half the smallest subnormal: tie to 0
        assert_eq!(encode(3.0 * 2f32.powi(-10)), 0x02); // 1.5 subnormal steps: tie to 2
        assert_eq!(encode(15.5 * 2f32.powi(-10)), 0x08); // 7.75 steps rounds up into the smallest normal
        assert_eq!(encode(464.0), 0x7e);
        assert_eq!(encode(1e30), 0x7e);
        assert_eq!(encode(f32::INFINITY), 0x7e);
        assert_eq!(encode(f32::NEG_INFINITY), 0xfe);
        assert_eq!(encode(-0.0), 0x80);
        assert_eq!(encode(f32::NAN), 0x7f);
        assert_eq!(encode(-f32::NAN), 0xff);
        assert_eq!(scale_of(0.0), 1.0);
        assert_eq!(scale_of(896.0), 2.0);
        assert_eq!(amax(&[1.0, -3.0, f32::NAN, 2.0]), 3.0);
        assert_eq!(quantize(&[896.0, -1000.0, 1.0], 2.0), vec![448.0, -448.0, 0.5]);
    }
}
