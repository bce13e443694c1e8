//! What a generation returns.
//!
//! With the `serde` feature, [`GenerationOutput::summary`] gives everything but the images as a
//! [`GenerationSummary`] that serializes (timings in milliseconds, warnings tagged by kind).

use std::fmt;
use std::time::Duration;

use image::RgbImage;

use crate::error::Component;
use crate::runtime::ExecutionProvider;
use crate::scheduler::SamplerKind;
use crate::GenerationRequest;

/// Something the caller should know that did not stop the run.
///
/// With the `serde` feature a warning is an object tagged by its kind in snake case, with the variant's fields
/// (components by their [serde names](Component)):
/// `{"kind": "prompt_truncated", "encoder": "tokenizer_clip_l", "max_tokens": 77, "removed_text": "...",
/// "removed_tokens": 12}`,
/// `{"kind": "execution_provider_fallback", "component": "transformer", "reason": "..."}`,
/// `{"kind": "input_resized", "input": "init_image", "from": [64, 64], "to": [128, 128]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Warning {
    /// The prompt was longer than an encoder takes and was cut (as diffusers does).
    PromptTruncated {
        /// The encoder whose limit was hit.
        encoder: Component,
        /// Its limit in tokens, special tokens included.
        max_tokens: usize,
        /// The text that was dropped, in full (the `Display` form quotes only its start).
        removed_text: String,
        /// How many tokens were dropped.
        removed_tokens: usize,
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
        /// `"init_image"`, `"mask"` or `"control_image"` (a ControlNet's).
        input: &'static str,
        /// Its size, width x height.
        from: (u32, u32),
        /// The request's size.
        to: (u32, u32),
    },
    /// Keys of a LoRA file that were not applied: another component's (T5, or a text encoder whose folder is not LoRA-ready), a
    /// format we do not read (kohya: convert it, docs/lora.md), or modules the model's graph does not expose.
    LoraKeysIgnored {
        /// The name the LoRA was loaded under.
        lora: String,
        /// The keys, sorted.
        keys: Vec<String>,
    },
    /// The prompt has words whose tokens this model's export did not keep: its text encoders map them all to one
    /// shared embedding that it never learned (the nano model keeps only its training vocabulary; the kept ids
    /// are listed in `tokenizer*/kept_token_ids.json`). Such words have no effect on the image.
    UnknownWords {
        /// `"prompt"` or `"negative_prompt"`.
        input: &'static str,
        /// The words, as typed, in order, each once.
        words: Vec<String>,
    },
    /// The requested size differs from the one the model was trained at
    /// ([`ModelCard::trained_size`](crate::ModelCard::trained_size)); a model trained at one size only (the nano
    /// model) draws noise or a smear at others. Models trained at several aspect ratios around one pixel count
    /// (SD3) warn only below half or above twice that count.
    UntrainedSize {
        /// The requested width x height.
        requested: (u32, u32),
        /// The size the model was trained at.
        trained: (u32, u32),
        /// Whether the model was trained at that size only (otherwise around that many pixels).
        only: bool,
    },
}

impl Warning {
    /// Marks a warning as coming from the negative prompt.
    pub(crate) fn for_negative_prompt(self) -> Warning {
        match self {
            Warning::PromptTruncated { encoder, max_tokens, removed_text, removed_tokens } => {
                Warning::PromptTruncated {
                    encoder,
                    max_tokens,
                    removed_text: format!("(negative prompt) {removed_text}"),
                    removed_tokens,
                }
            }
            other => other,
        }
    }
}

