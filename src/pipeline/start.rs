//! The starting latents of each image: seeded noise, explicit latents, or (img2img, inpainting) the init image
//! through the VAE encoder, noised to the first sigma, with diffusers' draws in diffusers' order.

use ndarray::{s, Array4};

use super::decode::to4;
use super::denoise::Inpaint;
use super::init_image;
use super::plan::Plan;
use super::Sd3Pipeline;
use crate::error::{Component, Error, Result};
use crate::latents::NoiseGenerator;
use crate::runtime::Input;

/// Per image of a plan: the starting latents, and the inpainting state where there is a mask.
pub(super) type Starts = (Vec<Array4<f32>>, Vec<Option<Inpaint>>);

/// The starting latents of every plan that draws them from its seeds alone (no init image, no explicit latents),
/// `None` for the others: what [`Sd3Pipeline::initial_latents`] gives such a plan, computed without the pipeline,
/// so that `run_denoise` draws them on another thread while the text encoders run (issue 19: the draw is 1.4 ms
/// per 1024x1024 image on the project's 2-core CPU, `cargo bench --bench noise`). `channels` and `factor`: the
/// latent channels and the VAE's scale factor ([`latent_shape`]).
pub(super) fn seeded_noise(plans: &[Plan], channels: usize, factor: usize) -> Vec<Option<Vec<Array4<f32>>>> {
    plans
        .iter()
        .map(|plan| {
            if plan.init.is_some() || plan.explicit.is_some() {
                return None;
            }
            let shape = latent_shape(channels, factor, plan.width, plan.height);
            // A plan without a seed for some image is left to initial_latents (and its error).
            plan.seeds.iter().map(|seed| seed.map(|s| NoiseGenerator::new(s).latents(shape))).collect()
        })
        .collect()
}

/// One image's latent shape `[1, channels, height / factor, width / factor]`.
fn latent_shape(channels: usize, factor: usize, width: usize, height: usize) -> [usize; 4] {
    [1, channels, height / factor, width / factor]
}

impl Sd3Pipeline {
    /// The starting latents of a plan's images `[1, C, h, w]` each and, for inpainting, what each image's
    /// unmasked region is pulled back to. Random draws per image, from its own seed, in diffusers' order: the
    /// VAE posterior sample of the init image first, then the noise.
    pub(super) fn initial_latents(&mut self, plan: &Plan) -> Result<Starts> {
        let shape = latent_shape(self.info.latent_channels, self.info.vae_scale_factor, plan.width, plan.height);
        let (sf, shift) = (self.info.vae_scaling_factor, self.info.vae_shift_factor);
        let encoded = match &plan.init {
            Some(init) => {
                let Some(encoder) = self.vae_encoder.as_mut() else {
                    return Err(super::missing_vae_encoder(&self.model_dir));
                };
                let mut out =
                    encoder.run(&[("sample", Input::Float(init.image.view().into_dyn()))], &["latent_parameters"])?;
                let params = out.pop().ok_or_else(|| Error::internal("the VAE encoder session returned no output"))?;
                Some(to4(Component::VaeEncoder, params)?)
            }
            None => None,
        };
        let mut starts = Vec::with_capacity(plan.seeds.len());
        let mut inpaints = Vec::with_capacity(plan.seeds.len());
        for (k, seed) in plan.seeds.iter().enumerate() {
            let mut generator = seed.map(NoiseGenerator::new);
            let mut draw = || -> Result<Array4<f32>> {
                generator.as_mut().map(|g| g.latents(shape)).ok_or_else(|| Error::internal("no seed for a random draw"))
            };
            let image_latents = match &encoded {
                Some(params) => {
                    let eps = draw()?;
                    let sample = init_image::sample_posterior(params.view(), &eps)?;
                    Some(sample.mapv(|v| (v - shift) * sf))
                }
                None => None,
            };
            let noise = match &plan.explicit {
                Some(l) => l.slice(s![k..k + 1, .., .., ..]).to_owned(),
                None => draw()?,
            };
            let (Some(image_latents), Some(init)) = (image_latents, &plan.init) else {
                starts.push(noise);
                inpaints.push(None);
                continue;
            };
            let start = if init.mask.is_some() && init.full_strength {
                noise.clone()
            } else {
                let mut out = Array4::zeros(noise.raw_dim());
                let (x, n) = (image_latents.as_slice(), noise.as_slice());
                let (Some(x), Some(n), Some(o)) = (x, n, out.as_slice_mut()) else {
                    return Err(Error::internal("latents are not contiguous"));
                };
                init_image::scale_noise(x, n, plan.sampler.sigma(0), o);
                out
            };
            starts.push(start);
            inpaints.push(init.mask.as_ref().map(|mask| Inpaint {
                image_latents,
                noise,
                mask: mask.iter().copied().collect(),
            }));
        }
        Ok((starts, inpaints))
    }
}
