//! Token ids, padding and truncation equal the Hugging Face tokenizers' on a corpus of prompts
//! (models/goldens/tokenizers.json.gz: empty, unicode, emoji, punctuation, `!`, whitespace runs, special tokens
//! typed as text, prompts over 77 CLIP and over 256 T5 tokens, ...), for CLIP-L, CLIP-G and T5, in both
//! layouts: tokenizer.json (tiny-sd3) and vocab.json + merges.txt (tiny-sd35, the real SD3 repo layout).
//!
//! The reference for CLIP is transformers' CLIPTokenizerFast (the `tokenizers` library, as diffusers uses with
//! tokenizer.json). diffusers loads the vocab.json + merges.txt layout with the *slow* CLIPTokenizer, whose
//! ftfy clean-up (HTML entities, curly quotes, case-folded special tokens) differs from the fast pipeline on a
//! few prompts; those are listed under `disagreements` in the golden file and checked against the fast ids.
//! On every other prompt our ids equal the slow tokenizer's too.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use common::*;
use sd3_onnx::text::PromptTokenizer;
use sd3_onnx::Component;
use serde_json::Value;

/// Reads a gzipped JSON file (the golden is committed compressed to keep the repository small).
fn read_json_gz(path: &Path) -> Value {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().expect("id list").iter().map(|x| x.as_i64().expect("id")).collect()
}

struct Tokenizers {
    clip_l: PromptTokenizer,
    clip_g: PromptTokenizer,
    t5: PromptTokenizer,
}

fn load(fixture_name: &str) -> Tokenizers {
    let dir = fixture(fixture_name);
    Tokenizers {
        clip_l: PromptTokenizer::load_clip(Component::TokenizerClipL, dir.join("tokenizer")).unwrap(),
        clip_g: PromptTokenizer::load_clip(Component::TokenizerClipG, dir.join("tokenizer_2")).unwrap(),
        t5: PromptTokenizer::load_t5(Component::TokenizerT5, dir.join("tokenizer_3")).unwrap(),
    }
}

/// Checks one tokenizer on one prompt against an expected entry; returns a description of any mismatch.
fn check(tok: &PromptTokenizer, prompt: &str, max_len: usize, want: &Value, removed_key: &str) -> Option<String> {
    let got = tok.encode(prompt, max_len).unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
    let want_ids = ids(&want["input_ids"]);
    if got.ids != want_ids {
        return Some(format!("ids for {prompt:?} (max {max_len}):\n  ours {:?}\n  want {want_ids:?}", got.ids));
    }
    let untruncated = ids(&want["untruncated_ids"]).len();
    let truncated = untruncated > max_len;
    if truncated != got.removed_text.is_some() {
        return Some(format!(
            "truncation flag for {prompt:?}: ours {:?}, untruncated length {untruncated}",
            got.removed_text
        ));
    }
    if let (Some(ours), Some(theirs)) = (&got.removed_text, want[removed_key].as_str()) {
        if ours != theirs {
            return Some(format!("removed text for {prompt:?}:\n  ours {ours:?}\n  want {theirs:?}"));
        }
    }
    None
}

