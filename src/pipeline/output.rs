//! What a generation returns.

use std::fmt;
use std::time::Duration;

use image::RgbImage;

use crate::error::Component;
use crate::runtime::ExecutionProvider;
use crate::scheduler::SamplerKind;
use crate::GenerationRequest;

/// Something the caller should know that did not stop the run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// The prompt was longer than an encoder takes and was cut (as diffusers does).
    PromptTruncated {
        /// The encoder whose limit was hit.
        encoder: Component,
        /// Its limit in tokens, special tokens included.
        max_tokens: usize,
        /// The text that was dropped.
        removed_text: String,
    },
    /// A component runs on the CPU because its execution provider was unavailable and the builder allowed
    /// `cpu_fallback`.
    ExecutionProviderFallback {
        /// The component.
        component: Component,
        /// Why the provider could not be used.
        reason: String,
    },
    /// The init image or mask had another size than the request and was resized (Lanczos). diffusers resizes
    /// with PIL, whose Lanczos filter rounds differently: pass pictures of the request's size for identical
    /// results.
    InputResized {
        /// `"init_image"` or `"mask"`.
        input: &'static str,
        /// Its size, width x height.
        from: (u32, u32),
        /// The request's size.
        to: (u32, u32),
    },
}

impl Warning {
    /// Marks a warning as coming from the negative prompt.
    pub(crate) fn for_negative_prompt(self) -> Warning {
        match self {
            Warning::PromptTruncated { encoder, max_tokens, removed_text } => Warning::PromptTruncated {
                encoder,
                max_tokens,
                removed_text: format!("(negative prompt) {removed_text}"),
            },
            other => other,
        }
    }
}

impl From<crate::text::Truncation> for Warning {
    fn from(t: crate::text::Truncation) -> Self {
        Warning::PromptTruncated { encoder: t.encoder, max_tokens: t.max_tokens, removed_text: t.removed_text }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::PromptTruncated { encoder, max_tokens, removed_text } => {
                write!(f, "prompt truncated to {max_tokens} tokens for the {encoder}; dropped: {removed_text:?}")
            }
            Warning::ExecutionProviderFallback { component, reason } => write!(f, "{component}: {reason}"),
            Warning::InputResized { input, from, to } => write!(
                f,
                "{input} resized from {}x{} to {}x{} (Lanczos; not bit-identical to diffusers' PIL resize)",
                from.0, from.1, to.0, to.1
            ),
        }
    }
}

/// Wall-clock time of each stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Tokenization and the text encoders (prompt and negative prompt).
    pub text_encoding: Duration,
    /// The whole denoising loop.
    pub denoising: Duration,
    /// Each denoising step.
    pub steps: Vec<Duration>,
    /// The VAE decoder and conversion to RGB.
    pub vae_decode: Duration,
    /// Everything, from request checks to images.
    pub total: Duration,
    /// Time spent inside ONNX Runtime's `Session::run` across all graphs.
    pub onnx_runtime: Duration,
    /// Time inside `Session::run` per component (the transformer's share is the denoiser's own cost).
    pub components: Vec<(Component, Duration)>,
    /// Time spent loading graphs again during this run (low-memory mode; zero otherwise). Included in the
    /// stage times.
    pub load: Duration,
}

impl Timings {
    /// Time spent outside ONNX Runtime (our own code: tokenization, conversions, scheduler, guidance, images),
    /// graph loads in low-memory mode excluded.
    pub fn outside_onnx_runtime(&self) -> Duration {
        self.total.saturating_sub(self.onnx_runtime).saturating_sub(self.load)
    }

    /// Time inside `Session::run` for one component.
    pub fn component(&self, component: Component) -> Duration {
        self.components.iter().filter(|(c, _)| *c == component).map(|(_, d)| *d).sum()
    }
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per_step = if self.steps.is_empty() { 0.0 } else { ms(self.denoising) / self.steps.len() as f64 };
        write!(
            f,
            "text encoding {:.1} ms | denoising {:.1} ms ({} steps, {:.1} ms/step) | VAE decode {:.1} ms | total {:.1} ms \
             (ONNX Runtime {:.1} ms, our code {:.1} ms)",
            ms(self.text_encoding),
            ms(self.denoising),
            self.steps.len(),
            per_step,
            ms(self.vae_decode),
            ms(self.total),
            ms(self.onnx_runtime),
            ms(self.outside_onnx_runtime())
        )
    }
}

/// The result of [`Sd3Pipeline::generate`](crate::Sd3Pipeline::generate).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GenerationOutput {
    /// The images: for each request in order, its `images_per_prompt` images.
    pub images: Vec<RgbImage>,
    /// The seed of the first image's noise; `None` when explicit latents were given.
    pub seed: Option<u64>,
    /// The seed of each image's noise (`None` for explicit latents), aligned with `images`.
    pub seeds: Vec<Option<u64>>,
    /// Width and height of the images.
    pub size: (u32, u32),
    /// Stage timings.
    pub timings: Timings,
    /// Truncated prompts, provider fallbacks and the like.
    pub warnings: Vec<Warning>,
    /// Where each component ran.
    pub placements: Vec<(Component, ExecutionProvider)>,
    /// Each image's generation parameters in AUTOMATIC1111's `parameters` text convention, for
    /// [`save_png`](crate::imageio::save_png), aligned with `images`.
    pub parameters: Vec<String>,
}

/// Formats generation parameters the way AUTOMATIC1111's web UI stores them in a PNG's `parameters` chunk:
/// the prompt, a `Negative prompt:` line, then `Key: value` pairs.
/// The sampler as the A1111 `parameters` text names it.
fn sampler_label(kind: SamplerKind) -> &'static str {
    match kind {
        SamplerKind::Heun => "FlowMatch Heun",
        SamplerKind::DpmSolverPlusPlus2M => "DPM++ 2M (flow)",
        _ => "FlowMatch Euler",
    }
}

pub(crate) fn a1111_parameters(
    request: &GenerationRequest,
    seed: Option<u64>,
    size: (u32, u32),
    model: &str,
    shift: f64,
) -> String {
    let mut text = request.prompt.clone();
    if !request.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", request.negative_prompt));
    }
    let seed = match seed {
        Some(s) => format!("Seed: {s}"),
        None => "Seed: explicit latents".to_string(),
    };
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, Shift: {shift}, CFG scale: {}, {seed}, Size: {}x{}, Model: {model}, \
         T5 tokens: {}",
        request.steps,
        sampler_label(request.sampler),
        request.guidance,
        size.0,
        size.1,
        request.max_sequence_length
    ));
    if let Some(k) = request.clip_skip {
        text.push_str(&format!(", Clip skip: {k}"));
    }
    if request.init_image.is_some() {
        let mode = if request.mask.is_some() { "Inpainting" } else { "img2img" };
        text.push_str(&format!(", Mode: {mode}, Denoising strength: {}", request.strength));
    }
    if let Some(slg) = &request.skip_layer_guidance {
        text.push_str(&format!(", SLG scale: {}, SLG window: {}-{}", slg.scale, slg.start, slg.stop));
        if let Some(layers) = &slg.layers {
            let names: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
            text.push_str(&format!(", SLG layers: {}", names.join(" ")));
        }
    }
    text
}
