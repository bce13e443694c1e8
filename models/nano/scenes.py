"""Synthetic captioned scenes for the nano SD3 model (issue 6).

Everything here is deterministic: all randomness comes from ``numpy.random.default_rng`` and rendering uses only
numpy and Pillow (built-in FreeType font from ``ImageFont.load_default(size=N)``, no system fonts). With the same
numpy / Pillow versions (models/requirements.txt) the same seed gives bit-identical images on any machine.

Scene kinds
  object  one shape with a color, a size (small / large) and a position (3x3 grid)
  count   N (1-4) shapes of one shape and one color at random non-overlapping places
  word    a short upper-case word in big letters in one color (center, top or bottom)

Held-out combinations (``HELDOUT``) never appear in a "train" scene (whatever the caption says); every single
color, shape, size, position, count and word does appear in training. ``sample_scene(rng, "heldout")`` always
contains at least one held-out combination; ``eval_prompts()`` builds the balanced evaluation set from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 190),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
# The "train3" split (training data of the fourth model run and later) also draws a medium size, so that every
# shape appears at two or more sizes in training even with one size x shape pair held out; evaluation prompts
# still state small or large only.
TRAIN3_SIZES: tuple[str, ...] = ("small", "medium", "large")
# 3x3 grid, row-major; the name is also the cell the checker expects the centroid in (thirds of the image)
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_CELLS = {p: (i // 3, i % 3) for i, p in enumerate(POSITIONS)}  # (row, col)
COUNTS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
COUNT_NAMES = {v: k for k, v in COUNTS.items()}
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "SKY", "BOX", "CUP", "KEY",
    "FISH", "BIRD", "TREE", "MOON", "BOAT", "FROG", "LAMP",
)
WORD_POSITIONS: tuple[str, ...] = ("center", "top", "bottom")

# muted background colors: every object color is >= ~90 (RGB euclidean) away from all of them and from any mix of two
BG_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (205, 190, 160),
    "sand": (180, 165, 125),
    "slate": (105, 120, 135),
    "sage": (135, 155, 125),
    "pink": (190, 150, 150),
    "blue gray": (160, 175, 190),
    "taupe": (145, 130, 115),
}
# background styles: solid color, two-color gradients, and a light low-frequency texture with pixel noise
BACKGROUNDS: tuple[str, ...] = ("solid", "vertical gradient", "horizontal gradient", "texture")

KINDS: tuple[str, ...] = ("object", "count", "word")
KIND_WEIGHTS = (0.45, 0.3, 0.25)
# The "train3c" split (fine-tuning data from run 10 on): train3's scenes with more count scenes, because counting the
# held-out count x shape pairs was what the run-8 model missed most (34/48 through our pipeline). Held-out
# combinations are redrawn, which rejects about half of the object scenes, 40% of the count scenes and 1/8 of the word
# scenes, so the weights are not the shares: train3 ends up about 36% object, 29% count and 35% word scenes, train3c
# about 33% object, 45% count and 22% word scenes (test_checker.py).
KIND_WEIGHTS_TRAIN3C = (0.4, 0.45, 0.15)
# Pair scenes (issue 22): two different shapes, each with its own color and size; the first object stands in
# RELATIONS[k] to the second (its bbox center clearly left of / right of / above / below the second's, boxes apart by
# a gap along that axis, the other axis' offset at most half of it), or anywhere ("and": relation None).
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
# sizes of pair objects (two large ones do not fit side by side at 128 px: never both large)
PAIR_SIZES: tuple[str, ...] = ("small", "medium", "large")
# The "train4" split (issue 22): train3's kinds plus pair scenes, the kind weights for KINDS4. Held-out combinations
# are redrawn, and about 4 in 5 pair scenes hit one (two objects, five pair families), so the shares of the kinds in
# the data are about 20% object, 23% count, 17% word and 40% pair scenes (test_checker.py asserts them).
KINDS4: tuple[str, ...] = ("object", "count", "word", "pair")
KIND_WEIGHTS_TRAIN4 = (0.1, 0.1, 0.05, 0.75)
# The "train5" split (issue 22, after run 16): train4, but of the pair draws SAME_SHAPE_SHARE_TRAIN5 are two objects of
# the same shape and different colours in a stated relation, captioned with both colours and the relation ("a red
# star to the left of a blue star"). Run 16 drew the held-out side x shape prompts in the wrong relation (3/50) while
# single-object scenes and "and" pairs show every shape on every side: it seems to learn which side a shape takes
# in a relation from the shapes. In these scenes only the word order tells the objects' sides. They keep every
# held-out rule (side x shape included: the shape on a held-out side never appears there), so the held-out
# prompts stay unseen.
SAME_SHAPE_SHARE_TRAIN5 = 0.3
# the splits sample_scene draws training scenes for (train.py --split)
TRAIN_SPLITS: tuple[str, ...] = ("train", "train3", "train3c", "train4", "train5")

# ----------------------------------------------------------------------------------------------------------------
# Held-out combinations (deterministic, a fixed rule over the vocabulary order)

_C = list(COLORS)
HELDOUT: dict[str, frozenset] = {
    # each color is held out with exactly one shape (shape index 2i+1 mod 5); each shape stays with >= 6 colors
    "color_shape": frozenset((c, SHAPES[(2 * i + 1) % 5]) for i, c in enumerate(_C)),
    # large stars and small triangles / small crosses are never seen (stars only small, triangles/crosses only large)
    "size_shape": frozenset({("large", "star"), ("small", "triangle"), ("small", "cross")}),
    # one shape per grid position (shape index 2j mod 5)
    "shape_position": frozenset((SHAPES[(2 * j) % 5], p) for j, p in enumerate(POSITIONS)),
    # counts 2-4 with some shapes
    "count_shape": frozenset({(2, "triangle"), (2, "star"), (3, "circle"), (3, "cross"), (4, "square")}),
    # each word is held out with one color (color index 3i mod 8)
    "word_color": frozenset((w, _C[(3 * i) % 8]) for i, w in enumerate(WORDS)),
    # pair scenes (issue 22), unordered pairs as sorted tuples. Colors: color i with color i+3 mod 8 (8 of the 28
    # pairs; each color in two of them, with five other partners left for training)
    "color_pair": frozenset(tuple(sorted((c, _C[(i + 3) % 8]))) for i, c in enumerate(_C)),
    # shapes: shape i with shape i+2 mod 5 for i = 0, 1, 2 (3 of the 10 pairs: circle+triangle, square+star,
    # triangle+cross; every shape keeps two or more partners)
    "shape_pair": frozenset(tuple(sorted((SHAPES[i], SHAPES[(i + 2) % 5]))) for i in range(3)),
    # relation x shape, by geometry (whatever the caption's word order): the object on that side of a stated
    # relation (the left one of a left/right pair, the upper one of an above/below pair, ...) is never that shape;
    # side k with shape 2k+1 mod 5
    "side_shape": frozenset((side, SHAPES[(2 * k + 1) % 5])
                            for k, side in enumerate(("left", "right", "top", "bottom"))),
}
# evaluation category -> held-out family and the attributes its prompts state (the checker checks exactly these)
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "color": ("color_shape", ("color", "shape")),
    "shape": ("size_shape", ("size", "shape", "color")),
    "position": ("shape_position", ("shape", "position", "color")),
    "count": ("count_shape", ("count", "shape", "color")),
    "word": ("word_color", ("word", "color")),
}
# The six GenEval-style categories of eval_prompts_v2.json (issue 22): category -> (held-out families cycled through,
# the attributes its prompts state). "single" (exactly one significant object) and "pair" (exactly two) are checked
# for every object and pair prompt without being stated.
CATEGORIES_V2: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "single_object": (("color_shape", "size_shape", "shape_position"), ("shape",)),
    "two_objects": (("shape_pair",), ("shape", "shape2")),
    "counting": (("count_shape",), ("count", "shape")),
    "colors": (("color_shape",), ("color", "shape")),
    "position": (("side_shape",), ("shape", "shape2", "relation")),
    "color_attr": (("color_pair",), ("shape", "color", "shape2", "color2")),
}


def pair_sides(d: dict) -> dict[str, str]:
    """{"left"/"right"/"top"/"bottom": shape} of a pair scene with a stated-able relation (empty for "and")."""
    rel = d.get("relation")
    if rel is None:
        return {}
    a, b = d["shape"], d["shape2"]
    if rel == "left":
        return {"left": a, "right": b}
    if rel == "right":
        return {"left": b, "right": a}
    if rel == "above":
        return {"top": a, "bottom": b}
    return {"top": b, "bottom": a}


def heldout_combos(scene: "Scene | dict") -> list[str]:
    """Names of the held-out families a scene falls into (empty list: allowed in training)."""
    d = scene.__dict__ if isinstance(scene, Scene) else scene
    out = []
    k = d["kind"]
    if k in ("object", "count") and (d["color"], d["shape"]) in HELDOUT["color_shape"]:
        out.append("color_shape")
    if k == "object":
        if (d["size"], d["shape"]) in HELDOUT["size_shape"]:
            out.append("size_shape")
        if (d["shape"], d["position"]) in HELDOUT["shape_position"]:
            out.append("shape_position")
    if k == "count" and (d["count"], d["shape"]) in HELDOUT["count_shape"]:
        out.append("count_shape")
    if k == "word" and (d["word"], d["color"]) in HELDOUT["word_color"]:
        out.append("word_color")
    if k == "pair":
        # each object on its own is held to the single-object rules (color x shape, size x shape)
        objs = ((d["color"], d["shape"], d["size"]), (d["color2"], d["shape2"], d["size2"]))
        if any((c, sh) in HELDOUT["color_shape"] for c, sh, _ in objs):
            out.append("color_shape")
        if any((sz, sh) in HELDOUT["size_shape"] for _, sh, sz in objs):
            out.append("size_shape")
        if tuple(sorted((d["color"], d["color2"]))) in HELDOUT["color_pair"]:
            out.append("color_pair")
        if tuple(sorted((d["shape"], d["shape2"]))) in HELDOUT["shape_pair"]:
            out.append("shape_pair")
        if any(x in HELDOUT["side_shape"] for x in pair_sides(d).items()):
            out.append("side_shape")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scene


@dataclasses.dataclass
class Scene:
    kind: str  # "object" | "count" | "word" | "pair"
    color: str
    background: dict  # {"style": one of BACKGROUNDS, "colors": [bg color name(s)], "seed": int}
    shape: str | None = None
    size: str | None = None  # object only
    position: str | None = None  # object (POSITIONS) and word (WORD_POSITIONS)
    count: int | None = None  # count only
    word: str | None = None  # word only
    # geometry, as fractions of the image side: object/count: [cx, cy, half_size] per item; word: [[cx, cy, font]]
    items: list = dataclasses.field(default_factory=list)
    # attributes the caption states (None: decided by caption()); eval prompts set it, the checker checks it
    stated: list | None = None
    # pair scenes only: the second object (items[1]) and the relation of the first to the second (None: "and")
    shape2: str | None = None
    color2: str | None = None
    size2: str | None = None
    relation: str | None = None

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _FIELDS}
        for f in _PAIR_FIELDS:  # absent unless set: the dicts of the older kinds (eval_prompts.json) stay as they were
            if d[f] is None:
                del d[f]
        d["background"] = dict(self.background, colors=list(self.background["colors"]))
        d["items"] = [list(it) for it in self.items]
        d["stated"] = None if self.stated is None else list(self.stated)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(**{f.name: d.get(f.name, None if f.name != "items" else []) for f in dataclasses.fields(cls)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_FIELDS = tuple(f.name for f in dataclasses.fields(Scene))
_PAIR_FIELDS = ("shape2", "color2", "size2", "relation")


# ----------------------------------------------------------------------------------------------------------------
# Geometry shared with the checker


def shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape filling the box [cx-s, cx+s] x [cy-s, cy+s] (None for circle/square: drawn as primitives)."""
    if shape == "triangle":
        return [(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        return [(cx - s + 2 * s * (x - x0) / (x1 - x0), cy - s + 2 * s * (y - y0) / (y1 - y0)) for x, y in pts]
    if shape == "cross":
        w = 0.36 * s
        return [
            (cx - w, cy - s), (cx + w, cy - s), (cx + w, cy - w), (cx + s, cy - w), (cx + s, cy + w), (cx + w, cy + w),
            (cx + w, cy + s), (cx - w, cy + s), (cx - w, cy + w), (cx - s, cy + w), (cx - s, cy - w), (cx - w, cy - w),
        ]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill=255) -> None:
    box = [cx - s, cy - s, cx + s, cy + s]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, s), fill=fill)