#[test]
fn token_ids_match_hugging_face_on_the_corpus() {
    let golden = read_json_gz(&repo().join("models/goldens/tokenizers.json.gz"));
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 50, "corpus has {} prompts", cases.len());
    let pads = &golden["pad_ids"];
    let slow_differs: HashSet<(String, String)> = golden["disagreements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["prompt"].as_str().unwrap().to_string(), d["tokenizer"].as_str().unwrap().to_string()))
        .collect();

    let mut failures = Vec::new();
    let (mut checked, mut truncations) = (0, 0);
    for fixture_name in ["tiny-sd3", "tiny-sd35"] {
        let t = load(fixture_name);
        assert_eq!(i64::from(t.clip_l.pad_id()), pads["clip_l"].as_i64().unwrap(), "{fixture_name}: CLIP-L pad");
        assert_eq!(i64::from(t.clip_g.pad_id()), pads["clip_g"].as_i64().unwrap(), "{fixture_name}: CLIP-G pad");
        assert_eq!(i64::from(t.t5.pad_id()), pads["t5"].as_i64().unwrap(), "{fixture_name}: T5 pad");
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            for (name, tok) in [("clip_l", &t.clip_l), ("clip_g", &t.clip_g)] {
                // tiny-sd35 keeps CLIP as vocab.json + merges.txt: its fast reference is "tiny-sd35-fast";
                // the slow one (what diffusers would load) must agree wherever slow and fast agree.
                let mut references = vec![&case[fixture_name][name]];
                if fixture_name == "tiny-sd35" {
                    references = vec![&case["tiny-sd35-fast"][name]];
                    if !slow_differs.contains(&(prompt.to_string(), name.to_string())) {
                        references.push(&case["tiny-sd35"][name]);
                    }
                }
                for want in references {
                    checked += 1;
                    truncations += usize::from(ids(&want["untruncated_ids"]).len() > 77);
                    if let Some(f) = check(tok, prompt, 77, want, "removed_text") {
                        failures.push(format!("{fixture_name}/{name}: {f}"));
                    }
                }
            }
            for n in [256, 77] {
                let want = &case[fixture_name][format!("t5_{n}")];
                checked += 1;
                truncations += usize::from(ids(&want["untruncated_ids"]).len() > n);
                if let Some(f) = check(&t.t5, prompt, n, want, "truncated_text") {
                    failures.push(format!("{fixture_name}/t5_{n}: {f}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} checks failed:\n{}", failures.len(), failures.join("\n"));
    assert!(truncations >= 6, "the corpus must exercise truncation ({truncations} truncated encodings)");
    eprintln!("{checked} tokenizer checks passed ({truncations} with truncation)");
}

#[test]
fn a_wrong_pad_token_would_be_caught() {
    // CLIP-G pads with `!` (0), CLIP-L with <|endoftext|> (49407): the same text must differ in the padding.
    let t = load("tiny-sd3");
    let l = t.clip_l.encode("a cat", 77).unwrap();
    let g = t.clip_g.encode("a cat", 77).unwrap();
    assert_eq!(l.ids[..4], g.ids[..4]);
    assert_eq!((l.ids[76], g.ids[76]), (49407, 0));
}

#[test]
fn any_text_tokenizes_without_panicking() {
    let t = load("tiny-sd35");
    let long = "word ".repeat(5000);
    for text in ["", "\0", "\u{FFFD}\u{200B}\u{202E}", "🙂🙂🙂", &long, "<|startoftext|><|endoftext|>", "\t\n\r"]
    {
        for tok in [&t.clip_l, &t.clip_g] {
            assert_eq!(tok.encode(text, 77).unwrap().ids.len(), 77);
        }
        assert_eq!(t.t5.encode(text, 512).unwrap().ids.len(), 512);
    }
    assert!(t.t5.encode("x", 1).is_err(), "no room for text after </s> is an error, not a panic");
}

/// tiny-sd3's `tokenizer_2/tokenizer.json` is a symlink to CLIP-L's `../tokenizer/tokenizer.json`, which does not
/// list CLIP-G's pad token `!` as an added token; `tokenizer_2/tokenizer_config.json` does (and names it
/// `pad_token`), and transformers' `CLIPTokenizerFast.from_pretrained` registers it from there. The folder must
/// encode exactly as one whose tokenizer.json lists `!` itself (the file the fixture had before), also with the
/// configs' legacy form (no `added_tokens_decoder`: special_tokens_map.json's `pad_token` alone).
#[test]
fn clip_g_sharing_clip_l_tokenizer_json_equals_one_that_lists_the_pad_token() {
    let src = fixture("tiny-sd3");
    let shared = src.join("tokenizer_2/tokenizer.json");
    assert_eq!(std::fs::read_link(&shared).unwrap(), std::path::Path::new("../tokenizer/tokenizer.json"));
    let mut json = read_json(&src.join("tokenizer/tokenizer.json"));
    let added = json["added_tokens"].as_array_mut().unwrap();
    assert!(added.iter().all(|t| t["content"] != "!"), "CLIP-L's tokenizer.json lists `!`");
    added.insert(
        0,
        serde_json::json!({"id": 0, "content": "!", "single_word": false, "lstrip": false, "rstrip": false,
                           "normalized": false, "special": true}),
    );
    let dir = std::env::temp_dir().join(format!("sd3-onnx-test-{}-clip-g-bang", std::process::id()));
    let (listed, legacy) = (dir.join("listed"), dir.join("legacy"));
    for d in [&listed, &legacy] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(src.join("tokenizer_2/special_tokens_map.json"), d.join("special_tokens_map.json")).unwrap();
    }
    std::fs::write(listed.join("tokenizer.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    std::fs::copy(src.join("tokenizer_2/tokenizer_config.json"), listed.join("tokenizer_config.json")).unwrap();
    std::fs::copy(&shared, legacy.join("tokenizer.json")).unwrap();
    let mut config = read_json(&src.join("tokenizer_2/tokenizer_config.json"));
    config.as_object_mut().unwrap().remove("added_tokens_decoder");
    config["pad_token"] = "<|endoftext|>".into(); // special_tokens_map.json's "!" overrides it in this form
    std::fs::write(legacy.join("tokenizer_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();

    let load = |d: &std::path::Path| PromptTokenizer::load_clip(Component::TokenizerClipG, d).unwrap();
    let (ours, reference, legacy_tok) = (load(&src.join("tokenizer_2")), load(&listed), load(&legacy));
    let mut prompts: Vec<String> = [
        "",
        "!",
        "!!!",
        "hello!",
        "a ! b",
        "wow!!x",
        "!start",
        "end!",
        " ! ",
        "x!y!z",
        "!!a!!b!!",
        "héllo! ünïcode!",
        "日本語！と!",
        "emoji 🎉! ok",
        "don't!",
        "&amp;!",
        "<|endoftext|>!",
        "!<|startoftext|>",
        "!\n!\t!",
        "a cat",
    ]
    .map(String::from)
    .to_vec();
    prompts.push("a!".repeat(100));
    prompts.push("long prompt with bangs! ".repeat(20));
    prompts.push("!".repeat(100));
    let pieces = ["a", "b", " ", "!", "!!", "?", ".", "'", "é", "日", "🎉", "\n", "hello", "<|endoftext|>"];
    let mut state = 0x2545_f491_u32;
    for _ in 0..300 {
        let mut p = String::new();
        for _ in 0..1 + state % 40 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            p.push_str(pieces[state as usize % pieces.len()]);
        }
        prompts.push(p);
    }
    let mut bangs = 0;
    for p in &prompts {
        let want = reference.encode(p, 77).unwrap();
        assert_eq!(ours.encode(p, 77).unwrap(), want, "{p:?}");
        assert_eq!(legacy_tok.encode(p, 77).unwrap(), want, "{p:?} (legacy configs)");
        let end = want.ids.iter().rposition(|&i| i == 49407).unwrap();
        bangs += usize::from(want.ids[1..end].contains(&0));
    }
    assert!(bangs > 10, "typed `!` (id 0 mid-prompt) in {bangs} prompts only");
    assert_eq!(ours.encode("hello!", 77).unwrap().ids[..4], [49406, 3306, 0, 49407]);
    assert_eq!(
        (ours.pad_id(), ours.decode(&[49406, 3306, 0, 49407]).unwrap()),
        (0, reference.decode(&[49406, 3306, 0, 49407]).unwrap())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
