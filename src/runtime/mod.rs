//! Everything that touches ONNX Runtime: loading the library, execution providers, sessions and the
//! conversion of our `f32` arrays to and from the element types a graph declares.
//!
//! The rest of the crate asks this module for a `Graph` and runs it with `Graph::run`; no `ort` type leaves
//! this module.

pub(crate) mod discovery;
mod graph;
pub(crate) mod kernels;
mod merge;
mod provider;
#[cfg(test)]
mod static_graph_tests;
mod step;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use graph::ElementType;
pub(crate) use graph::{Binding, Graph, Input, Port, SessionConfig};
pub use provider::{CudaAttention, CudaOptions, DirectMlOptions, ExecutionProvider, TensorRtOptions};
pub(crate) use step::{DeviceTensor, StepKind, StepSpec};

use crate::error::{boxed, Error, Result};

/// ONNX Runtime allows one environment per process, and `ort` loads one library per process.
static ENVIRONMENT: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

/// Returns the process-wide ONNX Runtime environment, loading the library on first use.
pub(crate) fn environment(explicit: Option<&Path>) -> Result<ort::environment::Environment> {
    // A poisoned lock only means another thread panicked while holding it; the Option inside is still valid.
    let mut guard = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = guard.as_ref() {
        if let Some(wanted) = explicit {
            let wanted = std::fs::canonicalize(wanted).unwrap_or_else(|_| wanted.to_path_buf());
            if &wanted != loaded {
                return Err(Error::RuntimeLoad {
                    path: wanted,
                    message: format!(
                        "this process already loaded ONNX Runtime from {}, and a process can load only one; pass \
                         the same library to every pipeline (or none)",
                        loaded.display()
                    ),
                    source: None,
                });
            }
        }
        return Ok(env.clone());
    }
    let (path, builder) = discovery::open(explicit)?;
    let env = builder.with_name("sd3-onnx").build().map_err(|e| Error::RuntimeLoad {
        path: path.clone(),
        message: e.to_string(),
        source: boxed(e),
    })?;
    *guard = Some((path, env.clone()));
    Ok(env)
}

/// The path of the ONNX Runtime library this process loaded, if any.
pub fn loaded_library() -> Option<PathBuf> {
    let guard = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    guard.as_ref().map(|(p, _)| p.clone())
}
