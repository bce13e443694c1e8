//! Prompt tokenizers for CLIP-L, CLIP-G and T5, padded and truncated exactly as diffusers asks the Hugging Face
//! tokenizers to (`padding="max_length"`, `truncation=True`, special tokens added).
//!
//! Both the `tokenizer.json` layout that optimum exports and the real SD3 repository layout (CLIP given only as
//! `vocab.json` + `merges.txt`) load. For the latter we build the same pipeline that transformers'
//! `CLIPTokenizerFast` converts the slow tokenizer to (`convert_slow_tokenizer.CLIPConverter`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};

use super::weighting::Segment;
use crate::error::{boxed, require_file, Component, Error, Result};

/// A prompt turned into exactly `max_len` token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenizedPrompt {
    /// Token ids, padded or truncated to the requested length, special tokens included.
    pub ids: Vec<i64>,
    /// The content tokens that did not fit, decoded, when the prompt was truncated. (For CLIP this is the text
    /// diffusers logs; for T5 diffusers (0.35.2 to 0.42.1) logs a slice starting at token 76 whatever the length, we report
    /// what was actually dropped.)
    pub removed_text: Option<String>,
    /// How many content tokens did not fit (0 when nothing was cut).
    pub removed_tokens: usize,
}

/// One of the three prompt tokenizers, with the padding token its config names.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    component: Component,
    path: PathBuf,
    inner: Tokenizer,
    pad_id: u32,
    model_max_length: Option<usize>,
    /// CLIP's BPE marks word ends with `</w>`; decoded text turns it into spaces, as transformers'
    /// `CLIPTokenizerFast._wrap_decode_method_backend_tokenizer` does.
    word_suffix: Option<String>,
    /// transformers' `clean_up_tokenization_spaces` (from tokenizer_config.json), applied to decoded text.
    clean_up_spaces: bool,
}

/// Special-token settings read from `special_tokens_map.json` and `tokenizer_config.json`.
struct SpecialTokens {
    map: Option<Value>,
    config: Option<Value>,
    config_path: PathBuf,
}

impl SpecialTokens {
    fn read(component: Component, dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        Ok(SpecialTokens {
            map: read_json_opt(component, &dir.join("special_tokens_map.json"))?,
            config: read_json_opt(component, &config_path)?,
            config_path,
        })
    }

    /// A special token's text: `special_tokens_map.json` wins over `tokenizer_config.json`, as in transformers.
    fn token(&self, key: &str) -> Option<String> {
        [&self.map, &self.config].into_iter().flatten().find_map(|v| match v.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        })
    }

    /// Whether decoded text gets transformers' `clean_up_tokenization`. transformers 5 (the version diffusers 0.42.1
    /// runs with; `TokenizersBackend.decode` in tokenization_utils_tokenizers.py) ignores
    /// `clean_up_tokenization_spaces` for BPE models such as CLIP's unless
    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is set too; transformers 4 applied it.
    fn clean_up_spaces(&self, bpe: bool) -> bool {
        let flag = |key: &str| self.config.as_ref().and_then(|c| c.get(key)).and_then(Value::as_bool).unwrap_or(false);
        flag("clean_up_tokenization_spaces")
            && (!bpe || flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
    }

    fn model_max_length(&self) -> Option<usize> {
        let v = self.config.as_ref()?.get("model_max_length")?.as_f64()?;
        // transformers writes 1e30 for "no limit".
        (1.0..1e9).contains(&v).then_some(v as usize)
    }
}

/// Reads a tokenizer text file; bytes that are not UTF-8 are a tokenizer error naming the file, other failures
/// I/O errors.
fn read_text(component: Component, path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| Error::Tokenizer {
        component,
        path: path.to_path_buf(),
        message: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        source: boxed(e.utf8_error()),
    })
}

fn read_json_opt(component: Component, path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::InvalidConfig {
        component,
        path: Some(path.to_path_buf()),
        message: format!("not json: {e}"),
        source: boxed(e),
    })
}

