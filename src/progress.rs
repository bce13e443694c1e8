//! Per-step progress reports, and stopping a run: from the progress callback or from another thread through a
//! [`CancellationToken`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use std::ops::ControlFlow;

/// Sent to the progress callback after each denoising step.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepProgress {
    /// The step just finished, 0-based.
    pub step: usize,
    /// Total steps of this run: one per transformer evaluation, so `2 * steps - 1` with the Heun sampler and
    /// fewer than the request's `steps` for img2img and inpainting (which skip the start of the schedule).
    pub steps: usize,
    /// The sigma the step started from.
    pub sigma: f32,
    /// Time since the denoising loop began.
    pub elapsed: Duration,
    /// On steps chosen by [`GenerationRequest::preview_every`](crate::GenerationRequest::preview_every): one
    /// preview per image of the run (the predicted clean image through [`latents_to_rgb`](crate::preview::latents_to_rgb),
    /// at latent resolution); empty on other steps.
    pub previews: Vec<image::RgbImage>,
}

/// Stops a running generation from any thread: the run checks it before every denoising step (and before
/// decoding) and returns [`Error::Cancelled`](crate::Error::Cancelled), so it stops within one step. Clones share
/// the same flag. A pipeline stays usable after a cancelled run.
///
/// ```
/// use sd3_onnx::{CancellationToken, GenerationRequest};
/// let token = CancellationToken::new();
/// let request = GenerationRequest::new("a red cube").cancellation(token.clone());
/// std::thread::spawn(move || token.cancel()); // e.g. from a UI thread
/// # let _ = request;
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancellationToken(Arc<AtomicBool>);

impl CancellationToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every run holding this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl PartialEq for CancellationToken {
    /// Two tokens are equal when they share one flag.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