@functools.lru_cache(maxsize=256)
def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in (FreeType) font at ``px`` pixels; no system fonts."""
    return ImageFont.load_default(size=px)


def stroke_for(px: int) -> int:
    """Extra stroke (bold) used for words, as a function of the font size in pixels."""
    return max(1, round(px * 0.05))


@functools.lru_cache(maxsize=4096)
def text_ink_bbox(word: str, px: int) -> tuple[int, int, int, int]:
    """Ink bbox (x0, y0, x1, y1) of ``word`` drawn at origin with font size ``px`` (and the bold stroke)."""
    return font(px).getbbox(word, stroke_width=stroke_for(px))


def draw_word(draw: ImageDraw.ImageDraw, word: str, cx: float, cy: float, px: int, fill=255) -> None:
    x0, y0, x1, y1 = text_ink_bbox(word, px)
    ox = cx - (x0 + x1) / 2
    oy = cy - (y0 + y1) / 2
    draw.text((round(ox), round(oy)), word, font=font(px), fill=fill, stroke_width=stroke_for(px), stroke_fill=fill)


# ----------------------------------------------------------------------------------------------------------------
# Sampling

_SMALL = (0.085, 0.115)  # half-size as a fraction of the side: 2s = 22-29 px at 128
_LARGE = (0.2, 0.25)  # 2s = 51-64 px at 128
_MEDIUM = (0.14, 0.168)  # 2s = 36-43 px at 128 ("train3" only; the checker's medium band is 32.5-47.5 px)
_COUNT_S = (0.08, 0.11)  # 2s = 20-28 px
_MARGIN = 0.03
_WORD_FONT = (0.22, 0.36)  # font size as fraction of side: 28-46 px at 128 -> cap height ~20-33 px
_WORD_MAX_W = 0.92


def _sample_background(rng: np.random.Generator) -> dict:
    style = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    names = list(BG_COLORS)
    if "gradient" in style:
        i, j = rng.choice(len(names), size=2, replace=False)
        colors = [names[int(i)], names[int(j)]]
    else:
        colors = [names[int(rng.integers(len(names)))]]
    return {"style": style, "colors": colors, "seed": int(rng.integers(2**31))}


def _position_center(pos: str, s: float, rng: np.random.Generator) -> tuple[float, float]:
    row, col = POSITION_CELLS[pos]
    lo, hi = _MARGIN + s, 1 - _MARGIN - s
    centers = []
    for k in (col, row):
        if k == 0:
            c = min(1 / 6, 1 / 3 - 0.04) if s < 1 / 6 else lo
            c = max(c, lo)
        elif k == 2:
            c = max(5 / 6, 2 / 3 + 0.04) if s < 1 / 6 else hi
            c = min(c, hi)
        else:
            c = 0.5
        # jitter that keeps the centroid inside its third of the image (and the shape inside the frame)
        j = float(rng.uniform(-0.03, 0.03))
        c = c + j
        third_lo, third_hi = k / 3 + 0.02, (k + 1) / 3 - 0.02
        c = min(max(c, third_lo, lo), third_hi, hi)
        centers.append(c)
    return centers[0], centers[1]


def _place_count(n: int, rng: np.random.Generator) -> list[list[float]]:
    for _ in range(1000):
        items = []
        ok = True
        for _k in range(n):
            s = float(rng.uniform(*_COUNT_S))
            for _t in range(200):
                cx = float(rng.uniform(_MARGIN + s, 1 - _MARGIN - s))
                cy = float(rng.uniform(_MARGIN + s, 1 - _MARGIN - s))
                # boxes separated by a gap of >= 0.05 (6 px at 128) so components stay apart after blur
                if all(max(abs(cx - x) - s - t, abs(cy - y) - s - t) >= 0.05 for x, y, t in items):
                    items.append([cx, cy, s])
                    break
            else:
                ok = False
                break
        if ok:
            return items
    raise RuntimeError("could not place objects")


_PAIR_GAP = (0.06, 0.2)  # gap between the two boxes along the relation's axis: 8-26 px at 128


def _place_pair(s1: float, s2: float, relation: str | None, rng: np.random.Generator) -> list[list[float]]:
    """Centers of two boxes of half-sizes s1, s2: the first in ``relation`` to the second (boxes apart by a gap of
    8+ px along the axis, the offset along the other axis at most half the offset along it), or anywhere with a gap
    of 6+ px ("and", None)."""
    lo = lambda s: _MARGIN + s  # noqa: E731
    hi = lambda s: 1 - _MARGIN - s  # noqa: E731
    for _ in range(1000):
        if relation is None:
            c1 = [float(rng.uniform(lo(s1), hi(s1))), float(rng.uniform(lo(s1), hi(s1)))]
            c2 = [float(rng.uniform(lo(s2), hi(s2))), float(rng.uniform(lo(s2), hi(s2)))]
            if max(abs(c1[0] - c2[0]), abs(c1[1] - c2[1])) - s1 - s2 >= 0.05:
                return [[c1[0], c1[1], s1], [c2[0], c2[1], s2]]
            continue
        # along the axis: a = the object first along it (left / top), b = the other
        first_is_1 = relation in ("left", "above")
        sa, sb = (s1, s2) if first_is_1 else (s2, s1)
        room = 1 - 2 * _MARGIN - 2 * sa - 2 * sb
        if room < _PAIR_GAP[0]:
            raise ValueError("pair does not fit")
        gap = float(rng.uniform(_PAIR_GAP[0], min(_PAIR_GAP[1], room)))
        pa = float(rng.uniform(lo(sa), 1 - _MARGIN - 2 * sb - gap - sa))
        pb = pa + sa + gap + sb
        qa = float(rng.uniform(lo(sa), hi(sa)))
        qb = float(rng.uniform(lo(sb), hi(sb)))
        if abs(qa - qb) > 0.5 * (pb - pa):
            continue
        ca, cb = ([pa, qa], [pb, qb]) if relation in ("left", "right") else ([qa, pa], [qb, pb])
        c1, c2 = (ca, cb) if first_is_1 else (cb, ca)
        return [[c1[0], c1[1], s1], [c2[0], c2[1], s2]]
    raise RuntimeError("could not place the pair")


def _make_scene(rng: np.random.Generator, kind: str, **kw) -> Scene:
    sc = _make_scene_raw(rng, kind, **kw)
    sc.items = [[round(float(v), 4) for v in it] for it in sc.items]  # short, exact JSON
    return sc


_HALF = {"small": _SMALL, "medium": _MEDIUM, "large": _LARGE}
_NO_REL = "and"  # relation=_NO_REL asks _make_scene for a pair with no relation (None would draw one)


def _make_pair(rng: np.random.Generator, color=None, shape=None, size=None, color2=None, shape2=None, size2=None,
               relation=None) -> Scene:
    color = color or _C[int(rng.integers(len(_C)))]
    if color2 is None:
        others = [c for c in _C if c != color]
        color2 = others[int(rng.integers(len(others)))]
    bg = _sample_background(rng)
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    if shape2 is None:
        others = [x for x in SHAPES if x != shape]
        shape2 = others[int(rng.integers(len(others)))]
    if relation is None:  # 80% with a relation, 20% "and"
        k = int(rng.integers(5))
        relation = RELATIONS[k] if k < 4 else _NO_REL
    size = size or PAIR_SIZES[int(rng.integers(len(PAIR_SIZES)))]
    if size2 is None:
        opts = [x for x in PAIR_SIZES if not (x == "large" and size == "large")]
        size2 = opts[int(rng.integers(len(opts)))]
    s1 = float(rng.uniform(*_HALF[size]))
    s2 = float(rng.uniform(*_HALF[size2]))
    rel = None if relation == _NO_REL else relation
    items = _place_pair(s1, s2, rel, rng)
    return Scene("pair", color, bg, shape=shape, size=size, items=items, shape2=shape2, color2=color2, size2=size2,
                 relation=rel)


def _make_scene_raw(rng: np.random.Generator, kind: str, *, color=None, shape=None, size=None, position=None,
                    count=None, word=None, sizes: tuple[str, ...] = SIZES, **pair) -> Scene:
    if kind == "pair":
        return _make_pair(rng, color=color, shape=shape, size=size, **pair)
    color = color or _C[int(rng.integers(len(_C)))]
    bg = _sample_background(rng)
    if kind == "object":
        shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
        size = size or sizes[int(rng.integers(len(sizes)))]
        position = position or POSITIONS[int(rng.integers(len(POSITIONS)))]
        s = float(rng.uniform(*{"small": _SMALL, "medium": _MEDIUM, "large": _LARGE}[size]))
        cx, cy = _position_center(position, s, rng)
        return Scene("object", color, bg, shape=shape, size=size, position=position, items=[[cx, cy, s]])
    if kind == "count":
        shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
        count = count or int(rng.integers(1, 5))
        return Scene("count", color, bg, shape=shape, count=count, items=_place_count(count, rng))
    if kind == "word":
        word = word or WORDS[int(rng.integers(len(WORDS)))]
        position = position or WORD_POSITIONS[int(rng.integers(len(WORD_POSITIONS)))]
        f = float(rng.uniform(*_WORD_FONT))
        # shrink until the word fits (measured at 128 px, the training resolution)
        while True:
            px = max(8, round(f * 128))
            x0, y0, x1, y1 = text_ink_bbox(word, px)
            if (x1 - x0) <= _WORD_MAX_W * 128 or f < 0.1:
                break
            f *= 0.95
        w, h = (x1 - x0) / 128, (y1 - y0) / 128
        cx = 0.5 + float(rng.uniform(-1, 1)) * max(0.0, (1 - 2 * _MARGIN - w) / 2) * 0.5
        if position == "center":
            cy = 0.5 + float(rng.uniform(-0.03, 0.03))
        else:
            cy = _MARGIN + h / 2 + 0.02 + float(rng.uniform(0, 0.04))
            cy = min(cy, 1 / 3 - 0.02)  # keep the center in the top third
            cy = max(cy, _MARGIN + h / 2)
            if position == "bottom":
                cy = 1 - cy
        return Scene("word", color, bg, position=position, word=word, items=[[cx, cy, f]])
    raise ValueError(kind)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """One random scene. "train": never a held-out combination. "train3": the same with three object sizes
    (TRAIN3_SIZES). "train3c": train3 with the kind weights KIND_WEIGHTS_TRAIN3C (more count scenes). "train4":
    train3's kinds plus pair scenes (KIND_WEIGHTS_TRAIN4). "heldout": always at least one held-out combination of
    the five old families; "heldout2": a scene of one of the CATEGORIES_V2 (pairs included). "train5": train4 with
    same-shape relation pairs (SAME_SHAPE_SHARE_TRAIN5)."""
    if split in ("train4", "train5"):
        while True:
            kind = KINDS4[int(rng.choice(len(KINDS4), p=KIND_WEIGHTS_TRAIN4))]
            # (train4 draws no extra number here: its scenes stay those of runs 13-16)
            if split == "train5" and kind == "pair" and rng.random() < SAME_SHAPE_SHARE_TRAIN5:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
                sc = _make_scene(rng, "pair", shape=shape, shape2=shape, relation=rel)
                sc.stated = ["shape", "shape2", "color", "color2", "relation"]  # the colours tell the objects apart
            elif kind == "object":
                sc = _make_scene(rng, kind, sizes=TRAIN3_SIZES)
            else:
                sc = _make_scene(rng, kind)
            if not heldout_combos(sc):
                return sc
    if split in TRAIN_SPLITS:
        sizes = SIZES if split == "train" else TRAIN3_SIZES
        weights = KIND_WEIGHTS_TRAIN3C if split == "train3c" else KIND_WEIGHTS
        while True:
            kind = KINDS[int(rng.choice(len(KINDS), p=weights))]
            sc = _make_scene(rng, kind, sizes=sizes) if kind == "object" else _make_scene(rng, kind)
            if not heldout_combos(sc):
                return sc
    if split == "heldout":
        cat = list(CATEGORIES)[int(rng.integers(len(CATEGORIES)))]
        return _heldout_scene(rng, cat)
    if split == "heldout2":
        cat = list(CATEGORIES_V2)[int(rng.integers(len(CATEGORIES_V2)))]
        return heldout_scene_v2(rng, cat)
    raise ValueError(f"split must be one of {TRAIN_SPLITS + ('heldout', 'heldout2')}, got {split!r}")


def _heldout_scene(rng: np.random.Generator, category: str) -> Scene:
    fam, stated = CATEGORIES[category]
    combos = sorted(HELDOUT[fam])
    combo = combos[int(rng.integers(len(combos)))]
    if fam == "color_shape":
        sc = _make_scene(rng, "object", color=combo[0], shape=combo[1])
    elif fam == "size_shape":
        sc = _make_scene(rng, "object", size=combo[0], shape=combo[1])
    elif fam == "shape_position":
        sc = _make_scene(rng, "object", shape=combo[0], position=combo[1])
    elif fam == "count_shape":
        sc = _make_scene(rng, "count", count=combo[0], shape=combo[1])
    else:
        sc = _make_scene(rng, "word", word=combo[0], color=combo[1])
    sc.stated = list(stated)
    assert fam in heldout_combos(sc)
    return sc


def heldout_scene_v2(rng: np.random.Generator, category: str, k: int | None = None) -> Scene:
    """A scene of CATEGORIES_V2[category] built on a held-out combination (the k-th of the category's families'
    sorted combinations, cycled; random when k is None), ``stated`` set to what its prompts state."""
    fams, stated = CATEGORIES_V2[category]
    combos = [(f, c) for f in fams for c in sorted(HELDOUT[f])]
    fam, combo = combos[(int(rng.integers(len(combos))) if k is None else k) % len(combos)]
    for _ in range(1000):
        if fam == "color_shape":
            sc = _make_scene(rng, "object", color=combo[0], shape=combo[1])
        elif fam == "size_shape":
            sc = _make_scene(rng, "object", size=combo[0], shape=combo[1])
        elif fam == "shape_position":
            sc = _make_scene(rng, "object", shape=combo[0], position=combo[1])
        elif fam == "count_shape":
            sc = _make_scene(rng, "count", count=combo[0], shape=combo[1])
        elif fam == "shape_pair":
            a, b = combo if rng.random() < 0.5 else combo[::-1]
            sc = _make_scene(rng, "pair", shape=a, shape2=b, relation=_NO_REL)
        elif fam == "color_pair":
            a, b = combo if rng.random() < 0.5 else combo[::-1]
            sc = _make_scene(rng, "pair", color=a, color2=b, relation=_NO_REL)
        else:  # side_shape: that shape on that side of a stated relation, as the first or the second object
            side, shape = combo
            rel = {"left": ("left", "right"), "right": ("right", "left"), "top": ("above", "below"),
                   "bottom": ("below", "above")}[side]
            if rng.random() < 0.5:  # the first object is on `side`
                sc = _make_scene(rng, "pair", shape=shape, relation=rel[0])
            else:
                others = [x for x in SHAPES if x != shape]
                sc = _make_scene(rng, "pair", shape=others[int(rng.integers(4))], shape2=shape, relation=rel[1])
        if fam in heldout_combos(sc):
            break
    sc.stated = list(stated)
    assert fam in heldout_combos(sc), (fam, sc)
    return sc


# ----------------------------------------------------------------------------------------------------------------
# Captions

_POS_PHRASES = {
    "top left": ["in the top left corner", "at the top left", "in the upper left corner", "in the top left"],
    "top": ["at the top", "near the top", "at the top of the image", "in the top middle"],
    "top right": ["in the top right corner", "at the top right", "in the upper right corner", "in the top right"],
    "left": ["on the left", "on the left side", "at the left"],
    "center": ["in the center", "in the middle", "in the center of the image", "centered"],
    "right": ["on the right", "on the right side", "at the right"],
    "bottom left": ["in the bottom left corner", "at the bottom left", "in the lower left corner",
                    "in the bottom left"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the image", "in the bottom middle"],
    "bottom right": ["in the bottom right corner", "at the bottom right", "in the lower right corner",
                     "in the bottom right"],
}
_SHAPE_SYN = {"circle": ["circle", "circle", "disc"], "square": ["square"], "triangle": ["triangle"],
              "star": ["star"], "cross": ["cross", "cross", "plus sign"]}
_SHAPE_SYN_PL = {"circle": ["circles", "circles", "discs"], "square": ["squares"], "triangle": ["triangles"],
                 "star": ["stars"], "cross": ["crosses", "crosses", "plus signs"]}
_SIZE_SYN = {"small": ["small", "small", "little", "tiny"], "large": ["large", "large", "big", "huge"],
             "medium": ["medium", "medium", "medium-sized", "mid-sized"]}


def _pick(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(bg: dict, rng: np.random.Generator) -> str:
    st, cs = bg["style"], bg["colors"]
    if st == "solid":
        d = f"{cs[0]} background"
    elif st == "texture":
        d = f"textured {cs[0]} background"
    elif st == "vertical gradient":
        d = _pick(rng, [f"{cs[0]} to {cs[1]} gradient background", f"background fading from {cs[0]} to {cs[1]}"])
    else:
        d = _pick(rng, [f"{cs[0]} to {cs[1]} gradient", f"{cs[0]} to {cs[1]} gradient background"])
    if d.startswith("background"):
        return "on a " + d
    return _pick(rng, ["on " + _article(d) + " " + d, "against " + _article(d) + " " + d])


def _stated_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    if scene.stated is not None:
        return list(scene.stated)
    if scene.kind == "object":
        st = ["shape"] + [a for a, p in (("color", 0.85), ("size", 0.6), ("position", 0.7)) if rng.random() < p]
    elif scene.kind == "count":
        st = ["count", "shape"] + (["color"] if rng.random() < 0.85 else [])
    elif scene.kind == "pair":
        st = ["shape", "shape2"]
        both_colors = rng.random() < 0.85
        st += [a for a, p in (("color", 0.85), ("color2", 0.85)) if both_colors or rng.random() < 0.5]
        st += [a for a, p in (("size", 0.3), ("size2", 0.3)) if rng.random() < p]
        if scene.relation is not None and rng.random() < 0.9:
            st.append("relation")
    else:
        st = ["word"] + [a for a, p in (("color", 0.8), ("position", 0.3)) if rng.random() < p]
    return st


_REL_PHRASES = {
    "left": ["to the left of", "on the left of", "left of"],
    "right": ["to the right of", "on the right of", "right of"],
    "above": ["above", "over", "above"],
    "below": ["below", "under", "beneath"],
}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _pair_caption(scene: Scene, st: list[str], rng: np.random.Generator) -> str:
    def np_(shape, color, size, c_attr, s_attr):
        adjs = ([_pick(rng, _SIZE_SYN[size])] if s_attr in st else []) + ([color] if c_attr in st else [])
        p = " ".join(adjs + [_pick(rng, _SHAPE_SYN[shape])])
        return f"{_article(p)} {p}"

    a = np_(scene.shape, scene.color, scene.size, "color", "size")
    b = np_(scene.shape2, scene.color2, scene.size2, "color2", "size2")
    intro = _pick(rng, ["a picture of", "an image of", "a drawing of", "there is"])
    if "relation" in st:
        rel = scene.relation
        if rng.random() < 0.3:  # the same scene said the other way round: "b right of a"
            a, b, rel = b, a, _INVERSE[rel]
        t = int(rng.integers(3))
        core = f"{a} {_pick(rng, _REL_PHRASES[rel])} {b}"
        return [core, f"{intro} {core}", core][t]
    if rng.random() < 0.5:
        a, b = b, a
    t = int(rng.integers(4))
    return [f"{a} and {b}", f"{intro} {a} and {b}", f"{a} together with {b}", f"{a} and {b}"][t]


def caption(scene: Scene | dict, rng: np.random.Generator) -> str:
    """A plain-English caption from varied templates; states ``scene.stated`` when set, else a random subset
    (always the shape / count / word itself). Background mentioned about 35% of the time."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    st = _stated_for(scene, rng)
    bg = (" " + background_phrase(scene.background, rng)) if rng.random() < 0.35 else ""
    col = scene.color if "color" in st else None
    if scene.kind == "object":
        noun = _pick(rng, _SHAPE_SYN[scene.shape])
        adjs = []
        if "size" in st:
            adjs.append(_pick(rng, _SIZE_SYN[scene.size]))
        if col:
            adjs.append(col)
        np_ = " ".join(adjs + [noun])
        pos = (" " + _pick(rng, _POS_PHRASES[scene.position])) if "position" in st else ""
        t = int(rng.integers(5))
        if t == 0:
            s = f"{_article(np_)} {np_}{pos}"
        elif t == 1:
            s = f"{_pick(rng, ['a picture of', 'an image of', 'a drawing of'])} {_article(np_)} {np_}{pos}"
        elif t == 2:
            s = f"{np_}{pos}"
        elif t == 3 and pos:
            s = f"there is {_article(np_)} {np_}{pos}"
        else:
            s = f"{_article(np_)} {np_}{pos}"
    elif scene.kind == "pair":
        s = _pair_caption(scene, st, rng)
    elif scene.kind == "count":
        n = scene.count
        noun = _pick(rng, _SHAPE_SYN[scene.shape] if n == 1 else _SHAPE_SYN_PL[scene.shape])
        num = COUNT_NAMES[n] if (n > 1 or rng.random() < 0.6) else "a single"
        np_ = " ".join([num] + ([col] if col else []) + [noun])
        t = int(rng.integers(4))
        if t == 0:
            s = f"{np_}"
        elif t == 1:
            s = f"{_pick(rng, ['a picture of', 'an image with', 'a drawing of'])} {np_}"
        elif t == 2:
            s = f"{'there is' if n == 1 else 'there are'} {np_}"
        else:
            s = f"exactly {np_}"
    else:
        w = scene.word
        pos = (" " + _pick(rng, _POS_PHRASES[scene.position])) if "position" in st else ""
        if col:
            t = int(rng.integers(5))
            s = [f'the word "{w}" written in {col} letters{pos}',
                 f'{col} text that says "{w}"{pos}',
                 f'the word {w} in {col}{pos}',
                 f'"{w}" written in {col}{pos}',
                 f'a sign that says {w} in {col} letters{pos}'][t]
        else:
            t = int(rng.integers(4))
            s = [f'the word "{w}"{pos}', f'a sign that says {w}{pos}', f'text that says "{w}"{pos}',
                 f'"{w}" written in big letters{pos}'][t]
    s = " ".join(s.split())
    if bg and len(s.split()) + len(bg.split()) <= 20:  # captions stay <= 20 words
        s += bg
    return s


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def render_background(bg: dict, size: int = 128) -> np.ndarray:
    """float32 [size, size, 3] background in 0..255."""
    st = bg["style"]
    c0 = np.array(BG_COLORS[bg["colors"][0]], np.float32)
    if st == "solid":
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    if "gradient" in st:
        c1 = np.array(BG_COLORS[bg["colors"][1]], np.float32)
        t = (np.arange(size, dtype=np.float32) + 0.5) / size
        ramp = c0[None, :] * (1 - t[:, None]) + c1[None, :] * t[:, None]  # [size, 3]
        if st == "vertical gradient":
            return np.broadcast_to(ramp[:, None, :], (size, size, 3)).astype(np.float32)
        return np.broadcast_to(ramp[None, :, :], (size, size, 3)).astype(np.float32)
    # texture: low-frequency luminance blotches (+-~12) plus fine pixel noise, from the scene's own seed
    rng = np.random.default_rng(bg["seed"])
    low = rng.normal(0.0, 7.0, size=(6, 6)).astype(np.float32)
    up = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    fine = rng.normal(0.0, 3.0, size=(size, size)).astype(np.float32)
    return c0[None, None, :] + (up + fine)[:, :, None]


