//! The json configs of the transformer and the VAE: the numbers the graphs cannot tell us.

use std::path::Path;

use serde_json::Value;

use crate::error::{boxed, require_file, Component, Error, Result};

/// Reads a json config file and parses it with `parse`; a parse failure becomes [`Error::InvalidConfig`] naming
/// the file and `component`.
pub(crate) fn read_config<T>(
    component: Component,
    path: &Path,
    hint: &str,
    parse: impl FnOnce(&str) -> Result<T>,
) -> Result<T> {
    require_file(component, path, || hint.to_string())?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text).map_err(|e| match e {
        Error::InvalidConfig { message, source, .. } => {
            Error::InvalidConfig { component, path: Some(path.to_path_buf()), message, source }
        }
        other => other,
    })
}

/// Parses json text that must hold an object; serde_json's error is the source of the [`Error::InvalidConfig`].
pub(crate) fn parse_object(component: Component, text: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::InvalidConfig {
        component,
        path: None,
        message: format!("not json: {e}"),
        source: boxed(e),
    })?;
    if !v.is_object() {
        return Err(Error::config(component, "expected a json object"));
    }
    Ok(v)
}

fn positive_int(v: &Value, key: &str, default: Option<u64>) -> std::result::Result<Option<usize>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default.map(|d| d as usize)),
        Some(x) => match x.as_u64().filter(|n| (1..=1 << 20).contains(n)) {
            Some(n) => Ok(Some(n as usize)),
            None => Err(format!("`{key}` must be a positive integer, got {x}")),
        },
    }
}

/// `transformer/config.json` (diffusers `SD3Transformer2DModel`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TransformerConfig {
    /// Latent patch size (2 for SD3).
    pub patch_size: usize,
    /// Latent channels in (16 for SD3), when the config gives them.
    pub in_channels: Option<usize>,
    /// T5 width the context is padded to (4096 for SD3).
    pub joint_attention_dim: Option<usize>,
    /// Width of the pooled CLIP vector (2048 for SD3).
    pub pooled_projection_dim: Option<usize>,
    /// Default latent size; default image size is `sample_size * vae_scale_factor`.
    pub sample_size: usize,
    /// Largest latent grid (in patches) the position embedding covers.
    pub pos_embed_max_size: Option<usize>,
    /// Transformer blocks.
    pub num_layers: Option<usize>,
    /// `qk_norm` (`"rms_norm"` in SD3.5), if any.
    pub qk_norm: Option<String>,
    /// Number of MMDiT-X blocks with the extra self-attention (SD3.5-medium).
    pub dual_attention_layers: usize,
}

impl TransformerConfig {
    /// Reads `transformer/config.json`. Defaults are `SD3Transformer2DModel.__init__`'s (diffusers 0.42.1, as 0.35.2,
    /// `models/transformers/transformer_sd3.py`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let hint = "optimum-cli export writes transformer/config.json; copy it from the diffusers repo";
        read_config(Component::Transformer, path, hint, Self::from_json_str)
    }

    /// Parses the text of `transformer/config.json` (what [`from_file`](Self::from_file) reads). The
    /// [`Error::InvalidConfig`] says what is wrong, without a file name.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json(&parse_object(Component::Transformer, text)?)
    }

    /// Reads the config from parsed json.
    pub fn from_json(v: &Value) -> Result<Self> {
        Self::parse(v).map_err(|m| Error::config(Component::Transformer, m))
    }

    fn parse(v: &Value) -> std::result::Result<Self, String> {
        Ok(TransformerConfig {
            patch_size: positive_int(v, "patch_size", Some(2))?.unwrap_or(2),
            in_channels: positive_int(v, "in_channels", None)?,
            joint_attention_dim: positive_int(v, "joint_attention_dim", None)?,
            pooled_projection_dim: positive_int(v, "pooled_projection_dim", None)?,
            sample_size: positive_int(v, "sample_size", Some(128))?.unwrap_or(128),
            pos_embed_max_size: positive_int(v, "pos_embed_max_size", None)?,
            num_layers: positive_int(v, "num_layers", None)?,
            qk_norm: v.get("qk_norm").and_then(Value::as_str).map(str::to_string),
            dual_attention_layers: v.get("dual_attention_layers").and_then(Value::as_array).map_or(0, Vec::len),
        })
    }
}

/// The VAE config (`vae_decoder/config.json`, diffusers `AutoencoderKL`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VaeConfig {
    /// Pixels per latent along each axis: `2 ^ (len(block_out_channels) - 1)` (8 for SD3), as the SD3 pipeline
    /// computes `vae_scale_factor`.
    pub scale_factor: usize,
    /// Latent channels, when the config gives them.
    pub latent_channels: Option<usize>,
    /// Latents are divided by this before decoding (1.5305 for SD3).
    pub scaling_factor: f32,
    /// ... and then this is added (0.0609 for SD3).
    pub shift_factor: f32,
    /// `sample_size`: the pixel tile size of tiled decoding (1024 for SD3; `AutoencoderKL`'s default is 32).
    pub sample_size: usize,
}

