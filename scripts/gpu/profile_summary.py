"""Summarises an ONNX Runtime profile (json written with Sd3PipelineBuilder::profiling): kernel time per op type,
per model run, largest first. Usage: python3 profile_summary.py PROFILE.json [--top 20]"""
import argparse
import collections
import json

ap = argparse.ArgumentParser()
ap.add_argument("profile")
ap.add_argument("--top", type=int, default=20)
args = ap.parse_args()
events = json.load(open(args.profile))
runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
by_op, by_provider, count = collections.Counter(), collections.Counter(), collections.Counter()
for e in events:
    if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
        a = e.get("args", {})
        by_op[a.get("op_name", "?")] += e["dur"]
        by_provider[a.get("provider", "?")] += e["dur"]
        count[a.get("op_name", "?")] += 1
n = max(len(runs), 1)
total = sum(by_op.values())
run_ms = sum(e["dur"] for e in runs) / n / 1e3
print(f"{args.profile}: {len(runs)} runs, {run_ms:.2f} ms per run (wall), kernel time {total / n / 1e3:.2f} ms per run")
print("| op | ms per run | share | nodes per run |\n|---|---:|---:|---:|")
for op, us in by_op.most_common(args.top):
    print(f"| {op} | {us / n / 1e3:.2f} | {100 * us / max(total, 1):.1f}% | {count[op] // n} |")
print("providers:", {k: f"{v / n / 1e3:.2f} ms" for k, v in by_provider.items()})
