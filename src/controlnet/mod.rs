//! ControlNet for SD3 / SD3.5, as diffusers 0.42.1's `SD3ControlNetModel`, `SD3MultiControlNetModel` and
//! `StableDiffusion3ControlNetPipeline` do (`models/controlnets/controlnet_sd3.py`,
//! `pipelines/controlnet_sd3/pipeline_stable_diffusion_3_controlnet.py`, `models/transformers/transformer_sd3.py`).
//!
//! A ControlNet is a folder with diffusers' `config.json` and a `model.onnx` (`models/make_controlnet_fixtures.py`
//! shows the contract). Load it with [`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet) and ask
//! for it per request with [`GenerationRequest::controlnet`](crate::GenerationRequest::controlnet). The model folder
//! needs `transformer/model_controlnet.onnx`, its transformer taking the ControlNets' block residuals.
//! See docs/controlnet.md.

mod canny;

use std::path::Path;

use image::RgbImage;
use serde_json::Value;

use crate::error::{Component, Error, Result};

pub use canny::{canny, canny_gray, rgb_to_gray};

/// Which of diffusers' two SD3 ControlNet conventions a ControlNet follows. diffusers tells them apart only by
/// `force_zeros_for_pooled_projection` in its `config.json` (pipeline_stable_diffusion_3_controlnet.py lines 1058-1062
/// and 1137-1141).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlNetKind {
    /// InstantX-style SD3-medium ControlNets (`force_zeros_for_pooled_projection: true`): zero pooled projection,
    /// control latents without the VAE shift factor; own position embedding and text input.
    InstantX,
    /// Stability's SD3.5 ControlNets (`force_zeros_for_pooled_projection: false`): the real pooled embeddings,
    /// control latents with the VAE shift factor; usually `use_pos_embed: false` (the transformer's position
    /// embedding) and no text input (`joint_attention_dim: null`).
    Sd35,
}

/// What a loaded ControlNet is, read from its `config.json` and graph.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ControlNetInfo {
    /// The convention it follows.
    pub kind: ControlNetKind,
    /// Its transformer blocks (`num_layers`): how many residuals it gives per step.
    pub num_layers: usize,
    /// `num_attention_heads * attention_head_dim`: the width of each residual.
    pub inner_dim: usize,
    /// Whether it takes the prompt's `encoder_hidden_states` (`joint_attention_dim` is set).
    pub text_input: bool,
    /// `use_pos_embed` (false: the transformer's position embedding, copied in at export as diffusers does at
    /// pipeline construction, lines 211-224).
    pub use_pos_embed: bool,
}

/// One ControlNet applied to a request: which loaded ControlNet, its control image, scale and window.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ControlNetUnit {
    /// The name it was loaded under ([`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet)).
    pub name: String,
    /// The control image (e.g. edges from [`canny`]); resized to the request's size with a
    /// warning when it differs, as diffusers' image processor does.
    pub image: RgbImage,
    /// `controlnet_conditioning_scale`: the residuals are multiplied by it (default 1).
    pub scale: f32,
    /// `control_guidance_start`: the share of steps before which the ControlNet is off (default 0).
    pub start: f64,
    /// `control_guidance_end`: the share of steps after which it is off (default 1).
    pub end: f64,
    /// How the control image was made (e.g. `"canny 100 200"`), for the PNG parameters only; `None` (default)
    /// records `none`.
    pub preprocessor: Option<String>,
}

impl ControlNetUnit {
    /// The ControlNet `name` with `image`, at scale 1 over every step.
    pub fn new(name: impl Into<String>, image: RgbImage) -> Self {
        ControlNetUnit { name: name.into(), image, scale: 1.0, start: 0.0, end: 1.0, preprocessor: None }
    }

    /// Sets `controlnet_conditioning_scale`.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Sets `control_guidance_start` and `control_guidance_end` (shares of the steps, 0 <= start < end <= 1).
    pub fn window(mut self, start: f64, end: f64) -> Self {
        self.start = start;
        self.end = end;
        self
    }

    /// Records how the control image was made (see [`preprocessor`](Self::preprocessor)).
    pub fn preprocessor(mut self, label: impl Into<String>) -> Self {
        self.preprocessor = Some(label.into());
        self
    }

    /// Checks scale and window (diffusers' SD/SDXL ControlNet pipelines' `check_inputs` rules: start < end,
    /// start >= 0, end <= 1; the SD3 pipeline does not check them).
    pub(crate) fn check(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::request("controlnet scale", self.scale, "must be a finite number"));
        }
        let (s, e) = (self.start, self.end);
        if !(s.is_finite() && e.is_finite()) || s < 0.0 || e > 1.0 || s >= e {
            return Err(Error::request(
                "controlnet window",
                format!("{s}..{e}"),
                "control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1",
            ));
        }
        Ok(())
    }

    /// Whether the ControlNet acts at evaluation `i` of `n`: diffusers' `controlnet_keep`
    /// (pipeline_stable_diffusion_3_controlnet.py lines 1129-1135), `1.0 - float(i / n < s or (i + 1) / n > e)`,
    /// in float64.
    pub(crate) fn keep(&self, i: usize, n: usize) -> f64 {
        let n = n as f64;
        let off = (i as f64) / n < self.start || ((i + 1) as f64) / n > self.end;
        1.0 - f64::from(u8::from(off))
    }
}

