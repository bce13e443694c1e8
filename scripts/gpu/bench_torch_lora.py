"""PyTorch side of the LoRA benchmark (scripts/gpu/lora.sh): diffusers' SD3 transformer with the same random
SD3-medium weights as the ONNX graphs (models/export/export_sd3.py `Source`), float16 on CUDA, and the same LoRA
files our pipeline loads (peft layout, scripts/gpu/make_lora.py), through diffusers' own LoRA API
(`load_lora_adapter`, `set_adapters`, `fuse_lora`, diffusers 0.42.1 `loaders/peft.py`).

Prints a table: the time each switch takes (CUDA-synchronised wall time) and the transformer's time per call at
the request's shape (CFG batch 2, CUDA events over --iters calls, bench_torch.py's `time_transformer`): without
LoRA, with a LoRA active unfused (peft's extra low-rank matmuls every step), and fused into the weights; then
torch.compile without LoRA and with the LoRA fused (--compile).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models" / "export"))
from bench_torch import time_transformer  # noqa: E402
from export_sd3 import Source  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sd3-medium")
    ap.add_argument("--tokenizers-from", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--max-sequence-length", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lora", action="append", required=True, help="two LoRA files: a, b")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    tr = Source(None, args.variant, Path(args.tokenizers_from), args.seed).load("transformer")
    tr = tr.to(args.device, torch.float16).eval()
    rows = []

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t) * 1e3, 1)

    def step(label, switch_ms=None, model=None):
        ms = round(time_transformer(tr if model is None else model, args, args.iters), 2)
        rows.append({"case": label, "switch_ms": switch_ms, "transformer_ms_per_step": ms})
        print(f"{label}: switch {switch_ms} ms, transformer {ms} ms/step", flush=True)

    step("eager, no LoRA")
    for name, path in zip("ab", args.lora):
        sd = load_file(path)
        ms = timed(lambda: tr.load_lora_adapter(dict(sd), prefix="transformer", adapter_name=name))
        print(f"load_lora_adapter {name}: {ms} ms", flush=True)
    step("eager, LoRA a unfused (set_adapters)", timed(lambda: tr.set_adapters(["a"], [1.0])))
    step("eager, switch to LoRA b unfused (set_adapters)", timed(lambda: tr.set_adapters(["b"], [1.0])))
    tr.set_adapters(["a"], [1.0])
    step("eager, LoRA a fused (fuse_lora)", timed(lambda: tr.fuse_lora(lora_scale=1.0, adapter_names=["a"])))

    def refuse_b():
        tr.unfuse_lora()
        tr.set_adapters(["b"], [1.0])
        tr.fuse_lora(lora_scale=1.0, adapter_names=["b"])

    step("eager, switch fused a -> fused b (unfuse_lora, set_adapters, fuse_lora)", timed(refuse_b))
    if args.compile:
        t = time.time()
        compiled = torch.compile(tr)
        step("torch.compile, LoRA b fused (compile time in the note)", None, compiled)
        rows[-1]["compile_s"] = round(time.time() - t, 1)
        tr.unfuse_lora()
        tr.unload_lora()
        t = time.time()
        compiled = torch.compile(tr)
        step("torch.compile, no LoRA", None, compiled)
        rows[-1]["compile_s"] = round(time.time() - t, 1)
    card = torch.cuda.get_device_name(0)
    print(f"\nPyTorch {torch.__version__} on {card}, {args.size}x{args.size}, CFG batch 2\n")
    print("| case | switch ms | transformer ms/step |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['switch_ms'] if r['switch_ms'] is not None else '-'} | {r['transformer_ms_per_step']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
