//! Cheap previews during denoising: the predicted clean latents mapped linearly to RGB, no VAE.
//!
//! At step `i` the flow model's clean-image estimate is `x0 = x_t - sigma_i * v` (rectified flow:
//! `x_t = (1 - sigma) * x0 + sigma * noise`, `v = noise - x0`). Each latent pixel becomes one RGB pixel through
//! a fixed 16x3 matrix and a bias, so a preview is `width / 8` x `height / 8` pixels and costs microseconds.

use image::RgbImage;
use ndarray::ArrayView3;

use crate::error::{Error, Result};

/// SD3's latent-to-RGB factors: row `c` is latent channel `c`'s contribution to R, G and B, for latents in the
/// model's space (`(z - shift_factor) * scaling_factor`, what the transformer denoises). A least-squares fit
/// published by ComfyUI (`comfy/latent_formats.py`, class `SD3`, `latent_rgb_factors`); it fits the SD3 / SD3.5
/// VAE (16 latent channels) and no other.
const SD3_LATENT_RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
];

/// ComfyUI `comfy/latent_formats.py`, class `SD3`, `latent_rgb_factors_bias`.
const SD3_LATENT_RGB_BIAS: [f32; 3] = [0.2394, 0.2135, 0.1925];

/// Latent channels the preview factors are fitted for.
pub const PREVIEW_LATENT_CHANNELS: usize = SD3_LATENT_RGB_FACTORS.len();

/// Checks that previews can be made for latents with `channels` channels.
pub(crate) fn check_channels(channels: usize) -> Result<()> {
    if channels != PREVIEW_LATENT_CHANNELS {
        return Err(Error::request(
            "preview_every",
            channels,
            format!(
                "previews map SD3's {PREVIEW_LATENT_CHANNELS}-channel latents to RGB; this model's latents have \
                 {channels} channels. Turn previews off"
            ),
        ));
    }
    Ok(())
}

/// The preview of one image's latents `[16, h, w]` (model space) as an `w` x `h` RGB image: the linear map,
/// then `(rgb + 1) / 2` clamped to [0, 1], as ComfyUI's `Latent2RGBPreviewer`.
pub fn latents_to_rgb(latents: ArrayView3<'_, f32>) -> Result<RgbImage> {
    let (c, h, w) = latents.dim();
    check_channels(c)?;
    let (wu, hu) = (u32::try_from(w), u32::try_from(h));
    let (Ok(wu), Ok(hu)) = (wu, hu) else {
        return Err(Error::request("preview_every", format!("{w}x{h}"), "latents too large to preview"));
    };
    let mut image = RgbImage::new(wu, hu);
    for y in 0..h {
        for x in 0..w {
            let mut rgb = SD3_LATENT_RGB_BIAS;
            for (ch, factors) in SD3_LATENT_RGB_FACTORS.iter().enumerate() {
                let v = latents[[ch, y, x]];
                for k in 0..3 {
                    rgb[k] += v * factors[k];
                }
            }
            let px = rgb.map(|v| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
            image.put_pixel(x as u32, y as u32, image::Rgb(px));
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests;
