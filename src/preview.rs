//! Cheap previews during denoising: the predicted clean latents mapped linearly to RGB, no VAE.
//!
//! At step `i` the flow model's clean-image estimate is `x0 = x_t - sigma_i * v` (rectified flow:
//! `x_t = (1 - sigma) * x0 + sigma * noise`, `v = noise - x0`). Each latent pixel becomes one RGB pixel through
//! a fixed C x 3 matrix and a bias, so a preview is `width / 8` x `height / 8` pixels and costs microseconds.
//! The matrix must fit the model's VAE: SD3's (ComfyUI's fit) for SD3's VAE, or the model folder's own
//! `vae_decoder/latent_rgb_factors.json` ([`LatentRgbFactors::for_model`]); the pipeline refuses previews for a
//! model with neither.

use image::RgbImage;
use ndarray::ArrayView3;

use std::path::Path;

use crate::error::{Component, Error, Result};
use crate::model_config::VaeConfig;

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

/// SD3's VAE, as its config states it (`stabilityai/stable-diffusion-3-medium-diffusers`, `vae/config.json`:
/// `latent_channels` 16, `scaling_factor` 1.5305, `shift_factor` 0.0609). ComfyUI's factors fit this VAE only.
const SD3_VAE: (usize, f32, f32) = (16, 1.5305, 0.0609);

/// The file in `vae_decoder/` that holds a model's own preview factors (written by
/// `examples/fit_preview_factors.rs`): `{"factors": [[r, g, b], ...one row per latent channel], "bias": [r, g, b]}`.
pub const FACTORS_FILE: &str = crate::layout::LATENT_RGB_FACTORS_FILE;

/// A linear map from latent channels to RGB for previews: `rgb = bias + sum_c latent[c] * factors[c]`, then
/// `(rgb + 1) / 2` clamped to [0, 1].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct LatentRgbFactors {
    /// One row per latent channel: its contribution to R, G and B.
    pub factors: Vec<[f32; 3]>,
    /// Added to every pixel.
    pub bias: [f32; 3],
}

impl LatentRgbFactors {
    /// A map from `factors` (one row per channel) and `bias`.
    pub fn new(factors: Vec<[f32; 3]>, bias: [f32; 3]) -> Self {
        LatentRgbFactors { factors, bias }
    }

    /// SD3's factors (ComfyUI's fit for the SD3 / SD3.5 VAE).
    pub fn sd3() -> Self {
        LatentRgbFactors { factors: SD3_LATENT_RGB_FACTORS.to_vec(), bias: SD3_LATENT_RGB_BIAS }
    }

    /// Parses the text of a [`FACTORS_FILE`]. The error says what is wrong, without a file name.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct File {
            factors: Vec<[f32; 3]>,
            bias: [f32; 3],
        }
        let f: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if f.factors.is_empty() || f.factors.len() > 1024 {
            return Err(format!("`factors` must have one [r, g, b] row per latent channel, got {}", f.factors.len()));
        }
        if f.factors.iter().flatten().chain(&f.bias).any(|v| !v.is_finite()) {
            return Err("factors and bias must be finite numbers".into());
        }
        Ok(LatentRgbFactors { factors: f.factors, bias: f.bias })
    }

    /// The factors that fit the model in `model_dir`, whose VAE config is `vae`: the folder's own
    /// `vae_decoder/latent_rgb_factors.json` when it has one, else SD3's when the VAE is SD3's (16 latent
    /// channels, scaling factor 1.5305, shift factor 0.0609), else `None`: previews would show wrong colours.
    pub fn for_model(model_dir: impl AsRef<Path>, vae: &VaeConfig) -> Result<Option<Self>> {
        let path = model_dir.as_ref().join(Component::VaeDecoder.folder()).join(FACTORS_FILE);
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let factors =
                Self::from_json_str(&text).map_err(|m| Error::config(Component::VaeDecoder, m).in_file(&path))?;
            if let Some(c) = vae.latent_channels.filter(|c| *c != factors.channels()) {
                return Err(Error::config(
                    Component::VaeDecoder,
                    format!("{} rows of factors for a VAE with {c} latent channels", factors.channels()),
                )
                .in_file(&path));
            }
            return Ok(Some(factors));
        }
        let (channels, scaling, shift) = SD3_VAE;
        let is_sd3 = vae.latent_channels == Some(channels)
            && (vae.scaling_factor - scaling).abs() < 1e-4
            && (vae.shift_factor - shift).abs() < 1e-4;
        Ok(is_sd3.then(Self::sd3))
    }

    /// Latent channels this map takes.
    pub fn channels(&self) -> usize {
        self.factors.len()
    }

    /// The preview of one image's latents `[C, h, w]` (model space) as a `w` x `h` RGB image.
    pub fn to_rgb(&self, latents: ArrayView3<'_, f32>) -> Result<RgbImage> {
        let (c, h, w) = latents.dim();
        if c != self.channels() {
            return Err(Error::request(
                "preview_every",
                c,
                format!("the preview factors map {}-channel latents to RGB; these have {c} channels", self.channels()),
            ));
        }
        let (wu, hu) = (u32::try_from(w), u32::try_from(h));
        let (Ok(wu), Ok(hu)) = (wu, hu) else {
            return Err(Error::request("preview_every", format!("{w}x{h}"), "latents too large to preview"));
        };
        let mut image = RgbImage::new(wu, hu);
        for y in 0..h {
            for x in 0..w {
                let mut rgb = self.bias;
                for (ch, factors) in self.factors.iter().enumerate() {
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
}

/// The preview of one image's latents `[16, h, w]` (model space) with SD3's factors as an `w` x `h` RGB image:
/// the linear map, then `(rgb + 1) / 2` clamped to [0, 1], as ComfyUI's `Latent2RGBPreviewer`. For other models
/// use [`LatentRgbFactors::for_model`].
pub fn latents_to_rgb(latents: ArrayView3<'_, f32>) -> Result<RgbImage> {
    let c = latents.dim().0;
    if c != PREVIEW_LATENT_CHANNELS {
        return Err(Error::request(
            "preview_every",
            c,
            format!(
                "SD3's preview factors map {PREVIEW_LATENT_CHANNELS}-channel latents to RGB; these have {c} channels"
            ),
        ));
    }
    LatentRgbFactors::sd3().to_rgb(latents)
}

#[cfg(test)]
mod tests;
