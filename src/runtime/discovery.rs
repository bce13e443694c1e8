//! Finding the ONNX Runtime shared library.
//!
//! With the `load-dynamic` feature (on by default) `ort` opens the library at run time, from the path the user
//! gives: the builder option [`Sd3PipelineBuilder::onnxruntime_library`](crate::Sd3PipelineBuilder::onnxruntime_library),
//! else the `ORT_DYLIB_PATH` environment variable. Nothing else is searched: no folder relative to the current
//! directory (a program embedding this crate, started in a folder someone else can write to, would load that
//! folder's library) and no folder of this crate's source (a path baked in at compile time that, for a
//! crates.io user, points into the cargo registry). When neither is set, the error says how to get a library.
//!
//! Without `load-dynamic`, ONNX Runtime is linked when the program is built (the `ort-download-binaries` /
//! `ort-copy-dylibs` features, or `ORT_LIB_PATH` for ort's build script) and no path is looked up at run time.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Resolves the library path: `explicit`, then `ORT_DYLIB_PATH`. A path that is given but does not exist is an
/// error; it is never a reason to look elsewhere.
#[cfg(feature = "load-dynamic")]
pub(crate) fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return existing(p).ok_or_else(|| Error::RuntimeNotFound {
            searched: format!("builder option onnxruntime_library = {} (no such file)", p.display()),
        });
    }
    match std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from) {
        Some(p) => existing(&p).ok_or_else(|| Error::RuntimeNotFound {
            searched: format!("ORT_DYLIB_PATH = {} (no such file)", p.display()),
        }),
        None => Err(Error::RuntimeNotFound {
            searched: "builder option onnxruntime_library (not set); ORT_DYLIB_PATH (not set)".into(),
        }),
    }
}

/// Opens ONNX Runtime: the library [`find_library`] names (feature `load-dynamic`), and the path it came from.
#[cfg(feature = "load-dynamic")]
pub(crate) fn open(explicit: Option<&Path>) -> Result<(PathBuf, ort::environment::EnvironmentBuilder)> {
    let path = find_library(explicit)?;
    let builder = ort::init_from(&path).map_err(|e| Error::RuntimeLoad {
        path: path.clone(),
        message: e.to_string(),
        source: crate::error::boxed(e),
    })?;
    Ok((path, builder))
}

/// ONNX Runtime linked at build time (no `load-dynamic`): there is no library to open. The path reported is the
/// executable's, which holds (static link) or names (dynamic link) the library.
#[cfg(not(feature = "load-dynamic"))]
pub(crate) fn open(explicit: Option<&Path>) -> Result<(PathBuf, ort::environment::EnvironmentBuilder)> {
    if let Some(p) = explicit {
        return Err(Error::RuntimeLoad {
            path: p.to_path_buf(),
            message: "this build links ONNX Runtime at build time (sd3-onnx without its `load-dynamic` feature); \
                      a library path is only used with `load-dynamic`"
                .into(),
            source: None,
        });
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("(this executable)"));
    Ok((exe, ort::init()))
}

#[cfg(feature = "load-dynamic")]
fn existing(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        // Absolute paths keep ort from resolving relative to the executable's folder.
        Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    } else {
        None
    }
}

#[cfg(all(test, feature = "load-dynamic"))]
mod tests;