def render_mask(scene: Scene | dict, size: int = 128, obj: int = 0) -> np.ndarray:
    """float32 [size, size] coverage (0..1) of the scene's foreground, drawn at 2x and box-downsampled (pair
    scenes: of object ``obj``, 0 or 1)."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    S = 2 * size
    m = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(m)
    if scene.kind in ("object", "count"):
        for cx, cy, s in scene.items:
            draw_shape(d, scene.shape, cx * S, cy * S, s * S)
    elif scene.kind == "pair":
        cx, cy, s = scene.items[obj]
        draw_shape(d, scene.shape if obj == 0 else scene.shape2, cx * S, cy * S, s * S)
    else:
        cx, cy, f = scene.items[0]
        draw_word(d, scene.word, cx * S, cy * S, max(8, round(f * S)))
    m = m.reduce(2)
    return np.asarray(m, np.float32) * (1.0 / 255.0)


def render(scene: Scene | dict, size: int = 128) -> np.ndarray:
    """uint8 [size, size, 3] image of the scene (deterministic)."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    bg = render_background(scene.background, size)
    a = render_mask(scene, size)[:, :, None]
    col = np.array(COLORS[scene.color], np.float32)
    out = bg * (1.0 - a) + col * a
    if scene.kind == "pair":  # the second object over the first (they never overlap)
        a = render_mask(scene, size, 1)[:, :, None]
        out = out * (1.0 - a) + np.array(COLORS[scene.color2], np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Datasets

CHUNK = 512
_SPLIT_ID = {"train": 0, "heldout": 1, "train3": 2, "train3c": 3, "train4": 4, "heldout2": 5, "train5": 6}


def _chunk_rng(seed: int, split: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_ID[split], int(chunk)])


