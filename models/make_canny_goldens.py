#!/usr/bin/env python3
"""Canny goldens for tests/canny.rs: OpenCV's `cv2.Canny(gray, low, high)` (defaults: apertureSize 3,
L2gradient False) on small test images, against which the crate's Rust Canny (src/controlnet/canny.rs) is compared.

    .venv-diffusers-cn/bin/python models/make_canny_goldens.py   # pins: models/requirements-controlnet.txt

Writes models/goldens/canny/<name>.png (8-bit grayscale input), <name>_<low>_<high>.png (cv2.Canny's edges) and
summary.json. The inputs: a fixture image of this repository (models/goldens/tiny-sd3/cfg_negative/diffusers.png
through cv2.cvtColor(RGB2GRAY), which the Rust side also reproduces), seeded smoothed noise, and drawn shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "goldens" / "canny"
THRESHOLDS = [(100, 200), (50, 150), (20, 60)]


def images() -> dict[str, np.ndarray]:
    rgb = np.asarray(Image.open(ROOT / "goldens" / "tiny-sd3" / "cfg_negative" / "diffusers.png").convert("RGB"))
    photo = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_NEAREST)
    out = {"fixture": cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)}
    rng = np.random.default_rng(21)
    noise = Image.fromarray((rng.random((96, 128)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2.5))
    arr = np.asarray(noise).astype(np.float32)
    arr = (arr - arr.min()) / (arr.max() - arr.min() + 1e-6) * 255
    out["noise"] = arr.astype(np.uint8)
    shapes = Image.new("L", (120, 100), 30)
    d = ImageDraw.Draw(shapes)
    d.rectangle([10, 10, 60, 50], fill=200)
    d.ellipse([50, 40, 110, 95], fill=120)
    d.polygon([(5, 95), (40, 60), (70, 98)], fill=240)
    d.line([0, 0, 119, 99], fill=90, width=3)
    out["shapes"] = np.asarray(shapes.filter(ImageFilter.GaussianBlur(1.0)))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"opencv": cv2.__version__, "call": "cv2.Canny(gray, low, high)", "cases": []}
    for name, gray in images().items():
        Image.fromarray(gray).save(OUT / f"{name}.png")
        for low, high in THRESHOLDS:
            edges = cv2.Canny(gray, low, high)
            Image.fromarray(edges).save(OUT / f"{name}_{low}_{high}.png")
            summary["cases"].append({"image": f"{name}.png", "low": low, "high": high,
                                     "edges": f"{name}_{low}_{high}.png",
                                     "edge_pixels": int((edges > 0).sum()), "pixels": int(edges.size)})
    # RGB -> gray as OpenCV does it, for the Rust rgb_to_gray check.
    rgb = np.asarray(Image.open(ROOT / "goldens" / "tiny-sd3" / "cfg_negative" / "diffusers.png").convert("RGB"))
    Image.fromarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)).save(OUT / "rgb_gray.png")
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["cases"], indent=0))


if __name__ == "__main__":
    main()
