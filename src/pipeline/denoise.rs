//! The denoising loop: classifier-free guidance, skip-layer guidance, the sampler step, the inpainting blend,
//! previews, cancellation and the progress callback, one transformer evaluation at a time.
//!
//! The model is a closure, so the loop runs (and is unit-tested) without ONNX Runtime; the pipeline passes one
//! that runs the transformer graphs through their IO bindings.

use std::time::{Duration, Instant};

use ndarray::{Array4, Axis};

use super::init_image;
use super::SkipLayerGuidance;
use crate::error::{Error, Result};
use crate::progress::{ControlFlow, StepProgress};
use crate::scheduler::{apply_guidance, Sampler};

/// Which transformer graph an evaluation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// The transformer on the whole batch: with guidance `[uncond..., cond...]`, each half the size of the
    /// latents; without, the latents' size.
    Full,
    /// The skip-layer graph on the conditional half only (the latents' size).
    SkipLayers,
}

/// Inpainting state of one image: what the unmasked region is pulled back to after every step.
pub(crate) struct Inpaint {
    pub image_latents: Array4<f32>,
    pub noise: Array4<f32>,
    /// `[h * w]` of 0 / 1 per channel plane (see `init_image::blend_known`).
    pub mask: Vec<f32>,
}

/// Everything the loop needs besides the model and the latents.
pub(crate) struct DenoiseLoop {
    /// The evaluations to run and how to step (Euler over a possibly truncated schedule, Heun, DPM++).
    pub sampler: Sampler,
    /// The guidance scale when classifier-free guidance is on (the model's output is then `[uncond, cond]`).
    pub guidance: Option<f32>,
    /// Skip-layer guidance, with the request's step count (its window is in steps, not evaluations).
    pub skip_layers: Option<(SkipLayerGuidance, usize)>,
    /// Per image, in batch order: its inpainting state, if it has a mask.
    pub inpaints: Vec<Option<Inpaint>>,
    /// Predicted clean images every k evaluations (and at the last one), through these factors.
    pub preview_every: Option<(usize, crate::preview::LatentRgbFactors)>,
}

impl DenoiseLoop {
    /// Runs every evaluation on `latents` `[images, C, h, w]` in place and returns each evaluation's duration.
    ///
    /// `model(pass, latents, timestep)` returns the velocity as a flat vector (see [`Pass`] for its length).
    /// `cancelled` is asked before every evaluation; `progress` gets a report after it, and a `Break` or a panic
    /// there stops the run with a typed error. `started` is when the denoising stage began (for the reports).
    pub fn run(
        mut self,
        latents: &mut Array4<f32>,
        mut model: impl FnMut(Pass, &Array4<f32>, f32) -> Result<Vec<f32>>,
        cancelled: impl Fn() -> bool,
        progress: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
        started: Instant,
    ) -> Result<Vec<Duration>> {
        let images = latents.shape()[0];
        if self.inpaints.len() != images {
            return Err(Error::internal(format!("{} inpainting states for {images} images", self.inpaints.len())));
        }
        let n = latents.len();
        let per_image = n / images.max(1);
        let evaluations = self.sampler.len();
        let mut durations = Vec::with_capacity(evaluations);
        for i in 0..evaluations {
            if cancelled() {
                return Err(Error::Cancelled { step: i });
            }
            let step_start = Instant::now();
            let timestep = self.sampler.timesteps()[i];
            let (sigma, next) = (self.sampler.sigma(i), self.sampler.sigma(i + 1));
            let output = model(Pass::Full, latents, timestep)?;
            let expected = if self.guidance.is_some() { 2 * n } else { n };
            if output.len() != expected {
                return Err(Error::internal(format!(
                    "the transformer returned {} values for {n} latent values (guidance: {})",
                    output.len(),
                    self.guidance.is_some()
                )));
            }
            // With guidance the output is [uncond..., cond...], each half aligned with the latents.
            let (mut guided, cond) = match self.guidance {
                Some(scale) => {
                    let (uncond, cond) = output.split_at(n);
                    let mut g = cond.to_vec();
                    apply_guidance(&mut g, uncond, scale);
                    (g, Some(cond))
                }
                None => (output.clone(), None),
            };
            if let (Some((slg, steps)), Some(cond)) = (&self.skip_layers, cond) {
                if slg.applies(i, *steps) {
                    let skipped = model(Pass::SkipLayers, latents, timestep)?;
                    if skipped.len() != n {
                        return Err(Error::internal(format!(
                            "the skip-layer transformer returned {} values for {n} latent values",
                            skipped.len()
                        )));
                    }
                    // diffusers: noise_pred + (noise_pred_text - noise_pred_skip_layers) * scale, in f32.
                    for ((g, c), s) in guided.iter_mut().zip(cond).zip(&skipped) {
                        *g += (c - s) * slg.scale;
                    }
                }
            }
            let previews = match &self.preview_every {
                Some((k, factors)) if *k > 0 && ((i + 1) % k == 0 || i + 1 == evaluations) => {
                    previews(latents, &guided, sigma, images, factors)?
                }
                _ => Vec::new(),
            };
            let x = latents.as_slice_mut().ok_or_else(|| Error::internal("latents are not contiguous"))?;
            self.sampler.step(&guided, x)?;
            for (k, inpaint) in self.inpaints.iter().enumerate() {
                let Some(inp) = inpaint else { continue };
                let x = &mut x[k * per_image..(k + 1) * per_image];
                let image =
                    inp.image_latents.as_slice().ok_or_else(|| Error::internal("latents are not contiguous"))?;
                if image.len() != per_image || inp.noise.len() != per_image {
                    return Err(Error::internal("inpainting latents do not match the image's latents"));
                }
                // Pulled back to the image noised to the next level; after the last step, to the image itself.
                let reference = if i + 1 < evaluations {
                    let noise = inp.noise.as_slice().ok_or_else(|| Error::internal("noise is not contiguous"))?;
                    let mut r = vec![0.0; per_image];
                    init_image::scale_noise(image, noise, next, &mut r);
                    r
                } else {
                    image.to_vec()
                };
                init_image::blend_known(x, &reference, &inp.mask);
            }
            durations.push(step_start.elapsed());
            let report = StepProgress { step: i, steps: evaluations, sigma, elapsed: started.elapsed(), previews };
            // A panicking callback must not unwind through the pipeline: catch it and stop with a typed error.
            let flow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| progress(&report)))
                .map_err(|payload| Error::CallbackPanicked { step: i, message: panic_message(payload.as_ref()) })?;
            if flow.is_break() {
                return Err(Error::Cancelled { step: i + 1 });
            }
        }
        if cancelled() {
            return Err(Error::Cancelled { step: evaluations });
        }
        Ok(durations)
    }
}

/// Previews of every image: the predicted clean latents `x - sigma * v` through the model's preview factors.
pub(super) fn previews(
    latents: &Array4<f32>,
    velocity: &[f32],
    sigma: f32,
    images: usize,
    factors: &crate::preview::LatentRgbFactors,
) -> Result<Vec<image::RgbImage>> {
    let mut x0 = latents.clone();
    for (x, v) in x0.iter_mut().zip(velocity) {
        *x -= sigma * v;
    }
    (0..images).map(|k| factors.to_rgb(x0.index_axis(Axis(0), k))).collect()
}

/// The text of a caught panic (`panic!("...")` payloads are `&str` or `String`).
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

#[cfg(test)]
mod tests;
