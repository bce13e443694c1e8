#!/usr/bin/env python3
"""Makes an exported transformer graph LoRA-ready, once, in place: the weights of its LoRA-targetable linear layers
become *overridable initializers* (initializers that are also graph inputs), so the crate can feed merged weights
`W + sum_i scale_i * alpha_i / r_i * B_i @ A_i` per request through the same ONNX Runtime session, and leave them
unfed (the graph's own weights) when no LoRA is active.

    python models/export/lora_inputs.py MODEL_FOLDER [--all-linear] [--components transformer,text_encoder,...]

By default every component folder present among transformer/, text_encoder/ (CLIP-L) and text_encoder_2/ (CLIP-G)
is rewritten. Writes, next to each <component>/model.onnx:
  lora_targets.json          {"version": 1, "modules": {diffusers module name: {"input": graph input name,
                             "shape": [..], "layout": "in_out" | "out_in", "dtype": "float32" | "float16"}}}
  lora_base.safetensors      the base weights of those modules, keyed by module name, in the graph's layout
                             (the crate merges onto them; the ONNX file keeps its copy as the default value).

Module names come from the exporter's node names (`/transformer_blocks.0/attn/to_q/MatMul` ->
`transformer_blocks.0.attn.to_q`, `/text_model/encoder/layers.0/self_attn/q_proj/MatMul` ->
`text_model.encoder.layers.0.self_attn.q_proj`). MatMul weights are [in, out] ("in_out", torch's Linear weight transposed); Gemm
weights with transB=1 are [out, in]. By default the attention projections (`attn`, `attn2`: to_q/k/v, to_out.0,
add_q/k/v_proj, to_add_out) and the feed-forward layers (`ff`, `ff_context`) are targeted, the modules LoRA
trainers (diffusers' train_dreambooth_lora_sd3.py, sd-scripts) train; in the CLIP text encoders the attention
projections (q/k/v/out_proj) and the MLP (fc1, fc2), as peft's and sd-scripts' defaults; `--all-linear` takes every MatMul/Gemm
weight. An initializer used by more than one node is skipped (a merged value would change both).

ONNX Runtime disables constant folding and pre-packing only for these initializers (documented for overridable
initializers), so the stock graph's speed without LoRA is kept except for those optimisations on these weights.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT = re.compile(
    r"(^|\.)(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2))$"
)


TEXT = re.compile(r"(^|\.)(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def module_name(node_name: str, op: str) -> str | None:
    suffix = f"/{op}"
    if not node_name.startswith("/") or not node_name.endswith(suffix):
        return None
    return node_name[1:-len(suffix)].replace("/", ".")


def rewrite(path: Path, pattern: re.Pattern, all_linear: bool):
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses = Counter(x for n in g.node for x in n.input)
    existing_inputs = {i.name for i in g.input}
    modules, base = {}, {}
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        w = n.input[1]
        name = module_name(n.name, n.op_type)
        if name is None or w not in inits or len(inits[w].dims) != 2 or uses[w] != 1:
            continue
        if not (all_linear or pattern.search(name)):
            continue
        if n.op_type == "Gemm":
            attrs = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            if attrs.get("transA", 0) != 0:
                continue
            layout = "out_in" if attrs.get("transB", 0) == 1 else "in_out"
        else:
            layout = "in_out"
        arr = numpy_helper.to_array(inits[w])
        if arr.dtype not in (np.float32, np.float16):
            continue
        modules[name] = {"input": w, "shape": list(arr.shape), "layout": layout, "dtype": str(arr.dtype)}
        base[name] = arr
        if w not in existing_inputs:
            g.input.append(helper.make_tensor_value_info(w, inits[w].data_type, list(arr.shape)))
    if not modules:
        raise SystemExit(f"{path}: no LoRA-targetable MatMul/Gemm weights found")
    onnx.save(model, str(path))
    from safetensors.numpy import save_file

    save_file(base, str(path.parent / "lora_base.safetensors"))
    (path.parent / "lora_targets.json").write_text(
        json.dumps({"version": 1, "modules": modules}, indent=1, sort_keys=True) + "\n")
    print(f"{path}: {len(modules)} LoRA targets")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--all-linear", action="store_true")
    ap.add_argument("--components", default="transformer,text_encoder,text_encoder_2")
    a = ap.parse_args()
    done = 0
    for c in a.components.split(","):
        path = a.folder / c / "model.onnx"
        if path.is_file():
            rewrite(path, DEFAULT if c == "transformer" else TEXT, a.all_linear)
            done += 1
    if not done:
        raise SystemExit(f"{a.folder}: none of {a.components} has a model.onnx")


if __name__ == "__main__":
    main()
