//! Text: tokenizers, the three text encoders, and how their outputs become the transformer's conditioning.

mod conditioning;
pub(crate) mod encoders;
mod tokenizer;
mod weighting;

pub use conditioning::{NoT5Padding, TextConditioning};
pub(crate) use conditioning::{TextEncoders, Truncation};
pub use tokenizer::{PromptTokenizer, TokenizedPrompt};