def _chunk_scenes(seed: int, split: str, chunk: int, n: int):
    """The (scene, caption) pairs of one chunk; rendering draws no random numbers, so captions need no images."""
    rng = _chunk_rng(seed, split, chunk)
    for _ in range(n):
        sc = sample_scene(rng, split)
        yield sc, caption(sc, rng)


def _gen_chunk(args) -> tuple[int, np.ndarray, list[str], list[dict]]:
    seed, split, chunk, n, size = args
    imgs = np.empty((n, size, size, 3), np.uint8)
    caps, scenes = [], []
    for i, (sc, cap) in enumerate(_chunk_scenes(seed, split, chunk, n)):
        caps.append(cap)
        imgs[i] = render(sc, size)
        scenes.append(sc.to_dict())
    return chunk, imgs, caps, scenes


def make_captions(n: int, seed: int, split: str = "train") -> list[str]:
    """The captions ``make_dataset(n, seed, split)`` gives, without rendering."""
    if split not in _SPLIT_ID:
        raise ValueError(split)
    return [cap for c in range((n + CHUNK - 1) // CHUNK)
            for _, cap in _chunk_scenes(seed, split, c, min(CHUNK, n - c * CHUNK))]


def make_dataset(n: int, seed: int, split: str = "train", workers: int | None = None, size: int = 128
                 ) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` images uint8 [n, size, size, 3], their captions and scene dicts.

    Chunks of ``CHUNK`` scenes, each with its own generator seeded by (seed, split, chunk index), so the output is
    identical for any ``workers`` (default: all CPUs; 1 = no subprocesses)."""
    if split not in _SPLIT_ID:
        raise ValueError(split)
    jobs = [(seed, split, c, min(CHUNK, n - c * CHUNK), size) for c in range((n + CHUNK - 1) // CHUNK)]
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = [""] * n
    scenes: list[dict] = [{}] * n

    def put(res):
        c, im, cp, sc = res
        images[c * CHUNK:c * CHUNK + len(im)] = im
        captions[c * CHUNK:c * CHUNK + len(im)] = cp
        scenes[c * CHUNK:c * CHUNK + len(im)] = sc

    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            put(_gen_chunk(j))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for res in pool.imap_unordered(_gen_chunk, jobs):
                put(res)
    return images, captions, scenes


# ----------------------------------------------------------------------------------------------------------------
# Evaluation prompts

EVAL_PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompts.json")


def eval_prompts(n: int = 240, seed: int = 0) -> list[dict]:
    """``n`` held-out prompts balanced over CATEGORIES (n // 5 each, round robin), each
    {"prompt", "category", "scene"}; scene["stated"] lists the attributes the prompt states (and the checker checks).
    Within a category the held-out combinations are cycled so every one is covered."""
    cats = list(CATEGORIES)
    out = []
    per_cat = {c: 0 for c in cats}
    rng = np.random.default_rng([int(seed), 6, 6])
    for i in range(n):
        cat = cats[i % len(cats)]
        fam, stated = CATEGORIES[cat]
        combos = sorted(HELDOUT[fam])
        combo = combos[per_cat[cat] % len(combos)]
        per_cat[cat] += 1
        if fam == "color_shape":
            sc = _make_scene(rng, "object", color=combo[0], shape=combo[1])
        elif fam == "size_shape":
            sc = _make_scene(rng, "object", size=combo[0], shape=combo[1])
        elif fam == "shape_position":
            sc = _make_scene(rng, "object", shape=combo[0], position=combo[1])
        elif fam == "count_shape":
            sc = _make_scene(rng, "count", count=combo[0], shape=combo[1])
        else:
            sc = _make_scene(rng, "word", word=combo[0], color=combo[1])
        sc.stated = list(stated)
        out.append({"prompt": caption(sc, rng), "category": cat, "scene": sc.to_dict()})
    return out


EVAL_PROMPTS_V2_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_prompts_v2.json")


def eval_prompts_v2(per_category: int = 50, seed: int = 0) -> list[dict]:
    """The held-out prompts of the six GenEval-style categories (CATEGORIES_V2), ``per_category`` each, round robin
    over the categories, cycling within a category through its families' held-out combinations. Each is
    {"prompt", "category", "scene"} with scene["stated"] set (the checker checks exactly that, plus "single" /
    "pair"). A generator of its own (seed, 22, 6), so eval_prompts() is unchanged."""
    cats = list(CATEGORIES_V2)
    rng = np.random.default_rng([int(seed), 22, 6])
    out = []
    for i in range(per_category * len(cats)):
        cat = cats[i % len(cats)]
        sc = heldout_scene_v2(rng, cat, i // len(cats))
        out.append({"prompt": caption(sc, rng), "category": cat, "scene": sc.to_dict()})
    return out


def write_eval_prompts_v2(path: str = EVAL_PROMPTS_V2_PATH, per_category: int = 50, seed: int = 0) -> None:
    ps = eval_prompts_v2(per_category, seed)
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(p, sort_keys=True) for p in ps) + "\n]\n")


def write_eval_prompts(path: str = EVAL_PROMPTS_PATH, n: int = 240, seed: int = 0) -> None:
    ps = eval_prompts(n, seed)
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(p, sort_keys=True) for p in ps) + "\n]\n")


def contact_sheet(path: str, n: int = 32, seed: int = 1, cols: int = 8, split: str = "train") -> None:
    """Grid of training images with their captions below (for the README)."""
    imgs, caps, _ = make_dataset(n, seed, split, workers=1)
    cell_w, cell_h, pad = 128, 128 + 50, 4
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    f = font(11)
    for i in range(n):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (cell_h + pad)
        sheet.paste(Image.fromarray(imgs[i]), (x, y))
        # wrap the caption to the cell width
        words, lines, cur = caps[i].split(), [], ""
        for w in words:
            t = (cur + " " + w).strip()
            if f.getlength(t) > cell_w and cur:
                lines.append(cur)
                cur = w
            else:
                cur = t
        lines.append(cur)
        for k, ln in enumerate(lines[:4]):
            d.text((x, y + 130 + 12 * k), ln, font=f, fill=(0, 0, 0))
    # 128-color palette (dithered) keeps the PNG small (< 150 KB); the dataset itself is full RGB
    q = sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    q.save(path, optimize=True)


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-eval", action="store_true", help="write models/nano/eval_prompts.json")
    ap.add_argument("--write-eval-v2", action="store_true", help="write models/nano/eval_prompts_v2.json")
    ap.add_argument("--sheet", help="write a contact sheet of train images to this PNG")
    ap.add_argument("--bench", type=int, default=0, help="time make_dataset(N)")
    ap.add_argument("--split", default="train", help="the split of --sheet and --bench")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    if a.write_eval:
        write_eval_prompts()
        print("wrote", EVAL_PROMPTS_PATH)
    if a.write_eval_v2:
        write_eval_prompts_v2()
        print("wrote", EVAL_PROMPTS_V2_PATH)
    if a.sheet:
        contact_sheet(a.sheet, split=a.split)
        print("wrote", a.sheet)
    if a.bench:
        t = time.perf_counter()
        im, cp, sc = make_dataset(a.bench, 0, a.split, workers=a.workers)
        dt = time.perf_counter() - t
        print(f"{a.bench} images in {dt:.2f} s ({a.bench / dt:.0f} img/s, workers={a.workers or os.cpu_count()})")
