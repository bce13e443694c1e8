#!/usr/bin/env python3
"""Renders of held-out pair prompts (issue 22) for the Rust pair checker's self-test (tests/nano_pair_checker.rs):

    .venv-tools/bin/python models/nano/pair_renders.py      # writes models/goldens/sd3-nano-pairs/

The first four prompts of each pair category of eval_prompts_v2.json (two objects, colour attribution, position),
each rendered clean (scenes.render), degraded (checker.degrade: blur, colour shift, JPEG, noise; seeded) and coarse
(checker.down_up: 4x box-down, bicubic-up, like a coarse latent grid), and
cases.json with, per prompt, the scene's stated attributes, the Python checker's verdict on the three images (all
pass), and negatives the clean images must fail: the two objects' colours exchanged, their shapes exchanged, the
relation reversed (checker.exchanges, where the prompt states what they need) and the second shape replaced by one
neither object has. The Python checker's verdicts on the negatives are recorded too (all fail). The Rust checker
must reach the same verdicts.
"""
import json
import pathlib
import sys

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checker as C  # noqa: E402
import scenes as S  # noqa: E402

OUT = HERE.parent / "goldens" / "sd3-nano-pairs"
CATEGORIES = ("two_objects", "color_attr", "position")
PER_CATEGORY = 4
KEYS = ("shape", "color", "shape2", "color2", "relation")


def main():
    prompts = json.loads((HERE / "eval_prompts_v2.json").read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(22)
    cases = []
    for cat in CATEGORIES:
        for i, p in enumerate([p for p in prompts if p["category"] == cat][:PER_CATEGORY]):
            sc = p["scene"]
            clean = S.render(sc)
            degraded = C.degrade(clean, rng)
            coarse = C.down_up(clean)
            files = {}
            for tag, img in (("clean", clean), ("degraded", degraded), ("coarse", coarse)):
                name = f"{cat}_{i}_{tag}.png"
                Image.fromarray(img).save(OUT / name, optimize=True)
                files[tag] = name
            negatives = dict(C.exchanges(sc))
            other = [s for s in S.SHAPES if s not in (sc["shape"], sc["shape2"])]
            negatives["other_shape"] = dict(sc, shape2=other[i % len(other)])
            case = {
                "category": cat,
                "prompt": p["prompt"],
                "stated": sc["stated"],
                "scene": {k: sc.get(k) for k in KEYS},
                "files": files,
                "python": {tag: C.prompt_pass(C.check(img, sc)) for tag, img in (("clean", clean),
                                                                                  ("degraded", degraded),
                                                                                  ("coarse", coarse))},
                "negatives": [{"what": k, "scene": {key: v.get(key) for key in KEYS},
                               "python_clean": C.prompt_pass(C.check(clean, v))} for k, v in negatives.items()],
            }
            assert all(case["python"].values()), case
            assert not any(n["python_clean"] for n in case["negatives"]), case
            cases.append(case)
            print(cat, i, p["prompt"], "negatives:", [n["what"] for n in case["negatives"]])
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
