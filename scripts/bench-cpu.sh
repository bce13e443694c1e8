#!/usr/bin/env bash
# CPU benchmark: sd3-onnx (cargo bench --bench pipeline) against optimum's ORTStableDiffusion3Pipeline
# (scripts/bench_optimum.py) on the committed tiny fixtures: same graphs, same requests, same initial latents.
#
# Usage: [PYTHON=path/to/python] [SD3_BENCH_RUNS=N] [SD3_BENCH_ROUNDS=N] [SD3_BENCH_THREADS=N] bash scripts/bench-cpu.sh
#   PYTHON defaults to .venv-tools/bin/python, which `bash models/setup-python.sh` creates (it needs optimum-onnx,
#   diffusers, torch and onnxruntime, as pinned in models/requirements.txt).
#   SD3_BENCH_RUNS: timed generations per case and side in all (default 100), split over
#   SD3_BENCH_ROUNDS rounds (default 4) that alternate Rust and Python, so that a change in background load
#   hits both sides alike. Every round loads the fixtures again and warms up (SD3_BENCH_WARMUP, default 5).
#   SD3_BENCH_THREADS: ONNX Runtime intra-op threads for both sides (default: ONNX Runtime's default).
#   SD3_BENCH_FIXTURES / SD3_BENCH_CASES: comma lists (default tiny-sd3,tiny-sd35 / cfg_negative,guidance_1).
#   SD3_BENCH_OUT: where the JSON results, logs and first images go (default target/bench-cpu).
# Prints the machine, the ONNX Runtime version and thread settings, how busy the machine was with other work,
# each side's table and a combined table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage="usage: [PYTHON=path/to/python] bash scripts/bench-cpu.sh  (PYTHON defaults to .venv-tools/bin/python: create it with \`bash models/setup-python.sh\`)"
case "${1:-}" in -h | --help) echo "$usage"; exit 0 ;; esac
PYTHON="${PYTHON:-.venv-tools/bin/python}"
if ! [ -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: no Python at $PYTHON" >&2
  echo "$usage" >&2
  exit 1
fi
runs="${SD3_BENCH_RUNS:-100}"
rounds="${SD3_BENCH_ROUNDS:-4}"
warmup="${SD3_BENCH_WARMUP:-5}"
per_round=$(((runs + rounds - 1) / rounds))
out="${SD3_BENCH_OUT:-target/bench-cpu}"
mkdir -p "$out"
rm -rf "$out"/rust-* "$out"/optimum-*

# CPU time of the whole machine (/proc/stat) against this script's children (bash `times`) tells how much
# other processes ran during the benchmark: on a shared machine that is the main source of noise.
stat_before="$(head -n 1 /proc/stat)"
bash scripts/setup-ort.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so}"
cargo bench --bench pipeline --no-run

