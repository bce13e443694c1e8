//! Initial latents: seeded Gaussian noise, explicit arrays, and `.npy` files.

use std::path::Path;

use ndarray::{Array4, ArrayD, IxDyn};

use crate::error::{Error, Result};

/// A small, portable, seedable normal generator: SplitMix64 for uniform bits, Box-Muller for normals.
///
/// The same seed gives the same latents on every platform. It is *not* torch's generator: to reproduce an image
/// made by diffusers, pass diffusers' latents explicitly (`GenerationRequest::latents`).
#[derive(Debug, Clone)]
pub struct NoiseGenerator {
    state: u64,
}

impl NoiseGenerator {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        NoiseGenerator { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with standard normal values.
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        let mut chunks = out.chunks_mut(2);
        for pair in &mut chunks {
            let (u1, u2) = (self.uniform(), self.uniform());
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            pair[0] = (r * theta.cos()) as f32;
            if let Some(second) = pair.get_mut(1) {
                *second = (r * theta.sin()) as f32;
            }
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
mod tests {
    use super::*;

    #[test]
    fn noise_is_deterministic_and_standard() {
        let a = NoiseGenerator::new(7).latents([1, 4, 16, 16]);
        let b = NoiseGenerator::new(7).latents([1, 4, 16, 16]);
        let c = NoiseGenerator::new(8).latents([1, 4, 16, 16]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let n = a.len() as f32;
        let mean = a.sum() / n;
        let var = a.mapv(|v| (v - mean) * (v - mean)).sum() / n;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
    }

    #[test]
    fn npy_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("sd3-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let a = ArrayD::from_shape_vec(IxDyn(&[1, 2, 3]), (0..6).map(|v| v as f32 * 0.5).collect()).unwrap();
        write_npy_f32(&p, &a).unwrap();
        assert_eq!(read_npy_f32(&p).unwrap(), a);
        assert!(parse_npy_f32(b"garbage").is_err());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.pop();
        assert!(parse_npy_f32(&bytes).unwrap_err().contains("data bytes"));
        let mut f8 = std::fs::read(&p).unwrap();
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        assert!(parse_npy_f32(&f8).unwrap_err().contains("float32"));
    }
}
