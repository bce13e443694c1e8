//! What to generate: a request value with documented defaults and `with`-style setters.

use ndarray::Array4;

use crate::progress::CancellationToken;

/// One text-to-image request. Build it with [`GenerationRequest::new`] and the setters; every field has the
/// default diffusers' `StableDiffusion3Pipeline.__call__` uses.
///
/// ```
/// use sd3_onnx::GenerationRequest;
/// let req = GenerationRequest::new("a red cube on a blue floor")
///     .negative_prompt("blurry")
///     .size(64, 96)
///     .steps(4)
///     .guidance(5.0)
///     .seed(42);
/// assert_eq!(req.steps, 4);
/// assert_eq!(req.max_sequence_length, 256);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GenerationRequest {
    /// The prompt, sent to all three text encoders.
    pub prompt: String,
    /// The negative prompt (default empty), used only with guidance above 1.
    pub negative_prompt: String,
    /// Image width in pixels; `None` means the model's default (`sample_size * vae_scale_factor`) or the
    /// width implied by explicit latents.
    pub width: Option<u32>,
    /// Image height in pixels; `None` as for `width`.
    pub height: Option<u32>,
    /// Denoising steps (default 28).
    pub steps: usize,
    /// Classifier-free guidance scale (default 7.0). At or below 1.0 no unconditional pass is run.
    pub guidance: f32,
    /// Seed for the initial noise. `None` (and no latents) picks a random seed, reported in the output.
    pub seed: Option<u64>,
    /// Explicit initial latents `[images_per_prompt, C, H / f, W / f]`; they take precedence over `seed`.
    pub latents: Option<Array4<f32>>,
    /// Images generated for this prompt (default 1). Image `k` starts from the noise of `seed + k`, so it is
    /// the image a request with that seed alone would give.
    pub images_per_prompt: usize,
    /// T5 token count (default 256, at most 512).
    pub max_sequence_length: usize,
    /// Skip this many final CLIP layers (default none: the penultimate layer).
    pub clip_skip: Option<usize>,
    /// Stops the run from another thread when cancelled.
    pub cancellation: Option<CancellationToken>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: 28,
            guidance: 7.0,
            seed: None,
            latents: None,
            images_per_prompt: 1,
            max_sequence_length: 256,
            clip_skip: None,
            cancellation: None,
        }
    }
}

impl GenerationRequest {
    /// A request for `prompt` with every other setting at its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerationRequest { prompt: prompt.into(), ..Default::default() }
    }

    /// Sets the negative prompt.
    #[must_use]
    pub fn negative_prompt(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt = text.into();
        self
    }

    /// Sets width and height in pixels.
    #[must_use]
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self
    }

    /// Sets the number of denoising steps.
    #[must_use]
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Sets the guidance scale.
    #[must_use]
    pub fn guidance(mut self, scale: f32) -> Self {
        self.guidance = scale;
        self
    }

    /// Sets the noise seed.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Uses these initial latents instead of seeded noise.
    #[must_use]
    pub fn latents(mut self, latents: Array4<f32>) -> Self {
        self.latents = Some(latents);
        self
    }

    /// Generates `n` images for this prompt.
    #[must_use]
    pub fn images_per_prompt(mut self, n: usize) -> Self {
        self.images_per_prompt = n;
        self
    }

    /// Sets the T5 sequence length.
    #[must_use]
    pub fn max_sequence_length(mut self, tokens: usize) -> Self {
        self.max_sequence_length = tokens;
        self
    }

    /// Skips the last `layers` CLIP layers.
    #[must_use]
    pub fn clip_skip(mut self, layers: usize) -> Self {
        self.clip_skip = Some(layers);
        self
    }

    /// Lets `token` stop the run (from any thread) between denoising steps.
    #[must_use]
    pub fn cancellation(mut self, token: CancellationToken) -> Self {
        self.cancellation = Some(token);
        self
    }

    /// Whether this request runs the unconditional pass (guidance above 1).
    pub fn uses_guidance(&self) -> bool {
        self.guidance > 1.0
    }
}
