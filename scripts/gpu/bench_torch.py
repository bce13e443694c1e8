"""PyTorch baseline for the GPU benchmark: diffusers' StableDiffusion3Pipeline with the SAME random weights the
export tool puts into the ONNX graphs (models/export/export_sd3.py `Source`, same variant and seed), in float16 on
CUDA, eager and with torch.compile.

Prints and writes (--json) the same quantities as examples/benchmark.rs: end-to-end time for one image (median of
--runs after --warmup), and the transformer's time per call at the request's shape (CFG batch 2), measured with
CUDA events over --iters calls.

Run on the GPU machine (needs diffusers on PYTHONPATH, see scripts/gpu/README.md):
  python3 scripts/gpu/bench_torch.py --variant sd3-medium --tokenizers-from models/fixtures/tiny-sd3 --json out.json

--transformer-only builds only the transformer (no text encoders or VAE: no end-to-end time) and reports, per mode,
the transformer's time per call and the peak GPU memory PyTorch allocated during that mode's calls
(torch.cuda.max_memory_allocated, weights included). With --init-on-device its random weights are drawn on the GPU
(same config and initialisation, other random values: speed does not depend on them), which saves building the
model on the CPU (SD3.5-large: 8.1B float32 parameters, a minute or two) at the cost of the same-weights property.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "export"))
from export_sd3 import Source  # noqa: E402


def build_pipeline(args):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer

    src = Source(None, args.variant, Path(args.tokenizers_from), args.seed)
    dt = torch.float16 if args.device == "cuda" else torch.float32
    mods = {}
    for name in ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]:
        t = time.time()
        mods[name] = src.load(name).to(args.device, dt)
        print(f"built {name} in {time.time() - t:.1f} s", flush=True)
    vae = src.load("vae_decoder").to(args.device, dt)  # the AutoencoderKL (decoder and encoder) with the same seed
    tf = Path(args.tokenizers_from)
    pipe = StableDiffusion3Pipeline(
        transformer=mods["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in src.scheduler_config().items()
                                                      if not k.startswith("_")}),
        vae=vae,
        text_encoder=mods["text_encoder"],
        tokenizer=AutoTokenizer.from_pretrained(tf / "tokenizer"),
        text_encoder_2=mods["text_encoder_2"],
        tokenizer_2=AutoTokenizer.from_pretrained(tf / "tokenizer_2"),
        text_encoder_3=mods["text_encoder_3"],
        tokenizer_3=AutoTokenizer.from_pretrained(tf / "tokenizer_3"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def time_pipeline(pipe, args):
    times = []
    for i in range(args.warmup + args.runs):
        sync(args)
        t = time.perf_counter()
        pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
             num_inference_steps=args.steps, guidance_scale=args.guidance,
             max_sequence_length=args.max_sequence_length,
             generator=torch.Generator(args.device).manual_seed(0), output_type="pil")
        sync(args)
        ms = (time.perf_counter() - t) * 1e3
        print(f"  {'warm-up' if i < args.warmup else 'run'} {i}: {ms:.1f} ms", flush=True)
        if i >= args.warmup:
            times.append(ms)
    return statistics.median(times)


@torch.no_grad()
def time_transformer(transformer, args, iters):
    cfg = transformer.config
    h = args.size // 8
    batch = 2 if args.guidance > 1 else 1
    dev = args.device
    dt = next(transformer.parameters()).dtype
    x = torch.randn(batch, cfg.in_channels, h, h, device=dev, dtype=dt)
    ctx = torch.randn(batch, 77 + args.max_sequence_length, cfg.joint_attention_dim, device=dev, dtype=dt)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=dt)
    t = torch.full((batch,), 500.0, device=dev, dtype=torch.float32)  # the pipeline passes float32 timesteps

    def call():
        transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                    return_dict=False)

    for _ in range(3):
        call()
    sync(args)
    if dev != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def transformer_only(args, result):
    src = Source(None, args.variant, Path(args.tokenizers_from), args.seed)
    dt = torch.float16 if args.device == "cuda" else torch.float32
    t = time.time()
    if args.init_on_device:
        with torch.device(args.device):  # parameters created (and initialised) on the GPU
            transformer = src.load("transformer")
        transformer = transformer.to(args.device, dt)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the float32 originals
    else:
        transformer = src.load("transformer").to(args.device, dt)
    print(f"built transformer in {time.time() - t:.1f} s ({sum(p.numel() for p in transformer.parameters()) / 1e9:.2f}B "
          f"parameters{', drawn on the device' if args.init_on_device else ''})", flush=True)
    result["init_on_device"] = bool(args.init_on_device)
    for mode in args.modes.split(","):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if mode == "compile":
            t = time.time()
            transformer = torch.compile(transformer)
            step_ms = time_transformer(transformer, args, args.iters)  # includes compiling in the warm-up
            result["compile_s"] = round(time.time() - t, 1)
        else:
            step_ms = time_transformer(transformer, args, args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        result[mode] = {"transformer_ms_per_step": round(step_ms, 2), "end_to_end_ms": None,
                        "peak_gpu_mib": None if peak is None else round(peak)}
        print(f"{mode}: transformer {step_ms:.2f} ms/step, peak allocated {peak or 0:.0f} MiB", flush=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sd3-medium")
    ap.add_argument("--tokenizers-from", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon, detailed, 8k")
    ap.add_argument("--negative-prompt", default="blurry, low quality")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    ap.add_argument("--init-on-device", action="store_true",
                    help="with --transformer-only: draw the random weights on --device (not the export's values)")
    ap.add_argument("--transformer-only", action="store_true",
                    help="time the transformer alone (no pipeline: no text encoders, VAE or end-to-end time)")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "variant": args.variant,
              "size": args.size, "steps": args.steps, "guidance": args.guidance}
    if args.transformer_only:
        transformer_only(args, result)
        return
    pipe = build_pipeline(args)
    for mode in args.modes.split(","):
        if mode == "compile":
            t = time.time()
            pipe.transformer = torch.compile(pipe.transformer)
            step_ms = time_transformer(pipe.transformer, args, args.iters)  # includes compiling in the warm-up
            result["compile_s"] = round(time.time() - t, 1)
        else:
            step_ms = time_transformer(pipe.transformer, args, args.iters)
        e2e = time_pipeline(pipe, args)
        result[mode] = {"transformer_ms_per_step": round(step_ms, 2), "end_to_end_ms": round(e2e, 1)}
        print(f"{mode}: transformer {step_ms:.2f} ms/step, end to end {e2e:.1f} ms", flush=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
