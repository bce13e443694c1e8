#!/usr/bin/env python3
"""Input pictures for img2img and inpainting on the nano model (issue 22), rendered by scenes.py (deterministic:
numpy's default_rng and Pillow, the pins of models/requirements.txt), into models/goldens/sd3-nano-edit/:

- `heldout_NN.png` (8): held-out scenes (`sample_scene(rng, "heldout")`, seed 2222), for the VAE round trip
  (encoder + committed decoder) in tests/nano_edit.rs;
- `edit_NN.png` + `edit_NN_mask.png` + the scene in `edits.json` (4): one large shape on a solid background; the
  mask is white over the shape's bounding box grown by 6 px (what inpainting repaints), black elsewhere.

    .venv-nano/bin/python models/nano/edit_inputs.py [--out models/goldens/sd3-nano-edit]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import scenes

HERE = Path(__file__).resolve().parent
# (color, shape, position): shapes the inpainting prompts replace; training combinations, solid backgrounds
EDITS = [("red", "circle", "center"), ("green", "square", "left"), ("yellow", "triangle", "right"),
         ("blue", "star", "top")]
GROW = 6


def edit_scene(k: int, color: str, shape: str, position: str) -> scenes.Scene:
    rng = np.random.default_rng(1000 + k)
    while True:
        sc = scenes._make_scene(rng, "object", color=color, shape=shape, size="large", position=position)
        if sc.background["style"] == "solid":
            return sc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent / "goldens" / "sd3-nano-edit")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2222)
    held = []
    for i in range(8):
        sc = scenes.sample_scene(rng, "heldout")
        Image.fromarray(scenes.render(sc)).save(a.out / f"heldout_{i:02d}.png", optimize=True)
        held.append(sc.to_dict())
    edits = []
    for k, (color, shape, position) in enumerate(EDITS):
        sc = edit_scene(k, color, shape, position)
        Image.fromarray(scenes.render(sc)).save(a.out / f"edit_{k:02d}.png", optimize=True)
        ys, xs = np.nonzero(scenes.render_mask(sc) > 0.5)
        box = [max(0, int(xs.min()) - GROW), max(0, int(ys.min()) - GROW), min(127, int(xs.max()) + GROW),
               min(127, int(ys.max()) + GROW)]
        mask = np.zeros((128, 128), np.uint8)
        mask[box[1]:box[3] + 1, box[0]:box[2] + 1] = 255
        Image.fromarray(mask).save(a.out / f"edit_{k:02d}_mask.png", optimize=True)
        edits.append(dict(file=f"edit_{k:02d}.png", mask=f"edit_{k:02d}_mask.png", box=box, scene=sc.to_dict()))
    (a.out / "edits.json").write_text(json.dumps(dict(heldout=held, edits=edits), indent=1) + "\n")
    print(f"{a.out}: 8 held-out scenes, {len(edits)} edit scenes")


if __name__ == "__main__":
    main()