impl From<crate::text::Truncation> for Warning {
    fn from(t: crate::text::Truncation) -> Self {
        Warning::PromptTruncated {
            encoder: t.encoder,
            max_tokens: t.max_tokens,
            removed_text: t.removed_text,
            removed_tokens: t.removed_tokens,
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::PromptTruncated { encoder, max_tokens, removed_text, removed_tokens } => {
                let name = match encoder {
                    Component::TokenizerClipL | Component::TextEncoderClipL => "CLIP-L".to_string(),
                    Component::TokenizerClipG | Component::TextEncoderClipG => "CLIP-G".to_string(),
                    Component::TokenizerT5 | Component::TextEncoderT5 => "T5".to_string(),
                    other => other.to_string(),
                };
                write!(
                    f,
                    "{name}: {removed_tokens} tokens dropped (over {max_tokens}): \"{}\"",
                    short_quote(removed_text)
                )
            }
            Warning::UnknownWords { input, words } => {
                let which = if *input == "negative_prompt" { "negative prompt" } else { "prompt" };
                let shown: Vec<&str> = words.iter().take(8).map(String::as_str).collect();
                let more = if words.len() > shown.len() {
                    format!(" and {} more", words.len() - shown.len())
                } else {
                    String::new()
                };
                write!(
                    f,
                    "{which}: not in this model's vocabulary (no effect on the image): {}{more}",
                    shown.join(", ")
                )
            }
            Warning::UntrainedSize { requested, trained, only } => {
                let how = if *only { "only at" } else { "around" };
                write!(
                    f,
                    "{}x{} was asked; this model was trained {how} {}x{} and may draw poorly at other sizes",
                    requested.0, requested.1, trained.0, trained.1
                )
            }
            Warning::ExecutionProviderFallback { component, reason } => write!(f, "{component}: {reason}"),
            Warning::InputResized { input, from, to } => write!(
                f,
                "{input} resized from {}x{} to {}x{} (Lanczos; not bit-identical to diffusers' PIL resize)",
                from.0, from.1, to.0, to.1
            ),
            Warning::LoraKeysIgnored { lora, keys } => {
                const SHOWN: usize = 8;
                write!(
                    f,
                    "LoRA {lora}: {} keys not applied: {}",
                    keys.len(),
                    keys[..keys.len().min(SHOWN)].join(", ")
                )?;
                if keys.len() > SHOWN {
                    write!(f, ", ...")?;
                }
                Ok(())
            }
        }
    }
}

/// The first words of `text` (at most 40 characters), with `...` when there is more.
fn short_quote(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        return text.to_string();
    }
    let cut: String = text.chars().take(MAX).collect();
    let cut = match cut.rfind(' ') {
        Some(i) if i > MAX / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{cut}...")
}

/// Wall-clock time of each stage.
///
/// With the `serde` feature every duration is written as a JSON number of milliseconds (an `f64`, e.g.
/// `"total_ms": 1234.567891`), under the field's name plus `_ms`; `components` is a list of
/// `{"component": "transformer", "ms": 812.5}` objects. Reading gives back the same nanoseconds for durations
/// below about 26 days (2^51 ns); negative or non-finite milliseconds are an error.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Timings {
    /// Tokenization and the text encoders (prompt and negative prompt).
    #[cfg_attr(feature = "serde", serde(rename = "text_encoding_ms", with = "serde_support::ms"))]
    pub text_encoding: Duration,
    /// The whole denoising loop.
    #[cfg_attr(feature = "serde", serde(rename = "denoising_ms", with = "serde_support::ms"))]
    pub denoising: Duration,
    /// Each denoising step.
    #[cfg_attr(feature = "serde", serde(rename = "steps_ms", with = "serde_support::ms_list"))]
    pub steps: Vec<Duration>,
    /// The VAE decoder and conversion to RGB.
    #[cfg_attr(feature = "serde", serde(rename = "vae_decode_ms", with = "serde_support::ms"))]
    pub vae_decode: Duration,
    /// Everything, from request checks to images.
    #[cfg_attr(feature = "serde", serde(rename = "total_ms", with = "serde_support::ms"))]
    pub total: Duration,
    /// Time spent inside ONNX Runtime's `Session::run` across all graphs.
    #[cfg_attr(feature = "serde", serde(rename = "onnx_runtime_ms", with = "serde_support::ms"))]
    pub onnx_runtime: Duration,
    /// Time inside `Session::run` per component (the transformer's share is the denoiser's own cost).
    #[cfg_attr(feature = "serde", serde(with = "serde_support::component_ms"))]
    pub components: Vec<(Component, Duration)>,
    /// Time spent loading graphs again during this run (low-memory mode; zero otherwise). Included in the
    /// stage times.
    #[cfg_attr(feature = "serde", serde(rename = "load_ms", with = "serde_support::ms"))]
    pub load: Duration,
    /// Time spent merging LoRA weights because the request's LoRAs differ from the previous request's (zero
    /// otherwise; docs/lora.md). Included in `text_encoding`, which it precedes.
    #[cfg_attr(feature = "serde", serde(rename = "lora_ms", default, with = "serde_support::ms"))]
    pub lora: Duration,
    /// Whether the denoising loop ran on the transformer's device
    /// ([`Sd3PipelineBuilder::device_loop`](crate::Sd3PipelineBuilder::device_loop)). Its step graphs (guidance,
    /// the sampler step) count as our code: they are not in `onnx_runtime`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub device_loop: bool,
}

