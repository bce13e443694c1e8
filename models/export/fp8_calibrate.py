#!/usr/bin/env python3
"""Static activation scales for an FP8 graph (issue 19; optional: the default is dynamic scaling, amax / 448 of
each activation computed on the fly). Runs the *float16 fused* transformer (fused_kernels.py, without --fp8) in
onnx's ReferenceEvaluator with the numpy operators of fused_reference.py, records max |x| of every activation
that a Linear / LinearConcat / LinearSplit node reads over the calibration runs, and writes
`{node name: [scale per activation input]}` with scale = margin * amax / 448, for
`fused_kernels.py --fp8 --fp8-scales FILE` (stored as the FP8 operators' optional x_scale inputs).

    python models/export/fp8_calibrate.py FUSED/transformer/model.onnx scales.json [--runs 4] [--margin 1.0]
        [--latent 64x64] [--context 154]

Calibration inputs: random latents (standard normal, as the sampler's noise; batch 2 as with CFG), random text
conditioning, timesteps spread over (0, 1000). That is a synthetic stand-in: for real weights, calibrate with
encoder outputs of real prompts (not done). The trade-off against dynamic scaling (docs/performance.md, "FP8"):
no amax pass at run time, but an activation larger than margin * the calibrated amax is clipped at +-448 * scale.
The numpy run is slow at real widths: SD3-medium's widths with 2 of the 24 blocks, 3 runs at 32x32 latents and 333
text tokens took 81 s on a 2-core CPU before float16 MatMuls ran in float32 and the weights' float32 copies were
kept between calls (identical scales), 26 s after (the full model's 24 blocks: not timed here).
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fused_reference as fr  # noqa: E402

AMAX: dict = {}


def _record(node, *xs):
    a = AMAX.setdefault(node.name, [0.0] * len(xs))
    for i, x in enumerate(xs):
        a[i] = max(a[i], float(np.nanmax(np.abs(x.astype(np.float32)))) if x.size else 0.0)


class Linear(fr.Linear):
    def _run(self, x, w, b, activation=0):
        _record(self.onnx_node, x)
        return super()._run(x, w, b, activation=activation)


class LinearConcat(fr.LinearConcat):
    def _run(self, xa, wa, ba, xb, wb, bb):
        _record(self.onnx_node, xa, xb)
        return super()._run(xa, wa, ba, xb, wb, bb)


class LinearSplit(fr.LinearSplit):
    def _run(self, x, wa, ba, wb=None, bb=None, like_a=None):
        _record(self.onnx_node, x)  # one scale for all of x, as LinearSplitFp8
        return super()._run(x, wa, ba, wb, bb, like_a)


def feeds(model: onnx.ModelProto, rng, latent=(8, 12), context=29, t=500.0) -> dict:
    out = {}
    for i in model.graph.input:
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        last = dims[-1] if dims else None
        chans = dims[1] if len(dims) == 4 and dims[1] else 16
        shape = {"hidden_states": (2, chans, *latent), "encoder_hidden_states": (2, context, last or 32),
                 "pooled_projections": (2, last or 20), "timestep": (2,)}[i.name]
        a = np.full(shape, t, np.float32) if i.name == "timestep" else rng.standard_normal(shape).astype(np.float32)
        out[i.name] = a.astype(np.float16) if tt.elem_type == TensorProto.FLOAT16 else a
    return out


class MatMul(OpRun):
    """ONNX MatMul with float16 operands computed in float32 and rounded back (as cuBLAS accumulates): numpy has no
    BLAS for float16, and SD3-medium's two plain MatMuls (context_embedder, proj_out) took 19 s of each 30 s
    calibration run of a 2-block graph that way."""

    def _run(self, a, b):
        if a.dtype == np.float16 or b.dtype == np.float16:
            return ((a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16),)
        return (np.matmul(a, b),)


class _Float32Copies:
    """Float32 copies of the graph's float16 weights, made once: the evaluator hands the same initializer arrays
    to every node call of every run, and fused_reference's products converted them at each call (the same values)."""

    def __init__(self):
        self.copies = {}

    def __call__(self, a):
        hit = self.copies.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        f = a.astype(np.float32)
        self.copies[id(a)] = (a, f)
        return f


def calibrate(model: onnx.ModelProto, runs: list, margin: float = 1.0) -> dict:
    """`runs`: feed dicts. Returns {node name: [scales]} (amax 0 -> scale 1, as dynamic scaling)."""
    AMAX.clear()
    ev = ReferenceEvaluator(model, new_ops=[Linear, LinearConcat, LinearSplit, fr.ModNorm, fr.HeadRmsNorm,
                                            fr.MultiHeadAttention, MatMul])
    weights = _Float32Copies()
    plain_mm = fr._mm
    fr._mm = lambda x, w, b: x.astype(np.float32) @ weights(w) + weights(b)  # fused_reference._mm's arithmetic
    try:
        for f in runs:
            ev.run(None, f)
    finally:
        fr._mm = plain_mm
    # float32 arithmetic as the kernels' amax / 448
    return {n: [float(np.float32(margin) * np.float32(a) / np.float32(448.0)) if a > 0 else 1.0 for a in v]
            for n, v in AMAX.items()}


def load_with_data(path: str) -> onnx.ModelProto:
    """onnx.load with the external data read by fused_kernels.tensor_array: onnx 1.23 refuses data files with more
    than one hard link, and fused_kernels.py hard-links the folders it writes."""
    import fused_kernels as fk  # noqa: E402 (this folder is on sys.path, above)

    model = onnx.load(path, load_external_data=False)
    base = str(pathlib.Path(path).resolve().parent)
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            arr = fk.tensor_array(t, base)
            t.raw_data = arr.tobytes()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the float16 fused transformer (fused_kernels.py without --fp8)")
    ap.add_argument("out", help="scales JSON for fused_kernels.py --fp8 --fp8-scales")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--margin", type=float, default=1.0, help="scale = margin * amax / 448 (above 1: headroom)")
    ap.add_argument("--latent", default="8x12", help="latent height x width (pixels / 8)")
    ap.add_argument("--context", type=int, default=29, help="text tokens")
    args = ap.parse_args()
    model = load_with_data(args.model)
    h, w = (int(v) for v in args.latent.split("x"))
    rng = np.random.default_rng(0)
    ts = np.linspace(1000, 0, args.runs + 2)[1:-1]
    scales = calibrate(model, [feeds(model, rng, (h, w), args.context, float(t)) for t in ts], args.margin)
    pathlib.Path(args.out).write_text(json.dumps(scales, indent=1) + "\n")
    print(f"wrote {args.out}: {len(scales)} nodes from {args.runs} runs")


if __name__ == "__main__":
    main()
