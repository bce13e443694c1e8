//! What to generate: a request value with documented defaults and `with`-style setters.
//!
//! With the `serde` feature, [`GenerationRequest`] and [`SkipLayerGuidance`] read and write a JSON form (see
//! [`GenerationRequest`]'s documentation).

use image::{GrayImage, RgbImage};
use ndarray::Array4;

use crate::progress::CancellationToken;
use crate::scheduler::SamplerKind;
use crate::text::NoT5Padding;

/// Skip-layer guidance (SLG, diffusers' `skip_guidance_layers`): on the steps inside `[start, stop)` of the
/// schedule, one more conditional transformer pass with some blocks skipped pushes the prediction away from it:
/// `v += scale * (v_cond - v_skip)`. It needs a transformer graph exported with those blocks skipped
/// (`transformer/model_skip_layers.onnx`, made by `models/export/export_sd3.py --skip-layers`), and guidance
/// above 1, as in diffusers.
///
/// ```
/// use sd3_onnx::{GenerationRequest, SkipLayerGuidance};
/// let slg = SkipLayerGuidance::new(2.8).window(0.01, 0.2).layers(vec![7, 8, 9]);
/// let request = GenerationRequest::new("a red cube").skip_layer_guidance(slg);
/// assert_eq!(request.skip_layer_guidance.unwrap().scale, 2.8);
/// ```
///
/// With the `serde` feature it is the JSON object `{"scale": 2.8, "start": 0.01, "stop": 0.2, "layers": null}`;
/// missing fields take these defaults (diffusers'), so `{}` is SLG as diffusers does it by default, and unknown
/// fields are an error.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct SkipLayerGuidance {
    /// `skip_layer_guidance_scale` (diffusers' default 2.8).
    pub scale: f32,
    /// `skip_layer_guidance_start`, a fraction of the steps (default 0.01): SLG runs on step `i` when
    /// `i > steps * start` and `i < steps * stop`.
    pub start: f64,
    /// `skip_layer_guidance_stop`, a fraction of the steps (default 0.2).
    pub stop: f64,
    /// The skipped blocks (0-based). `None` uses the layers the skip-layer graph was exported with; a list that
    /// differs from the graph's is refused, since a graph has its layers baked in.
    pub layers: Option<Vec<usize>>,
}

/// diffusers' `skip_layer_guidance_scale` default (`StableDiffusion3Pipeline.__call__`).
const DEFAULT_SLG_SCALE: f32 = 2.8;

impl Default for SkipLayerGuidance {
    /// SLG with diffusers' defaults: scale 2.8, window 0.01 to 0.2, the graph's layers.
    fn default() -> Self {
        SkipLayerGuidance::new(DEFAULT_SLG_SCALE)
    }
}

impl SkipLayerGuidance {
    /// SLG with `scale` and diffusers' default window (0.01 to 0.2 of the steps).
    pub fn new(scale: f32) -> Self {
        SkipLayerGuidance { scale, start: 0.01, stop: 0.2, layers: None }
    }

    /// Sets the window: fractions of the steps where SLG applies.
    #[must_use]
    pub fn window(mut self, start: f64, stop: f64) -> Self {
        self.start = start;
        self.stop = stop;
        self
    }

    /// Names the skipped blocks (checked against the skip-layer graph).
    #[must_use]
    pub fn layers(mut self, layers: Vec<usize>) -> Self {
        self.layers = Some(layers);
        self
    }

