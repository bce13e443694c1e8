#!/usr/bin/env python3
"""Judges the img2img and inpainting pictures that tests/nano_adherence.rs's `measure_edits` saves (EDIT_OUT=DIR)
with checker.py (colour, shape, exactly one object; not the place), and the distance from the input at least
8 px outside each mask box (mean over pixels and channels):

    EDIT_OUT=/tmp/nano-edit EDIT_SEEDS=8 cargo test --release --test nano_adherence measure_edits -- --ignored --nocapture
    .venv-nano/bin/python models/nano/check_edits.py /tmp/nano-edit [--seeds 8]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import checker

HERE = Path(__file__).resolve().parent
INPUTS = HERE.parent / "goldens" / "sd3-nano-edit"
# tests/nano_adherence.rs EDITS: (inpainting colour, shape; img2img colour) per edit case
EDITS = [("blue", "square", "blue"), ("red", "circle", "yellow"), ("purple", "circle", "blue"),
         ("orange", "square", "red")]
STRENGTHS = ["0.5", "0.6", "0.7", "0.8"]


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seeds", type=int, default=8)
    a = ap.parse_args()
    meta = json.loads((INPUTS / "edits.json").read_text())
    totals: dict[str, list[bool]] = {}
    for k, e in enumerate(meta["edits"]):
        sc = e["scene"]
        inp = load(INPUTS / e["file"])
        ic, ish, ec = EDITS[k]
        want = dict(sc, color=ic, shape=ish, stated=["color", "shape"])
        assert checker.prompt_pass(checker.check(inp, dict(sc, stated=["color", "shape"])))
        assert not checker.prompt_pass(checker.check(inp, want))
        x0, y0, x1, y1 = e["box"]
        keep = np.ones(inp.shape[:2], bool)
        keep[max(0, y0 - 8):y1 + 9, max(0, x0 - 8):x1 + 9] = False
        res, outside = [], []
        for s in range(a.seeds):
            out = load(a.dir / f"inpaint-{k}-{s}.png")
            res.append(checker.prompt_pass(checker.check(out, want)))
            outside.append(round(float(np.abs(out.astype(int) - inp.astype(int))[keep].mean()), 2))
        totals.setdefault("inpaint", []).extend(res)
        print(f"case {k} inpaint {ic} {ish}: {sum(res)}/{a.seeds}, outside the mask box {outside}")
        for st in STRENGTHS:
            want2 = dict(sc, color=ec, stated=["color", "shape"])
            r = [checker.prompt_pass(checker.check(load(a.dir / f"img2img-{k}-{st}-{s}.png"), want2))
                 for s in range(a.seeds)]
            totals.setdefault(f"img2img {st}", []).extend(r)
            print(f"case {k} img2img {ec} {sc['shape']} strength {st}: {sum(r)}/{a.seeds}")
    for name, v in totals.items():
        print(f"{name}: {sum(v)}/{len(v)}")


if __name__ == "__main__":
    main()
