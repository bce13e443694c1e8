//! Initial latents: seeded Gaussian noise, explicit arrays, and `.npy` files.

use std::path::Path;

use ndarray::{Array4, ArrayD, IxDyn};

use crate::error::{Error, Result};

/// Seeded Gaussian noise drawn the way PyTorch's CPU generator draws it, so `seed` gives bit for bit the latents
/// diffusers makes with `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`, and further
/// draws from the same generator continue as torch's do.
///
/// Reference (PyTorch): `at::mt19937` (`ATen/core/MT19937RNGEngine.h`: MT19937 seeded with the low 32 bits),
/// `uniform_real_distribution<float>` (`ATen/core/TransformationHelper.h`: the low 24 bits of one 32-bit draw
/// times 2^-24), and `normal_fill` (`ATen/native/cpu/DistributionTemplates.h`: all uniforms drawn first, then
/// Box-Muller on blocks of 16, `u1 = 1 - data[j]`, `u2 = data[j + 8]`; a size that is not a multiple of 16
/// redraws the last 16). Box-Muller uses the Cephes `log`/`sincos` polynomials of `ATen/native/cpu/avx_mathfun.h`
/// that torch's kernel calls (not libm), with the fused multiply-adds of the compiled kernel. Checked bit for bit
/// against torch 2.8.0 on an AVX-512 CPU (tests/seeds.rs, models/goldens/torch_randn). Other torch builds (e.g.
/// ones that route `randn` through MKL on Intel CPUs) may draw differently.
#[derive(Debug, Clone)]
pub struct NoiseGenerator {
    mt: Box<[u32; 624]>,
    index: usize,
    /// torch's cached second Box-Muller value of the scalar path (`next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl NoiseGenerator {
    /// A generator seeded like `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut mt = Box::new([0u32; 624]);
        mt[0] = seed as u32; // at::mt19937 keeps the low 32 bits of the seed
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        NoiseGenerator { mt, index: 624, cached_normal: None }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled to [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// Box-Muller on one block of 16 uniforms, in place: torch's `normal_fill_16_AVX2`
    /// (`ATen/native/cpu/DistributionTemplates.h`) with `log256_ps` / `sincos256_ps` from
    /// `ATen/native/cpu/avx_mathfun.h`, lane by lane.
    #[inline(always)]
    fn normal_16(data: &mut [f32]) {
        // _mm256_set1_ps(2.0f * c10::pi<double>)
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        for j in 0..8 {
            let u1 = 1.0 - data[j];
            let u2 = data[j + 8];
            let radius = (-2.0 * cephes_log(u1)).sqrt();
            let (sin, cos) = cephes_sincos(two_pi * u2);
            // _mm256_fmadd_ps(n, std = 1, mean = 0) == n exactly.
            data[j] = radius * cos;
            data[j + 8] = radius * sin;
        }
    }

    /// Fills `out` with standard normal values, as `torch.randn` fills a contiguous float32 tensor of that many
    /// elements: from 16 values on, all uniforms first and then Box-Muller on blocks of 16 (a remainder redraws
    /// the last 16); below 16, torch's scalar path (`at::normal_distribution<double>`, with its cached value).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform();
        }
        box_muller_blocks(out);
        if !n.is_multiple_of(16) {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform();
            }
            Self::normal_16(tail);
        }
    }

    /// torch's `at::normal_distribution<double>` (`ATen/core/DistributionsHelper.h`): a cached value if one is
    /// left, else Box-Muller in f64 on two 53-bit uniforms (`random64`: two draws, the first the high word),
    /// keeping `r * sin(theta)` for the next call.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: the low 53 bits of `random64()` times 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Standard normal latents of the given shape.
    pub fn latents(&mut self, shape: [usize; 4]) -> Array4<f32> {
        let mut a = Array4::<f32>::zeros(shape);
        if let Some(slice) = a.as_slice_mut() {
            self.fill_normal(slice);
        }
        a
    }
}

