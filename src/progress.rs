//! Per-step progress reports and stopping a run from a callback.

use std::time::Duration;

pub use std::ops::ControlFlow;

/// Sent to the progress callback after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct StepProgress {
    /// The step just finished, 0-based.
    pub step: usize,
    /// Total steps.
    pub steps: usize,
    /// The sigma the step started from.
    pub sigma: f32,
    /// Time since the denoising loop began.
    pub elapsed: Duration,
}

/// A progress callback: return [`ControlFlow::Continue`] to go on or [`ControlFlow::Break`] to stop the run
/// with [`Error::Cancelled`](crate::Error::Cancelled).
pub trait ProgressCallback: FnMut(&StepProgress) -> ControlFlow<()> {}
impl<F: FnMut(&StepProgress) -> ControlFlow<()>> ProgressCallback for F {}
