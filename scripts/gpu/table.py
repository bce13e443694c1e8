"""One table from a bench.sh output folder: our pipeline (each variant) beside diffusers eager and torch.compile,
measured in the same call on the same card. Usage: python3 scripts/gpu/table.py OUT_DIR

OUT_DIR/notes.json ({variant: " (what it is)"}, optional) overrides the built-in row notes below (sd35l.sh: its
sd35l folders are the full 38-block model, not round 10's 8 blocks)."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
card = (out / "card.txt").read_text().split(",")[0].strip() if (out / "card.txt").exists() else "?"
rows = []
own_notes = json.loads((out / "notes.json").read_text()) if (out / "notes.json").exists() else {}
for f in sorted(out.glob("ours-*.json")):
    j = json.loads(f.read_text())
    m = j["medians_ms"]
    variant = f.stem[len("ours-"):]
    notes = {"sd3m": "", "sd3m-static": " (static shape)", "sd3m-dyn": " (dynamo-exported transformer)",
             "sd3m-cudnn": " (ORT_ENABLE_CUDNN_FLASH_ATTENTION=1)", "sd3m-noflash": " (ORT_DISABLE_FLASH_ATTENTION=1)",
             "sd3m-fused": " (--fused-kernels: sd3onnx fused operators)",
             "sd3m-fp8": " (--fused-kernels --fp8: E4M3 weights and activations in the blocks' products; q/k/v "
                         "as one LinearConcat3Fp8, activations quantized once)",
             "sd3m-fp8s": " (--fused-kernels --fp8 with calibrated static activation scales; q/k/v merged)",
             "sd3m-fp8sf": " (as sd3m-fp8s, with cuBLASLt's fast accumulation: --fp8-fast-accum)",
             "sd3m-fp8sm": " (as sd3m-fp8s, feed-forwards as MlpFp8: --fp8-merge-mlp)",
             "sd3m-fp8sfm": " (as sd3m-fp8s, fast accumulation and MlpFp8)",
             "sd3m-fp8sep": " (--fused-kernels --fp8 --fp8-separate-qkv: q, k and v as three LinearConcatFp8, "
                            "each quantizing the same activations)",
             "sd35l": " (SD3.5-large shapes, 8 of 38 blocks)",
             "sd35l-fused": " (SD3.5-large shapes, 8 of 38 blocks, --fused-kernels)",
             "sd35m": " (SD3.5-medium shapes, 1-layer text encoders)",
             "sd35m-fused": " (SD3.5-medium shapes, 1-layer text encoders, --fused-kernels incl. dual attention)"}
    notes.update(own_notes)
    name = "sd3-onnx, ORT CUDA" + notes.get(variant, f" ({variant})")
    # peak GPU memory of the whole process (sd35m.sh: nvidia-smi sampled during the run, minus the idle reading)
    peak = out / f"peak-{variant}.txt"
    peak = peak.read_text().split() if peak.exists() else []
    peak = float(peak[0]) if peak and peak[0].lstrip("-").isdigit() else None
    rows.append((name, m["transformer Session::run per step"], m["per step (whole loop / steps)"], m["end to end"],
                 m["text encoding"], m["VAE decode"], m["outside ONNX Runtime (our code)"], peak))
t = out / "torch.json"
if t.exists():
    j = json.loads(t.read_text())
    shapes = "" if j.get("variant", "sd3-medium") == "sd3-medium" else f" ({j['variant']} shapes, transformer only)"
    for mode, label in [("eager", "diffusers, PyTorch eager"), ("compile", "diffusers, torch.compile")]:
        if mode in j:
            rows.append((label + shapes, j[mode]["transformer_ms_per_step"], None, j[mode]["end_to_end_ms"], None, None,
                         None, j[mode].get("peak_gpu_mib")))
print(f"{card}: random weights (SD3-medium shapes unless the row says otherwise), fp16, 1024x1024, 28 steps, "
      "CFG (batch 2); medians. Peak GPU MiB: ours = the process (nvidia-smi), PyTorch = allocated by the "
      "transformer's calls (weights included)")
print("| pipeline | transformer ms/step | loop ms/step | end to end ms | text enc. ms | VAE ms | our code ms "
      "| peak GPU MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
fmt = lambda v: "" if v is None else f"{v:.1f}"
for r in rows:
    print("| " + " | ".join([r[0]] + [fmt(v) for v in r[1:]]) + " |")
