#!/usr/bin/env python3
"""Which goldens changed between two copies of models/goldens, and by how much.

    python models/golden_diff.py BEFORE_DIR AFTER_DIR [--json OUT.json]

Per file: `same` (byte-identical), `added`, `removed`, or `changed` with a measure of the change:
  .png   max / mean absolute difference over the 8-bit channels (or a size change)
  .npy   max absolute difference and the largest relative one (max |a-b| / max |a|), or a shape change
  .json  (also .json.gz) the numeric leaves that differ (count, largest absolute difference) and the paths of
         non-numeric leaves that differ (first few)
Needs numpy and Pillow only, so any of the golden environments runs it. Exit status 0 whatever changed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load_json(p: Path):
    raw = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
    return json.loads(raw)


def json_leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from json_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from json_leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def compare(a: Path, b: Path) -> str:
    name = b.name
    if name.endswith(".png"):
        x = np.asarray(Image.open(a).convert("RGB")).astype(np.int16)
        y = np.asarray(Image.open(b).convert("RGB")).astype(np.int16)
        if x.shape != y.shape:
            return f"size {x.shape[1]}x{x.shape[0]} -> {y.shape[1]}x{y.shape[0]}"
        d = np.abs(x - y)
        return f"max {int(d.max())} levels, mean {d.mean():.4f}, {np.count_nonzero(d)} of {d.size} channel values"
    if name.endswith(".npy"):
        x, y = np.load(a), np.load(b)
        if x.shape != y.shape:
            return f"shape {list(x.shape)} -> {list(y.shape)}"
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        scale = float(np.abs(x).max()) or 1.0
        return f"max abs {d.max():.3g} (relative {d.max() / scale:.3g}), {np.count_nonzero(d)} of {d.size} values"
    if name.endswith(".json") or name.endswith(".json.gz"):
        la, lb = dict(json_leaves(load_json(a))), dict(json_leaves(load_json(b)))
        num, other, worst = 0, [], 0.0
        for k in sorted(set(la) | set(lb)):
            va, vb = la.get(k, "<absent>"), lb.get(k, "<absent>")
            if va == vb:
                continue
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                num += 1
                worst = max(worst, abs(float(va) - float(vb)))
            else:
                other.append(k)
        parts = []
        if num:
            parts.append(f"{num} numbers differ (max abs {worst:.3g})")
        if other:
            parts.append(f"{len(other)} other values differ: {', '.join(other[:4])}{' ...' if len(other) > 4 else ''}")
        return "; ".join(parts) or "same values, different bytes (formatting)"
    return "bytes differ"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--json", type=Path, help="also write the report as JSON")
    a = ap.parse_args()
    files_a = {p.relative_to(a.before).as_posix() for p in a.before.rglob("*") if p.is_file()}
    files_b = {p.relative_to(a.after).as_posix() for p in a.after.rglob("*") if p.is_file()}
    report = {}
    for rel in sorted(files_a | files_b):
        if rel not in files_b:
            report[rel] = "removed"
        elif rel not in files_a:
            report[rel] = "added"
        elif (a.before / rel).read_bytes() == (a.after / rel).read_bytes():
            report[rel] = "same"
        else:
            report[rel] = "changed: " + compare(a.before / rel, a.after / rel)
    same = sum(v == "same" for v in report.values())
    for rel, v in report.items():
        if v != "same":
            print(f"{rel}: {v}")
    print(f"{len(report)} files: {same} unchanged, {len(report) - same} changed/added/removed")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