impl PromptTokenizer {
    /// Loads a CLIP tokenizer folder (`tokenizer/` or `tokenizer_2/`).
    ///
    /// The default padding token is `<|endoftext|>` as in transformers' `CLIPTokenizer`; SD3's CLIP-G folder
    /// overrides it with `!` (id 0) in its `special_tokens_map.json`, and that file decides.
    pub fn load_clip(component: Component, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let special = SpecialTokens::read(component, dir)?;
        let json_path = dir.join("tokenizer.json");
        let (inner, path) = if json_path.is_file() {
            let mut inner = load_tokenizer_json(component, &json_path)?;
            register_config_tokens(component, &mut inner, &special)?;
            (inner, json_path)
        } else {
            let vocab = dir.join("vocab.json");
            let merges = dir.join("merges.txt");
            for p in [&vocab, &merges] {
                require_file(component, p, || {
                    format!(
                        "A CLIP tokenizer folder needs tokenizer.json, or vocab.json + merges.txt (found neither \
                         complete in {})",
                        dir.display()
                    )
                })?;
            }
            (clip_from_vocab_merges(component, &vocab, &merges, &special)?, vocab)
        };
        let pad = special.token("pad_token").unwrap_or_else(|| "<|endoftext|>".to_string());
        let mut tok = Self::finish(component, path, inner, &pad, special.model_max_length())?;
        tok.word_suffix = Some("</w>".to_string());
        tok.clean_up_spaces = special.clean_up_spaces(tok.is_bpe());
        Ok(tok)
    }

    /// Loads the T5 tokenizer folder (`tokenizer_3/`), which must hold `tokenizer.json`.
    pub fn load_t5(component: Component, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let special = SpecialTokens::read(component, dir)?;
        let json_path = dir.join("tokenizer.json");
        require_file(component, &json_path, || {
            if dir.join("spiece.model").is_file() {
                "Only spiece.model was found; convert it once with transformers \
                 (`T5TokenizerFast.from_pretrained(dir).save_pretrained(dir)`) to write tokenizer.json"
            } else {
                "The T5 tokenizer folder needs tokenizer.json"
            }
            .to_string()
        })?;
        let inner = load_tokenizer_json(component, &json_path)?;
        let pad = special.token("pad_token").unwrap_or_else(|| "<pad>".to_string());
        let mut tok = Self::finish(component, json_path, inner, &pad, special.model_max_length())?;
        tok.clean_up_spaces = special.clean_up_spaces(tok.is_bpe());
        Ok(tok)
    }

    fn is_bpe(&self) -> bool {
        matches!(self.inner.get_model(), tokenizers::ModelWrapper::BPE(_))
    }

