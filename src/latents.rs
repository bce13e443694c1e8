//! Initial latents: seeded Gaussian noise, explicit arrays, and `.npy` files.

use std::path::Path;

use ndarray::{Array4, ArrayD, IxDyn};

use crate::error::{Error, Result};

/// Seeded Gaussian noise drawn the way PyTorch's CPU generator draws it, so `seed` gives (within float
/// rounding of `log`/`cos`/`sin`, about 1 ulp) the latents diffusers makes with
/// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
///
/// Reference (PyTorch): `at::mt19937` (`ATen/core/MT19937RNGEngine.h`: MT19937 seeded with the low 32 bits),
/// `uniform_real_distribution<float>` (`ATen/core/TransformationHelper.h`: the low 24 bits of one 32-bit draw
/// times 2^-24), and `normal_fill` (`ATen/native/cpu/DistributionTemplates.h`: all uniforms drawn first, then
/// Box-Muller on blocks of 16, `u1 = 1 - data[j]`, `u2 = data[j + 8]`; a size that is not a multiple of 16
/// redraws the last 16). torch's vectorised (AVX2/AVX-512) `log`/`cos`/`sin` can differ from ours in the last
/// bit, which does not show in an 8-bit image.
#[derive(Debug, Clone)]
pub struct NoiseGenerator {
    mt: Box<[u32; 624]>,
    index: usize,
}

impl NoiseGenerator {
    /// A generator seeded like `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut mt = Box::new([0u32; 624]);
        mt[0] = seed as u32; // at::mt19937 keeps the low 32 bits of the seed
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        NoiseGenerator { mt, index: 624 }
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

    /// Box-Muller on one block of 16 uniforms, in place (torch's `normal_fill_16`).
    fn normal_16(data: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - data[j];
            let u2 = data[j + 8];
            let radius = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f32::consts::PI * u2;
            data[j] = radius * theta.cos();
            data[j + 8] = radius * theta.sin();
        }
    }

    /// Fills `out` with standard normal values, as `torch.randn` fills a float32 tensor of that many elements
    /// (at least 16; smaller tensors use another torch code path and are drawn here the same way).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = self.uniform();
        }
        let n = out.len();
        let mut i = 0;
        while i + 16 <= n {
            Self::normal_16(&mut out[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) && n >= 16 {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform();
            }
            Self::normal_16(tail);
        } else if !n.is_multiple_of(16) {
            // Fewer than 16 values: pad a block of 16 and keep the first n.
            let mut block = [0f32; 16];
            block[..n].copy_from_slice(out);
            for v in block[n..].iter_mut() {
                *v = self.uniform();
            }
            Self::normal_16(&mut block);
            out.copy_from_slice(&block[..n]);
        }
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

/// Reads a little-endian float32 `.npy` file (C order) of any rank.
pub fn read_npy_f32(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy_f32(&bytes).map_err(|message| Error::Npy { path: path.to_path_buf(), message })
}

/// Parses the bytes of a float32 `.npy` file.
pub fn parse_npy_f32(bytes: &[u8]) -> std::result::Result<ArrayD<f32>, String> {
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
        let shown: String = descr.chars().take(8).collect();
        return Err(format!("dtype {shown} is not little-endian float32 ('<f4'); save with np.float32"));
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
    ArrayD::from_shape_vec(IxDyn(&dims), values).map_err(|e| e.to_string())
}

/// Writes a float32 `.npy` file (version 1.0, C order).
pub fn write_npy_f32(path: &Path, array: &ArrayD<f32>) -> Result<()> {
    let dims: Vec<String> = array.shape().iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    let len = u16::try_from(header.len())
        .map_err(|_| Error::Npy { path: path.to_path_buf(), message: "header too long".into() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in array.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests;
