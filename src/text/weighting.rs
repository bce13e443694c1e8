//! Prompt weighting: AUTOMATIC1111 / ComfyUI emphasis syntax, parsed into text segments with weights.
//!
//! The grammar follows ComfyUI (`comfy/sd1_clip.py`: `escape_important`, `parse_parentheses`, `token_weights`):
//!
//! - `(text)` multiplies the weight of `text` by 1.1; groups nest (`((text))` = 1.21).
//! - `(text:1.3)` sets the weight of `text` to 1.3: the number after the group's last `:` (not at its start)
//!   replaces the weight, as ComfyUI does (AUTOMATIC1111 multiplies; the two agree outside nested groups).
//! - `[text]` divides the weight by 1.1 (AUTOMATIC1111; ComfyUI has no `[ ]` groups). No `:number` inside `[ ]`.
//! - `\(` `\)` `\[` `\]` are literal brackets.
//!
//! Malformed syntax is literal text, never an error: a weight that is not a finite number (`(cat:big)`) leaves
//! the colon and the text in the group, which keeps its x1.1 (ComfyUI's `float()` failing); a bracket without its
//! partner is a literal character and the rest of the prompt is parsed as usual (ComfyUI would fold the rest of
//! the prompt into the unclosed group; we keep the damage local).

use crate::error::{Error, Result};

/// How deep emphasis groups may nest (ComfyUI has no limit; real prompts use two or three levels).
pub(crate) const MAX_DEPTH: usize = 100;

/// One piece of prompt text with its emphasis weight.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub text: String,
    pub weight: f32,
}

/// ComfyUI's `(` weight factor (`token_weights`: `weight *= 1.1`), also AUTOMATIC1111's `[ ]` divisor.
const EMPHASIS: f32 = 1.1;

/// A character of the prompt after escapes are resolved: literal characters never open or close a group.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ch {
    Lit(char),
    Open(char),
    Close(char),
}

fn lex(text: &str) -> Vec<Ch> {
    let mut out = Vec::with_capacity(text.len());
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' if matches!(it.peek(), Some('(' | ')' | '[' | ']')) => out.push(Ch::Lit(it.next().unwrap_or(c))),
            '(' | '[' => out.push(Ch::Open(c)),
            ')' | ']' => out.push(Ch::Close(c)),
            _ => out.push(Ch::Lit(c)),
        }
    }
    out
}

/// For each opening bracket, the index of the bracket that closes it, counting only brackets of the same kind
/// (one pass, a stack per kind).
fn matches(chars: &[Ch]) -> Vec<Option<usize>> {
    let mut out = vec![None; chars.len()];
    let (mut round, mut square) = (Vec::new(), Vec::new());
    for (i, c) in chars.iter().enumerate() {
        match *c {
            Ch::Open('(') => round.push(i),
            Ch::Open(_) => square.push(i),
            Ch::Close(c) => {
                if let Some(open) = if c == ')' { round.pop() } else { square.pop() } {
                    out[open] = Some(i);
                }
            }
            Ch::Lit(_) => {}
        }
    }
    out
}

/// The literal text of `chars` (brackets written back).
fn text_of(chars: &[Ch]) -> String {
    chars
        .iter()
        .map(|c| match *c {
            Ch::Lit(c) | Ch::Open(c) | Ch::Close(c) => c,
        })
        .collect()
}

/// A group's explicit weight: the text after its last literal `:` (not the first character), when that is a
/// finite number. Returns the weight and the length of the group's text before the colon.
fn explicit_weight(chars: &[Ch]) -> Option<(f32, usize)> {
    let colon = chars.iter().rposition(|c| *c == Ch::Lit(':'))?;
    if colon == 0 {
        return None;
    }
    let number = text_of(&chars[colon + 1..]);
    let w: f32 = number.trim().parse().ok()?;
    w.is_finite().then_some((w, colon))
}

fn push(out: &mut Vec<Segment>, text: String, weight: f32) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.weight == weight => last.text.push_str(&text),
        _ => out.push(Segment { text, weight }),
    }
}

/// Parses `chars[range]` (offsets into the whole prompt, whose bracket matches are `ends`) at `weight`.
fn parse_into(
    chars: &[Ch],
    ends: &[Option<usize>],
    range: std::ops::Range<usize>,
    weight: f32,
    depth: usize,
    out: &mut Vec<Segment>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::request(
            "prompt",
            "(nested emphasis)",
            format!("emphasis groups nest deeper than {MAX_DEPTH} levels; escape literal brackets as \\( \\)"),
        ));
    }
    let mut literal = String::new();
    let mut i = range.start;
    while i < range.end {
        match chars[i] {
            // A group closed inside this range (a match beyond it belongs to an unclosed outer bracket).
            Ch::Open(open) if ends[i].is_some_and(|e| e < range.end) => {
                let end = ends[i].unwrap_or(i);
                push(out, std::mem::take(&mut literal), weight);
                let inner = i + 1..end;
                if open == '(' {
                    match explicit_weight(&chars[inner.clone()]) {
                        Some((w, len)) => parse_into(chars, ends, inner.start..inner.start + len, w, depth + 1, out)?,
                        None => parse_into(chars, ends, inner, weight * EMPHASIS, depth + 1, out)?,
                    }
                } else {
                    parse_into(chars, ends, inner, weight / EMPHASIS, depth + 1, out)?;
                }
                i = end + 1;
                continue;
            }
            Ch::Open(c) | Ch::Close(c) | Ch::Lit(c) => literal.push(c),
        }
        i += 1;
    }
    push(out, literal, weight);
    Ok(())
}