    fn finish(
        component: Component,
        path: PathBuf,
        mut inner: Tokenizer,
        pad: &str,
        model_max_length: Option<usize>,
    ) -> Result<Self> {
        // The files carry no padding or truncation settings that diffusers relies on; we apply both ourselves.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Tokenizer {
            component,
            path: path.clone(),
            message: e.to_string(),
            source: Some(e),
        })?;
        let pad_id = inner.token_to_id(pad).ok_or_else(|| Error::Tokenizer {
            component,
            path: path.clone(),
            message: format!("the padding token {pad:?} named by the tokenizer config is not in the vocabulary"),
            source: None,
        })?;
        Ok(PromptTokenizer {
            component,
            path,
            inner,
            pad_id,
            model_max_length,
            word_suffix: None,
            clean_up_spaces: false,
        })
    }

    /// The id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `model_max_length` from `tokenizer_config.json`, when it names a real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The file the tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decodes ids to text as transformers' `decode(ids, skip_special_tokens=False)` does.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = self.inner.decode(ids, false).map_err(|e| self.failed(e))?;
        if let Some(suffix) = &self.word_suffix {
            text = text.replace(suffix.as_str(), " ").trim().to_string();
        }
        if self.clean_up_spaces {
            // transformers `PreTrainedTokenizerBase.clean_up_tokenization`.
            for (from, to) in [
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ] {
                text = text.replace(from, to);
            }
        }
        Ok(text)
    }

    /// The content tokens of `text` (no special tokens, no truncation) with their byte offsets in `text`.
    pub(crate) fn content_tokens(&self, text: &str) -> Result<Vec<(u32, (usize, usize))>> {
        let content: Encoding = self.inner.encode(text, false).map_err(|e| self.failed(e))?;
        Ok(content.get_ids().iter().copied().zip(content.get_offsets().iter().copied()).collect())
    }

    fn err(&self, message: impl ToString) -> Error {
        Error::Tokenizer {
            component: self.component,
            path: self.path.clone(),
            message: message.to_string(),
            source: None,
        }
    }

    /// The tokenizers library failed: its error is the source.
    fn failed(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer { component: self.component, path: self.path.clone(), message: e.to_string(), source: Some(e) }
    }

    /// Tokenizes `text` to exactly `max_len` ids: special tokens added, content truncated from the right so
    /// the closing special token survives, then padded with the pad id (transformers' `padding="max_length",
    /// truncation=True`).
    pub fn encode(&self, text: &str, max_len: usize) -> Result<TokenizedPrompt> {
        let added = self.check_room(max_len)?;
        let content: Encoding = self.inner.encode(text, false).map_err(|e| self.failed(e))?;
        Ok(self.finish_encoding(content, added, max_len)?.0)
    }

    /// The number of special tokens the post-processor adds, checked to leave room for text in `max_len`.
    fn check_room(&self, max_len: usize) -> Result<usize> {
        let processor_tokens = self.inner.get_post_processor().map(|p| {
            use tokenizers::PostProcessor;
            p.added_tokens(false)
        });
        let added = processor_tokens.unwrap_or(0);
        if max_len <= added {
            return Err(self.err(format!("max length {max_len} leaves no room for text after {added} special tokens")));
        }
        Ok(added)
    }

    /// Truncates content tokens, adds the special tokens and pads: the prompt, and the position of the first
    /// content token and the number of content tokens kept.
    fn finish_encoding(
        &self,
        content: Encoding,
        added: usize,
        max_len: usize,
    ) -> Result<(TokenizedPrompt, usize, usize)> {
        let removed_tokens = (content.len() + added).saturating_sub(max_len);
        let removed_text = if content.len() + added > max_len {
            // diffusers decodes untruncated_ids[max_len - 1 : -1]: the content tokens that were cut.
            let start = max_len - added;
            let cut: Vec<u32> = content.get_ids()[start..].to_vec();
            Some(self.decode(&cut)?)
        } else {
            None
        };
        let mut content = content;
        content.truncate(max_len - added, 0, TruncationDirection::Right);
        let kept: Vec<u32> = content.get_ids().to_vec();
        let full = self.inner.post_process(content, None, true).map_err(|e| self.failed(e))?;
        let full_ids = full.get_ids();
        if full_ids.len() > max_len {
            return Err(self.err(format!("post-processing produced {} ids for a limit of {max_len}", full_ids.len())));
        }
        // Where the content sits among the special tokens (CLIP: after <|startoftext|>; T5: first).
        let first = (0..=full_ids.len().saturating_sub(kept.len()))
            .find(|&f| full_ids[f..f + kept.len()] == kept[..])
            .ok_or_else(|| self.err("post-processing changed the content tokens"))?;
        let mut ids: Vec<i64> = full_ids.iter().map(|&i| i64::from(i)).collect();
        ids.resize(max_len, i64::from(self.pad_id));
        Ok((TokenizedPrompt { ids, removed_text, removed_tokens }, first, kept.len()))
    }

    /// Tokenizes weighted prompt segments to exactly `max_len` ids, with one weight per id.
    ///
    /// Each segment is split at whitespace and every word is tokenized on its own, without special tokens
    /// (ComfyUI `SDTokenizer.tokenize_with_weights`); the words' tokens are joined in order, each with its
    /// segment's weight, then truncated from the right, given the special tokens and padded exactly as
    /// [`encode`](Self::encode) does. Special and padding tokens weigh 1.0; a truncated token's weight goes
    /// with it.
    pub(crate) fn encode_weighted(&self, segments: &[Segment], max_len: usize) -> Result<(TokenizedPrompt, Vec<f32>)> {
        let added = self.check_room(max_len)?;
        let mut words = Vec::new();
        let mut weights = Vec::new();
        for segment in segments {
            for word in segment.text.split_whitespace() {
                let e = self.inner.encode(word, false).map_err(|e| self.failed(e))?;
                weights.extend(std::iter::repeat_n(segment.weight, e.len()));
                words.push(e);
            }
        }
        let content = Encoding::merge(words, false);
        let (prompt, first, kept) = self.finish_encoding(content, added, max_len)?;
        let mut per_id = vec![1.0f32; max_len];
        per_id[first..first + kept].copy_from_slice(&weights[..kept]);
        Ok((prompt, per_id))
    }
}

fn load_tokenizer_json(component: Component, path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        component,
        path: path.to_path_buf(),
        message: e.to_string(),
        source: Some(e),
    })
}

