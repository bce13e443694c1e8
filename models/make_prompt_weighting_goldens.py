#!/usr/bin/env python3
"""Reference for prompt weighting: writes models/goldens/prompt_weighting/<fixture>/<case>/{prompt_embeds,
pooled_prompt_embeds}.npy and cases.json, checked by tests/prompt_weighting.rs (max abs diff <= 1e-4).

An independent implementation of the formula the crate follows, ComfyUI's (comfy/sd1_clip.py,
`ClipTokenWeightEncoder.encode_token_weights`, `token_weights`, `parse_parentheses`; comfy/text_encoders/sd3_clip.py
applies it to CLIP-L, CLIP-G and T5-XXL alike):

    z[j] = (z[j] - z_empty[j]) * w[j] + z_empty[j]     for every token j whose weight is not 1.0

where z is the encoder output the pipeline uses (CLIP: the penultimate hidden state, T5: the last hidden state)
for the prompt's tokens and z_empty the same output for the empty prompt; the pooled CLIP vectors are those of the
prompt's tokens, unweighted (ComfyUI's `first_pooled`). Tokenization: transformers' tokenizers loaded from the
fixture folder with the classes its model_index.json names; each whitespace-separated word of a
segment is tokenized on its own without special tokens (ComfyUI `SDTokenizer.tokenize_with_weights`), the tokens
are truncated from the right to leave room for the special tokens (those the tokenizer gives the empty prompt:
CLIP's start and end tokens around the text, T5's `</s>` after it), then padded with the pad token. Special and pad tokens weigh 1.0.

The encoders are the fixture's ONNX graphs run by onnxruntime (the weights are the ones the crate runs; the
fixture's PyTorch originals are not committed). Run with the pinned environment of models/reference-requirements.txt:

    python models/make_prompt_weighting_goldens.py
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import transformers

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"
OUT = ROOT / "goldens" / "prompt_weighting"
CLIP_LEN = 77  # tokenizer.model_max_length of both CLIP tokenizers (tokenizer_config.json)
EMPHASIS = 1.1
MAX_DEPTH = 100

# (name, prompt, max_sequence_length, weighting)
CASES = [
    ("weighted", "a photo of a (red:1.5) cat sitting on a (wooden table:0.6)", 64, True),
    ("nested", "((a castle)) on a [[hill]] under a (starry (night:1.8) sky)", 64, True),
    ("escaped", r"a \(literal\) bracket and an (emphasised) word, \[ and \]", 64, True),
    ("malformed", "a (cat:big) and a (dog and ) stray ( brackets [x", 64, True),
    ("negative_weight", "a (dark:-0.5) forest, (mist:2.25)", 64, True),
    # Truncated on every encoder: the weights travel with the tokens that are kept.
    ("truncated", "a breathtaking (oil painting:1.3) of a lighthouse " * 8 + "(storm:1.4) " * 30, 32, True),
    # Weighting off: brackets are text.
    ("literal", "a photo of a (red:1.5) cat", 64, False),
]


def lex(text):
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]":
            out.append(("lit", text[i + 1]))
            i += 2
            continue
        out.append(("open" if c in "([" else "close" if c in ")]" else "lit", c))
        i += 1
    return out


def bracket_matches(chars):
    ends, stacks = [None] * len(chars), {"(": [], "[": []}
    for i, (kind, c) in enumerate(chars):
        if kind == "open":
            stacks[c].append(i)
        elif kind == "close":
            st = stacks["(" if c == ")" else "["]
            if st:
                ends[st.pop()] = i
    return ends


def explicit_weight(chars):
    colons = [i for i, t in enumerate(chars) if t == ("lit", ":")]
    if not colons or colons[-1] == 0:
        return None
    k = colons[-1]
    number = "".join(c for _, c in chars[k + 1:]).strip()
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", number):
        return None
    w = float(np.float32(float(number)))
    return (w, k) if np.isfinite(w) else None


def parse(prompt):
    """[(text, weight)] or None when the prompt has no bracket (then it is encoded as is)."""
    if not any(c in prompt for c in "()[]"):
        return None
    chars = lex(prompt)
    ends = bracket_matches(chars)
    out = []

    def push(text, w):
        if not text:
            return
        if out and out[-1][1] == w:
            out[-1] = (out[-1][0] + text, w)
        else:
            out.append((text, w))

    def rec(lo, hi, w, depth):
        assert depth <= MAX_DEPTH
        lit, i = "", lo
        while i < hi:
            kind, c = chars[i]
            if kind == "open" and ends[i] is not None and ends[i] < hi:
                push(lit, w)
                lit = ""
                end = ends[i]
                if c == "(":
                    ew = explicit_weight(chars[i + 1:end])
                    if ew is not None:
                        rec(i + 1, i + 1 + ew[1], ew[0], depth + 1)
                    else:
                        rec(i + 1, end, np.float32(w) * np.float32(EMPHASIS), depth + 1)
                else:
                    rec(i + 1, end, np.float32(w) / np.float32(EMPHASIS), depth + 1)
                i = end + 1
                continue
            lit += c
            i += 1
        push(lit, w)

    rec(0, len(chars), np.float32(1.0), 0)
    return out


def tokens_and_weights(tok, prompt, max_len, weighting, unit=False):
    segments = parse(prompt) if weighting else None
    if segments is not None and unit:
        segments = [(t, 1.0) for t, _ in segments]
    if segments is None:
        segments = None
        content = tok(prompt, add_special_tokens=False)["input_ids"]
        weights = [1.0] * len(content)
    else:
        content, weights = [], []
        for text, w in segments:
            for word in text.split():
                ids = tok(word, add_special_tokens=False)["input_ids"]
                content += ids
                weights += [float(w)] * len(ids)
    # The special tokens of an empty prompt: CLIP [<|startoftext|>, <|endoftext|>] around the text, T5 [</s>] after.
    special = tok("", add_special_tokens=True)["input_ids"]
    assert len(special) in (1, 2), special
    keep = max_len - len(special)
    content, weights = content[:keep], weights[:keep]
    ids = special[:1] + content + special[1:] if len(special) == 2 else content + special
    first = 1 if len(special) == 2 else 0
    w = [1.0] * max_len
    w[first:first + len(content)] = weights
    ids = ids + [tok.pad_token_id] * (max_len - len(ids))
    return np.array([ids], dtype=np.int64), np.array(w, dtype=np.float32)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def clip_encode(sess, ids):
    names = [o.name for o in sess.get_outputs()]
    layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("hidden_states."))
    penultimate = f"hidden_states.{layers[-2]}"  # diffusers: hidden_states[-2]
    h, p = sess.run([penultimate, "text_embeds"], {"input_ids": ids})
    return h[0], p[0]


def weigh(z, z_empty, w):
    z = z.copy()
    for j, wj in enumerate(w):
        if wj != 1.0:
            z[j] = (z[j] - z_empty[j]) * wj + z_empty[j]
    return z


def encode(fixture: Path, toks, sessions, prompt, max_seq, weighting, unit=False):
    states, pooled = [], []
    for tok, sess in zip(toks[:2], sessions[:2]):
        ids, w = tokens_and_weights(tok, prompt, CLIP_LEN, weighting, unit)
        h, p = clip_encode(sess, ids)
        if np.any(w != 1.0):
            empty_ids, _ = tokens_and_weights(tok, "", CLIP_LEN, False)
            h = weigh(h, clip_encode(sess, empty_ids)[0], w)
        states.append(h)
        pooled.append(p)
    ids, w = tokens_and_weights(toks[2], prompt, max_seq, weighting, unit)
    t5 = sessions[2].run(["last_hidden_state"], {"input_ids": ids})[0][0]
    if np.any(w != 1.0):
        empty_ids, _ = tokens_and_weights(toks[2], "", max_seq, False)
        t5 = weigh(t5, sessions[2].run(["last_hidden_state"], {"input_ids": empty_ids})[0][0], w)
    clip = np.concatenate(states, axis=1)
    clip = np.pad(clip, ((0, 0), (0, t5.shape[1] - clip.shape[1])))
    context = np.concatenate([clip, t5], axis=0)[None]
    return context.astype(np.float32), np.concatenate(pooled)[None].astype(np.float32)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for name in ("tiny-sd3", "tiny-sd35"):
        fixture = FIXTURES / name
        index = json.loads((fixture / "model_index.json").read_text())
        toks = [getattr(transformers, index[sub][1]).from_pretrained(fixture / sub)
                for sub in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        sessions = [session(fixture / sub / "model.onnx") for sub in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        cases = []
        for case, prompt, max_seq, weighting in CASES:
            context, pooled = encode(fixture, toks, sessions, prompt, max_seq, weighting)
            d = OUT / name / case
            d.mkdir(parents=True)
            np.save(d / "prompt_embeds.npy", context)
            np.save(d / "pooled_prompt_embeds.npy", pooled)
            # How far the weights moved the embeddings (the same tokens, every weight 1.0).
            plain, _ = encode(fixture, toks, sessions, prompt, max_seq, weighting, unit=True)
            cases.append({"name": case, "prompt": prompt, "max_sequence_length": max_seq, "weighting": weighting,
                          "segments": [[t, float(w)] for t, w in (parse(prompt) or [])] if weighting else None,
                          "max_abs_diff_to_unit_weights": float(np.abs(context - plain).max())})
            print(name, case, "diff to unit weights", cases[-1]["max_abs_diff_to_unit_weights"])
        (OUT / name / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
