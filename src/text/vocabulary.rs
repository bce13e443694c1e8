//! Restricted vocabularies: an export may keep only some rows of a text encoder's token-embedding table
//! (`models/export/export_sd3.py --keep-token-ids`, as the nano model's export does); every other token id then
//! maps to one shared row the model never learned. The kept ids are stored next to the tokenizer
//! (`tokenizer*/kept_token_ids.json`), so a prompt's words outside them can be named in a warning.

use std::collections::HashSet;
use std::path::Path;

use super::PromptTokenizer;
use crate::error::{Component, Error, Result};

use crate::layout::KEPT_TOKEN_IDS_FILE;

/// The token ids one text encoder knows.
#[derive(Debug, Clone)]
pub(crate) struct KeptVocabulary {
    /// The tokenizer whose ids these are.
    pub tokenizer: Component,
    kept: HashSet<u32>,
}

impl KeptVocabulary {
    /// Reads `<model>/<tokenizer folder>/kept_token_ids.json`; `None` when the folder has none (the whole
    /// vocabulary is kept).
    pub fn read(model_dir: &Path, tokenizer: Component) -> Result<Option<Self>> {
        let path = model_dir.join(tokenizer.folder()).join(KEPT_TOKEN_IDS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct File {
            vocab_size: u64,
            kept: Vec<u64>,
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let file: File =
            serde_json::from_str(&text).map_err(|e| Error::config(tokenizer, e.to_string()).in_file(&path))?;
        if file.kept.is_empty() || file.kept.iter().any(|i| *i >= file.vocab_size || *i > u64::from(u32::MAX)) {
            return Err(Error::config(
                tokenizer,
                format!("`kept` must list token ids below vocab_size {}", file.vocab_size),
            )
            .in_file(&path));
        }
        Ok(Some(KeptVocabulary { tokenizer, kept: file.kept.into_iter().map(|i| i as u32).collect() }))
    }

    /// The words of `text` (as typed, split at whitespace, outer punctuation trimmed) with a token this
    /// vocabulary lacks, in order, each once.
    pub fn unknown_words(&self, tokenizer: &PromptTokenizer, text: &str) -> Result<Vec<String>> {
        let mut words: Vec<String> = Vec::new();
        for (id, (start, _)) in tokenizer.content_tokens(text)? {
            if self.kept.contains(&id) {
                continue;
            }
            let word = word_at(text, start);
            if !word.is_empty() && !words.iter().any(|w| w == word) {
                words.push(word.to_string());
            }
        }
        Ok(words)
    }
}

/// The whitespace-delimited word of `text` around byte `at` (or the next word, when `at` is whitespace: T5's
/// offsets for a word-start token may begin at the space before the word), outer ASCII punctuation trimmed.
fn word_at(text: &str, at: usize) -> &str {
    let at = (0..=at.min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    let at = text[at..].find(|c: char| !c.is_whitespace()).map_or(text.len(), |i| at + i);
    let start =
        text[..at].rfind(char::is_whitespace).map_or(0, |i| i + text[i..].chars().next().map_or(1, char::len_utf8));
    let end = text[at..].find(char::is_whitespace).map_or(text.len(), |i| at + i);
    text[start..end].trim_matches(|c: char| c.is_ascii_punctuation())
}

/// Unknown words of `text` over several vocabularies (each tokenizer with its kept ids), each once.
pub(crate) fn unknown_words<'a>(
    vocabularies: impl IntoIterator<Item = (&'a KeptVocabulary, &'a PromptTokenizer)>,
    text: &str,
) -> Result<Vec<String>> {
    let mut words: Vec<String> = Vec::new();
    for (vocabulary, tokenizer) in vocabularies {
        for w in vocabulary.unknown_words(tokenizer, text)? {
            if !words.contains(&w) {
                words.push(w);
            }
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::word_at;

    #[test]
    fn words_are_found_around_a_token() {
        let t = "an astronaut, riding  a horse.";
        assert_eq!(word_at(t, 3), "astronaut");
        assert_eq!(word_at(t, 8), "astronaut");
        assert_eq!(word_at(t, 0), "an");
        assert_eq!(word_at(t, 25), "horse");
        assert_eq!(word_at("é", 1), "é");
        // At a space: the word after it.
        assert_eq!(word_at(t, 2), "astronaut");
        assert_eq!(word_at(t, 21), "a");
    }
}