/// Registers the added and special tokens that `tokenizer_config.json` / `special_tokens_map.json` name but
/// `tokenizer.json` lacks, as transformers' `PreTrainedTokenizerFast.from_pretrained` does (transformers 4.57.1):
///
/// - `tokenization_utils_base.PreTrainedTokenizerBase._from_pretrained` builds `added_tokens_decoder` from
///   tokenizer_config.json's `added_tokens_decoder` and takes the special-token attributes (`bos_token`, ...,
///   `pad_token`, `additional_special_tokens`) from tokenizer_config.json; only when that file has no
///   `added_tokens_decoder` (the "legacy" branch) do the values of special_tokens_map.json override them.
/// - `tokenization_utils_fast.PreTrainedTokenizerFast.__init__` then adds, in this order, the `added_tokens_decoder`
///   entries (sorted by id) whose `repr` (content and all flags) is not among the backend's added tokens, and the
///   special tokens (`all_special_tokens_extended`, deduplicated by text) whose text is neither an added token of
///   the backend nor one of those entries; every token whose text is a special token is marked special; a string
///   becomes `AddedToken(text, special=True)` (so not normalized). It adds them with `add_tokens`, which reuses the
///   vocabulary id of a text that the model already has.
///
/// This is what lets an SD3 `tokenizer_2/` hold CLIP-L's `tokenizer.json` (e.g. a symlink to
/// `../tokenizer/tokenizer.json`, as the tiny-sd3 fixture does): its config still makes the pad token `!` (id 0) an
/// added special token, so a typed `!` is split off before BPE and becomes id 0, exactly as with a tokenizer.json
/// that lists `!` itself. For a tokenizer.json that already has every such token this changes nothing.
fn register_config_tokens(component: Component, inner: &mut Tokenizer, special: &SpecialTokens) -> Result<()> {
    use tokenizers::AddedToken;
    const ATTRIBUTES: [&str; 8] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
    ];
    let bad =
        |message: String| Error::Tokenizer { component, path: special.config_path.clone(), message, source: None };
    // An AddedToken from its serialized form; Python's defaults for missing flags (normalized = not special).
    let from_object = |o: &serde_json::Map<String, Value>, force_special: bool| -> Option<AddedToken> {
        let flag = |k: &str| o.get(k).and_then(Value::as_bool);
        let is_special = force_special || flag("special").unwrap_or(false);
        Some(
            AddedToken::from(o.get("content")?.as_str()?, is_special)
                .single_word(flag("single_word").unwrap_or(false))
                .lstrip(flag("lstrip").unwrap_or(false))
                .rstrip(flag("rstrip").unwrap_or(false))
                .normalized(flag("normalized").unwrap_or(!is_special)),
        )
    };
    let config_decoder = special.config.as_ref().and_then(|c| c.get("added_tokens_decoder"));
    // Special-token attributes: tokenizer_config.json, overridden by special_tokens_map.json in the legacy branch.
    let attribute = |key: &str| -> Option<&Value> {
        let from_config = special.config.as_ref().and_then(|c| c.get(key));
        if config_decoder.is_some() {
            from_config
        } else {
            special.map.as_ref().and_then(|m| m.get(key)).or(from_config)
        }
    };
    let mut special_tokens: Vec<AddedToken> = Vec::new();
    for key in ATTRIBUTES {
        let values: Vec<&Value> = match attribute(key) {
            Some(Value::Array(list)) if key == "additional_special_tokens" => list.iter().collect(),
            Some(v) => vec![v],
            None => Vec::new(),
        };
        for v in values {
            let token = match v {
                Value::String(s) if !s.is_empty() => AddedToken::from(s.as_str(), true),
                Value::Object(o) => from_object(o, true).ok_or_else(|| bad(format!("{key} has no `content`")))?,
                _ => continue, // null, "" and other values are unset attributes
            };
            if !special_tokens.iter().any(|t| t.content == token.content) {
                special_tokens.push(token);
            }
        }
    }
    let backend = inner.get_added_tokens_decoder();
    let same = |a: &AddedToken, b: &AddedToken| {
        (&a.content, a.single_word, a.lstrip, a.rstrip, a.normalized, a.special)
            == (&b.content, b.single_word, b.lstrip, b.rstrip, b.normalized, b.special)
    };
    let mut to_add: Vec<AddedToken> = Vec::new();
    if let Some(decoder) = config_decoder {
        let Value::Object(decoder) = decoder else {
            return Err(bad("added_tokens_decoder is not an object of id -> token".to_string()));
        };
        let mut entries: Vec<(u64, &Value)> = Vec::new();
        for (id, v) in decoder {
            let id = id.parse::<u64>().map_err(|_| bad(format!("added_tokens_decoder key {id:?} is not an id")))?;
            entries.push((id, v));
        }
        entries.sort_by_key(|(id, _)| *id);
        for (id, v) in entries {
            let token = v
                .as_object()
                .and_then(|o| from_object(o, false))
                .ok_or_else(|| bad(format!("added_tokens_decoder entry {id} has no `content`")))?;
            if !backend.values().any(|b| same(b, &token)) {
                to_add.push(token);
            }
        }
    }
    for token in &special_tokens {
        let known = backend.values().any(|b| b.content == token.content);
        if !known && !to_add.iter().any(|t| t.content == token.content) {
            to_add.push(token.clone());
        }
    }
    if to_add.is_empty() {
        return Ok(());
    }
    for token in &mut to_add {
        token.special = token.special || special_tokens.iter().any(|s| s.content == token.content);
    }
    inner.add_tokens(&to_add);
    Ok(())
}

