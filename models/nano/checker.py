"""Deterministic prompt-adherence checker for the nano SD3 scenes (issue 6). numpy + Pillow only, no learning.

check(image, scene) -> {attribute: bool} for every attribute the prompt states (scene["stated"]; when absent, all
attributes of the scene kind), computed as follows on the image resized to 128x128:

  background   a quadratic surface per RGB channel (1, x, y, xy, x^2, y^2), fit by least squares first to a 6 px border
               ring and then to all pixels, up to 4 rounds of trimming pixels whose residual is large (robust to objects,
               handles solid colors, gradients; light texture stays in the residual).
  foreground   residual distance |image - background| > T, T = clip(0.5 * 99.7th percentile residual, 35, 75) (the
               half-contrast level, so blurred edges do not grow or shrink shapes).
  components   8-connected labeling (numpy min-label propagation with pointer jumping). Significant components:
               area >= 25 px and >= 20% of the largest (drops specks).
  color        median RGB of the strongest half of a component's pixels -> nearest of the 8 palette colors; passes if
               it is the stated color, within 130 of it and closer to it than to the background there; counts:
               every significant component; words: all word pixels together.
  shape        the component mask cropped to its bbox against each shape template resized to that bbox (IoU; per
               shape the best of the sharp template and the template blurred by 3.5/7/10% of its side and cut at
               half height, which is what a blurred shape looks like at T); passes if the stated shape has the best
               IoU, IoU >= 0.6 and bbox aspect <= 1.5.
               For counts every significant component must pass.
  size         bbox long side of the main component: small < 32.5 px <= medium < 47.5 px <= large.
  position     bbox center of the main component (of all word pixels for words) in the 3x3 grid of image thirds.
  count        number of significant components == stated count.
  single       (object prompts, implicit "a ...") exactly one significant component.
  word         the union of foreground components of >= 8 px and >= 10% of the largest, cropped to its bbox, vs
               every word of WORDS rendered with the same font/stroke and resized to that bbox (IoU); passes if the
               stated word is best, IoU >= 0.45 and beats the runner-up by >= 0.03.

A prompt passes (``prompt_pass``) iff every checked attribute passes; ``category_pass`` is the same rule, kept for
callers that name the category.

CLI
  python models/nano/checker.py --selftest
  python models/nano/checker.py --images DIR --prompts models/nano/eval_prompts.json [--pattern '{i:03d}.png']
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenes as S  # noqa: E402

N = 128
MIN_AREA = 25
REL_AREA = 0.2
SHAPE_IOU = 0.6
SHAPE_ASPECT = 1.5
# Size bands of the bbox long side (px at 128): small < 32.5 <= medium < 47.5 <= large. Renders: small 22-29,
# medium 36-43 (training split "train3" only), large 51-64. A prompt's "small" or "large" passes only in its band,
# so a medium shape drawn for either fails.
SIZE_BANDS = (32.5, 47.5)
WORD_IOU = 0.45
WORD_REL_AREA = 0.1
WORD_MARGIN = 0.03
COLOR_MAX_DIST = 130.0
# Pair scenes (issue 22): their two objects may differ in size (a small star has about 150 px, a large square 4000),
# so their components count from PAIR_MIN_AREA px and PAIR_REL_AREA of the largest (not 20%). A relation holds when
# the second object's bbox center is at least REL_MARGIN px away from the first's along the relation's axis, in
# the stated direction, and no farther along the other axis than along that one.
PAIR_MIN_AREA = 40
PAIR_REL_AREA = 0.02
REL_MARGIN = 10.0

_PALETTE_NAMES = list(S.COLORS)
_PALETTE = np.array([S.COLORS[c] for c in _PALETTE_NAMES], np.float32)

# ----------------------------------------------------------------------------------------------------------------
# Background / foreground

_yy, _xx = np.mgrid[0:N, 0:N].astype(np.float32)
_xn, _yn = (_xx / (N - 1) - 0.5).ravel(), (_yy / (N - 1) - 0.5).ravel()
_BASIS = np.stack([np.ones_like(_xn), _xn, _yn, _xn * _yn, _xn * _xn, _yn * _yn], 1)  # [N*N, 6]
_BASIS64 = _BASIS.astype(np.float64)
_RING = np.zeros((N, N), bool)
_RING[:6, :] = _RING[-6:, :] = _RING[:, :6] = _RING[:, -6:] = True


def _prep(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.shape[:2] != (N, N):
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((N, N), Image.Resampling.LANCZOS))
    return img.astype(np.float32)


def background(img: np.ndarray) -> np.ndarray:
    """Robust quadratic background per channel, float32 [N, N, 3]."""
    flat = img.reshape(-1, 3)
    inl = _RING.ravel().copy()
    fit = None
    for it in range(5):
        A = _BASIS64[inl]
        coef = np.linalg.solve(A.T @ A, A.T @ flat[inl].astype(np.float64))
        fit = (_BASIS64 @ coef).astype(np.float32)
        r = np.linalg.norm(flat - fit, axis=1)
        med = float(np.median(r[inl]))
        thr = max(18.0, 3.0 * med)
        new = r < thr
        if new.sum() < 200:
            break
        inl = new
    return fit.reshape(N, N, 3).astype(np.float32)


def residual(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bg = background(img)
    return np.linalg.norm(img - bg, axis=2), bg


def label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (-1 background, else the smallest flat index in the component)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy == 1 and dx == 1:
                    continue
                np.minimum(m, p[dy:dy + h, dx:dx + w], out=m)
        m = np.where(mask, m, big)
        # pointer jumping: follow each label to its own label until stable
        flat = m.ravel()
        for _ in range(4):
            sel = flat < big
            flat[sel] = np.minimum(flat[sel], flat[flat[sel]])
        m = flat.reshape(h, w)
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, -1)


class Analysis:
    """Foreground, components and their features for one image."""

    def __init__(self, image: np.ndarray):
        self.img = _prep(image)
        self.r, self.bg = residual(self.img)
        hi = float(np.percentile(self.r, 99.7))
        self.T = float(np.clip(0.5 * hi, 35.0, 75.0))
        self.mask = self.r > self.T
        lab = label(self.mask)
        ids, areas = np.unique(lab[lab >= 0], return_counts=True)
        order = np.argsort(-areas, kind="stable")
        self.comps = []
        for k in order:
            m = lab == ids[k]
            ys, xs = np.nonzero(m)
            self.comps.append({"mask": m, "area": int(areas[k]), "y0": int(ys.min()), "y1": int(ys.max()),
                               "x0": int(xs.min()), "x1": int(xs.max())})
        big = self.comps[0]["area"] if self.comps else 0
        self.sig = [c for c in self.comps if c["area"] >= max(MIN_AREA, REL_AREA * big)]

    # -- features
    def color_of(self, m: np.ndarray) -> tuple[str, float, float]:
        """(nearest palette color, its distance, distance to the background there) of the median RGB of the
        strongest half of the pixels of mask ``m``."""
        rv = self.r[m]
        core = m & (self.r >= np.median(rv))
        med = np.median(self.img[core], axis=0)
        bgc = np.median(self.bg[core], axis=0)
        d = np.linalg.norm(_PALETTE - med[None], axis=1)
        k = int(np.argmin(d))
        return _PALETTE_NAMES[k], float(d[k]), float(np.linalg.norm(med - bgc))

    def shape_scores(self, c: dict) -> dict[str, float]:
        """IoU of the component mask (cropped to its bbox) with each shape template resized to that bbox; per shape
        the best over a family of templates: the shape blurred by sigma = 0 / 3.5 / 7 / 10% of its side and cut at
        half height, i.e. what a blurred render looks like at the half-contrast threshold (tips cut, corners
        rounded)."""
        h, w = c["y1"] - c["y0"] + 1, c["x1"] - c["x0"] + 1
        crop = c["mask"][c["y0"]:c["y1"] + 1, c["x0"]:c["x1"] + 1]
        out = {}
        for sh in S.SHAPES:
            best = 0.0
            for sig in _SHAPE_BLURS:
                t = _shape_template(sh, sig, w, h)
                best = max(best, float((crop & t).sum() / max(1, (crop | t).sum())))
            out[sh] = best
        return out

    def shape_of(self, c: dict) -> tuple[str | None, float]:
        h, w = c["y1"] - c["y0"] + 1, c["x1"] - c["x0"] + 1
        if max(h, w) / max(1, min(h, w)) > SHAPE_ASPECT:
            return None, 0.0
        sc = self.shape_scores(c)
        best = max(sc, key=lambda k: sc[k])
        if sc[best] < SHAPE_IOU:
            return None, sc[best]
        return best, sc[best]

    def word_mask(self) -> np.ndarray | None:
        big = self.comps[0]["area"] if self.comps else 0
        keep = [c for c in self.comps if c["area"] >= max(8, WORD_REL_AREA * big)]
        if not keep:
            return None
        m = np.zeros((N, N), bool)
        for c in keep:
            m |= c["mask"]
        return m

    def word_scores(self, m: np.ndarray) -> dict[str, float]:
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        crop = m[y0:y1 + 1, x0:x1 + 1]
        h, w = crop.shape
        out = {}
        for wd in S.WORDS:
            t = _word_template(wd, w, h)
            out[wd] = float((crop & t).sum() / max(1, (crop | t).sum()))
        return out


_SHAPE_BLURS = (0.0, 0.035, 0.07, 0.1)


@functools.lru_cache(maxsize=50000)
def _shape_template(shape: str, sig: float, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(_shape_unit(shape, sig)).resize((w, h), Image.Resampling.BILINEAR)) >= 128


@functools.lru_cache(maxsize=None)
def _shape_unit(shape: str, sig: float) -> np.ndarray:
    """uint8 mask of the shape (side 128 in a 192 canvas) blurred by sig * side, cut at half height, cropped."""
    R, side = 192, 128
    im = Image.new("L", (R, R), 0)
    S.draw_shape(ImageDraw.Draw(im), shape, R / 2, R / 2, side / 2)
    a = np.asarray(im, np.float32) / 255.0
    if sig > 0:
        a = _blur(a, sig * side)
    m = a >= 0.5
    ys, xs = np.nonzero(m)
    return (m[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur (numpy, zero padded)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(a, r)
    tmp = sum(k[i] * p[:, i:i + a.shape[1]] for i in range(2 * r + 1))
    return sum(k[i] * tmp[i:i + a.shape[0], :] for i in range(2 * r + 1))


@functools.lru_cache(maxsize=None)
def _word_unit(word: str) -> np.ndarray:
    px = 96
    x0, y0, x1, y1 = S.text_ink_bbox(word, px)
    im = Image.new("L", (x1 - x0 + 8, y1 - y0 + 8), 0)
    S.draw_word(ImageDraw.Draw(im), word, im.width / 2, im.height / 2, px)
    a = np.asarray(im)
    ys, xs = np.nonzero(a >= 128)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@functools.lru_cache(maxsize=20000)
def _word_template(word: str, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(_word_unit(word)).resize((w, h), Image.Resampling.BILINEAR)) >= 128


# ----------------------------------------------------------------------------------------------------------------
# Checking

_ALL = {"object": ["color", "shape", "size", "position"], "count": ["count", "shape", "color"],
        "word": ["word", "color", "position"],
        "pair": ["shape", "color", "size", "shape2", "color2", "size2", "relation"]}
_PAIR_OBJ_ATTRS = {"shape": (0, "shape"), "color": (0, "color"), "size": (0, "size"),
                   "shape2": (1, "shape"), "color2": (1, "color"), "size2": (1, "size")}


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the object with bbox center ``a`` is ``rel`` ("left", "right", "above", "below") of the one at ``b``
    (pixels, y down): along the relation's axis at least REL_MARGIN apart in that direction, and no farther apart
    along the other axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left": (dx, dy), "right": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return along >= REL_MARGIN and abs(across) <= along


def _size_band(c: dict) -> str:
    long = max(c["x1"] - c["x0"], c["y1"] - c["y0"]) + 1
    return "small" if long < SIZE_BANDS[0] else "medium" if long < SIZE_BANDS[1] else "large"


def _center(c: dict) -> tuple[float, float]:
    return (c["x0"] + c["x1"] + 1) / 2, (c["y0"] + c["y1"] + 1) / 2


def check_pair(a: "Analysis", scene: dict, stated: list[str], info: dict) -> dict:
    """Two objects, each with its own stated attributes: the image must have exactly two components ("pair"), and
    one assignment of the two components to the two stated objects must satisfy every stated attribute (so a red
    circle and a blue square fail "a blue circle and a red square"). Per attribute, the results of the assignment
    that satisfies the most are reported."""
    big = a.comps[0]["area"] if a.comps else 0
    comps = [c for c in a.comps if c["area"] >= max(PAIR_MIN_AREA, PAIR_REL_AREA * big)]
    info["n_pair_comps"] = len(comps)
    res = {"pair": len(comps) == 2}
    if len(comps) < 2:
        return dict(res, **{attr: False for attr in stated})
    comps = comps[:2]
    feats = []
    for c in comps:
        col, d, dbg = a.color_of(c["mask"])
        feats.append({"shape": a.shape_of(c)[0], "color": (col, d, dbg), "size": _size_band(c), "center": _center(c)})
    objs = [{"shape": scene["shape"], "color": scene["color"], "size": scene.get("size")},
            {"shape": scene["shape2"], "color": scene["color2"], "size": scene.get("size2")}]
    best = None
    for perm in ((0, 1), (1, 0)):
        r = {}
        for attr in stated:
            if attr == "relation":
                r[attr] = relation_holds(scene["relation"], feats[perm[0]]["center"], feats[perm[1]]["center"])
                continue
            k, what = _PAIR_OBJ_ATTRS[attr]
            f, want = feats[perm[k]], objs[k][what]
            if what == "color":
                n, d, dbg = f["color"]
                r[attr] = n == want and d <= COLOR_MAX_DIST and d < dbg
            else:
                r[attr] = f[what] == want
        if best is None or sum(r.values()) > sum(best[1].values()):
            best = (perm, r)
    info["pair_assignment"] = best[0]
    info["pair_features"] = [{k: v for k, v in f.items()} for f in feats]
    res.update(best[1])
    return res


def _cell(cx: float, cy: float) -> tuple[int, int]:
    return min(2, int(cy * 3 / N)), min(2, int(cx * 3 / N))


def check(image: np.ndarray, scene: dict, detail: bool = False) -> dict:
    """{attribute: bool} for the attributes the prompt states (see module doc). ``detail=True`` adds a "_detail"
    entry with the measured values."""
    if isinstance(scene, S.Scene):
        scene = scene.to_dict()
    a = Analysis(image)
    kind = scene["kind"]
    stated = list(scene.get("stated") or _ALL[kind])
    res: dict = {}
    info: dict = {"T": a.T, "n_sig": len(a.sig)}
    if kind == "pair":
        res = check_pair(a, scene, stated, info)
    elif kind in ("object", "count"):
        main = a.sig[0] if a.sig else None
        comps = a.sig if kind == "count" else a.sig[:1]
        if kind == "object":
            res["single"] = len(a.sig) == 1
        for attr in stated:
            if attr == "color":
                cols = [a.color_of(c["mask"]) for c in comps]
                info["colors"] = cols
                res["color"] = bool(cols) and all(n == scene["color"] and d <= COLOR_MAX_DIST and d < dbg
                                                  for n, d, dbg in cols)
            elif attr == "shape":
                shs = [a.shape_of(c) for c in comps]
                info["shapes"] = shs
                res["shape"] = bool(shs) and all(s == scene["shape"] for s, _ in shs)
            elif attr == "count":
                res["count"] = len(a.sig) == int(scene["count"])
            elif attr == "size":
                if main is None:
                    res["size"] = False
                else:
                    long = max(main["x1"] - main["x0"], main["y1"] - main["y0"]) + 1
                    info["long_side"] = long
                    band = "small" if long < SIZE_BANDS[0] else "medium" if long < SIZE_BANDS[1] else "large"
                    res["size"] = band == scene["size"]
            elif attr == "position":
                if main is None:
                    res["position"] = False
                else:
                    cell = _cell((main["x0"] + main["x1"] + 1) / 2, (main["y0"] + main["y1"] + 1) / 2)
                    info["cell"] = cell
                    res["position"] = cell == S.POSITION_CELLS[scene["position"]]
    else:
        m = a.word_mask()
        for attr in stated:
            if m is None:
                res[attr] = False
                continue
            if attr == "word":
                sc = a.word_scores(m)
                ranked = sorted(sc, key=lambda k: -sc[k])
                info["word_scores"] = {k: round(sc[k], 3) for k in ranked[:3]}
                best, second = ranked[0], ranked[1]
                res["word"] = best == scene["word"] and sc[best] >= WORD_IOU and sc[best] - sc[second] >= WORD_MARGIN
            elif attr == "color":
                n, d, dbg = a.color_of(m)
                info["color"] = (n, d, dbg)
                res["color"] = n == scene["color"] and d <= COLOR_MAX_DIST and d < dbg
            elif attr == "position":
                ys, xs = np.nonzero(m)
                row, _ = _cell(64, (ys.min() + ys.max() + 1) / 2)
                res["position"] = row == S.POSITION_CELLS[scene["position"]][0]
    if detail:
        res["_detail"] = info
    return res


def prompt_pass(results: dict) -> bool:
    """A prompt passes iff every checked attribute passes (keys starting with "_" are ignored)."""
    vals = [v for k, v in results.items() if not k.startswith("_")]
    return bool(vals) and all(vals)


def category_pass(results: dict, category: str | None = None) -> bool:
    """Same rule as prompt_pass for every category: all attributes the prompt states (plus "single" for a one-object
    prompt) must pass."""
    return prompt_pass(results)


def adherence(images: list[np.ndarray], prompts: list[dict]) -> dict:
    """Per-category and overall pass rates: {"per_category": {cat: (passed, total)}, "overall": (passed, total),
    "results": [...]}."""
    per: dict[str, list[int]] = {}
    results = []
    for im, p in zip(images, prompts):
        r = check(im, p["scene"])
        ok = category_pass(r, p["category"])
        results.append(r)
        pc = per.setdefault(p["category"], [0, 0])
        pc[0] += ok
        pc[1] += 1
    tot = [sum(v[0] for v in per.values()), sum(v[1] for v in per.values())]
    return {"per_category": {k: tuple(v) for k, v in per.items()}, "overall": tuple(tot), "results": results}


# ----------------------------------------------------------------------------------------------------------------
# Self-test helpers


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 1-1.5), per-channel color shift (+-15), JPEG (quality 35-60), pixel noise (sd 3)."""
    im = Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 1.5))))
    a = np.asarray(im, np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
    a = np.clip(a + rng.normal(0, 3, size=a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(rng.integers(35, 61)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def down_up(img: np.ndarray, f: int = 4) -> np.ndarray:
    """Box-downsample by ``f`` and bicubic-upsample back (detail lost like a coarse latent grid)."""
    n = img.shape[0]
    im = Image.fromarray(img).resize((n // f, n // f), Image.Resampling.BOX)
    return np.asarray(im.resize((n, n), Image.Resampling.BICUBIC))


def _stated_values(sc: dict) -> tuple:
    if sc["kind"] == "pair":  # "a circle and a square" is "a square and a circle"
        st = sc["stated"]
        o1 = tuple(sc.get(k) for k in ("shape", "color", "size") if k in st)
        o2 = tuple(sc.get(k + "2") for k in ("shape", "color", "size") if k in st or k + "2" in st)
        rel = tuple(sorted(S.pair_sides(sc).items())) if "relation" in st else ()
        return tuple(sorted([o1, o2])), rel
    return tuple(sc.get(k) for k in sc["stated"])


def _swap_attr(sc: dict, attr: str, rng: np.random.Generator) -> dict:
    """The scene with ``attr`` changed to another value. Old kinds: only that attribute stated. Pair scenes keep
    every stated attribute (a pair prompt stating one object's color alone can match the other object); a shape is
    changed to one neither object has."""
    d = dict(sc)
    base = attr.rstrip("2")
    choices = {"color": list(S.COLORS), "shape": list(S.SHAPES), "size": list(S.SIZES),
               "position": list(S.POSITIONS) if sc["kind"] != "word" else list(S.WORD_POSITIONS),
               "count": [1, 2, 3, 4], "word": list(S.WORDS), "relation": list(S.RELATIONS)}[base]
    avoid = {sc[attr]} | ({sc["shape"], sc["shape2"]} if sc["kind"] == "pair" and base == "shape" else set())
    others = [c for c in choices if c not in avoid]
    d[attr] = others[int(rng.integers(len(others)))]
    if sc["kind"] != "pair":
        d["stated"] = [attr]
    return d


def exchanges(sc: dict) -> dict[str, dict]:
    """Pair prompts with the two objects' attributes exchanged, which a faithful image must FAIL: "colors" (a red
    circle and a blue square -> a blue circle and a red square; when both colors are stated), "shapes" (when both
    shapes and something that tells the objects apart are stated: colors or a relation), "relation" (reversed:
    left <-> right, above <-> below)."""
    st = sc.get("stated") or []
    out = {}
    if sc["kind"] != "pair":
        return out
    if "color" in st and "color2" in st:
        out["colors"] = dict(sc, color=sc["color2"], color2=sc["color"])
    if "shape" in st and "shape2" in st and ("color" in st or "relation" in st):
        out["shapes"] = dict(sc, shape=sc["shape2"], shape2=sc["shape"])
    if "relation" in st:
        out["relation"] = dict(sc, relation={"left": "right", "right": "left", "above": "below",
                                             "below": "above"}[sc["relation"]])
    return out


def selftest(prompts: list[dict] | None = None, verbose: bool = True) -> dict:
    prompts = prompts or S.eval_prompts()
    cats = list(dict.fromkeys(p["category"] for p in prompts))
    clean = [S.render(p["scene"]) for p in prompts]
    rng = np.random.default_rng(1234)
    degraded = [degrade(im, rng) for im in clean]
    coarse = [down_up(im) for im in clean]
    # negative 1: the render of the next prompt of the same category whose stated values differ
    neg = []
    for i, p in enumerate(prompts):
        same = [j for j in range(len(prompts)) if prompts[j]["category"] == p["category"]]
        k = same.index(i)
        for step in range(1, len(same)):
            j = same[(k + step) % len(same)]
            if _stated_values(prompts[j]["scene"]) != _stated_values(p["scene"]):
                break
        neg.append(clean[j])
    # negative 2: pure backgrounds (the scene's own background, nothing drawn)
    bgs = [np.clip(np.rint(S.render_background(p["scene"]["background"])), 0, 255).astype(np.uint8) for p in prompts]
    table = {}
    for name, ims in (("clean", clean), ("degraded", degraded), ("4x down/up", coarse), ("other prompt", neg),
                      ("background only", bgs)):
        table[name] = adherence(ims, prompts)
    # negative 3: one stated attribute swapped, checked on the clean and degraded renders of the original
    swap: dict[str, list[int]] = {}
    exch: dict[str, list[int]] = {}
    for im_set, tag in ((clean, "clean"), (degraded, "degraded"), (coarse, "4x down/up")):
        srng = np.random.default_rng(99)
        for im, p in zip(im_set, prompts):
            for attr in p["scene"]["stated"]:
                r = check(im, _swap_attr(p["scene"], attr, srng))
                s = swap.setdefault(f"{attr} ({tag})", [0, 0])
                # pair prompts: the whole swapped prompt (the per-attribute result depends on the assignment)
                s[0] += bool(prompt_pass(r) if p["scene"]["kind"] == "pair" else r[attr])
                s[1] += 1
            for what, sc in exchanges(p["scene"]).items():
                e = exch.setdefault(f"{what} ({tag})", [0, 0])
                e[0] += prompt_pass(check(im, sc))
                e[1] += 1
    if verbose:
        w = max(len(c) for c in cats + ["overall"])
        print(f"{'pass rate':<{w}} " + " ".join(f"{n:>16}" for n in table))
        for c in cats + ["overall"]:
            cells = []
            for n in table:
                ps, t = table[n]["overall"] if c == "overall" else table[n]["per_category"][c]
                cells.append(f"{ps:>4}/{t:<4} {100 * ps / t:5.1f}%")
            print(f"{c:<{w}} " + " ".join(f"{x:>16}" for x in cells))
        print("\nfalse pass of a swapped attribute (original render checked against a prompt with that attribute "
              "changed):")
        for k in sorted(swap):
            ps, t = swap[k]
            print(f"  {k:<24} {ps:>4}/{t:<4} {100 * ps / t:5.1f}%")
        if exch:
            print("\nfalse pass of a pair prompt with the two objects' attributes exchanged:")
            for k in sorted(exch):
                ps, t = exch[k]
                print(f"  {k:<24} {ps:>4}/{t:<4} {100 * ps / t:5.1f}%")
    return {"table": {n: {"per_category": v["per_category"], "overall": v["overall"]} for n, v in table.items()},
            "swap": {k: tuple(v) for k, v in swap.items()}, "exchange": {k: tuple(v) for k, v in exch.items()}}


def check_dir(images: str, prompts_path: str, pattern: str = "{i:03d}.png", verbose: bool = False) -> dict:
    with open(prompts_path) as f:
        prompts = json.load(f)
    ims, ps, missing = [], [], 0
    for i, p in enumerate(prompts):
        path = os.path.join(images, pattern.format(i=i))
        if not os.path.exists(path):
            missing += 1
            continue
        ims.append(np.asarray(Image.open(path).convert("RGB")))
        ps.append(p)
    rep = adherence(ims, ps)
    cats = list(dict.fromkeys(p["category"] for p in ps))
    print(f"{len(ps)} images checked ({missing} missing) in {images} ({pattern})")
    for c in cats:
        a, t = rep["per_category"][c]
        print(f"  {c:<10} {a:>4}/{t:<4} {100 * a / t:5.1f}%")
    a, t = rep["overall"]
    if t:
        print(f"  {'overall':<10} {a:>4}/{t:<4} {100 * a / t:5.1f}%")
    if verbose:
        for p, r in zip(ps, rep["results"]):
            if not prompt_pass(r):
                print("   FAIL", p["category"], repr(p["prompt"]), {k: v for k, v in r.items() if not v})
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--images", help="folder of generated PNGs, one per prompt")
    ap.add_argument("--prompts", default=S.EVAL_PROMPTS_PATH)
    ap.add_argument("--pattern", default="{i:03d}.png", help="file name pattern, formatted with i=prompt index")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="list failing prompts")
    a = ap.parse_args(argv)
    if a.selftest:
        with open(a.prompts) as f:
            rep = selftest(json.load(f))
    elif a.images:
        rep = check_dir(a.images, a.prompts, a.pattern, a.verbose)
        rep = {"per_category": rep["per_category"], "overall": rep["overall"]}
    else:
        ap.print_help()
        return 2
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
