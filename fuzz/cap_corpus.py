#!/usr/bin/env python3
"""Writes fuzz/corpus/TARGET from fuzz/corpus-work/TARGET within a byte budget (the committed test data has one).
A file counts as its size plus PER_FILE bytes (its directory entry; about what `du -sb` adds per file).

Usage: cap_corpus.py TARGET BUDGET_BYTES CONTROL_FILE

CONTROL_FILE is a libFuzzer merge control file for corpus-work/TARGET (cmin.sh makes it): it lists each input's
features. If the inputs fit the budget they are all kept; otherwise a deterministic greedy selection keeps, one by
one, the input with the most not-yet-covered features per byte counted
(ties: smaller, then by name) while it fits, until no input adds a feature. Prints what was kept and the share of features it covers.
"""

import heapq
import os
import shutil
import sys

FUZZ = os.path.dirname(os.path.abspath(__file__))
# What a file costs beyond its bytes (directory entry, git tree entry), so that many tiny files are not free.
PER_FILE = 72


def main():
    target, budget, control = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lines = open(control, encoding="utf-8", errors="replace").read().splitlines()
    n = int(lines[0])
    names = lines[2 : 2 + n]
    features = {}
    for line in lines[2 + n :]:
        parts = line.split()
        if parts and parts[0] == "FT":
            features[int(parts[1])] = set(map(int, parts[2:]))
    work = os.path.join(FUZZ, "corpus-work", target)
    files = []
    for i, path in enumerate(names):
        name = os.path.basename(path)
        if not os.path.isfile(os.path.join(work, name)):
            continue
        files.append((name, os.path.getsize(os.path.join(work, name)), features.get(i, set())))
    everything = set().union(*(f for _, _, f in files)) if files else set()
    total = sum(size + PER_FILE for _, size, _ in files)
    if total <= budget:
        kept = sorted(files)
    else:
        covered, kept, used = set(), [], 0
        # Lazy greedy: a gain can only shrink as more features are covered.
        heap = [(-len(f) / (size + PER_FILE), size, name, i) for i, (name, size, f) in enumerate(files) if f]
        heapq.heapify(heap)
        while heap:
            _, size, name, i = heapq.heappop(heap)
            gain = len(files[i][2] - covered)
            if gain == 0 or used + size + PER_FILE > budget:
                continue
            score = -gain / (size + PER_FILE)
            if heap and (score, size, name) > heap[0][:3]:
                heapq.heappush(heap, (score, size, name, i))
                continue
            kept.append(files[i])
            covered |= files[i][2]
            used += size + PER_FILE
    out = os.path.join(FUZZ, "corpus", target)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, _, _ in kept:
        shutil.copyfile(os.path.join(work, name), os.path.join(out, name))
    got = set().union(*(f for _, _, f in kept)) if kept else set()
    print(
        f"{target}: kept {len(kept)} of {len(files)} minimised inputs, {sum(s for _, s, _ in kept)} bytes "
        f"({sum(s + PER_FILE for _, s, _ in kept)} counted, of {total}), "
        f"{len(got)} of {len(everything)} features"
    )


if __name__ == "__main__":
    main()
