"""Where torch.compile's transformer step spends GPU time, by kernel category, next to eager: SD3-medium-shaped
MMDiT with random weights (models/export/export_sd3.py `Source`), fp16, batch 2 (CFG), 1024x1024, 333 text
tokens. torch.profiler (CUPTI) over --iters calls after warm-up; kernel time summed per category. Tells how much
of torch.compile's step is GEMM and attention (the floor any runtime pays with cuBLAS and flash attention) and
how much is everything else (norms, elementwise, copies), which is where ONNX Runtime's unfused ops cost us.

  python3 scripts/gpu/profile_torch.py [--iters 5] [--json out.json]
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "export"))
from export_sd3 import Source  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "sgemm", "hgemm")):
        return "gemm"
    if "triton" in n:
        return "triton (fused elementwise/norm)"
    if any(k in n for k in ("layer_norm", "layernorm", "rms")):
        return "norm"
    if any(k in n for k in ("copy", "cat", "transpose", "memcpy")):
        return "copy/concat/transpose"
    return "other elementwise"


def profile(fn, iters):
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    cats = defaultdict(float)
    for e in p.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith("ProfilerStep"):
            cats[category(e.key)] += t / 1000.0 / iters  # us -> ms per call
    return dict(cats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--tokenizers-from", default="models/fixtures/tiny-sd3")
    args = ap.parse_args()
    src = Source(None, "sd3-medium", Path(args.tokenizers_from), 0)
    tr = src.load("transformer").to("cuda", torch.float16).eval()
    cfg = tr.config
    b, h = 2, 1024 // 8
    x = torch.randn(b, cfg.in_channels, h, h, device="cuda", dtype=torch.float16)
    ctx = torch.randn(b, 333, cfg.joint_attention_dim, device="cuda", dtype=torch.float16)
    pooled = torch.randn(b, cfg.pooled_projection_dim, device="cuda", dtype=torch.float16)
    t = torch.full((b,), 500.0, device="cuda", dtype=torch.float16)
    results = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for mode in ["eager", "compile"]:
        model = tr if mode == "eager" else torch.compile(tr)

        def step():
            with torch.no_grad():
                model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        cats = profile(step, args.iters)
        results[mode] = {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
        results[mode]["total kernel ms"] = round(sum(cats.values()), 2)
        print(mode, json.dumps(results[mode]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{results['card']}: GPU kernel time per transformer call (ms), batch 2, 1024x1024")
    keys = sorted(set(results["eager"]) | set(results["compile"]), key=lambda k: -results["eager"].get(k, 0))
    print("| category | eager | torch.compile |\n|---|---:|---:|")
    for k in keys:
        print(f"| {k} | {results['eager'].get(k, 0):.2f} | {results['compile'].get(k, 0):.2f} |")


if __name__ == "__main__":
    main()
