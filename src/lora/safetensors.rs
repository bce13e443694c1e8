//! A bounded reader of the `.safetensors` format (an 8-byte little-endian header length, a JSON header naming
//! each tensor's dtype, shape and byte range, then the data): <https://github.com/huggingface/safetensors>.
//!
//! Written here rather than taken from the `safetensors` crate so that every way a hostile file can be wrong
//! (a header length beyond the file, offsets outside the data, overlapping or misdeclared sizes, shapes whose
//! element count overflows, dtypes we do not read) is a typed [`Error::Lora`] naming the file, and so that the
//! file size is checked against a limit before anything is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

use crate::error::{boxed, Error, Result};

/// The largest header we read (the format's own reference implementation refuses more than 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// A whole safetensors file in memory.
#[derive(Debug)]
pub(crate) struct SafeTensors {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
    bytes: Vec<u8>,
    data_start: usize,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora { path: path.to_path_buf(), message: message.into(), source: None }
}

impl SafeTensors {
    /// Reads `path`, refusing files larger than `max_bytes`.
    pub fn read(path: &Path, max_bytes: u64) -> Result<Self> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::Lora {
                path: path.to_path_buf(),
                message: format!("cannot read: {e}"),
                source: boxed(e),
            })?
            .len();
        if len > max_bytes {
            return Err(bad(
                path,
                format!("the file has {len} bytes, more than Limits::max_lora_bytes ({max_bytes}); raise the limit if it is a LoRA you trust"),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::Lora {
            path: path.to_path_buf(),
            message: format!("cannot read: {e}"),
            source: boxed(e),
        })?;
        Self::parse(path, bytes)
    }

    fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let not = |why: &str| bad(path, format!("not a safetensors file: {why}"));
        let head: [u8; 8] =
            bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| not("shorter than 8 bytes"))?;
        let header_len = u64::from_le_bytes(head);
        if header_len > MAX_HEADER || header_len > bytes.len() as u64 - 8 {
            return Err(not(&format!("header length {header_len} exceeds the file or {MAX_HEADER} bytes")));
        }
        let data_start = 8 + header_len as usize;
        let header: Value = serde_json::from_slice(&bytes[8..data_start]).map_err(|e| Error::Lora {
            path: path.to_path_buf(),
            message: format!("header is not JSON: {e}"),
            source: boxed(e),
        })?;
        let Value::Object(header) = header else { return Err(not("the header is not a JSON object")) };
        let data_len = bytes.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                if let Value::Object(m) = v {
                    for (k, v) in m {
                        if let Value::String(s) = v {
                            metadata.insert(k, s);
                        }
                    }
                }
                continue;
            }
            let entry = (|| -> Option<Entry> {
                let dtype = v.get("dtype")?.as_str()?.to_string();
                let shape: Vec<usize> = v
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<_>>()?;
                let offsets = v.get("data_offsets")?.as_array()?;
                let begin = usize::try_from(offsets.first()?.as_u64()?).ok()?;
                let end = usize::try_from(offsets.get(1)?.as_u64()?).ok()?;
                Some(Entry { dtype, shape, begin, end })
            })()
            .ok_or_else(|| {
                bad(path, format!("tensor `{name}`: the header entry needs dtype, shape and data_offsets"))
            })?;
            let size = match entry.dtype.as_str() {
                "F32" => 4,
                "F16" | "BF16" => 2,
                "F64" => 8,
                _ => 0, // read by name only; using it is an error (see `f32`)
            };
            let count = entry.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let valid = entry.begin <= entry.end
                && entry.end <= data_len
                && (size == 0 || count.and_then(|c| c.checked_mul(size)) == Some(entry.end - entry.begin));
            if !valid {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{name}`: {} {:?} does not match its data range {}..{} (data section: {data_len} bytes)",
                        entry.dtype, entry.shape, entry.begin, entry.end
                    ),
                ));
            }
            tensors.insert(name, entry);
        }
        Ok(SafeTensors { path: path.to_path_buf(), tensors, metadata, bytes, data_start })
    }

    /// A tensor's values as `f32` (from F32, F16, BF16 or F64).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.tensors.get(name).ok_or_else(|| bad(&self.path, format!("no tensor `{name}`")))?;
        let data = &self.bytes[self.data_start + e.begin..self.data_start + e.end];
        Ok(match e.dtype.as_str() {
            "F32" => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "F16" => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "BF16" => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "F64" => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            other => {
                return Err(bad(
                    &self.path,
                    format!("tensor `{name}` has dtype {other}; LoRA weights must be F32, F16, BF16 or F64"),
                ))
            }
        })
    }

    /// A tensor's dtype name and its bytes (little-endian).
    pub fn raw(&self, name: &str) -> Result<(&str, &[u8])> {
        let e = self.tensors.get(name).ok_or_else(|| bad(&self.path, format!("no tensor `{name}`")))?;
        Ok((e.dtype.as_str(), &self.bytes[self.data_start + e.begin..self.data_start + e.end]))
    }

    /// The bytes after the header: what AUTOMATIC1111's "addnet" LoRA hash covers.
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.data_start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn reads_f32_and_f16() {
        let mut data = 1.5f32.to_le_bytes().to_vec();
        data.extend(f16::from_f32(-2.0).to_le_bytes());
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[1,1],"data_offsets":[4,6]},"__metadata__":{"k":"v"}}"#;
        let st = SafeTensors::parse(Path::new("x"), file(h, &data)).unwrap();
        assert_eq!(st.f32("a").unwrap(), vec![1.5]);
        assert_eq!(st.f32("b").unwrap(), vec![-2.0]);
        assert_eq!(st.metadata["k"], "v");
    }

    #[test]
    fn hostile_files_are_typed_errors() {
        let p = Path::new("x");
        let lora_err = |b: Vec<u8>| matches!(SafeTensors::parse(p, b), Err(Error::Lora { .. }));
        assert!(lora_err(vec![1, 2, 3]));
        assert!(lora_err(u64::MAX.to_le_bytes().to_vec()));
        assert!(lora_err(file("not json", &[])));
        assert!(lora_err(file("[1]", &[])));
        // Truncated data, a huge claimed shape, overflowing shapes, offsets backwards.
        assert!(lora_err(file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4])));
        assert!(lora_err(file(r#"{"a":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4]}}"#, &[0; 4])));
        assert!(lora_err(file(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            &[0; 4]
        )));
        assert!(lora_err(file(r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#, &[0; 4])));
        assert!(lora_err(file(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, &[0; 4])));
        // An unknown dtype reads, but not as numbers.
        let st =
            SafeTensors::parse(p, file(r#"{"a":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#, &[0; 4])).unwrap();
        assert!(matches!(st.f32("a"), Err(Error::Lora { .. })));
    }
}
