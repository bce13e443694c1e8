#!/usr/bin/env python3
"""README's grid: the first PER prompts of every category of eval_prompts.json (no picking), as drawn by our Rust
pipeline (models/nano/eval_rust.sh's images), each with its prompt and the checker's verdict.

    python models/nano/readme_grid.py target/nano-eval docs/images/nano_grid.png [--mode cfg] [--per 2]
"""
import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checker  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", default="cfg")
    ap.add_argument("--per", type=int, default=2)
    a = ap.parse_args()
    prompts = json.loads((HERE / "eval_prompts.json").read_text())
    picked = []
    for cat in ("color", "shape", "position", "count", "word"):
        picked += [i for i, p in enumerate(prompts) if p["category"] == cat][: a.per]
    cell_w, img, text_h = 160, 128, 46
    cols = 5
    rows = (len(picked) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * (img + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for k, i in enumerate(picked):
        im = Image.open(a.images / f"{i:03d}_{a.mode}.png").convert("RGB")
        ok = checker.prompt_pass(checker.check(np.asarray(im), prompts[i]["scene"]))
        x, y = (k % cols) * cell_w, (k // cols) * (img + text_h)
        sheet.paste(im, (x + (cell_w - img) // 2, y))
        label = f"[{'pass' if ok else 'fail'}] {prompts[i]['prompt']}"
        for j, line in enumerate(textwrap.wrap(label, 27)[:3]):
            draw.text((x + 4, y + img + 2 + 13 * j), line, fill=(0, 90, 0) if ok else (150, 0, 0), font=font)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out, optimize=True)
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