impl Timings {
    /// Time spent outside ONNX Runtime (our own code: tokenization, conversions, scheduler, guidance, images),
    /// graph loads in low-memory mode and LoRA merges (which run in ONNX Runtime) excluded.
    pub fn outside_onnx_runtime(&self) -> Duration {
        self.total.saturating_sub(self.onnx_runtime).saturating_sub(self.load).saturating_sub(self.lora)
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

/// Everything in a [`GenerationOutput`] but the images and the placements: the record a job queue keeps with the
/// PNGs. Made by [`GenerationOutput::summary`]; serializes (feature `serde`) as
///
/// ```json
/// {"seeds": [42], "width": 64, "height": 64,
///  "timings": {"text_encoding_ms": 10.2, "denoising_ms": 30.5, "steps_ms": [15.1, 15.4], "vae_decode_ms": 5.0,
///              "total_ms": 46.1, "onnx_runtime_ms": 40.3, "components": [{"component": "transformer", "ms": 29.0}],
///              "load_ms": 0.0},
///  "warnings": [], "parameters": ["a red cube\nSteps: 2, Sampler: FlowMatch Euler, ..."]}
/// ```
///
/// (see [`Timings`] and [`Warning`] for their forms). Unknown fields are ignored when reading, so a reader keeps
/// working when later versions add fields.
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct GenerationSummary {
    /// The seed of each image's noise (`null` for explicit latents), in the order of the images.
    pub seeds: Vec<Option<u64>>,
    /// Width of the images in pixels.
    pub width: u32,
    /// Height of the images in pixels.
    pub height: u32,
    /// Stage timings.
    pub timings: Timings,
    /// Truncated prompts, provider fallbacks and the like.
    pub warnings: Vec<Warning>,
    /// Each image's parameters in AUTOMATIC1111's `parameters` text convention (what
    /// [`save_png`](crate::imageio::save_png) writes into the PNG), in the order of the images.
    pub parameters: Vec<String>,
}

#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
impl GenerationOutput {
    /// Everything but the images and the placements, as a value that serializes.
    pub fn summary(&self) -> GenerationSummary {
        GenerationSummary {
            seeds: self.seeds.clone(),
            width: self.size.0,
            height: self.size.1,
            timings: self.timings.clone(),
            warnings: self.warnings.clone(),
            parameters: self.parameters.clone(),
        }
    }
}

/// The serde forms of durations and of [`Warning::InputResized`]'s input name.
#[cfg(feature = "serde")]
mod serde_support {
    use std::time::Duration;

    use serde::de::{Deserialize, Deserializer, Error as _, Unexpected};
    use serde::ser::{SerializeSeq, Serializer};

    use crate::error::Component;

    fn to_ms(d: &Duration) -> f64 {
        // Whole nanoseconds as f64 are exact below 2^53; divided by 1e6 and multiplied back they round to the
        // same integer below 2^51 ns.
        d.as_nanos() as f64 / 1e6
    }

    fn from_ms<E: serde::de::Error>(ms: f64) -> Result<Duration, E> {
        let nanos = (ms * 1e6).round();
        if !nanos.is_finite() || nanos < 0.0 || nanos >= u64::MAX as f64 {
            return Err(E::invalid_value(Unexpected::Float(ms), &"a duration: milliseconds, finite and not negative"));
        }
        Ok(Duration::from_nanos(nanos as u64))
    }

    pub(super) mod ms {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_f64(to_ms(d))
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            from_ms(f64::deserialize(d)?)
        }
    }

    pub(super) mod ms_list {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for d in v {
                seq.serialize_element(&to_ms(d))?;
            }
            seq.end()
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            Vec::<f64>::deserialize(d)?.into_iter().map(from_ms).collect()
        }
    }

    pub(super) mod component_ms {
        use super::*;

        #[derive(serde::Serialize, serde::Deserialize)]
        struct Entry {
            component: Component,
            ms: f64,
        }

        pub(crate) fn serialize<S: Serializer>(v: &[(Component, Duration)], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for (component, d) in v {
                seq.serialize_element(&Entry { component: *component, ms: to_ms(d) })?;
            }
            seq.end()
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(Component, Duration)>, D::Error> {
            Vec::<Entry>::deserialize(d)?.into_iter().map(|e| Ok((e.component, from_ms(e.ms)?))).collect()
        }
    }