/// Which residual each transformer block adds: diffusers' `SD3Transformer2DModel.forward`
/// (transformer_sd3.py lines 323-326), `interval_control = len(blocks) / len(residuals)` and
/// `residuals[int(index_block / interval_control)]`, in float64 as Python computes it. (The last block, which is
/// `context_pre_only`, adds none; its entry is there for the graph's fixed-length input and is never read.)
pub fn controlnet_block_index(num_layers: usize, residuals: usize) -> Vec<i64> {
    if residuals == 0 {
        return vec![0; num_layers];
    }
    let interval = num_layers as f64 / residuals as f64;
    (0..num_layers).map(|i| (i as f64 / interval) as i64).collect()
}

/// `config.json` of an `SD3ControlNetModel`, with diffusers' defaults (controlnet_sd3.py lines 94-113).
#[derive(Debug, Clone)]
pub(crate) struct ControlNetConfig {
    pub num_layers: usize,
    pub inner_dim: usize,
    pub in_channels: usize,
    pub extra_conditioning_channels: usize,
    pub patch_size: usize,
    pub joint_attention_dim: Option<usize>,
    pub pooled_projection_dim: usize,
    pub use_pos_embed: bool,
    pub force_zeros_for_pooled_projection: bool,
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(Component::ControlNet, format!("{}: {e}", path.display())))?;
        let bad = |m: String| Error::config(Component::ControlNet, format!("{}: {m}", path.display()));
        if let Some(class) = v.get("_class_name").and_then(Value::as_str) {
            if class != "SD3ControlNetModel" {
                return Err(bad(format!(
                    "_class_name is {class:?}: not an SD3 ControlNet (SD3ControlNetModel); ControlNets of other \
                     architectures (SD1.5, SDXL, Flux) do not fit this transformer"
                )));
            }
        }
        let uint = |key: &str, default: usize| -> Result<usize> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("`{key}` is {x}, expected a non-negative integer"))),
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_bool().ok_or_else(|| bad(format!("`{key}` is {x}, expected true or false"))),
            }
        };
        let joint_attention_dim = match v.get("joint_attention_dim") {
            // diffusers' default is 4096; an explicit null means no text input (SD3.5's ControlNets).
            None => Some(4096),
            Some(Value::Null) => None,
            Some(x) => {
                Some(x.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("`joint_attention_dim` is {x}")))?)
            }
        };
        Ok(ControlNetConfig {
            num_layers: uint("num_layers", 18)?,
            inner_dim: uint("num_attention_heads", 18)? * uint("attention_head_dim", 64)?,
            in_channels: uint("in_channels", 16)?,
            extra_conditioning_channels: uint("extra_conditioning_channels", 0)?,
            patch_size: uint("patch_size", 2)?,
            joint_attention_dim,
            pooled_projection_dim: uint("pooled_projection_dim", 2048)?,
            use_pos_embed: flag("use_pos_embed", true)?,
            force_zeros_for_pooled_projection: flag("force_zeros_for_pooled_projection", true)?,
        })
    }

    pub fn info(&self) -> ControlNetInfo {
        ControlNetInfo {
            kind: if self.force_zeros_for_pooled_projection { ControlNetKind::InstantX } else { ControlNetKind::Sd35 },
            num_layers: self.num_layers,
            inner_dim: self.inner_dim,
            text_input: self.joint_attention_dim.is_some(),
            use_pos_embed: self.use_pos_embed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_matches_diffusers_float64_rule() {
        let u = ControlNetUnit::new("a", RgbImage::new(1, 1)).window(0.25, 0.75);
        let keeps: Vec<f64> = (0..4).map(|i| u.keep(i, 4)).collect();
        assert_eq!(keeps, [0.0, 1.0, 1.0, 0.0]);
        // 0.1 * 10 steps: i / 10 < 0.1 is false at i = 1 in float64 (0.1 == 0.1).
        let u = ControlNetUnit::new("a", RgbImage::new(1, 1)).window(0.1, 0.3);
        let keeps: Vec<f64> = (0..10).map(|i| u.keep(i, 10)).collect();
        assert_eq!(keeps, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn window_and_scale_are_checked() {
        let u = |s, e| ControlNetUnit::new("a", RgbImage::new(1, 1)).window(s, e);
        assert!(u(0.0, 1.0).check().is_ok());
        for (s, e) in [(-0.1, 1.0), (0.0, 1.1), (0.5, 0.5), (0.6, 0.4), (f64::NAN, 1.0)] {
            assert!(matches!(u(s, e).check(), Err(Error::InvalidRequest { .. })), "{s}..{e}");
        }
        assert!(u(0.0, 1.0).scale(f32::INFINITY).check().is_err());
    }

    #[test]
    fn block_index_on_small_cases() {
        assert_eq!(
            controlnet_block_index(24, 6),
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]
        );
        assert_eq!(controlnet_block_index(2, 1), [0, 0]);
        assert_eq!(controlnet_block_index(3, 2), [0, 0, 1]);
    }
}
