#!/usr/bin/env python3
"""Our Rust pipeline vs diffusers' StableDiffusion3Pipeline on the nano model, same explicit latents.

diffusers runs train.py's saved pipeline (float32) with every weight rounded to float16 and back (the ONNX graphs
store float16 weights and compute in float32); the latents are torch.randn(seed i), which our pipeline's seed i
also draws (bit-exact generator). Prints per prompt the max / mean difference in 8-bit levels.

    python models/nano/parity_diffusers.py PIPELINE_DIR [--model models/sd3-nano] [--prompts 0,2,100,200]
(PIPELINE_DIR needs tokenizer folders; export_nano.py copies them in.)
"""
import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--model", default=str(REPO / "models" / "sd3-nano"))
    ap.add_argument("--prompts", default="0,2,100,200")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=5.0)
    a = ap.parse_args()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(a.pipeline, torch_dtype=torch.float32)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    prompts = json.loads((REPO / "models" / "nano" / "eval_prompts.json").read_text())
    binary = os.environ.get("TXT2IMG", str(REPO / "target" / "release" / "examples" / "txt2img"))
    side = pipe.transformer.config.sample_size
    with tempfile.TemporaryDirectory() as tmp:
        for i in (int(x) for x in a.prompts.split(",")):
            lat = torch.randn((1, 16, side, side), generator=torch.Generator("cpu").manual_seed(i))
            np.save(Path(tmp) / "lat.npy", lat.numpy())
            ref = pipe(prompts[i]["prompt"], latents=lat, num_inference_steps=a.steps, guidance_scale=a.guidance,
                       height=side * 8, width=side * 8).images[0]
            subprocess.run([binary, "--model", a.model, "--prompt", prompts[i]["prompt"], "--steps", str(a.steps),
                            "--guidance", str(a.guidance), "--latents", str(Path(tmp) / "lat.npy"), "--output",
                            str(Path(tmp) / "ours.png")], check=True, capture_output=True)
            x = np.asarray(ref).astype(int)
            y = np.asarray(Image.open(Path(tmp) / "ours.png").convert("RGB")).astype(int)
            print(f"{i:3d} {prompts[i]['prompt'][:50]:50s} max {np.abs(x - y).max()} mean {np.abs(x - y).mean():.4f}")


if __name__ == "__main__":
    main()
