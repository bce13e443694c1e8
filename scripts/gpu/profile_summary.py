"""Summarises an ONNX Runtime profile (json written with Sd3PipelineBuilder::profiling): kernel time per op type,
per model run, largest first, and the time per provider. When a GPU provider ran the session, the op types the CPU
provider ran are listed with their time, and a WARNING line says so when they take 1% or more of the kernel time:
nodes ONNX Runtime placed on the CPU behind the requested provider's back (round 23's VAE decoder: 30
InstanceNormalization nodes, 3.5 s of 5.0). Usage: python3 profile_summary.py PROFILE.json [--top 20]"""
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
cpu_ops = collections.Counter()
for e in events:
    if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
        a = e.get("args", {})
        by_op[a.get("op_name", "?")] += e["dur"]
        by_provider[a.get("provider", "?")] += e["dur"]
        if a.get("provider") == "CPUExecutionProvider":
            cpu_ops[a.get("op_name", "?")] += e["dur"]
        count[a.get("op_name", "?")] += 1
n = max(len(runs), 1)
total = sum(by_op.values())
run_ms = sum(e["dur"] for e in runs) / n / 1e3
print(f"{args.profile}: {len(runs)} runs, {run_ms:.2f} ms per run (wall), kernel time {total / n / 1e3:.2f} ms per run")
print("| op | ms per run | share | nodes per run |\n|---|---:|---:|---:|")
for op, us in by_op.most_common(args.top):
    print(f"| {op} | {us / n / 1e3:.2f} | {100 * us / max(total, 1):.1f}% | {count[op] // n} |")
print("providers:", {k: f"{v / n / 1e3:.2f} ms" for k, v in by_provider.items()})
cpu = by_provider.get("CPUExecutionProvider", 0)
if any(k not in ("CPUExecutionProvider", "?") for k in by_provider):
    print("on the CPU provider:", {k: f"{v / n / 1e3:.2f} ms" for k, v in cpu_ops.most_common(8)} or "nothing")
    if cpu >= 0.01 * max(total, 1):
        print(f"WARNING: the CPU provider ran {100 * cpu / max(total, 1):.1f}% of the kernel time of a GPU session")
