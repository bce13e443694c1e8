//! Finding the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`, so the library is opened at run time. We look, in order, at: the path
//! given to the builder, `ORT_DYLIB_PATH`, and the folder `scripts/setup-ort.sh` installs into (`.ort/lib/`
//! under the current directory, then under this crate's own source folder). The first that exists wins; when
//! none does, the error lists every place tried and how to fix it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The library's file name on this platform (`libonnxruntime.so`, `onnxruntime.dll`, `libonnxruntime.dylib`).
pub fn library_file_name() -> String {
    format!("{}onnxruntime{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Where `scripts/setup-ort.sh` puts the library, relative to a repository root.
pub(crate) fn setup_location(root: &Path) -> PathBuf {
    root.join(".ort").join("lib").join(library_file_name())
}

/// Resolves the library path: `explicit`, then `ORT_DYLIB_PATH`, then the set-up locations.
pub(crate) fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    let env = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = explicit {
        // An explicit choice is final: a wrong path is an error, not a reason to look elsewhere.
        return existing(p).ok_or_else(|| Error::RuntimeNotFound {
            searched: format!("builder option onnxruntime_library = {} (no such file)", p.display()),
        });
    }
    if let Some(p) = env {
        return existing(&p).ok_or_else(|| Error::RuntimeNotFound {
            searched: format!("ORT_DYLIB_PATH = {} (no such file)", p.display()),
        });
    }
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(("current directory".into(), setup_location(&cwd)));
    }
    candidates.push(("sd3-onnx source folder".into(), setup_location(Path::new(env!("CARGO_MANIFEST_DIR")))));
    for (_, path) in &candidates {
        if let Some(found) = existing(path) {
            return Ok(found);
        }
    }
    let searched = std::iter::once("builder option (not set)".to_string())
        .chain(std::iter::once("ORT_DYLIB_PATH (not set)".to_string()))
        .chain(candidates.iter().map(|(what, p)| format!("{what}: {}", p.display())))
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::RuntimeNotFound { searched })
}

fn existing(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        // Absolute paths keep ort from resolving relative to the executable's folder.
        Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