/// Box-Muller on every whole block of 16 values of `out` ([`NoiseGenerator::normal_16`]). The polynomials use
/// `f32::mul_add`, which without the FMA instructions in the build's target is a call to libm's software `fmaf`:
/// on x86-64 CPUs that have FMA (checked at run time) the same code runs compiled with it. A fused multiply-add is
/// rounded once either way, so both give the same bits (tests/seeds.rs); 1024x1024 latents on the project's
/// CPU: 6.97 ms without, see `cargo bench --bench noise` (issue 19: our time outside ONNX Runtime).
fn box_muller_blocks(out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the FMA instructions (checked on the line above).
        unsafe { box_muller_blocks_fma(out) };
        return;
    }
    box_muller_blocks_plain(out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn box_muller_blocks_fma(out: &mut [f32]) {
    box_muller_blocks_plain(out);
}

#[inline(always)]
fn box_muller_blocks_plain(out: &mut [f32]) {
    for block in out.chunks_exact_mut(16) {
        NoiseGenerator::normal_16(block);
    }
}

// The constants are avx_mathfun.h's decimal literals as written there: rounding a shorter decimal to f32 can
// land on the neighbouring float and change the last bit of some draws.
/// `log256_ps` of avx_mathfun.h (Julien Pommier's AVX port of the Cephes `logf`), one lane, in the order of
/// operations torch's compiled kernel performs: GCC contracts each multiply that feeds an add into one fused
/// multiply-add (`-ffp-contract=fast`), so the polynomial and the final corrections use `mul_add` exactly where
/// the kernel has an FMA. Valid for the arguments Box-Muller gives it, `(0, 1]`.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
#[inline(always)]
fn cephes_log(x: f32) -> f32 {
    const SQRTHF: f32 = 0.707106781186547524; // cephes_SQRTHF
    const P: [f32; 9] = [
        7.0376836292E-2,  // cephes_log_p0
        -1.1514610310E-1, // p1
        1.1676998740E-1,  // p2
        -1.2420140846E-1, // p3
        1.4249322787E-1,  // p4
        -1.6668057665E-1, // p5
        2.0000714765E-1,  // p6
        -2.4999993993E-1, // p7
        3.3333331174E-1,  // p8
    ];
    const Q1: f32 = -2.12194440e-4; // cephes_log_q1
    const Q2: f32 = 0.693359375; // cephes_log_q2
    let x = x.max(f32::from_bits(0x0080_0000)); // min_norm_pos
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for p in &P[1..] {
        y = y.mul_add(x, *p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(Q2, x)
}

/// `sincos256_ps` of avx_mathfun.h (Cephes `sinf`/`cosf`), one lane, with the compiled kernel's fused
/// multiply-adds (see [`cephes_log`]). Returns `(sin, cos)`.
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn cephes_sincos(theta: f32) -> (f32, f32) {
    const FOPI: f32 = 1.27323954473516; // cephes_FOPI (4 / pi)
    const DP1: f32 = -0.785_156_25; // minus_cephes_DP1
    const DP2: f32 = -2.4187564849853515625e-4; // minus_cephes_DP2
    const DP3: f32 = -3.77489497744594108e-8; // minus_cephes_DP3
    const SINCOF: [f32; 3] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1]; // sincof_p0..p2
    const COSCOF: [f32; 3] = [2.443315711809948E-005, -1.388731625493765E-003, 4.166664568298827E-002]; // coscof_p0..p2
    let mut sign_sin = theta.to_bits() & 0x8000_0000;
    let mut x = theta.abs();
    // cvttps: truncation toward zero; then to the next even integer.
    let j = (((x * FOPI) as i32) + 1) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let poly = (j & 2) == 0;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let z = x * x;
    let mut c = COSCOF[0].mul_add(z, COSCOF[1]);
    c = c.mul_add(z, COSCOF[2]);
    c *= z;
    // The kernel's FMA takes the second multiply by z into the subtraction (fmsub), not `z * 0.5`.
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SINCOF[0].mul_add(z, SINCOF[1]);
    s = s.mul_add(z, SINCOF[2]);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if poly { (s, c) } else { (c, s) };
    (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
}

/// Reads a little-endian float32 `.npy` file (C order) of any rank.
pub fn read_npy_f32(path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy_f32(&bytes).map_err(|e| e.in_file(path))
}

/// Parses the bytes of a float32 `.npy` file. Anything else is an [`Error::Npy`] (without a path) that says what
/// is wrong.
pub fn parse_npy_f32(bytes: &[u8]) -> Result<ArrayD<f32>> {
    let (dims, values) = parse_npy(bytes).map_err(|message| Error::Npy { path: None, message, source: None })?;
    // parse_npy checked that the values fill the shape exactly.
    ArrayD::from_shape_vec(IxDyn(&dims), values).map_err(|e| Error::internal(format!(".npy shape {dims:?}: {e}")))
}

/// The shape and values of a float32 `.npy` file, or what is wrong with it.
fn parse_npy(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic bytes)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(n).map_err(|_| "header too large")?, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start.checked_add(header_len).filter(|e| *e <= bytes.len()).ok_or("truncated header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        Some(rest.trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr").ok_or("header has no 'descr'")?;
    if !(descr.starts_with("'<f4'") || descr.starts_with("'|f4'")) {
        // The quoted dtype string, e.g. '<f8' (float64); at most 16 characters of it.
        let shown: String = descr.trim_start_matches('\'').chars().take_while(|c| *c != '\'').take(16).collect();
        return Err(format!("dtype '{shown}' is not little-endian float32 ('<f4'); save with np.float32"));
    }
    let fortran = field("fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into());
    }
    let shape_text = field("shape").ok_or("header has no 'shape'")?;
    let close = shape_text.find(')').ok_or("malformed shape")?;
    let inner = shape_text.strip_prefix('(').ok_or("malformed shape")?;
    let dims: Vec<usize> = inner[..close - 1]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad dimension {s:?}")))
        .collect::<std::result::Result<_, _>>()?;
    let count = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).ok_or("shape overflows")?;
    let data = &bytes[end..];
    let needed = count.checked_mul(4).ok_or("shape overflows")?;
    if data.len() != needed {
        return Err(format!("shape {dims:?} needs {needed} data bytes, file has {}", data.len()));
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((dims, values))
}

/// Writes a float32 `.npy` file (version 1.0, C order).
pub fn write_npy_f32(path: impl AsRef<Path>, array: &ArrayD<f32>) -> Result<()> {
    let path = path.as_ref();
    let dims: Vec<String> = array.shape().iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    let len = u16::try_from(header.len()).map_err(|_| Error::Npy {
        path: Some(path.to_path_buf()),
        message: "header too long".into(),
        source: None,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in array.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests;
