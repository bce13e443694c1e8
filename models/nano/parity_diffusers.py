#!/usr/bin/env python3
"""Our Rust pipeline vs diffusers' StableDiffusion3Pipeline on the nano model, same explicit latents.

diffusers runs train.py's saved pipeline with the scheduler config of the exported model folder and the weights the
ONNX graphs hold (export_sd3.weights_as_stored_int8: Linear/Conv weights through the export tool's own int8
quantizer, other matrices and tables rounded to float16, vectors as saved; the graphs compute in float32). Both
sides use the model's 77 T5 tokens. The latents are torch.randn(seed i), which our pipeline's seed i also draws
(bit-exact generator). Prints per prompt the max / mean difference in 8-bit levels.

    python models/nano/parity_diffusers.py PIPELINE_DIR [--model models/sd3-nano] [--prompts 0,2,100,200]
(PIPELINE_DIR needs tokenizer folders; export_nano.py copies them in.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models" / "export"))

from export_sd3 import weights_as_stored_int8  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--model", default=str(REPO / "models" / "sd3-nano"))
    ap.add_argument("--prompts", default="0,1,2,3,4,100,200")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--t5-tokens", type=int, default=77, help="the model's max_sequence_length")
    ap.add_argument("--goldens", type=Path, default=None,
                    help="also write diffusers' images there (NNN.png) with goldens.json, for tests/nano_parity.rs")
    a = ap.parse_args()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(a.pipeline, torch_dtype=torch.float32)
    # the scheduler of the exported model folder (export_nano.py --shift may have changed its shift)
    sched_cfg = json.loads((Path(a.model) / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = type(pipe.scheduler).from_config(sched_cfg)
    for m in (pipe.transformer, pipe.vae.decoder, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        weights_as_stored_int8(m)
    prompts = json.loads((REPO / "models" / "nano" / "eval_prompts.json").read_text())
    binary = os.environ.get("TXT2IMG", str(REPO / "target" / "release" / "examples" / "txt2img"))
    side = pipe.transformer.config.sample_size
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in (int(x) for x in a.prompts.split(",")):
            lat = torch.randn((1, 16, side, side), generator=torch.Generator("cpu").manual_seed(i))
            np.save(Path(tmp) / "lat.npy", lat.numpy())
            ref = pipe(prompts[i]["prompt"], latents=lat, num_inference_steps=a.steps, guidance_scale=a.guidance,
                       height=side * 8, width=side * 8, max_sequence_length=a.t5_tokens).images[0]
            subprocess.run([binary, "--model", a.model, "--prompt", prompts[i]["prompt"], "--steps", str(a.steps),
                            "--guidance", str(a.guidance), "--max-sequence-length", str(a.t5_tokens), "--latents",
                            str(Path(tmp) / "lat.npy"), "--output", str(Path(tmp) / "ours.png")],
                           check=True, capture_output=True)
            if a.goldens is not None:
                a.goldens.mkdir(parents=True, exist_ok=True)
                ref.save(a.goldens / f"{i:03d}.png")
                written.append(dict(index=i, prompt=prompts[i]["prompt"], seed=i, file=f"{i:03d}.png"))
            x = np.asarray(ref).astype(int)
            y = np.asarray(Image.open(Path(tmp) / "ours.png").convert("RGB")).astype(int)
            print(f"{i:3d} {prompts[i]['prompt'][:50]:50s} max {np.abs(x - y).max()} mean {np.abs(x - y).mean():.4f}")
    if a.goldens is not None:
        import diffusers
        meta = dict(source="diffusers StableDiffusion3Pipeline on train.py's pipeline, weights as exported "
                           "(models/nano/parity_diffusers.py)", diffusers=diffusers.__version__, torch=torch.__version__,
                    steps=a.steps, guidance=a.guidance, max_sequence_length=a.t5_tokens,
                    shift=pipe.scheduler.config.shift,
                    latents="torch.randn((1, 16, H/8, W/8), generator=torch.Generator('cpu').manual_seed(seed))",
                    images=written)
        (a.goldens / "goldens.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