    /// Whether SLG applies at step `i` of `steps` (diffusers `StableDiffusion3Pipeline.__call__`:
    /// `i > num_inference_steps * start and i < num_inference_steps * stop`, in Python floats).
    pub(crate) fn applies(&self, i: usize, steps: usize) -> bool {
        let (i, n) = (i as f64, steps as f64);
        i > n * self.start && i < n * self.stop
    }
}

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
///
/// # JSON (feature `serde`)
///
/// With the `serde` feature the request reads and writes a JSON object (or any serde format) whose field names
/// are the field names here:
///
/// ```json
/// {"prompt": "a red cube", "negative_prompt": "blurry", "width": 64, "height": 96, "steps": 4,
///  "guidance": 5.0, "seed": 42, "sampler": "heun", "skip_layer_guidance": {"scale": 2.8}}
/// ```
///
/// - `prompt` is required; every other field may be left out and then takes the default
///   [`GenerationRequest::new`] gives it (diffusers' defaults, not a model's own: see
///   [`Sd3Pipeline::request`](crate::Sd3Pipeline::request)). `{"prompt": "a red cube"}` is a whole request.
/// - Optional fields (`width`, `height`, `seed`, `clip_skip`, `skip_layer_guidance`, `preview_every`) are written
///   as `null` when unset, and read `null` as unset.
/// - `sampler` is a sampler's [name](SamplerKind::name): `"euler"`, `"heun"` or `"dpmpp_2m"`.
/// - `skip_layer_guidance` is an object, see [`SkipLayerGuidance`].
/// - `no_t5_padding` is `"max_sequence_length"` (default), `"clip_length"` or `"omit"` (see [`NoT5Padding`]).
/// - Unknown fields are an error, so a misspelt field cannot be silently ignored.
/// - `latents`, `init_image`, `mask` and `cancellation` have no JSON form: they are neither written nor read
///   (a JSON naming them is refused as having unknown fields). Set them in code on the deserialized request.
///
/// The values are not checked when read beyond their types (a JSON number for `steps`, a known sampler name);
/// [`Sd3Pipeline::validate`](crate::Sd3Pipeline::validate) and `generate` check them against the model and
/// [`Limits`](crate::Limits) as for any request. `seed` is a JSON integer up to 2^64 - 1: clients in languages
/// whose numbers are doubles (JavaScript) should keep seeds below 2^53.
///
/// ```
/// # #[cfg(feature = "serde")]
/// # fn main() -> Result<(), serde_json::Error> {
/// use sd3_onnx::{GenerationRequest, SamplerKind};
/// let request: GenerationRequest = serde_json::from_str(r#"{"prompt": "a red cube", "sampler": "heun"}"#)?;
/// assert_eq!(request, GenerationRequest::new("a red cube").sampler(SamplerKind::Heun));
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "serde"))]
/// # fn main() {}
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
// The JSON form: every field but `prompt` has `serde(default ...)` (the value `Default` gives it) or `serde(skip)`;
// a new field needs one of them. tests/serde_json.rs pins the whole form.
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct GenerationRequest {
    /// The prompt, sent to all three text encoders.
    pub prompt: String,
    /// The negative prompt (default empty), used only with guidance above 1.
    #[cfg_attr(feature = "serde", serde(default))]
    pub negative_prompt: String,
    /// Image width in pixels; `None` means the model's default (`sample_size * vae_scale_factor`) or the
    /// width implied by explicit latents.
    #[cfg_attr(feature = "serde", serde(default))]
    pub width: Option<u32>,
    /// Image height in pixels; `None` as for `width`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub height: Option<u32>,
    /// Denoising steps (default 28).
    #[cfg_attr(feature = "serde", serde(default = "defaults::steps"))]
    pub steps: usize,
    /// Classifier-free guidance scale (default 7.0). At or below 1.0 no unconditional pass is run.
    #[cfg_attr(feature = "serde", serde(default = "defaults::guidance"))]
    pub guidance: f32,
    /// Seed for the initial noise. `None` (and no latents) picks a random seed, reported in the output.
    #[cfg_attr(feature = "serde", serde(default))]
    pub seed: Option<u64>,
    /// Explicit initial latents `[images_per_prompt, C, H / f, W / f]`; they take precedence over `seed`.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub latents: Option<Array4<f32>>,
    /// Images generated for this prompt (default 1). Image `k` starts from the noise of `seed + k`, so it is
    /// the image a request with that seed alone would give.
    #[cfg_attr(feature = "serde", serde(default = "defaults::images_per_prompt"))]
    pub images_per_prompt: usize,
    /// T5 token count (default 256, at most 512).
    #[cfg_attr(feature = "serde", serde(default = "defaults::max_sequence_length"))]
    pub max_sequence_length: usize,
    /// Without a T5 encoder: what stands in for its states (default [`NoT5Padding::MaxSequenceLength`], as
    /// diffusers 0.36 and later). Ignored when the pipeline has T5.
    #[cfg_attr(feature = "serde", serde(default))]
    pub no_t5_padding: NoT5Padding,
    /// Skip this many final CLIP layers (default none: the penultimate layer).
    #[cfg_attr(feature = "serde", serde(default))]
    pub clip_skip: Option<usize>,
    /// Stops the run from another thread when cancelled.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub cancellation: Option<CancellationToken>,
    /// img2img / inpainting: the picture to start from (diffusers' `image`). It is resized to the request's
    /// size when it differs (the model's default size when none is set, as diffusers does).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub init_image: Option<RgbImage>,
    /// Inpainting: white (>= 128 of 255) marks what to repaint, black what to keep (diffusers' `mask_image`).
    /// Needs `init_image`.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub mask: Option<GrayImage>,
    /// img2img / inpainting: how much of the schedule runs, from 0 (keep the picture) to 1 (repaint fully);
    /// default 0.6 as diffusers. The first `int(steps - steps * strength)` steps are skipped.
    #[cfg_attr(feature = "serde", serde(default = "defaults::strength"))]
    pub strength: f64,
    /// Skip-layer guidance (see [`SkipLayerGuidance`]); off by default.
    #[cfg_attr(feature = "serde", serde(default))]
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// The sampler (default: FlowMatch Euler, the scheduler SD3 ships with). Heun and DPM-Solver++ (2M) read the
    /// same `scheduler_config.json`; img2img and inpainting need Euler (diffusers' pipelines call its
    /// `scale_noise`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub sampler: SamplerKind,
    /// Every this many steps, the progress callback receives a preview image (see
    /// [`StepProgress::previews`](crate::StepProgress::previews)); `None` (default) makes none.
    #[cfg_attr(feature = "serde", serde(default))]
    pub preview_every: Option<usize>,
    /// Emphasis syntax in the prompt and negative prompt (`(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, `\(`
    /// for a literal bracket) weighs their tokens as ComfyUI does (default `true`). A prompt without brackets
    /// is encoded the same either way; `false` makes brackets plain text. See docs/prompt-weighting.md.
    #[cfg_attr(feature = "serde", serde(default = "defaults::prompt_weighting"))]
    pub prompt_weighting: bool,
    /// LoRAs to apply, by the name they were loaded under ([`Sd3Pipeline::load_lora`](crate::Sd3Pipeline::load_lora)),
    /// each with its scale (diffusers' `set_adapters` weights); empty (default) runs the base model. JSON:
    /// `[["style", 0.8], ["character", 0.5]]`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub loras: Vec<(String, f32)>,
    /// ControlNets to apply (loaded with [`Sd3Pipeline::load_controlnet`](crate::Sd3Pipeline::load_controlnet)),
    /// each with its control image, scale and window; empty (default) runs without. Not serialised (images).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub controlnets: Vec<crate::controlnet::ControlNetUnit>,
}

