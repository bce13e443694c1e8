//! What a loaded pipeline knows about its model, and the one shape a static-shape pipeline serves.

use crate::model_config::Variant;
use crate::runtime::ElementType;

/// Facts about the loaded model, read from its graphs and configs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelInfo {
    /// Latent channels (16 for SD3).
    pub latent_channels: usize,
    /// Pixels per latent (8 for SD3).
    pub vae_scale_factor: usize,
    /// Transformer patch size (2 for SD3).
    pub patch_size: usize,
    /// Context width (T5 width, 4096 for SD3).
    pub joint_attention_dim: usize,
    /// Pooled CLIP width (2048 for SD3).
    pub pooled_projection_dim: usize,
    /// Default width and height in pixels.
    pub default_size: usize,
    /// Largest latent grid in patches the position embedding covers, if the config says.
    pub pos_embed_max_size: Option<usize>,
    /// VAE `scaling_factor`.
    pub vae_scaling_factor: f32,
    /// VAE `shift_factor`.
    pub vae_shift_factor: f32,
    /// Element type of the transformer's latent input.
    pub transformer_dtype: ElementType,
    /// CLIP-L layers.
    pub clip_l_layers: usize,
    /// CLIP-G layers.
    pub clip_g_layers: usize,
    /// Whether the T5 encoder is loaded.
    pub has_t5: bool,
    /// The model family, detected from the transformer config and the folder's name.
    pub variant: Variant,
    /// VAE `sample_size`: the pixel tile size of tiled decoding.
    pub vae_tile_size: usize,
}

impl ModelInfo {
    /// Width and height must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor * self.patch_size
    }
}

/// The one request shape a pipeline built with [`Sd3PipelineBuilder::static_shape`](crate::Sd3PipelineBuilder::static_shape) serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StaticShape {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Whether requests use classifier-free guidance (guidance > 1: the transformer sees a batch of 2).
    pub guidance: bool,
    /// The T5 sequence length of requests.
    pub max_sequence_length: usize,
}

impl StaticShape {
    /// `width` x `height` with guidance and the default 256 T5 tokens.
    pub fn new(width: u32, height: u32) -> Self {
        StaticShape { width, height, guidance: true, max_sequence_length: 256 }
    }

    /// Sets whether requests use guidance.
    #[must_use]
    pub fn guidance(mut self, guidance: bool) -> Self {
        self.guidance = guidance;
        self
    }

    /// Sets the T5 sequence length.
    #[must_use]
    pub fn max_sequence_length(mut self, tokens: usize) -> Self {
        self.max_sequence_length = tokens;
        self
    }
}