/// Parses `prompt`: `None` when it has no emphasis syntax at all (no bracket and no escape), so that such a
/// prompt is encoded exactly as without weighting; otherwise its segments (adjacent segments of equal weight
/// merged; an empty list for a prompt of empty groups).
///
/// Groups nested deeper than [`MAX_DEPTH`] are a request error (the parser recurses once per level).
pub(crate) fn parse(prompt: &str) -> Result<Option<Vec<Segment>>> {
    if !prompt.contains(['(', ')', '[', ']']) {
        return Ok(None);
    }
    let chars = lex(prompt);
    let ends = matches(&chars);
    let mut out = Vec::new();
    parse_into(&chars, &ends, 0..chars.len(), 1.0, 0, &mut out)?;
    Ok(Some(out))
}

/// The words `prompt` is encoded from, without the emphasis syntax (`(word:1.3)` -> `word`): what the vocabulary
/// check reads. A prompt without syntax, or one the parser refuses (the request fails on it anyway), is returned as
/// it is.
pub(crate) fn words_of(prompt: &str) -> String {
    match parse(prompt) {
        Ok(Some(segments)) => segments.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" "),
        _ => prompt.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_leave_the_syntax_out() {
        assert_eq!(
            words_of("a (red:1.6) [blue] circle").split_whitespace().collect::<Vec<_>>(),
            ["a", "red", "blue", "circle"]
        );
        assert_eq!(words_of("no syntax, 4k"), "no syntax, 4k");
        assert_eq!(words_of(r"a \(literal\) x"), r"a (literal) x");
    }

    fn seg(text: &str, weight: f32) -> Segment {
        Segment { text: text.to_string(), weight }
    }

    #[test]
    fn plain_prompts_have_no_segments() {
        assert_eq!(parse("a photo of a cat, 4k").unwrap(), None);
        assert_eq!(parse(r"a \ b").unwrap(), None);
    }

    #[test]
    fn groups_and_weights() {
        assert_eq!(
            parse("a (red:1.3) cube").unwrap().unwrap(),
            vec![seg("a ", 1.0), seg("red", 1.3), seg(" cube", 1.0)]
        );
        assert_eq!(parse("(red)").unwrap().unwrap(), vec![seg("red", 1.1)]);
        let w = parse("((red))").unwrap().unwrap();
        assert_eq!(w.len(), 1);
        assert!((w[0].weight - 1.21).abs() < 1e-6);
        assert_eq!(parse("[red]").unwrap().unwrap(), vec![seg("red", 1.0 / 1.1)]);
        // An explicit weight replaces the outer one (ComfyUI).
        assert_eq!(parse("((red:0.5) cube)").unwrap().unwrap(), vec![seg("red", 0.5), seg(" cube", 1.1)]);
        assert_eq!(parse("(a cat: 1.5 )").unwrap().unwrap(), vec![seg("a cat", 1.5)]);
        assert_eq!(parse("(a:1e1)").unwrap().unwrap(), vec![seg("a", 10.0)]);
        assert_eq!(parse("(a:-0.5)").unwrap().unwrap(), vec![seg("a", -0.5)]);
        assert_eq!(parse("([a])").unwrap().unwrap(), vec![seg("a", 1.1 / 1.1)]);
    }

    #[test]
    fn escapes_are_literal() {
        assert_eq!(parse(r"a \(cat\) b").unwrap().unwrap(), vec![seg("a (cat) b", 1.0)]);
        assert_eq!(parse(r"\[x\] (y)").unwrap().unwrap(), vec![seg("[x] ", 1.0), seg("y", 1.1)]);
        assert_eq!(parse(r"(\(x\):2)").unwrap().unwrap(), vec![seg("(x)", 2.0)]);
    }

    #[test]
    fn malformed_syntax_is_literal() {
        // Not a number: the colon stays, the group keeps x1.1.
        assert_eq!(parse("(cat:big)").unwrap().unwrap(), vec![seg("cat:big", 1.1)]);
        assert_eq!(parse("(cat:)").unwrap().unwrap(), vec![seg("cat:", 1.1)]);
        assert_eq!(parse("(:2)").unwrap().unwrap(), vec![seg(":2", 1.1)]);
        assert_eq!(parse("(cat:inf)").unwrap().unwrap(), vec![seg("cat:inf", 1.1)]);
        assert_eq!(parse("(cat:NaN)").unwrap().unwrap(), vec![seg("cat:NaN", 1.1)]);
        // Unbalanced brackets are literal characters.
        assert_eq!(parse("a (b").unwrap().unwrap(), vec![seg("a (b", 1.0)]);
        assert_eq!(parse("a) b").unwrap().unwrap(), vec![seg("a) b", 1.0)]);
        assert_eq!(parse("a (b (c:1.5)").unwrap().unwrap(), vec![seg("a (b ", 1.0), seg("c", 1.5)]);
        assert_eq!(parse("(a]").unwrap().unwrap(), vec![seg("(a]", 1.0)]);
        assert_eq!(parse("()").unwrap().unwrap(), vec![]);
        assert_eq!(parse(")(][").unwrap().unwrap(), vec![seg(")(][", 1.0)]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let p = format!("{}x{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(parse(&p).unwrap().unwrap().len(), 1);
        let p = format!("{}x{}", "(".repeat(100_000), ")".repeat(100_000));
        let e = parse(&p).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { parameter: "prompt", .. }), "{e}");
        // Unclosed brackets do not recurse, and matching stays linear.
        let p = "(".repeat(1_000_000);
        assert_eq!(parse(&p).unwrap().unwrap(), vec![seg(&p, 1.0)]);
    }
}
