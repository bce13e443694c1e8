#!/usr/bin/env python3
"""Sampling settings (guidance, shift) for the nano model, tuned on a TUNING set of held-out prompts
(scenes.eval_prompts(seed=1): the same held-out combinations, other prompts/backgrounds than eval_prompts.json),
drawn by our Rust pipeline (examples/txt2img, release build) and scored by checker.py.

    python models/nano/sweep.py --guidance 3,5,7,9 --shift 1 [--n 60]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import checker  # noqa: E402
import scenes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--guidance", default="5")
    ap.add_argument("--shift", default="1")
    ap.add_argument("--steps", default="28")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--model", default=str(REPO / "models" / "sd3-nano"))
    a = ap.parse_args()
    prompts = scenes.eval_prompts(n=240, seed=1)
    eval_set = {p["prompt"] for p in json.loads((HERE / "eval_prompts.json").read_text())}
    prompts = [p for p in prompts if p["prompt"] not in eval_set][:: max(1, 240 // a.n)][: a.n]
    binary = os.environ.get("TXT2IMG", str(REPO / "target" / "release" / "examples" / "txt2img"))
    print(f"{len(prompts)} tuning prompts (none in eval_prompts.json)")
    print("| guidance | shift | steps | per category | overall |")
    for g in a.guidance.split(","):
        for s in a.shift.split(","):
            for st in a.steps.split(","):
                per = {}
                with tempfile.TemporaryDirectory() as tmp:
                    for i, p in enumerate(prompts):
                        out = Path(tmp) / f"{i}.png"
                        subprocess.run([binary, "--model", a.model, "--prompt", p["prompt"], "--steps", st,
                                        "--guidance", g, "--shift", s, "--seed", str(i), "--output", str(out)],
                                       check=True, capture_output=True)
                        ok = checker.prompt_pass(checker.check(np.asarray(Image.open(out).convert("RGB")), p["scene"]))
                        c = per.setdefault(p["category"], [0, 0])
                        c[0] += ok
                        c[1] += 1
                tot = sum(v[0] for v in per.values())
                cells = " | ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(per.items()))
                print(f"| {g} | {s} | {st} | {cells} | {tot}/{len(prompts)} |", flush=True)


if __name__ == "__main__":
    main()
