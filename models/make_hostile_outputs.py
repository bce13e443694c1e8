#!/usr/bin/env python3
"""Generates models/fixtures/hostile/{t5_batch0,vae_decoder_fixed_shape}.onnx: graphs with the right signature
that answer with the wrong output shape (issue 15, item 8), for tests/hostile_outputs.rs. Each replaces one graph
of a scratch copy of models/fixtures/tiny-sd3.

  t5_batch0.onnx               input_ids int64 [batch, seq] -> last_hidden_state float [0, seq, 32]
                               (a T5 graph whose output batch is empty: the crate used to index row 0 and panic)
  vae_decoder_fixed_shape.onnx latent_sample float [batch, 16, h, w] -> sample float [batch, 3, 24, 40] of zeros,
                               whatever the latents' size (tiles of inconsistent shape: the tiled decode's blend
                               used to panic on them)

Only `onnx` is needed (pinned in models/requirements.txt: onnx==1.19.1):

    .venv-tools/bin/python models/make_hostile_outputs.py
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent / "fixtures" / "hostile"
T5_WIDTH = 32  # models/fixtures/tiny-sd3/transformer/config.json joint_attention_dim


def save(graph, name):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, OUT / name)
    print("wrote", OUT / name)


def t5_batch0():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [None, "sequence_length", T5_WIDTH])
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "one", "two"], ["seq"]),
        helper.make_node("Concat", ["zero", "seq", "width"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["last_hidden_state"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("width", TensorProto.INT64, [1], [T5_WIDTH]),
    ]
    save(helper.make_graph(nodes, "t5_batch0", [ids], [out], inits), "t5_batch0.onnx")


def vae_fixed_shape():
    lat = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch_size", 16, "h", "w"])
    out = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 3, None, None])
    nodes = [
        helper.make_node("Shape", ["latent_sample"], ["lat_shape"]),
        helper.make_node("Slice", ["lat_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "rest"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["sample"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("rest", TensorProto.INT64, [3], [3, 24, 40]),
    ]
    save(helper.make_graph(nodes, "vae_fixed_shape", [lat], [out], inits), "vae_decoder_fixed_shape.onnx")


if __name__ == "__main__":
    t5_batch0()
    vae_fixed_shape()