# Runs one side, its log in $1; on failure shows the end of the log.
logged() {
  local log="$1"
  shift
  "$@" >"$log" 2>&1 || {
    tail -n 40 "$log" >&2
    echo "error: $* failed (log: $log)" >&2
    exit 1
  }
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: sd3-onnx (cargo bench --bench pipeline), $per_round runs per case"
  logged "$out/rust-$r.log" cargo bench --bench pipeline -- --runs "$per_round" --warmup "$warmup" \
    --save-json "$out/rust-$r.json" --save-images "$out/rust-images-$r"
  echo "round $r/$rounds: optimum (scripts/bench_optimum.py), $per_round runs per case"
  logged "$out/optimum-$r.log" "$PYTHON" scripts/bench_optimum.py --runs "$per_round" --warmup "$warmup" \
    --save-json "$out/optimum-$r.json" --save-images "$out/optimum-images-$r"
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
stat_after="$(head -n 1 /proc/stat)"
times >"$out/times.txt" # in this shell: a subshell would not see the children's CPU time
children_cpu="$(tail -n 1 "$out/times.txt")"
echo "(per-round tables and image checks: $out/rust-*.log, $out/optimum-*.log)"
echo

"$PYTHON" - "$out" "$rounds" "$load_before" "$load_after" "$stat_before" "$stat_after" "$children_cpu" \
  "$(getconf CLK_TCK)" <<'PY'
import datetime
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
load_before, load_after = sys.argv[3], sys.argv[4]


def jiffies(line):
    v = [int(x) for x in line.split()[1:9]]  # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v)


def seconds(text):  # bash `times`: "1m2.345s 0m0.100s"
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", text))


(busy0, all0), (busy1, all1) = jiffies(sys.argv[5]), jiffies(sys.argv[6])
tck = float(sys.argv[8])
machine_busy, machine_all = (busy1 - busy0) / tck, (all1 - all0) / tck
ours_cpu = seconds(sys.argv[7])
others_cpu = max(0.0, machine_busy - ours_cpu)

SERIES = ("total_ms", "onnx_ms", "outside_ms", "text_encoding_ms", "denoising_ms", "vae_ms")


def merge(side):
    """Results of all rounds of one side: (fixture, case) -> first round's record with all samples merged."""
    docs = [json.loads((out / f"{side}-{r}.json").read_text()) for r in range(1, rounds + 1)]
    merged, loads = {}, {}
    for doc in docs:
        for f, ms in doc["loads_ms"].items():
            loads.setdefault(f, []).append(ms)
        for rec in doc["results"]:
            key = (rec["fixture"], rec["case"])
            m = merged.setdefault(key, dict(rec, **{k: [] for k in SERIES}))
            for k in SERIES:
                m[k] += rec[k]["samples"]
    for m in merged.values():
        m["share"] = [o / t for o, t in zip(m["outside_ms"], m["total_ms"])]
    return docs[0], merged, {f: statistics.median(v) for f, v in loads.items()}


rust_doc, ours, ours_load = merge("rust")
opt_doc, theirs, opt_load = merge("optimum")
med = statistics.median

cpu = "?"
for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
ort_version = Path(".ort/VERSION").read_text().strip() if Path(".ort/VERSION").is_file() else "?"
threads = os.environ.get("SD3_BENCH_THREADS", "").strip()
thread_text = (f"intra-op {threads} on both sides" if threads else
               "ONNX Runtime defaults on both sides (intra-op 0 = one thread per physical core; sequential "
               "executor, so no inter-op pool)")
n_ours = len(next(iter(ours.values()))["total_ms"])
n_opt = len(next(iter(theirs.values()))["total_ms"])

print(f"date: {datetime.date.today().isoformat()}")
print(f"machine: {cpu}, {os.cpu_count()} logical cores ({platform.system()} {platform.release()})")
print(f"ONNX Runtime: ours {ort_version} ({rust_doc.get('onnxruntime_library')}); optimum: onnxruntime "
      f"{opt_doc['onnxruntime']} (Python wheel)")
print(f"threads: {thread_text}; torch {opt_doc['torch']} uses {opt_doc['torch_threads']} threads on the "
      "Python side")
print(f"optimum-onnx {opt_doc['optimum_onnx']}, diffusers {opt_doc['diffusers']}")
print(f"runs: {n_ours} (ours) / {n_opt} (optimum) timed generations per case, in {rounds} alternating rounds, "
      f"each after {rust_doc['warmup']} warm-up generations")
print(f"background: other processes used {others_cpu:.1f} of {machine_all:.1f} CPU-seconds during the run "
      f"({100 * others_cpu / max(machine_all, 1e-9):.0f} %; the benchmark itself {ours_cpu:.1f}); load average "
      f"before/after {load_before} / {load_after}. More than a few % makes timings noisy.")
print()


def side_table(title, results, loads):
    print(f"{title} (model load, median of the rounds: "
          + ", ".join(f"{f} {ms:.0f} ms" for f, ms in loads.items()) + ")")
    print()
    print("| fixture | case | steps | CFG | median ms | mean ms | min ms | ORT median ms | outside median ms "
          "| outside share | text enc. ms | denoising ms | VAE ms |")
    print("|---|---|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (f, c), r in results.items():
        t = r["total_ms"]
        print(f"| {f} | {c} | {r['steps']} | {'yes' if r['cfg'] else 'no'} | {med(t):.2f} | "
              f"{statistics.fmean(t):.2f} | {min(t):.2f} | {med(r['onnx_ms']):.2f} | {med(r['outside_ms']):.2f} | "
              f"{100 * med(r['share']):.1f} % | {med(r['text_encoding_ms']):.2f} | {med(r['denoising_ms']):.2f} | "
              f"{med(r['vae_ms']):.2f} |")
    print()


side_table("sd3-onnx (Rust), ORT = inside Session::run", ours, ours_load)
side_table("optimum ORTStableDiffusion3Pipeline (Python), ORT = inside InferenceSession._sess.run", theirs,
           opt_load)


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int32) if path else None


def maxdiff(a, b):
    if a is None or b is None:
        return "n/a"
    if a.shape != b.shape:
        return "size differs"
    return str(int(np.abs(a - b).max()))


print("| case | steps | CFG | ours median ms | optimum median ms | speed-up | ours outside ORT | "
      "optimum outside ORT | max pixel diff: ours vs golden / optimum vs golden / ours vs optimum |")
print("|---|---:|:-:|---:|---:|---:|---:|---:|:-:|")
worst = 0
for key, r in ours.items():
    o = theirs.get(key)
    cfg = "yes" if r["cfg"] else "no"
    if o is None:
        print(f"| {key[0]}/{key[1]} | {r['steps']} | {cfg} | {med(r['total_ms']):.2f} | n/a | n/a | "
              f"{100 * med(r['share']):.1f} % | n/a | n/a |")
        continue
    a, b = rgb(r["image"]), rgb(o["image"])
    g = rgb(r["golden"] or o["golden"])
    diffs = [maxdiff(a, g), maxdiff(b, g), maxdiff(a, b)]
    worst = max([worst] + [int(d) for d in diffs if d.isdigit()])
    speed = med(o["total_ms"]) / med(r["total_ms"])
    print(f"| {key[0]}/{key[1]} | {r['steps']} | {cfg} | {med(r['total_ms']):.2f} | {med(o['total_ms']):.2f} | "
          f"{speed:.2f}x | {100 * med(r['share']):.1f} % | {100 * med(o['share']):.1f} % | {' / '.join(diffs)} |")
print()
print("speed-up = optimum median / ours median, end to end (request to RGB image). Outside ORT = median over runs "
      "of the share of a generation spent outside ONNX Runtime's run call. Pixel diffs are for the first image of "
      "round 1 against models/goldens/<fixture>/<case>/optimum.png, in 8-bit levels.")
if worst > 1:
    print(f"WARNING: images differ by up to {worst} levels: the two sides did not compute the same thing.")
PY
