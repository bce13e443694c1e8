"""PyTorch side of the ControlNet benchmark (scripts/gpu/controlnet.sh): diffusers' SD3 transformer with the same
random SD3-medium weights as the ONNX graphs (models/export/export_sd3.py `Source`) and a random ControlNet with
InstantX/SD3-Controlnet-Canny's config (`random_controlnet`, the same weights models/export writes for our side),
float16 on CUDA.

One denoising step of StableDiffusion3ControlNetPipeline (diffusers 0.42.1,
pipelines/controlnet_sd3/pipeline_stable_diffusion_3_controlnet.py lines 1130-1170) is the ControlNet's forward
on the CFG batch, then the transformer's with `block_controlnet_hidden_states`; this times exactly those two calls
(CUDA events over --iters steps), eager and torch.compile, with the transformer alone beside them.

    python3 scripts/gpu/bench_torch_controlnet.py --tokenizers-from models/fixtures/tiny-sd3 [--compile] [--json F]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "export"))

# InstantX/SD3-Controlnet-Canny config.json (num_layers 6; the rest is SD3-medium's transformer shape).
INSTANTX_CANNY = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                      num_attention_heads=24, num_layers=6, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                      pos_embed_max_size=192, sample_size=128)


def random_controlnet(seed: int = 0):
    """The InstantX-config ControlNet with every weight drawn (diffusers zero-initialises controlnet_blocks and
    pos_embed_input: zeros would let a runtime skip work), the same on every machine for a seed."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    cn = SD3ControlNetModel(**INSTANTX_CANNY)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return cn.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sd3-medium")
    ap.add_argument("--tokenizers-from", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on the tiny variant")
    args = ap.parse_args()
    from export_sd3 import Source

    dev = args.device
    tr = Source(None, args.variant, Path(args.tokenizers_from), args.seed).load("transformer")
    tr = tr.to(dev, torch.float16).eval()
    cn = random_controlnet(args.seed)
    if dev == "cpu":  # dry run: a ControlNet the tiny variant's shape
        from diffusers import SD3ControlNetModel
        c = tr.config
        cn = SD3ControlNetModel(**{k: c[k] for k in ("attention_head_dim", "caption_projection_dim", "in_channels",
                                                     "joint_attention_dim", "num_attention_heads", "out_channels",
                                                     "patch_size", "pooled_projection_dim", "pos_embed_max_size",
                                                     "sample_size")}, num_layers=1)
    cn = cn.to(dev, torch.float16).eval()
    cfg = tr.config
    h = args.size // 8
    batch = 2 if args.guidance > 1 else 1
    dt = torch.float16
    x = torch.randn(batch, cfg.in_channels, h, h, device=dev, dtype=dt)
    cond = torch.randn(batch, cfg.in_channels, h, h, device=dev, dtype=dt)
    ctx = torch.randn(batch, 77 + args.max_sequence_length, cfg.joint_attention_dim, device=dev, dtype=dt)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=dt)
    zeros = torch.zeros_like(pooled)  # force_zeros_for_pooled_projection (pipeline line 1139)
    t = torch.full((batch,), 500.0, device=dev, dtype=torch.float32)

    def step(transformer, controlnet):
        res = controlnet(hidden_states=x, controlnet_cond=cond, conditioning_scale=0.7, encoder_hidden_states=ctx,
                         pooled_projections=zeros, timestep=t, return_dict=False)[0]
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                           block_controlnet_hidden_states=res, return_dict=False)[0]

    def alone(transformer, _):
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                           return_dict=False)[0]

    def timed(fn, a, b):
        with torch.no_grad():
            for _ in range(3):
                fn(a, b)
            if dev != "cuda":
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn(a, b)
                return round((time.perf_counter() - t0) * 1e3 / args.iters, 2)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                fn(a, b)
            end.record()
            torch.cuda.synchronize()
        return round(start.elapsed_time(end) / args.iters, 2)

    rows = []

    def row(label, ms, compile_s=None):
        peak = None
        if dev == "cuda":
            torch.cuda.synchronize()
            peak = round(torch.cuda.max_memory_allocated() / 2**20)
        rows.append({"case": label, "ms_per_step": ms, "compile_s": compile_s, "peak_mib": peak})
        print(f"{label}: {ms} ms/step", flush=True)

    row("eager, transformer alone", timed(alone, tr, cn))
    row("eager, ControlNet + transformer", timed(step, tr, cn))
    if args.compile:
        t0 = time.time()
        ctr, ccn = torch.compile(tr), torch.compile(cn)
        ms = timed(alone, ctr, ccn)
        row("torch.compile, transformer alone", ms, round(time.time() - t0, 1))
        t0 = time.time()
        ms = timed(step, ctr, ccn)
        row("torch.compile, ControlNet + transformer", ms, round(time.time() - t0, 1))
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU (dry run)"
    print(f"\nPyTorch {torch.__version__} on {card}, {args.size}x{args.size}, CFG batch {batch}, ControlNet "
          f"{INSTANTX_CANNY['num_layers']} blocks, text {77 + args.max_sequence_length} tokens\n")
    print("| case | ms/step | compile s | peak allocated MiB |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['ms_per_step']} | {r['compile_s'] if r['compile_s'] is not None else '-'} | "
              f"{r['peak_mib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
