"""Tests for scenes.py and checker.py (plain asserts; run: python models/nano/test_checker.py, or with pytest)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker as C  # noqa: E402
import scenes as S  # noqa: E402

# sha256 of make_dataset(64, seed=0) images + captions: pins bit-identical data (numpy 2.2.6, Pillow 13.0.0)
DATA_SHA256 = "b0f4f35c657d3fde77511e758bbd5d459eab7ae25da025dc2d62f493037241ee"

_PROMPTS = None
_RENDERS = None


def prompts():
    global _PROMPTS, _RENDERS
    if _PROMPTS is None:
        _PROMPTS = S.eval_prompts()
        _RENDERS = [S.render(p["scene"]) for p in _PROMPTS]
    return _PROMPTS, _RENDERS


def test_dataset_deterministic():
    a = S.make_dataset(1100, 3, workers=1)
    b = S.make_dataset(1100, 3, workers=2)
    assert a[0].shape == (1100, 128, 128, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    # make_captions (token_ids.py) gives make_dataset's captions without rendering, across chunk boundaries
    assert S.make_captions(1100, 3) == a[1]
    assert S.make_captions(1100, 4) != a[1]
    im, caps, _ = S.make_dataset(64, 0, workers=1)
    h = hashlib.sha256(im.tobytes())
    h.update("\n".join(caps).encode())
    assert h.hexdigest() == DATA_SHA256, h.hexdigest()
    # render is a pure function of the scene dict (JSON round trip included)
    sc = json.loads(json.dumps(a[2][5]))
    assert np.array_equal(S.render(sc), a[0][5])


def test_heldout_rule():
    rng = np.random.default_rng(0)
    seen = collections.defaultdict(set)
    for _ in range(20000):
        sc = S.sample_scene(rng, "train")
        assert not S.heldout_combos(sc), sc
        seen["color"].add(sc.color)
        seen["kind"].add(sc.kind)
        if sc.kind != "word":
            seen["shape"].add(sc.shape)
        if sc.kind == "object":
            seen["size"].add(sc.size)
            seen["position"].add(sc.position)
            seen["size_shape"].add((sc.size, sc.shape))
        if sc.kind == "count":
            seen["count"].add(sc.count)
        if sc.kind == "word":
            seen["word"].add(sc.word)
    assert seen["color"] == set(S.COLORS) and seen["shape"] == set(S.SHAPES) and seen["size"] == set(S.SIZES)
    assert seen["position"] == set(S.POSITIONS) and seen["count"] == set(S.COUNTS.values())
    assert seen["word"] == set(S.WORDS)
    for _ in range(2000):
        assert S.heldout_combos(S.sample_scene(rng, "heldout"))
    # held-out combos are real combos of the vocabulary
    for fam, combos in S.HELDOUT.items():
        assert combos, fam


def test_train3_split():
    # three object sizes, still no held-out combination; every shape at two or more sizes; the "train" split and
    # its pinned data are unchanged (test_dataset_deterministic)
    rng = np.random.default_rng(1)
    sizes = collections.defaultdict(set)
    for _ in range(10000):
        sc = S.sample_scene(rng, "train3")
        assert not S.heldout_combos(sc), sc
        if sc.kind == "object":
            sizes[sc.shape].add(sc.size)
    assert set(sizes) == set(S.SHAPES) and all(len(v) >= 2 for v in sizes.values()), sizes
    assert set().union(*sizes.values()) == set(S.TRAIN3_SIZES)
    assert S.make_captions(600, 7, "train3") == S.make_dataset(600, 7, "train3", workers=1)[1]
    assert any("medium" in c or "mid-sized" in c for c in S.make_captions(600, 7, "train3"))


def test_train3c_split():
    # train3's scenes with more count scenes; still no held-out combination
    rng = np.random.default_rng(2)
    kinds = collections.Counter()
    sizes = set()
    for _ in range(10000):
        sc = S.sample_scene(rng, "train3c")
        assert not S.heldout_combos(sc), sc
        kinds[sc.kind] += 1
        if sc.kind == "object":
            sizes.add(sc.size)
    assert sizes == set(S.TRAIN3_SIZES)
    # shares after the held-out combinations are redrawn (scenes.KIND_WEIGHTS_TRAIN3C)
    assert 0.42 < kinds["count"] / 10000 < 0.48 and 0.3 < kinds["object"] / 10000 < 0.36, kinds
    assert S.make_captions(300, 7, "train3c") != S.make_captions(300, 7, "train3")


def test_train4_split():
    # issue 22: train3's kinds plus pair scenes; no held-out combination of any family, every single value (and every
    # allowed pair value) still seen; the older splits are untouched (test_dataset_deterministic pins "train")
    rng = np.random.default_rng(4)
    kinds = collections.Counter()
    seen = collections.defaultdict(set)
    n = 20000
    for _ in range(n):
        sc = S.sample_scene(rng, "train4")
        assert not S.heldout_combos(sc), sc
        kinds[sc.kind] += 1
        if sc.kind != "pair":
            continue
        d = sc.to_dict()
        assert sc.shape != sc.shape2 and sc.color != sc.color2, d
        assert not (sc.size == "large" and sc.size2 == "large"), d
        seen["color"] |= {sc.color, sc.color2}
        seen["shape"] |= {sc.shape, sc.shape2}
        seen["size"] |= {sc.size, sc.size2}
        seen["relation"].add(sc.relation)
        seen["color_pair"].add(tuple(sorted((sc.color, sc.color2))))
        seen["shape_pair"].add(tuple(sorted((sc.shape, sc.shape2))))
        seen["side_shape"] |= set(S.pair_sides(d).items())
        seen["color_shape"] |= {(sc.color, sc.shape), (sc.color2, sc.shape2)}
    assert 0.36 < kinds["pair"] / n < 0.44 and 0.2 < kinds["count"] / n < 0.27, kinds
    assert 0.17 < kinds["object"] / n < 0.23 and 0.14 < kinds["word"] / n < 0.2, kinds
    assert seen["color"] == set(S.COLORS) and seen["shape"] == set(S.SHAPES), seen
    assert seen["size"] == set(S.PAIR_SIZES) and seen["relation"] == set(S.RELATIONS) | {None}, seen
    all_cp = {tuple(sorted((a, b))) for a in S.COLORS for b in S.COLORS if a != b}
    all_sp = {tuple(sorted((a, b))) for a in S.SHAPES for b in S.SHAPES if a != b}
    all_ss = {(side, sh) for side in ("left", "right", "top", "bottom") for sh in S.SHAPES}
    assert seen["color_pair"] == all_cp - S.HELDOUT["color_pair"], all_cp - seen["color_pair"]
    assert seen["shape_pair"] == all_sp - S.HELDOUT["shape_pair"]
    assert seen["side_shape"] == all_ss - S.HELDOUT["side_shape"]
    assert seen["color_shape"] == {(c, sh) for c in S.COLORS for sh in S.SHAPES} - S.HELDOUT["color_shape"]
    # every held-out pair value is made of values seen in training, each still with some partner
    for a, b in S.HELDOUT["color_pair"] | S.HELDOUT["shape_pair"]:
        assert a in seen["color"] | seen["shape"] and b in seen["color"] | seen["shape"]
    for fam in ("color_pair", "shape_pair", "side_shape"):
        assert S.HELDOUT[fam]
    caps = S.make_captions(600, 7, "train4")
    assert caps == S.make_dataset(600, 7, "train4", workers=1)[1]
    assert any(" left of " in c for c in caps) and any(" above " in c for c in caps) and any(" and " in c for c in caps)
    assert S.make_captions(300, 7, "train4") != S.make_captions(300, 7, "train3c")


def test_train5_split():
    # train4 plus same-shape relation pairs (scenes.SAME_SHAPE_SHARE_TRAIN5): no held-out combination (side x shape
    # included), each same-shape pair in a stated relation with both colours in its caption; train4 is untouched
    rng = np.random.default_rng(5)
    n, pairs, same = 20000, 0, []
    for _ in range(n):
        sc = S.sample_scene(rng, "train5")
        assert not S.heldout_combos(sc), sc
        if sc.kind == "pair":
            pairs += 1
            if sc.shape == sc.shape2:
                same.append(sc)
    # about 0.3 of the pair draws, fewer after the held-out redraws (same-shape pairs hit side x shape more often)
    assert 0.15 < len(same) / pairs < 0.35, (len(same), pairs)
    seen_sides = set()
    for sc in same[:400]:
        assert sc.relation in S.RELATIONS and sc.color != sc.color2, sc
        cap = S.caption(sc, np.random.default_rng(0))
        assert sc.color in cap and sc.color2 in cap, cap
        seen_sides |= set(S.pair_sides(sc.to_dict()).items())
    assert not seen_sides & S.HELDOUT["side_shape"]
    caps = S.make_captions(600, 7, "train5")
    assert caps == S.make_dataset(600, 7, "train5", workers=1)[1]
    assert caps != S.make_captions(600, 7, "train4")
    # the checker passes the clean renders of same-shape scenes (the colours tell the objects apart) and fails
    # them with the relation reversed or the colours swapped
    inverse = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for sc in same[:24]:
        img, d = S.render(sc), sc.to_dict()
        assert all(C.check(img, d).values()), (C.check(img, d), d)
        assert not C.check(img, dict(d, relation=inverse[d["relation"]]))["relation"], d
        swapped = C.check(img, dict(d, color=d["color2"], color2=d["color"]))
        assert not all(swapped.values()), d


def test_pair_geometry_and_captions():
    # the stated relation holds for the checker on the render (bbox centers, margin), the two boxes never overlap,
    # both stay in the frame, and the caption names both shapes (and the relation word when stated)
    rng = np.random.default_rng(5)
    words = {"left": ("left",), "right": ("right",), "above": ("above", "over"), "below": ("below", "under", "beneath")}
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    n_rel = 0
    for _ in range(400):
        sc = S._make_scene(rng, "pair")
        (x1, y1, s1), (x2, y2, s2) = sc.items
        for x, y, s in sc.items:
            assert s <= x <= 1 - s and s <= y <= 1 - s, sc
        assert max(abs(x1 - x2) - s1 - s2, abs(y1 - y2) - s1 - s2) >= 0.049, sc
        if sc.relation is not None:
            n_rel += 1
            assert C.relation_holds(sc.relation, (x1 * 128, y1 * 128), (x2 * 128, y2 * 128)), sc
            inv = {"left": "right", "right": "left", "above": "below", "below": "above"}[sc.relation]
            assert not C.relation_holds(inv, (x1 * 128, y1 * 128), (x2 * 128, y2 * 128)), sc
        sc.stated = None
        c = S.caption(sc, rng)
        assert c.isascii() and len(c.split()) <= 20, c
        syn = lambda sh: S._SHAPE_SYN[sh]  # noqa: E731
        assert any(w in c for w in syn(sc.shape)) and any(w in c for w in syn(sc.shape2)), c
    assert n_rel > 250
    # stated relations show in the caption
    for _ in range(200):
        sc = S._make_scene(rng, "pair", relation=S.RELATIONS[int(rng.integers(4))])
        sc.stated = ["shape", "shape2", "relation"]
        c = S.caption(sc, rng)
        # said in the scene's order ("A left of B") or the other way round ("B right of A")
        first = min(c.find(w) for w in S._SHAPE_SYN[sc.shape] if w in c)
        second = min(c.find(w) for w in S._SHAPE_SYN[sc.shape2] if w in c)
        rel = sc.relation if first < second else opposite[sc.relation]
        assert any(f" {w} " in f" {c} " for w in words[rel]), c
        assert not any(f" {w} " in f" {c} " for w in words[opposite[rel]]), c


def test_eval_prompts_v2():
    ps = S.eval_prompts_v2()
    assert len(ps) == 300
    cnt = collections.Counter(p["category"] for p in ps)
    assert cnt == {c: 50 for c in S.CATEGORIES_V2}, cnt
    for p in ps:
        fams, stated = S.CATEGORIES_V2[p["category"]]
        assert set(fams) & set(S.heldout_combos(p["scene"])), p
        assert p["scene"]["stated"] == list(stated)
        assert p["prompt"].isascii() and len(p["prompt"].split()) <= 20
    # every held-out combination of the pair families is asked about
    for cat, fam in (("two_objects", "shape_pair"), ("color_attr", "color_pair")):
        got = {tuple(sorted((p["scene"]["shape" if fam == "shape_pair" else "color"],
                             p["scene"]["shape2" if fam == "shape_pair" else "color2"]))) for p in ps
               if p["category"] == cat}
        assert got == set(S.HELDOUT[fam]), (cat, got)
    sides = set()
    for p in ps:
        if p["category"] == "position":
            sides |= set(S.pair_sides(p["scene"]).items()) & S.HELDOUT["side_shape"]
    assert sides == set(S.HELDOUT["side_shape"])
    with open(S.EVAL_PROMPTS_V2_PATH) as f:
        assert json.load(f) == ps, "eval_prompts_v2.json is stale: python models/nano/scenes.py --write-eval-v2"
    # the "heldout2" split: every scene is one of the six categories' held-out scenes
    rng = np.random.default_rng(8)
    cats = collections.Counter()
    for _ in range(600):
        sc = S.sample_scene(rng, "heldout2").to_dict()
        hits = [c for c, (fams, st) in S.CATEGORIES_V2.items() if set(fams) & set(S.heldout_combos(sc))
                and sc["stated"] == list(st)]
        assert hits, sc
        cats[hits[0] if len(hits) == 1 else sc["stated"][0]] += 1
    assert len(cats) >= 5, cats


def test_selftest_figures_v2():
    ps = S.eval_prompts_v2()
    rep = C.selftest(ps, verbose=False)
    t = rep["table"]
    for cat, (ok, tot) in t["clean"]["per_category"].items():
        assert ok == tot, (cat, ok, tot)
    for name in ("degraded", "4x down/up"):
        for cat, (ok, tot) in t[name]["per_category"].items():
            assert ok / tot >= 0.95, (name, cat, ok, tot)
    ok, tot = t["other prompt"]["overall"]
    assert ok / tot <= 0.02, t["other prompt"]
    assert t["background only"]["overall"][0] == 0, t["background only"]
    for k, (ok, tot) in rep["swap"].items():
        assert ok / tot <= 0.02, (k, ok, tot)
    # the two objects' colors (shapes, relation) exchanged: a faithful image must fail every one
    assert {k.split()[0] for k in rep["exchange"]} == {"colors", "shapes", "relation"}
    for k, (ok, tot) in rep["exchange"].items():
        assert ok == 0 and tot >= 50, (k, ok, tot)


def test_pair_negatives():
    sc = _scene("pair", color="red", shape="circle", size="medium", color2="blue", shape2="square", size2="small",
                relation="left")
    sc.stated = ["shape", "color", "shape2", "color2", "relation"]
    img = S.render(sc)
    r = C.check(img, sc)
    assert C.prompt_pass(r) and r["pair"], r
    # one object missing: only the first drawn
    one = S.Scene.from_dict(sc.to_dict())
    one.items = [one.items[0], [0.5, 0.5, 0.0]]
    r = C.check(S.render(one), sc)
    assert not r["pair"] and not C.prompt_pass(r), r
    # a third object (a green star at the bottom) breaks "pair"
    extra = _scene("object", color="green", shape="star", size="small", position="bottom")
    three = np.where(S.render_mask(extra)[:, :, None] > 0.5, np.array(S.COLORS["green"], np.uint8), img)
    r = C.check(three, sc)
    assert not r["pair"] and not C.prompt_pass(r), r
    # both objects in one color: the second color is wrong
    mono = S.Scene.from_dict(dict(sc.to_dict(), color2="red"))
    r = C.check(S.render(mono), sc)
    assert not C.prompt_pass(r), r
    # the relation reversed by moving the objects; and stated the other way round it passes again
    flipped = S.Scene.from_dict(sc.to_dict())
    (x1, y1, s1), (x2, y2, s2) = flipped.items
    flipped.items = [[1 - x1, y1, s1], [1 - x2, y2, s2]]
    r = C.check(S.render(flipped), sc)
    assert not r["relation"] and r["color"] and r["shape"], r
    assert C.prompt_pass(C.check(S.render(flipped), dict(sc.to_dict(), relation="right")))
    # shapes without colors, in either order
    two = dict(sc.to_dict(), stated=["shape", "shape2"])
    assert C.prompt_pass(C.check(img, two))
    assert C.prompt_pass(C.check(img, dict(two, shape="square", shape2="circle")))
    assert not C.prompt_pass(C.check(img, dict(two, shape2="star")))
    # a small star beside a large square still counts as two objects (pair area thresholds)
    sm = _scene("pair", color="yellow", shape="star", size="small", color2="black", shape2="square", size2="large",
                relation="above")
    sm.stated = ["shape", "color", "shape2", "color2", "relation", "size", "size2"]
    r = C.check(S.render(sm), sm)
    assert C.prompt_pass(r), r


def test_captions():
    rng = np.random.default_rng(1)
    for split in ("train", "heldout"):
        for _ in range(5000):
            sc = S.sample_scene(rng, split)
            c = S.caption(sc, rng)
            assert c.isascii() and 1 <= len(c.split()) <= 20, c
            if sc.kind == "word":
                assert sc.word in c
            elif sc.kind == "count" and sc.count > 1:
                assert [k for k, v in S.COUNTS.items() if v == sc.count][0] in c


def test_eval_prompts():
    ps, _ = prompts()
    assert len(ps) >= 200
    cnt = collections.Counter(p["category"] for p in ps)
    assert set(cnt) == set(S.CATEGORIES) and min(cnt.values()) >= 40, cnt
    for p in ps:
        fam = S.CATEGORIES[p["category"]][0]
        assert fam in S.heldout_combos(p["scene"]), p
        assert p["scene"]["stated"]
    with open(S.EVAL_PROMPTS_PATH) as f:
        assert json.load(f) == ps, "eval_prompts.json is stale: python models/nano/scenes.py --write-eval"


def test_label():
    m = np.zeros((128, 128), bool)
    m[10:20, 10:20] = True
    m[30:40, 30:35] = True
    m[40, 35] = True  # diagonal neighbor: same component (8-connected)
    m[100:110, 5:125] = True
    m[5, 120] = True
    lab = C.label(m)
    assert len(np.unique(lab[lab >= 0])) == 4
    assert lab[40, 35] == lab[30, 30]
    # a long snake is one component
    s = np.zeros((128, 128), bool)
    s[::4, 2:126] = True
    s[:, 2] = True
    assert len(np.unique(C.label(s)[s])) == 1


def test_selftest_figures():
    ps, _ = prompts()
    rep = C.selftest(ps, verbose=False)
    t = rep["table"]
    ok, tot = t["clean"]["overall"]
    assert ok == tot, t["clean"]
    for cat, (ok, tot) in t["clean"]["per_category"].items():
        assert ok / tot >= 0.98, (cat, ok, tot)
    ok, tot = t["degraded"]["overall"]
    assert ok / tot >= 0.95, t["degraded"]
    ok, tot = t["4x down/up"]["overall"]
    assert ok / tot >= 0.95, t["4x down/up"]
    ok, tot = t["other prompt"]["overall"]
    assert ok / tot <= 0.05, t["other prompt"]
    ok, tot = t["background only"]["overall"]
    assert ok == 0, t["background only"]
    for k, (ok, tot) in rep["swap"].items():
        assert ok / tot <= 0.02, (k, ok, tot)


def _scene(kind, **kw):
    rng = np.random.default_rng(kw.pop("seed", 0))
    sc = S._make_scene(rng, kind, **kw)
    sc.background = {"style": "solid", "colors": ["gray"], "seed": 0}
    return sc


def test_specific_negatives():
    # an extra object breaks "a red circle"; two circles are not three
    sc = _scene("object", color="red", shape="circle", size="small", position="left")
    img = S.render(sc)
    r = C.check(img, sc)
    assert C.prompt_pass(r), r
    other = _scene("object", color="blue", shape="square", size="small", position="right")
    both = np.where(S.render_mask(other)[:, :, None] > 0.5, np.array(S.COLORS["blue"], np.uint8), img)
    r = C.check(both, sc)
    assert not r["single"] and not C.prompt_pass(r), r
    cs = _scene("count", color="green", shape="circle", count=2)
    img = S.render(cs)
    assert C.prompt_pass(C.check(img, cs))
    cs3 = S.Scene.from_dict(dict(cs.to_dict(), count=3))
    assert not C.check(img, cs3)["count"]
    # a squashed circle (ellipse) is not a circle
    el = np.full((128, 128, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:128, 0:128]
    el[((xx - 64) / 30.0) ** 2 + ((yy - 64) / 12.0) ** 2 <= 1] = S.COLORS["red"]
    sc = _scene("object", color="red", shape="circle", size="large", position="center")
    r = C.check(el, sc)
    assert r["color"] and not r["shape"], r
    # a word scene with a different word, and a scene with scrambled letters
    w = _scene("word", word="FISH", color="white", position="center")
    img = S.render(w)
    assert C.prompt_pass(C.check(img, w))
    for other in ("BIRD", "FROG", "LAMP", "BOAT", "TREE", "MOON"):
        assert not C.check(img, S.Scene.from_dict(dict(w.to_dict(), word=other)))["word"], other
    scr = _scene("word", word="FISH", color="white", position="center")
    scr.word = "HSIF"  # not in WORDS: rendered, then checked as FISH
    r = C.check(S.render(scr), w)
    assert not r["word"], r


def test_check_dir():
    ps, ims = prompts()
    with tempfile.TemporaryDirectory() as d:
        sub = ps[:10]
        for i in range(10):
            Image.fromarray(ims[i]).save(os.path.join(d, f"{i:03d}_cfg.png"))
        pp = os.path.join(d, "p.json")
        with open(pp, "w") as f:
            json.dump(sub, f)
        rep = C.check_dir(d, pp, "{i:03d}_cfg.png")
        assert rep["overall"] == (10, 10), rep["overall"]
        # other sizes are resized to 128
        big = np.asarray(Image.fromarray(ims[0]).resize((256, 256), Image.Resampling.BICUBIC))
        assert C.prompt_pass(C.check(big, ps[0]["scene"]))


if __name__ == "__main__":
    import time

    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            t = time.perf_counter()
            fn()
            print(f"ok  {name}  ({time.perf_counter() - t:.1f} s)")
    print("all passed")