/// Builds a CLIP BPE tokenizer from `vocab.json` + `merges.txt`, with the normalizer, pre-tokenizer,
/// post-processor and decoder that transformers' `CLIPConverter` gives `CLIPTokenizerFast`.
fn clip_from_vocab_merges(
    component: Component,
    vocab_path: &Path,
    merges_path: &Path,
    special: &SpecialTokens,
) -> Result<Tokenizer> {
    let vocab_text = read_text(component, vocab_path)?;
    let vocab: serde_json::Map<String, Value> = serde_json::from_str(&vocab_text).map_err(|e| Error::Tokenizer {
        component,
        path: vocab_path.to_path_buf(),
        message: format!("vocab.json is not a json object of token -> id: {e}"),
        source: boxed(e),
    })?;
    let merges_text = read_text(component, merges_path)?;
    let mut merges = Vec::new();
    for (n, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push(Value::Array(vec![a.into(), b.into()])),
            _ => {
                return Err(Error::Tokenizer {
                    component,
                    path: merges_path.to_path_buf(),
                    message: format!("line {} is not a merge of two symbols: {line:?}", n + 1),
                    source: None,
                })
            }
        }
    }
    let bos = special.token("bos_token").unwrap_or_else(|| "<|startoftext|>".into());
    let eos = special.token("eos_token").unwrap_or_else(|| "<|endoftext|>".into());
    let unk = special.token("unk_token").unwrap_or_else(|| "<|endoftext|>".into());
    let id_of = |tok: &str| -> Result<u64> {
        vocab.get(tok).and_then(Value::as_u64).ok_or_else(|| Error::Tokenizer {
            component,
            path: vocab_path.to_path_buf(),
            message: format!("special token {tok:?} (from {}) is not in vocab.json", special.config_path.display()),
            source: None,
        })
    };
    let (bos_id, eos_id) = (id_of(&bos)?, id_of(&eos)?);
    // Added tokens as transformers registers them: `added_tokens_decoder` of tokenizer_config.json when present
    // (SD3's CLIP-G folder makes its pad token `!` special there, so a typed `!` is never merged), plus BOS/EOS.
    let mut added_tokens: Vec<Value> = Vec::new();
    if let Some(Value::Object(decoder)) = special.config.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
        let mut entries: Vec<(u64, &Value)> =
            decoder.iter().filter_map(|(id, v)| Some((id.parse::<u64>().ok()?, v))).collect();
        entries.sort_by_key(|(id, _)| *id);
        for (id, v) in entries {
            let content = v.get("content").and_then(Value::as_str).ok_or_else(|| Error::Tokenizer {
                component,
                path: special.config_path.clone(),
                message: format!("added_tokens_decoder entry {id} has no `content`"),
                source: None,
            })?;
            let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
            added_tokens.push(serde_json::json!({"id": id, "content": content,
                "single_word": flag("single_word", false), "lstrip": flag("lstrip", false),
                "rstrip": flag("rstrip", false), "normalized": flag("normalized", true),
                "special": flag("special", true)}));
        }
    }
    for (id, content) in [(bos_id, &bos), (eos_id, &eos)] {
        if !added_tokens.iter().any(|t| t["id"].as_u64() == Some(id)) {
            added_tokens.push(serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": true, "special": true}));
        }
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split",
             "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    serde_json::from_value::<Tokenizer>(json).map_err(|e| Error::Tokenizer {
        component,
        path: vocab_path.to_path_buf(),
        message: format!("vocab.json + merges.txt do not form a BPE tokenizer: {e}"),
        source: boxed(e),
    })
}
