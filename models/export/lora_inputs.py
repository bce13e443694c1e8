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
weight. Graphs rewritten with `--fused-kernels` (models/export/fused_kernels.py) work too: their LinearConcat /
LinearSplit / Linear nodes take the stock MatMul weights, found by the rewrite's node names. An initializer used by
more than one node is skipped (a merged value would change both).

ONNX Runtime disables constant folding and pre-packing only for these initializers (documented for overridable
initializers), so the stock graph's speed without LoRA is kept except for those optimisations on these weights.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
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
    name = node_name[1:-len(suffix)].replace("/", ".")
    # models/export/export_sd3.py exports a wrapper module (`self.m`): its node names start with "/m/".
    return name.removeprefix("m.")


FUSED = re.compile(r"^/fk/(\d+)/(attn/(to_q|to_k|to_v|out)|(ff|ff_context)/net\.(0|2))$")


def fused_weights(node) -> list[tuple[str, str]]:
    """(module, weight input) of a node of the crate's fused operators (models/export/fused_kernels.py), which take
    the stock graph's MatMul weights ([in, out]) as they are: LinearConcat (q, k or v of both streams: weights at
    inputs 1 and 4), LinearSplit (to_out.0 and to_add_out: inputs 1 and 3) and Linear (feed-forward: input 1)."""
    m = FUSED.match(node.name)
    if not m:
        return []
    i = m.group(1)
    b = f"transformer_blocks.{i}"
    ins = list(node.input)
    pick = lambda k: ins[k] if len(ins) > k and ins[k] else None  # noqa: E731
    if node.op_type == "LinearConcat" and m.group(3) in ("to_q", "to_k", "to_v"):
        x = m.group(3)[-1]
        return [(f"{b}.attn.to_{x}", pick(1)), (f"{b}.attn.add_{x}_proj", pick(4))]
    if node.op_type == "LinearSplit" and m.group(3) == "out":
        return [(f"{b}.attn.to_out.0", pick(1)), (f"{b}.attn.to_add_out", pick(3))]
    if node.op_type == "Linear" and m.group(4):
        return [(f"{b}.{m.group(4)}.net.{'0.proj' if m.group(5) == '0' else '2'}", pick(1))]
    return []


def own_data(path: Path):
    """Gives `model.onnx.data` its own copy when it is hard-linked (fused_kernels.py links the weights it keeps
    unchanged to the stock folder's file): onnx refuses to load hard-linked external data, and the rewrite must not
    change the other folder's weights."""
    data = path.parent / (path.name + ".data")
    if data.is_file() and data.stat().st_nlink > 1:
        tmp = data.with_suffix(".data.own")
        shutil.copyfile(data, tmp)
        tmp.replace(data)


def rewrite(path: Path, pattern: re.Pattern, all_linear: bool):
    own_data(path)
    model = onnx.load(str(path))
    g = model.graph
    fp8 = sorted({n.op_type for n in g.node if n.domain == "sd3onnx" and n.op_type.endswith("Fp8")})
    if fp8:
        # the block products' weights are E4M3 bytes with a per-tensor scale: a LoRA delta added at run time would
        # need re-quantizing every merged weight, which the crate does not do
        raise SystemExit(f"{path}: an FP8 graph ({', '.join(fp8)}; fused_kernels.py --fp8) cannot be made LoRA-ready: "
                         "its matrix-product weights are E4M3. Run lora_inputs.py on the float16 fused graph instead")
    inits = {i.name: i for i in g.initializer}
    uses = Counter(x for n in g.node for x in n.input)
    existing_inputs = {i.name for i in g.input}
    modules, base = {}, {}

    def add(n, name, w, layout):
        if name is None or w not in inits or len(inits[w].dims) != 2 or uses[w] != 1:
            return
        if not (all_linear or pattern.search(name)):
            return
        if layout is None and n.op_type == "Gemm":
            attrs = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            if attrs.get("transA", 0) != 0:
                return
            layout = "out_in" if attrs.get("transB", 0) == 1 else "in_out"
        layout = layout or "in_out"
        arr = numpy_helper.to_array(inits[w])
        if arr.dtype not in (np.float32, np.float16):
            return
        modules[name] = {"input": w, "shape": list(arr.shape), "layout": layout, "dtype": str(arr.dtype)}
        base[name] = arr
        if w not in existing_inputs:
            g.input.append(helper.make_tensor_value_info(w, inits[w].data_type, list(arr.shape)))

    for n in g.node:
        if n.domain not in ("", "ai.onnx") and n.op_type in ("LinearConcat", "LinearSplit", "Linear"):
            found = [(name, w, "in_out") for name, w in fused_weights(n) if w]
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2:
            found = [(module_name(n.name, n.op_type), n.input[1], None)]
        else:
            continue
        for name, w, layout in found:
            add(n, name, w, layout)
    if not modules:
        raise SystemExit(f"{path}: no LoRA-targetable MatMul/Gemm weights found")
    save(model, path)
    from safetensors.numpy import save_file

    save_file(base, str(path.parent / "lora_base.safetensors"))
    (path.parent / "lora_targets.json").write_text(
        json.dumps({"version": 1, "modules": modules}, indent=1, sort_keys=True) + "\n")
    print(f"{path}: {len(modules)} LoRA targets")


def save(model: onnx.ModelProto, path: Path):
    """Writes the graph in place; over ~1.8 GB of weights (protobuf's 2 GB limit) into `model.onnx.data` beside it,
    as models/export/export_sd3.py does (onnx.load has read the old external data into memory already)."""
    if sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000:
        data = path.parent / (path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))


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
