#!/usr/bin/env python3
"""Generates models/fixtures/hostile/: tiny VAE-decoder graphs whose weight is ONNX *external data* stored at a
location the model folder should not be able to reach (issue 7, tested by tests/hostile.rs).

Pinned to the same tools as models/make_fixtures.py (models/requirements.txt: onnx==1.19.1, onnxruntime==1.31.1;
only onnx is needed to write the files). Run from anywhere:

    bash models/setup-python.sh && .venv-tools/bin/python models/make_hostile.py [--probe]

`--probe` also opens each graph with onnxruntime (CPU) from a scratch copy laid out like a model folder and prints
what ORT does, which is how the behaviour recorded in tests/hostile.rs was found.

Every graph has the signature of models/fixtures/tiny-sd3/vae_decoder/model.onnx:
    latent_sample float [batch_size, 16, latent_height, latent_width]
 -> sample        float [batch_size, 3, latent_height * 8, latent_width * 8]
computed as a 1x1 Conv (weight `w`, float [3, 16, 1, 1], the external initializer) then a nearest Resize by 8.
Opset 18 / IR 8 like optimum's exports. The files (a few hundred bytes each):

  escape_parent.onnx  `w` at location `../outside.bin`   (leaves the folder; the test writes outside.bin there)
  absolute_path.onnx  `w` at location `/etc/hostname`    (an absolute path; read as raw bytes if ORT follows it,
                                                          length 192 is asked for so a short file also fails,
                                                          but the path is what matters)
  absolute_tmp.onnx   `w` at location ABSOLUTE_TMP        (an absolute path the test creates with 192 valid bytes,
                                                          so only a path check can refuse it)
  missing_file.onnx   `w` at location `missing.bin`      (inside the folder, but absent)
  inside_ok.onnx      `w` at location `weights.bin`      (control: inside the folder; the test writes weights.bin)

The data files themselves are not committed: tests/hostile.rs writes them at run time (192 bytes = 48 floats).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
DST = HERE / "fixtures" / "hostile"
# Absolute location used by absolute_tmp.onnx; tests/hostile.rs creates this exact file (keep in sync).
ABSOLUTE_TMP = "/tmp/sd3-onnx-hostile-absolute.bin"
WEIGHT_SHAPE = [3, 16, 1, 1]
WEIGHT_BYTES = 3 * 16 * 4

CASES = {
    "escape_parent.onnx": "../outside.bin",
    "absolute_path.onnx": "/etc/hostname",
    "absolute_tmp.onnx": ABSOLUTE_TMP,
    "missing_file.onnx": "missing.bin",
    "inside_ok.onnx": "weights.bin",
}


def make_graph(location: str) -> onnx.ModelProto:
    w = TensorProto()
    w.name = "w"
    w.data_type = TensorProto.FLOAT
    w.dims.extend(WEIGHT_SHAPE)
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(WEIGHT_BYTES))):
        e = w.external_data.add()
        e.key, e.value = k, v
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 8.0, 8.0])
    nodes = [
        helper.make_node("Conv", ["latent_sample", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["sample"], mode="nearest"),
    ]
    inp = helper.make_tensor_value_info(
        "latent_sample", TensorProto.FLOAT, ["batch_size", 16, "latent_height", "latent_width"]
    )
    out = helper.make_tensor_value_info(
        "sample", TensorProto.FLOAT, ["batch_size", 3, "latent_height * 8", "latent_width * 8"]
    )
    graph = helper.make_graph(nodes, "hostile_vae_decoder", [inp], [out], initializer=[w, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="make_hostile.py")
    model.ir_version = 8
    # onnx's checker itself refuses `..` and absolute locations ("points outside the directory") and missing files,
    # so check a copy whose weight is inline: the graph is valid ONNX apart from where its data lives.
    inline = onnx.ModelProto()
    inline.CopyFrom(model)
    w0 = inline.graph.initializer[0]
    del w0.external_data[:]
    w0.data_location = TensorProto.DEFAULT
    w0.raw_data = weight_bytes()
    onnx.checker.check_model(inline)
    return model


def weight_bytes() -> bytes:
    return (np.arange(48, dtype=np.float32) / 48.0).tobytes()


def probe():
    """Opens each graph with ORT as the crate does (from the path, CPU) and prints the outcome."""
    import onnxruntime as ort

    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    root = Path(tempfile.mkdtemp(prefix="sd3-hostile-probe-"))
    try:
        folder = root / "model" / "vae_decoder"
        folder.mkdir(parents=True)
        (root / "model" / "outside.bin").write_bytes(weight_bytes())  # what `../outside.bin` resolves to
        (folder / "weights.bin").write_bytes(weight_bytes())
        Path(ABSOLUTE_TMP).write_bytes(weight_bytes())
        for name in CASES:
            dst = folder / "model.onnx"
            shutil.copy(DST / name, dst)
            try:
                s = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
                y = s.run(None, {"latent_sample": np.ones((1, 16, 2, 2), np.float32)})[0]
                print(f"{name:20} LOADED (ran, output {y.shape}, sum {float(y.sum()):.3f})")
            except Exception as e:  # noqa: BLE001 - we want every failure's message
                print(f"{name:20} REFUSED {type(e).__name__}: {e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        Path(ABSOLUTE_TMP).unlink(missing_ok=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="also report what onnxruntime does with each graph")
    args = ap.parse_args()
    shutil.rmtree(DST, ignore_errors=True)
    DST.mkdir(parents=True)
    for name, location in CASES.items():
        # onnx.save would try to re-home external tensors; write the serialized proto as is.
        (DST / name).write_bytes(make_graph(location).SerializeToString())
    print(f"wrote {len(CASES)} graphs to {DST}", file=sys.stderr)
    if args.probe:
        probe()


if __name__ == "__main__":
    main()
