//! img2img and inpainting inputs, prepared as diffusers 0.42.1 (as 0.35.2) prepares them
//! (`image_processor.py` `VaeImageProcessor.preprocess`, `pipeline_stable_diffusion_3_img2img.py`,
//! `pipeline_stable_diffusion_3_inpaint.py`, `models/autoencoders/vae.py` `DiagonalGaussianDistribution`).

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use ndarray::{s, Array4, ArrayView4};

use super::Warning;
use crate::error::{Error, Result};

/// The picture as the VAE encoder takes it: `[1, 3, H, W]` in [-1, 1]. diffusers: `np.array(img) / 255.0` in
/// float32 (`pil_to_numpy`), then `2.0 * x - 1.0` (`normalize`).
pub(super) fn image_tensor(
    image: &RgbImage,
    width: usize,
    height: usize,
    input: &'static str,
    warnings: &mut Vec<Warning>,
) -> Array4<f32> {
    let resized;
    let image = if (image.width() as usize, image.height() as usize) != (width, height) {
        warnings.push(Warning::InputResized { input, from: image.dimensions(), to: (width as u32, height as u32) });
        resized = image::imageops::resize(image, width as u32, height as u32, FilterType::Lanczos3);
        &resized
    } else {
        image
    };
    let mut t = Array4::<f32>::zeros((1, 3, height, width));
    for (x, y, px) in image.enumerate_pixels() {
        for c in 0..3 {
            let v = f32::from(px.0[c]) / 255.0;
            t[[0, c, y as usize, x as usize]] = 2.0 * v - 1.0;
        }
    }
    t
}

/// The mask on the latent grid, `[1, 1, h, w]` of 0 (keep) and 1 (repaint). diffusers' mask processor: `/ 255.0`,
/// no normalisation, binarised (`< 0.5` -> 0, else 1); then `torch.nn.functional.interpolate` to the latent size
/// (mode `nearest`: source index `floor(dst * in / out)`).
pub(super) fn mask_tensor(
    mask: &GrayImage,
    width: usize,
    height: usize,
    factor: usize,
    warnings: &mut Vec<Warning>,
) -> Array4<f32> {
    let resized;
    let mask = if (mask.width() as usize, mask.height() as usize) != (width, height) {
        warnings.push(Warning::InputResized {
            input: "mask",
            from: mask.dimensions(),
            to: (width as u32, height as u32),
        });
        resized = image::imageops::resize(mask, width as u32, height as u32, FilterType::Lanczos3);
        &resized
    } else {
        mask
    };
    let (h, w) = (height / factor, width / factor);
    let (sy, sx) = (height as f32 / h as f32, width as f32 / w as f32);
    let mut t = Array4::<f32>::zeros((1, 1, h, w));
    for y in 0..h {
        let src_y = ((y as f32 * sy).floor() as usize).min(height - 1);
        for x in 0..w {
            let src_x = ((x as f32 * sx).floor() as usize).min(width - 1);
            let v = f32::from(mask.get_pixel(src_x as u32, src_y as u32).0[0]) / 255.0;
            t[[0, 0, y, x]] = if v < 0.5 { 0.0 } else { 1.0 };
        }
    }
    t
}

/// A sample of the VAE posterior from the encoder's `latent_parameters` `[1, 2C, h, w]` (mean, then log
/// variance clamped to [-30, 20]) and standard normal draws `eps`: `mean + exp(0.5 * logvar) * eps`.
pub(super) fn sample_posterior(parameters: ArrayView4<'_, f32>, eps: &Array4<f32>) -> Result<Array4<f32>> {
    let c2 = parameters.shape()[1];
    let c = eps.shape()[1];
    if c2 != 2 * c || parameters.shape()[2..] != eps.shape()[2..] {
        return Err(Error::inference(
            crate::error::Component::VaeEncoder,
            format!(
                "latent_parameters has shape {:?}; expected [1, {}, {}, {}] (mean and log variance)",
                parameters.shape(),
                2 * c,
                eps.shape()[2],
                eps.shape()[3]
            ),
            None,
        ));
    }
    let mean = parameters.slice(s![.., ..c, .., ..]);
    let logvar = parameters.slice(s![.., c.., .., ..]);
    let mut out = Array4::<f32>::zeros(eps.raw_dim());
    ndarray::Zip::from(&mut out).and(&mean).and(&logvar).and(eps).for_each(|o, m, lv, e| {
        let std = (0.5 * lv.clamp(-30.0, 20.0)).exp();
        *o = m + std * e;
    });
    Ok(out)
}

/// `FlowMatchEulerDiscreteScheduler.scale_noise`: `sigma * noise + (1 - sigma) * sample`, in f32.
pub(super) fn scale_noise(sample: &[f32], noise: &[f32], sigma: f32, out: &mut [f32]) {
    let keep = 1.0 - sigma;
    for ((o, x), n) in out.iter_mut().zip(sample).zip(noise) {
        *o = sigma * n + keep * x;
    }
}

/// The step the img2img / inpainting schedule starts from (diffusers `get_timesteps`):
/// `t_start = int(max(steps - min(steps * strength, steps), 0))`, in Python floats.
pub(super) fn start_step(steps: usize, strength: f64) -> usize {
    let n = steps as f64;
    let init = (n * strength).min(n);
    (n - init).max(0.0) as usize
}

/// Inpainting's per-step blend (diffusers `StableDiffusion3InpaintPipeline.__call__`, 16-channel transformer):
/// `latents = (1 - mask) * reference + mask * latents`, where the reference is the image latents noised to the
/// next sigma (`scale_noise`), or the clean image latents after the last step.
pub(super) fn blend_known(latents: &mut [f32], reference: &[f32], mask: &[f32]) {
    // mask is [h * w], broadcast over the channels.
    let plane = mask.len();
    if plane == 0 {
        return;
    }
    for (x, r) in latents.chunks_mut(plane).zip(reference.chunks(plane)) {
        for ((v, r), m) in x.iter_mut().zip(r).zip(mask) {
            *v = (1.0 - m) * r + m * *v;
        }
    }
}

#[cfg(test)]
mod tests;
