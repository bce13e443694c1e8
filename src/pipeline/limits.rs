//! Bounds on requests, checked before anything is allocated.

use crate::error::{Error, Result};

/// The largest width or height accepted (16384 pixels), whatever the model's position embedding allows.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// The most images one request may ask for (`GenerationRequest::images_per_prompt`).
pub const MAX_IMAGES_PER_PROMPT: usize = 64;

/// Bounds on what one call may ask for, checked before anything is allocated, so that a hostile or mistaken
/// request is refused with [`Error::InvalidRequest`] / [`Error::InvalidSize`] instead of exhausting memory. Set
/// them with [`Sd3PipelineBuilder::limits`](crate::Sd3PipelineBuilder::limits); the defaults fit SD3 at any size its position embedding covers.
///
/// ```
/// use sd3_onnx::Limits;
/// let strict = Limits::default().max_pixels(1024 * 1024).max_images(4);
/// assert_eq!(strict.max_side, sd3_onnx::MAX_IMAGE_SIDE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest width or height in pixels (default [`MAX_IMAGE_SIDE`]).
    pub max_side: usize,
    /// Largest width x height of one image (default 16384 x 16384: the side limit alone).
    pub max_pixels: usize,
    /// Most images in one call, all requests and `images_per_prompt` together (default
    /// [`MAX_IMAGES_PER_PROMPT`]).
    pub max_images: usize,
    /// Most denoising steps (default 1000; the scheduler's `num_train_timesteps` also bounds them).
    pub max_steps: usize,
    /// Longest prompt or negative prompt in bytes (default 1 MiB). Longer prompts are truncated by the
    /// tokenizers anyway; this bounds the tokenizers' work and memory.
    pub max_prompt_bytes: usize,
    /// Largest LoRA file [`Sd3Pipeline::load_lora`](crate::Sd3Pipeline::load_lora) reads, in bytes (default 4 GiB;
    /// a rank-128 LoRA on every linear layer of SD3.5-large is under 2 GiB). The file is checked before it is read.
    pub max_lora_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: MAX_IMAGE_SIDE,
            max_pixels: MAX_IMAGE_SIDE * MAX_IMAGE_SIDE,
            max_images: MAX_IMAGES_PER_PROMPT,
            max_steps: 1000,
            max_prompt_bytes: 1 << 20,
            max_lora_bytes: 4 << 30,
        }
    }
}

impl Limits {
    /// Sets [`max_side`](Self::max_side).
    #[must_use]
    pub fn max_side(mut self, pixels: usize) -> Self {
        self.max_side = pixels;
        self
    }

    /// Sets [`max_pixels`](Self::max_pixels).
    #[must_use]
    pub fn max_pixels(mut self, pixels: usize) -> Self {
        self.max_pixels = pixels;
        self
    }

    /// Sets [`max_images`](Self::max_images).
    #[must_use]
    pub fn max_images(mut self, images: usize) -> Self {
        self.max_images = images;
        self
    }

    /// Sets [`max_steps`](Self::max_steps).
    #[must_use]
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = steps;
        self
    }

    /// Sets [`max_prompt_bytes`](Self::max_prompt_bytes).
    #[must_use]
    pub fn max_prompt_bytes(mut self, bytes: usize) -> Self {
        self.max_prompt_bytes = bytes;
        self
    }

    /// Sets [`max_lora_bytes`](Self::max_lora_bytes).
    #[must_use]
    pub fn max_lora_bytes(mut self, bytes: u64) -> Self {
        self.max_lora_bytes = bytes;
        self
    }
}

/// The largest `max_sequence_length` diffusers accepts (`StableDiffusion3Pipeline.check_inputs`).
pub const MAX_T5_SEQUENCE_LENGTH: usize = 512;

/// `max_sequence_length` must be in `1..=MAX_T5_SEQUENCE_LENGTH`.
pub(crate) fn check_sequence_length(n: usize) -> Result<()> {
    if n == 0 || n > MAX_T5_SEQUENCE_LENGTH {
        return Err(Error::request(
            "max_sequence_length",
            n,
            format!("the T5 sequence length must be between 1 and {MAX_T5_SEQUENCE_LENGTH}"),
        ));
    }
    Ok(())
}
