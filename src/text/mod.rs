//! Text: tokenizers, the three text encoders, and how their outputs become the transformer's conditioning.

mod conditioning;
pub(crate) mod encoders;
mod tokenizer;
mod vocabulary;
mod weighting;
pub(crate) use weighting::words_of;

pub use conditioning::{NoT5Padding, TextConditioning};
pub(crate) use conditioning::{TextEncoders, Truncation};
pub use tokenizer::{PromptTokenizer, TokenizedPrompt};
pub(crate) use vocabulary::{unknown_words, KeptVocabulary};
