#!/usr/bin/env python3
"""Exports a diffusers SD3 ControlNet (`SD3ControlNetModel`) to a folder `Sd3Pipeline::load_controlnet` loads, and
the model's transformer with a residual input (`transformer/model_controlnet.onnx`) into the model folder.

    python models/export/export_controlnet.py --controlnet InstantX/SD3-Controlnet-Canny \\
        --base stabilityai/stable-diffusion-3-medium-diffusers --out controlnets/canny \\
        --model-folder models/sd3-medium-onnx [--dtype fp16]

Pins: models/requirements-controlnet.txt (diffusers 0.42.1, torch 2.8.0). The graphs (docs/controlnet.md):

  <out>/model.onnx          inputs hidden_states [B, C, h, w], controlnet_cond [B, C, h, w] (the control latents),
                            timestep [B], pooled_projections [B, P], and encoder_hidden_states [B, S, J] when the
                            config has joint_attention_dim; output controlnet_block_samples [num_layers, B, h*w/p^2, D]
                            (conditioning_scale 1: the crate scales). For `use_pos_embed: false` ControlNets (SD3.5)
                            the base transformer's pos_embed is copied in first, as StableDiffusion3ControlNetPipeline
                            does at construction (pipeline_stable_diffusion_3_controlnet.py lines 211-224).
  <out>/config.json         the ControlNet's diffusers config (the crate reads the kind from it).
  <model-folder>/transformer/model_controlnet.onnx
                            the base transformer's inputs plus controlnet_residuals [N, B, h*w/p^2, D] and
                            controlnet_block_index int64 [num_layers] (which residual each block adds; computed by
                            the crate with diffusers' interval rule), made as export_sd3.py --controlnet-graph
                            makes it (ONNX Runtime's fusions; fp16 with a float32 timestep). Written only with
                            --model-folder; one per model,
                            shared by all its ControlNets.

Why a second transformer graph rather than an input on transformer/model.onnx: the plain graph stays exactly what it
was (no zero residuals to feed per step, existing exports and goldens untouched), and the crate needs the second
graph only once a ControlNet is loaded. The cost is the transformer's weights twice on disk.

--dtype fp16 casts the modules to float16 before export (inputs and outputs float16; the crate converts). Graphs
larger than 2 GB are written with external data beside them (torch.onnx.export does so).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_controlnet_fixtures import ControlNetWrapper  # noqa: E402

from diffusers import SD3ControlNetModel, SD3Transformer2DModel  # noqa: E402

OPSET = 17


def export(module, args, inputs, outputs, dyn, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))


def write_controlnet(cn: SD3ControlNetModel, out: Path, dtype: torch.dtype, optimize: bool = False,
                     fused_kernels: bool = False) -> None:
    """`cn` (already in `dtype`, with the base transformer's pos_embed for `use_pos_embed: false`) to
    out/model.onnx and out/config.json. Shapes come from the ControlNet's own config.

    optimize: through models/export/export_sd3.py's pipeline instead, as the transformer's model.onnx is made: a
    float32 TorchScript export, ONNX Runtime's MMDiT fusions (fused attention for the InstantX kind's joint blocks),
    then the float16 conversion with the timestep and its sinusoidal embedding kept float32; weights over 2 GB go to
    model.onnx.data. fused_kernels (with optimize and float16; the InstantX kind only): then rewritten to the
    crate's fused operators (models/export/fused_kernels.py, as the transformer's --fused-kernels)."""
    if optimize:
        import tempfile

        from export_sd3 import export_component

        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cn.config).items()}
        if out.exists():
            shutil.rmtree(out)
        with tempfile.TemporaryDirectory(prefix="controlnet-") as tmp:
            info = export_component("controlnet", cn.float(), Path(tmp), exporter="torchscript", attention="fused",
                                    dtype="fp16" if dtype == torch.float16 else "fp32", opset=None,
                                    t5_precision="mixed", fused_kernels=fused_kernels)
            out.mkdir(parents=True)
            for f in info["files"]:
                shutil.move(str(Path(tmp) / f), out / Path(f).name)
        cfg["_class_name"] = "SD3ControlNetModel"
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out} (optimized, {info['nodes_final']})")
        return
    cc = cn.config
    text = cc.joint_attention_dim is not None
    c, p = cc.in_channels, cc.patch_size
    h, w = 2 * p * 2, 3 * p * 2
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    args = [r(2, c, h, w), r(2, c, h, w), torch.tensor([500.0, 500.0], dtype=dtype), r(2, cc.pooled_projection_dim)]
    inputs = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections"]
    dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
           "controlnet_cond": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
           "pooled_projections": {0: "batch_size"}, "controlnet_block_samples": {1: "batch_size", 2: "image_tokens"}}
    if text:
        args.append(r(2, 7, cc.joint_attention_dim))
        inputs.append("encoder_hidden_states")
        dyn["encoder_hidden_states"] = {0: "batch_size", 1: "sequence_length"}
    if out.exists():
        shutil.rmtree(out)
    export(ControlNetWrapper(cn, text), tuple(args), inputs, ["controlnet_block_samples"], dyn, out / "model.onnx")
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cn.config).items()}
    cfg["_class_name"] = "SD3ControlNetModel"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({'InstantX-style' if cc.force_zeros_for_pooled_projection else 'SD3.5-style'}, "
          f"{cc.num_layers} blocks, {str(dtype).replace('torch.', '')})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controlnet", required=True, help="diffusers SD3ControlNetModel folder or Hub id")
    ap.add_argument("--base", required=True, help="the SD3 / SD3.5 diffusers pipeline folder or Hub id")
    ap.add_argument("--out", required=True, type=Path, help="the ControlNet folder to write")
    ap.add_argument("--model-folder", type=Path, help="the ONNX model folder: writes transformer/model_controlnet.onnx")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--optimize", action="store_true",
                    help="the ControlNet through export_sd3.py's pipeline (ONNX Runtime's fusions, then float16 "
                         "with a float32 timestep): faster on a GPU; the residual transformer for real models comes "
                         "from export_sd3.py --controlnet-graph the same way")
    ap.add_argument("--fused-kernels", action="store_true",
                    help="with --optimize --dtype fp16: the ControlNet (InstantX kind) and, with --model-folder, the "
                         "residual transformer rewritten to the crate's fused operators (as export_sd3.py "
                         "--fused-kernels); for the CUDA provider")
    a = ap.parse_args()
    if a.fused_kernels and not (a.optimize and a.dtype == "fp16"):
        raise SystemExit("error: --fused-kernels needs --optimize and --dtype fp16")
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    torch.set_grad_enabled(False)

    transformer = SD3Transformer2DModel.from_pretrained(a.base, subfolder="transformer").eval()
    cn = SD3ControlNetModel.from_pretrained(a.controlnet).eval()
    if cn.config.use_pos_embed is False:
        cn.pos_embed = cn._get_pos_embed_from_transformer(transformer)
    cn = cn.to(dtype)  # the transformer stays float32: export_component converts after the fusions
    write_controlnet(cn, a.out, dtype, optimize=a.optimize, fused_kernels=a.fused_kernels)
    if a.model_folder is not None:
        # The residual transformer through export_sd3.py's pipeline, as `export_sd3.py --controlnet-graph` makes it.
        from export_sd3 import CONTROLNET_FILE, export_component

        export_component("transformer", transformer, a.model_folder, exporter="torchscript",
                         attention="fused", dtype=a.dtype, opset=None, t5_precision="mixed", controlnet_graph=True,
                         fused_kernels=a.fused_kernels)
        print(f"wrote {a.model_folder / 'transformer' / CONTROLNET_FILE}")

if __name__ == "__main__":
    main()
