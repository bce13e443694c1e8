#!/usr/bin/env python3
"""The CLIP and T5 token ids of the nano model's training captions (scenes.make_captions for the given seeds and
sizes, plus the empty caption that caption dropout trains), for export_nano.py's embedding-table pruning. Checks
that every prompt of eval_prompts.json (with --check-v2 also eval_prompts_v2.json) is made of these ids only
(exits 1 otherwise).

    python models/nano/token_ids.py --runs 0:200000 1:200000 2:200000 --clip OUT/clip.json --t5 OUT/t5.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenes  # noqa: E402
from train import load_tokenizers, tokenize  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="SEED:N[:SPLIT] of each training call's --seed, --n-train and --split (default train)")
    ap.add_argument("--t5-len", type=int, default=77)
    ap.add_argument("--tokenizers-from", type=Path, default=HERE.parent / "fixtures" / "tiny-sd35")
    ap.add_argument("--clip", type=Path, required=True)
    ap.add_argument("--t5", type=Path, required=True)
    ap.add_argument("--check-v2", action="store_true",
                    help="also check eval_prompts_v2.json's prompts (issue 22: runs on the train4 split)")
    a = ap.parse_args()
    caps = {""}
    for r in a.runs:
        parts = r.split(":")
        seed, n = int(parts[0]), int(parts[1])
        caps.update(scenes.make_captions(n, seed, parts[2] if len(parts) > 2 else "train"))
    toks = load_tokenizers(a.tokenizers_from)
    ids_l, ids_g, ids_t = tokenize(toks, sorted(caps), a.t5_len)
    clip = sorted(set(ids_l.unique().tolist()) | set(ids_g.unique().tolist()))
    t5 = sorted(set(ids_t.unique().tolist()))
    files = ["eval_prompts.json"] + (["eval_prompts_v2.json"] if a.check_v2 else [])
    prompts = [p["prompt"] for f in files for p in json.loads((HERE / f).read_text())]
    el, eg, et = tokenize(toks, prompts, a.t5_len)
    missing_clip = (set(el.unique().tolist()) | set(eg.unique().tolist())) - set(clip)
    missing_t5 = set(et.unique().tolist()) - set(t5)
    a.clip.write_text(json.dumps(clip) + "\n")
    a.t5.write_text(json.dumps(t5) + "\n")
    print(f"{len(caps)} distinct captions: {len(clip)} CLIP ids, {len(t5)} T5 ids; eval prompts' ids missing: "
          f"CLIP {sorted(missing_clip)}, T5 {sorted(missing_t5)}")
    sys.exit(1 if missing_clip or missing_t5 else 0)


if __name__ == "__main__":
    main()