/// The defaults of diffusers' `StableDiffusion3Pipeline.__call__` (diffusers 0.42.1, unchanged since 0.35.2,
/// `pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`; `strength` from
/// `pipeline_stable_diffusion_3_img2img.py`), shared by [`Default`] and the serde defaults.
mod defaults {
    pub(super) fn steps() -> usize {
        28
    }
    pub(super) fn guidance() -> f32 {
        7.0
    }
    pub(super) fn images_per_prompt() -> usize {
        1
    }
    pub(super) fn max_sequence_length() -> usize {
        256
    }
    pub(super) fn strength() -> f64 {
        0.6
    }
    pub(super) fn prompt_weighting() -> bool {
        true
    }
}

impl Default for GenerationRequest {
    fn default() -> Self {
        GenerationRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: defaults::steps(),
            guidance: defaults::guidance(),
            seed: None,
            latents: None,
            images_per_prompt: defaults::images_per_prompt(),
            max_sequence_length: defaults::max_sequence_length(),
            no_t5_padding: NoT5Padding::MaxSequenceLength,
            clip_skip: None,
            cancellation: None,
            init_image: None,
            mask: None,
            strength: defaults::strength(),
            skip_layer_guidance: None,
            preview_every: None,
            sampler: SamplerKind::Euler,
            prompt_weighting: defaults::prompt_weighting(),
            loras: Vec::new(),
            controlnets: Vec::new(),
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

    /// Without a T5 encoder, conditions on `padding` in place of the T5 states (see [`NoT5Padding`]: diffusers
    /// 0.36+, diffusers up to 0.35 / optimum, or ComfyUI).
    #[must_use]
    pub fn no_t5_padding(mut self, padding: NoT5Padding) -> Self {
        self.no_t5_padding = padding;
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

    /// Starts from `image` instead of pure noise (img2img); see [`strength`](Self::strength).
    #[must_use]
    pub fn init_image(mut self, image: RgbImage) -> Self {
        self.init_image = Some(image);
        self
    }

    /// Repaints only where `mask` is white (inpainting); needs [`init_image`](Self::init_image).
    #[must_use]
    pub fn mask(mut self, mask: GrayImage) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Sets the img2img / inpainting strength (0 to 1).
    #[must_use]
    pub fn strength(mut self, strength: f64) -> Self {
        self.strength = strength;
        self
    }

    /// Turns on skip-layer guidance.
    #[must_use]
    pub fn skip_layer_guidance(mut self, slg: SkipLayerGuidance) -> Self {
        self.skip_layer_guidance = Some(slg);
        self
    }

    /// Chooses the sampler.
    #[must_use]
    pub fn sampler(mut self, kind: SamplerKind) -> Self {
        self.sampler = kind;
        self
    }

    /// Asks for a preview image every `steps` steps (a cheap linear map of the predicted clean latents to RGB).
    #[must_use]
    pub fn preview_every(mut self, steps: usize) -> Self {
        self.preview_every = Some(steps);
        self
    }

    /// Turns prompt weighting on (the default) or off (brackets are plain text).
    #[must_use]
    pub fn prompt_weighting(mut self, on: bool) -> Self {
        self.prompt_weighting = on;
        self
    }

    /// Adds a LoRA (loaded with [`Sd3Pipeline::load_lora`](crate::Sd3Pipeline::load_lora)) at `scale`; call it
    /// again for several.
    #[must_use]
    pub fn lora(mut self, name: impl Into<String>, scale: f32) -> Self {
        self.loras.push((name.into(), scale));
        self
    }

    /// Adds a ControlNet unit (diffusers' `controlnet_conditioning_scale`, `control_guidance_start/end` and
    /// `control_image` for one ControlNet); call it again for several (diffusers' `SD3MultiControlNetModel`).
    #[must_use]
    pub fn controlnet(mut self, unit: crate::controlnet::ControlNetUnit) -> Self {
        self.controlnets.push(unit);
        self
    }

    /// Whether this request runs the unconditional pass (guidance above 1).
    pub fn uses_guidance(&self) -> bool {
        self.guidance > 1.0
    }
}
