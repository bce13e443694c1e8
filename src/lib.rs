//! # sd3-onnx
//!
//! Stable Diffusion 3 / 3.5 text-to-image in Rust, on ONNX Runtime. The graphs (CLIP-L, CLIP-G, T5, the MMDiT
//! transformer, the VAE decoder) come from an `optimum-cli export onnx` folder; everything around them, from
//! tokenization and prompt conditioning to classifier-free guidance, the flow-matching scheduler and the
//! final image, is this crate's Rust, written to reproduce Hugging Face diffusers' numbers.
//!
//! ```no_run
//! use sd3_onnx::{ExecutionProvider, GenerationRequest, Sd3Pipeline};
//!
//! # fn main() -> sd3_onnx::Result<()> {
//! let mut pipe = Sd3Pipeline::builder("models/sd3-medium-onnx")
//!     .execution_provider(ExecutionProvider::Cpu)
//!     .build()?; // every graph is opened and checked here
//! let out = pipe.generate(
//!     &GenerationRequest::new("a photo of an astronaut riding a horse")
//!         .negative_prompt("blurry")
//!         .size(1024, 1024)
//!         .steps(28)
//!         .guidance(7.0)
//!         .seed(42),
//! )?;
//! // PNG with the generation parameters in its text chunk, errors typed like the rest.
//! sd3_onnx::imageio::save_png("astronaut.png", &out.images[0], Some(&out.parameters[0]))?;
//! for w in &out.warnings {
//!     eprintln!("warning: {w}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! With the model card's own defaults (steps, guidance, T5 token count; the size from the model's config), here
//! for the small nano model in the repository's `models/sd3-nano` (128x128):
//!
//! ```no_run
//! # fn main() -> sd3_onnx::Result<()> {
//! let mut pipe = sd3_onnx::Sd3Pipeline::builder("models/sd3-nano").build()?;
//! let out = pipe.generate(&pipe.request("three red circles").seed(7))?;
//! assert_eq!(out.images[0].dimensions(), out.size);
//! # Ok(())
//! # }
//! ```
//!
//! The examples are compiled, not run, as doctests: the crate package holds no model. The repository runs the
//! same calls on its models in `tests/` and in `downstream/`, a separate project that uses the packaged crate.
//!
//! Modules follow the data: [`text`] (tokenizers, encoders, conditioning) -> [`scheduler`] (sigmas, Euler
//! step, guidance) -> the denoising loop in [`Sd3Pipeline`] -> [`imageio`] (decoded tensor to RGB, PNGs with parameters, init images and masks). [`runtime`]
//! owns everything that touches ONNX Runtime. With the `download` feature, `hub` fetches a model folder from the
//! Hugging Face Hub into the Hugging Face cache (`Sd3Pipeline::from_hub("org/name")`).
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The crates whose types appear in this crate's API, re-exported so users need not match their versions by hand.
pub use image;
pub use ndarray;

pub mod controlnet;
pub mod error;
#[cfg(feature = "download")]
#[cfg_attr(docsrs, doc(cfg(feature = "download")))]
pub mod hub;
pub mod imageio;
pub mod latents;
mod layout;
mod lora;
pub mod model_config;
mod pipeline;
pub mod preview;
pub mod progress;
pub mod runtime;
pub mod scheduler;
pub mod text;

pub use controlnet::{ControlNetInfo, ControlNetKind, ControlNetUnit};
pub use error::{Component, Error, Result};
pub use model_config::Variant;
#[cfg(feature = "serde")]
pub use pipeline::GenerationSummary;
pub use pipeline::{
    GenerationOutput, GenerationRequest, Limits, ModelCard, ModelInfo, Sd3Pipeline, Sd3PipelineBuilder,
    SkipLayerGuidance, StaticShape, Timings, Warning, MAX_IMAGES_PER_PROMPT, MAX_IMAGE_SIDE, MAX_T5_SEQUENCE_LENGTH,
};
pub use progress::{CancellationToken, ControlFlow, StepProgress};
pub use runtime::{CudaAttention, CudaOptions, DirectMlOptions, ElementType, ExecutionProvider, TensorRtOptions};
pub use scheduler::{FlowMatchConfig, Sampler, SamplerKind, Schedule};
pub use text::NoT5Padding;
