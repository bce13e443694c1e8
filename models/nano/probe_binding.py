#!/usr/bin/env python3
"""Does the text conditioning bind colours to shapes? Linear probes on a trained pipeline's text encoders (issue 22,
run 15's diagnosis). For every caption "a C1 S1 and a C2 S2" (8 x 7 ordered colour pairs x 5 x 4 ordered shape
pairs: 1,120), the state of a shape token (CLIP-L / CLIP-G: hidden_states[-2], what the pipeline feeds the
transformer; T5: the last piece of the second shape) is mapped to a colour by softmax regression fitted on 3/4 of
the captions; the accuracy on the other 1/4 is printed (chance: 1/8).

With --relations, the same for relations (run 16's diagnosis): captions "a C1 S1 REL a C2 S2" (REL one of the
eleven distinct phrases scenes.py writes for left / right / above / below; 8 x 7 colour pairs x 5 x 4 shape pairs x
11 phrases, 12,320 captions), the label the side the first object is drawn on (left, right, top, bottom; chance
1/4).
Probed: each encoder's state of the first shape (CLIP is causal, so its state of the first shape cannot see the
relation: a control that must stay at chance), of the second shape, and the pooled embedding.

    python models/nano/probe_binding.py RUN/pipeline [--relations]   (a train.py pipeline folder, or from_onnx.py --out)
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def probe(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of a softmax regression x -> y (standardised features, Adam, 500 full-batch steps)."""
    classes = int(y.max()) + 1
    n = len(y)
    idx = np.random.default_rng(seed).permutation(n)
    tr, te = idx[: n * 3 // 4], idx[n * 3 // 4:]
    xt = torch.tensor(x[tr], dtype=torch.float32)
    yt = torch.tensor(y[tr])
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(((xt - mu) / sd) @ w + b, yt).backward()
        opt.step()
    xe = (torch.tensor(x[te], dtype=torch.float32) - mu) / sd
    return float(((xe @ w + b).argmax(1).numpy() == y[te]).mean())


def relations(te1, te2, te3, toks):
    """Relation probes (see the module's docstring)."""
    import scenes

    sides = {"left": 0, "right": 1, "above": 2, "below": 3}  # the first object's side: left, right, top, bottom
    caps, labels, first, second, t5_first, t5_second = [], [], [], [], [], []
    for c1, c2 in itertools.permutations(COLORS, 2):
        for s1, s2 in itertools.permutations(SHAPES, 2):
            for rel, phrases in scenes._REL_PHRASES.items():
                for phrase in dict.fromkeys(phrases):  # "above" is listed twice (weights): once here
                    head = f"a {c1} {s1}"
                    cap = f"{head} {phrase} a {c2} {s2}"
                    caps.append(cap)
                    labels.append(sides[rel])
                    # CLIP: BOS + one token a word (checked in main), so the first shape is at 3 and the second
                    # is the last token before EOS; T5 (no BOS): the last piece of each
                    first.append(3)
                    second.append(len(toks[0](cap, add_special_tokens=False)["input_ids"]))
                    t5_first.append(len(toks[2](head, add_special_tokens=False)["input_ids"]) - 1)
                    t5_second.append(len(toks[2](cap, add_special_tokens=False)["input_ids"]) - 1)
    for w in [p for ps in scenes._REL_PHRASES.values() for p in ps]:
        for piece in w.split():
            if len(toks[0](piece, add_special_tokens=False)["input_ids"]) != 1:
                raise SystemExit(f"CLIP splits {piece!r}: the token positions below do not hold")
    y = np.array(labels)
    rows = np.arange(len(caps))
    ids_l, ids_g, ids_t = train.tokenize(toks, caps, 77)
    with torch.no_grad():
        o1 = te1(ids_l, output_hidden_states=True)
        o2 = te2(ids_g, output_hidden_states=True)
        t5 = te3(ids_t)[0].numpy()
    print(f"{len(caps)} captions; the first object's side (left / right / top / bottom), chance 0.250")
    for name, o in (("CLIP-L", o1), ("CLIP-G", o2)):
        h = o.hidden_states[-2].numpy()
        print(f"{name} state of the 1st shape token (causal: cannot see the relation) {probe(h[rows, first], y):.3f}")
        print(f"{name} state of the 2nd shape token                                 {probe(h[rows, second], y):.3f}")
        print(f"{name} pooled embedding                                             {probe(o.text_embeds.numpy(), y):.3f}")
    print(f"T5 state of the 1st shape's last piece                                 {probe(t5[rows, t5_first], y):.3f}")
    print(f"T5 state of the 2nd shape's last piece                                 {probe(t5[rows, t5_second], y):.3f}")


def main():
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = Path(sys.argv[1])
    te1 = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder").float().eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2").float().eval()
    te3 = T5EncoderModel.from_pretrained(pipe / "text_encoder_3").float().eval()
    toks = train.load_tokenizers(train.HERE.parent / "fixtures" / "tiny-sd35")
    for w in COLORS + SHAPES + ["a", "and"]:
        if len(toks[0](w, add_special_tokens=False)["input_ids"]) != 1:
            raise SystemExit(f"CLIP splits {w!r}: the token positions below do not hold")
    if "--relations" in sys.argv[2:]:
        relations(te1, te2, te3, toks)
        return
    caps, labels = [], []
    for c1, c2 in itertools.permutations(COLORS, 2):
        for s1, s2 in itertools.permutations(SHAPES, 2):
            caps.append(f"a {c1} {s1} and a {c2} {s2}")
            labels.append((COLORS.index(c1), COLORS.index(c2)))
    labels = np.array(labels)
    ids_l, ids_g, ids_t = train.tokenize(toks, caps, 77)
    # CLIP: BOS a C1 S1 and a C2 S2 EOS, one token a word (checked), so S1 is at 3 and S2 at 7
    with torch.no_grad():
        h1 = te1(ids_l, output_hidden_states=True).hidden_states[-2].numpy()
        h2 = te2(ids_g, output_hidden_states=True).hidden_states[-2].numpy()
        t5 = te3(ids_t)[0].numpy()
    for name, h in (("CLIP-L", h1), ("CLIP-G", h2)):
        print(f"{name} state of the 2nd shape token -> its colour      {probe(h[:, 7], labels[:, 1]):.3f}")
        print(f"{name} state of the 2nd shape token -> the 1st colour  {probe(h[:, 7], labels[:, 0]):.3f}")
        print(f"{name} state of the 1st shape token -> its colour      {probe(h[:, 3], labels[:, 0]):.3f}")
    last = [len(toks[2](c, add_special_tokens=False)["input_ids"]) - 1 for c in caps]  # T5 has no BOS
    x = np.stack([t5[i, p] for i, p in enumerate(last)])
    print(f"T5 state of the 2nd shape's last piece -> its colour     {probe(x, labels[:, 1]):.3f}")
    print(f"T5 state of the 2nd shape's last piece -> the 1st colour {probe(x, labels[:, 0]):.3f}")


if __name__ == "__main__":
    main()