impl VaeConfig {
    /// Reads the VAE config. `scaling_factor` and `block_out_channels` are required: a wrong default would
    /// silently change every image.
    pub fn from_file(component: Component, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let hint = "optimum-cli export writes the VAE config next to the VAE graphs";
        read_config(component, path, hint, Self::from_json_str)
    }

    /// Parses the text of a VAE `config.json` (what [`from_file`](Self::from_file) reads). The
    /// [`Error::InvalidConfig`] says what is wrong, without a file name; its component is the VAE decoder.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json(&parse_object(Component::VaeDecoder, text)?)
    }

    /// Reads the config from parsed json.
    pub fn from_json(v: &Value) -> Result<Self> {
        Self::parse(v).map_err(|m| Error::config(Component::VaeDecoder, m))
    }

    fn parse(v: &Value) -> std::result::Result<Self, String> {
        let blocks =
            v.get("block_out_channels").and_then(Value::as_array).filter(|a| !a.is_empty() && a.len() <= 16).ok_or(
                "`block_out_channels` must be a list of 1 to 16 channel counts (the VAE factor is 2^(len - 1))",
            )?;
        let float = |key: &str, required: bool| -> std::result::Result<f32, String> {
            match v.get(key) {
                None | Some(Value::Null) if !required => Ok(0.0),
                // Checked as f32 (what is stored): 1e39 is a finite f64 but an infinite f32, 1e-50 an f32 zero.
                Some(x) => x
                    .as_f64()
                    .map(|f| f as f32)
                    .filter(|f| f.is_finite() && (*f != 0.0 || key == "shift_factor"))
                    .ok_or_else(|| format!("`{key}` must be a finite number within float32's range, got {x}")),
                None => Err(format!("`{key}` is missing")),
            }
        };
        Ok(VaeConfig {
            scale_factor: 1usize << (blocks.len() - 1),
            latent_channels: positive_int(v, "latent_channels", None)?,
            scaling_factor: float("scaling_factor", true)?,
            shift_factor: float("shift_factor", false)?,
            sample_size: positive_int(v, "sample_size", Some(32))?.unwrap_or(32),
        })
    }
}

/// The SD3-family model a folder holds, detected from the transformer's config, with the defaults its model card
/// uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Variant {
    /// Stable Diffusion 3 medium: no qk-norm.
    Sd3Medium,
    /// Stable Diffusion 3.5 medium: qk RMS-norm and MMDiT-X dual-attention blocks.
    Sd35Medium,
    /// Stable Diffusion 3.5 large: qk RMS-norm, no dual attention.
    Sd35Large,
    /// Stable Diffusion 3.5 large turbo: the large architecture, distilled for few steps without guidance
    /// (told apart from large only by its name, e.g. `_name_or_path` in model_index.json or the folder name).
    Sd35LargeTurbo,
    /// This repository's nano SD3 (`models/sd3-nano`, trained by `models/nano/train.py`): SD3.5's block layout at
    /// tiny widths, told apart by its name (`sd3-nano` in model_index.json's `_name_or_path` or the folder name).
    Sd3Nano,
}

impl Variant {
    /// Detects the variant from the transformer config and a name (model_index `_name_or_path`, folder name).
    pub(crate) fn detect(transformer: &TransformerConfig, name: &str) -> Variant {
        if name.to_ascii_lowercase().contains("sd3-nano") {
            Variant::Sd3Nano
        } else if transformer.qk_norm.is_none() {
            Variant::Sd3Medium
        } else if transformer.dual_attention_layers > 0 {
            Variant::Sd35Medium
        } else if name.to_ascii_lowercase().contains("turbo") {
            Variant::Sd35LargeTurbo
        } else {
            Variant::Sd35Large
        }
    }

    /// Default denoising steps and guidance scale, from the diffusers examples of stabilityai's model cards
    /// (stable-diffusion-3-medium-diffusers: 28 / 7.0; stable-diffusion-3.5-medium: 40 / 4.5;
    /// stable-diffusion-3.5-large: 28 / 3.5; stable-diffusion-3.5-large-turbo: 4 / 0.0; the nano model: 28 / 5.0,
    /// the setting models/nano/eval_rust.sh measures).
    pub fn defaults(self) -> (usize, f32) {
        match self {
            Variant::Sd3Medium => (28, 7.0),
            Variant::Sd35Medium => (40, 4.5),
            Variant::Sd35Large => (28, 3.5),
            Variant::Sd35LargeTurbo => (4, 0.0),
            Variant::Sd3Nano => (28, 5.0),
        }
    }

    /// Default T5 token count (`max_sequence_length`): 256 for stabilityai's models (the default of diffusers'
    /// `StableDiffusion3Pipeline.__call__`), 77 for the nano model, which was trained with 77 T5 tokens as the
    /// SD3 paper's models were (Esser et al. 2024, sec. 5.2; `models/nano/train.py --t5-len 77`): more padding
    /// tokens than it was trained with shift its attention and lower its adherence.
    pub fn default_max_sequence_length(self) -> usize {
        match self {
            Variant::Sd3Nano => 77,
            _ => 256,
        }
    }
}