    /// What [`Warning`](super::Warning) is read through: the same form, with an owned `input` name (a derived
    /// `Deserialize` cannot produce the `&'static str`).
    #[derive(serde::Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub(super) enum WarningRepr {
        PromptTruncated {
            encoder: Component,
            max_tokens: usize,
            removed_text: String,
            #[serde(default)]
            removed_tokens: usize,
        },
        ExecutionProviderFallback {
            component: Component,
            reason: String,
        },
        InputResized {
            input: String,
            from: (u32, u32),
            to: (u32, u32),
        },
        UnknownWords {
            input: String,
            words: Vec<String>,
        },
        UntrainedSize {
            requested: (u32, u32),
            trained: (u32, u32),
            only: bool,
        },
        LoraKeysIgnored {
            lora: String,
            keys: Vec<String>,
        },
    }

    // By hand: a derived `Deserialize` would need `'de: 'static` for `InputResized`'s `&'static str`.
    impl<'de> Deserialize<'de> for super::Warning {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            use super::Warning;
            Ok(match WarningRepr::deserialize(d)? {
                WarningRepr::PromptTruncated { encoder, max_tokens, removed_text, removed_tokens } => {
                    Warning::PromptTruncated { encoder, max_tokens, removed_text, removed_tokens }
                }
                WarningRepr::UnknownWords { input, words } => {
                    let input = match input.as_str() {
                        "prompt" => "prompt",
                        "negative_prompt" => "negative_prompt",
                        other => {
                            return Err(D::Error::invalid_value(
                                Unexpected::Str(other),
                                &"\"prompt\" or \"negative_prompt\"",
                            ))
                        }
                    };
                    Warning::UnknownWords { input, words }
                }
                WarningRepr::UntrainedSize { requested, trained, only } => {
                    Warning::UntrainedSize { requested, trained, only }
                }
                WarningRepr::LoraKeysIgnored { lora, keys } => Warning::LoraKeysIgnored { lora, keys },
                WarningRepr::ExecutionProviderFallback { component, reason } => {
                    Warning::ExecutionProviderFallback { component, reason }
                }
                WarningRepr::InputResized { input, from, to } => {
                    let input = match input.as_str() {
                        "init_image" => "init_image",
                        "mask" => "mask",
                        "control_image" => "control_image",
                        other => {
                            return Err(D::Error::invalid_value(
                                Unexpected::Str(other),
                                &"\"init_image\", \"mask\" or \"control_image\"",
                            ))
                        }
                    };
                    Warning::InputResized { input, from, to }
                }
            })
        }
    }
}

/// The sampler as the A1111 `parameters` text names it.
fn sampler_label(kind: SamplerKind) -> &'static str {
    match kind {
        SamplerKind::Heun => "FlowMatch Heun",
        SamplerKind::DpmSolverPlusPlus2M => "DPM++ 2M (flow)",
        _ => "FlowMatch Euler",
    }
}

/// Formats generation parameters the way AUTOMATIC1111's web UI stores them in a PNG's `parameters` chunk:
/// the prompt, a `Negative prompt:` line, then `Key: value` pairs.
pub(crate) fn a1111_parameters(
    request: &GenerationRequest,
    seed: Option<u64>,
    size: (u32, u32),
    model: &str,
    shift: f64,
    lora_hashes: &[(String, String)],
) -> String {
    let mut text = request.prompt.clone();
    // AUTOMATIC1111 keeps `<lora:name:scale>` in the prompt text and lists the files' short hashes.
    for (name, scale) in &request.loras {
        text.push_str(&format!(" <lora:{name}:{scale}>"));
    }
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
    // As the AUTOMATIC1111 ControlNet extension records its units.
    for (k, u) in request.controlnets.iter().enumerate() {
        text.push_str(&format!(
            ", ControlNet {k}: \"Model: {}, Module: {}, Weight: {}, Guidance Start: {}, Guidance End: {}\"",
            u.name,
            u.preprocessor.as_deref().unwrap_or("none"),
            u.scale,
            u.start,
            u.end
        ));
    }
    if !lora_hashes.is_empty() {
        let list: Vec<String> = lora_hashes.iter().map(|(n, h)| format!("{n}: {h}")).collect();
        text.push_str(&format!(", Lora hashes: \"{}\"", list.join(", ")));
    }
    text
}
