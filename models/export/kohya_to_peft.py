#!/usr/bin/env python3
"""Converts an SD3 / SD3.5 transformer LoRA in the kohya / sd-scripts layout to diffusers / PEFT keys, which
sd3-onnx (`Sd3Pipeline::load_lora`) and diffusers (`load_lora_weights`) read.

    python models/export/kohya_to_peft.py IN.safetensors OUT.safetensors

kohya keys (sd-scripts `networks/lora_sd3.py`) name the original MMDiT modules: `lora_unet_joint_blocks_N_x_block_
attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`. The mapping to diffusers' `SD3Transformer2DModel`
follows diffusers' checkpoint converter (`scripts/convert_sd3_to_diffusers.py`):

  joint_blocks.N.x_block.attn.qkv         -> transformer_blocks.N.attn.to_q / to_k / to_v   (rows split in 3)
  joint_blocks.N.x_block.attn.proj        -> transformer_blocks.N.attn.to_out.0
  joint_blocks.N.x_block.attn2.qkv        -> transformer_blocks.N.attn2.to_q / to_k / to_v  (SD3.5 dual attention)
  joint_blocks.N.x_block.attn2.proj       -> transformer_blocks.N.attn2.to_out.0
  joint_blocks.N.x_block.mlp.fc1 / fc2    -> transformer_blocks.N.ff.net.0.proj / ff.net.2
  joint_blocks.N.context_block.attn.qkv   -> transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj
  joint_blocks.N.context_block.attn.proj  -> transformer_blocks.N.attn.to_add_out
  joint_blocks.N.context_block.mlp.fc1/2  -> transformer_blocks.N.ff_context.net.0.proj / ff_context.net.2

A fused qkv LoRA (`up` [3*out, r] @ `down` [r, in]) becomes three LoRAs that share `down` as lora_A and take one
third of `up`'s rows each as lora_B: the same weight change, row for row. kohya's scale alpha / r is baked into
lora_B (as diffusers does for kohya files it converts, `_convert_kohya_flux_lora_to_diffusers`), so the output
needs no alpha (alpha = rank, scale 1). Keys of other modules (adaLN modulation, embedders, text encoders
`lora_te*_`) are not converted; they are listed on stderr and left out.
"""
from __future__ import annotations

import re
import sys

import numpy as np

KOHYA = re.compile(r"^lora_unet_joint_blocks_(\d+)_(x|context)_block_(attn2?)_(qkv|proj)$|"
                   r"^lora_unet_joint_blocks_(\d+)_(x|context)_block_mlp_(fc1|fc2)$")


def targets(module: str) -> tuple[list[str], bool] | None:
    """The diffusers modules a kohya module maps to, and whether its rows are split in three."""
    m = KOHYA.match(module)
    if not m:
        return None
    if m.group(1) is not None:
        n, stream, attn, kind = m.group(1), m.group(2), m.group(3), m.group(4)
        base = f"transformer_blocks.{n}.{attn}"
        if kind == "qkv":
            if stream == "x":
                return [f"{base}.to_q", f"{base}.to_k", f"{base}.to_v"], True
            if attn == "attn2":
                return None
            return [f"{base}.add_q_proj", f"{base}.add_k_proj", f"{base}.add_v_proj"], True
        if stream == "x":
            return [f"{base}.to_out.0"], False
        return ([f"{base}.to_add_out"], False) if attn == "attn" else None
    n, stream, fc = m.group(5), m.group(6), m.group(7)
    ff = "ff" if stream == "x" else "ff_context"
    return [f"transformer_blocks.{n}.{ff}.net.{'0.proj' if fc == 'fc1' else '2'}"], False


def convert(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    out, skipped = {}, []
    modules = sorted({k.split(".")[0] for k in state})
    for module in modules:
        down, up = state.get(f"{module}.lora_down.weight"), state.get(f"{module}.lora_up.weight")
        mapped = targets(module)
        if mapped is None or down is None or up is None:
            skipped += [k for k in state if k.split(".")[0] == module]
            continue
        names, split = mapped
        rank = down.shape[0]
        alpha = float(np.asarray(state.get(f"{module}.alpha", np.float32(rank))).reshape(-1)[0])
        up = up.astype(np.float32) * np.float32(alpha / rank)
        ups = np.split(up, 3, axis=0) if split else [up]
        for name, b in zip(names, ups):
            out[f"transformer.{name}.lora_A.weight"] = np.ascontiguousarray(down.astype(np.float32))
            out[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out, skipped


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    from safetensors.numpy import load_file, save_file

    out, skipped = convert(load_file(sys.argv[1]))
    if skipped:
        print(f"not converted ({len(skipped)} keys): {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}",
              file=sys.stderr)
    if not out:
        raise SystemExit("no kohya SD3 transformer LoRA keys found")
    save_file(out, sys.argv[2])
    print(f"{sys.argv[2]}: {len(out) // 2} modules")


if __name__ == "__main__":
    main()
