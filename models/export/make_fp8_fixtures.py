#!/usr/bin/env python3
"""FP8 fixtures (issue 19), all small and committed:

    models/fixtures/export-tiny-fp16-fused-fp8/transformer/model.onnx       export-tiny-fp16-fused through
    models/fixtures/export-tiny-dual-fp16-fused-fp8/transformer/model.onnx  `fused_kernels.to_fp8` (`--fp8`
                                                                            `--fp8-separate-qkv`)
    models/fixtures/export-tiny-fp16-fused-fp8-qkv/transformer/model.onnx   the same, q, k and v merged into
    models/fixtures/export-tiny-dual-fp16-fused-fp8-qkv/...                 LinearConcat3Fp8 (`share_qkv_fp8`,
                                                                            what `--fp8` writes now)
    models/fixtures/fp8/ops.onnx          one node of each FP8 operator (and a stored activation scale that clips)
    models/fixtures/fp8/ops_fast.onnx     the same with fast_accum=1 (ops_bad_accum.onnx: 2, refused)
    models/fixtures/fp8/mlp.onnx          a feed-forward's two FP8 products with stored scales, and
    models/fixtures/fp8/mlp_merged.onnx   the same as one MlpFp8 (`merge_mlp_fp8`)
    models/fixtures/fp8/<name>.txt/.bin   inputs and expected outputs of those graphs from the Python emulation of
                                          the FP8 operators (fused_reference.py: torch float8_e4m3fn casts)

The Rust tests (src/runtime/kernels/mod.rs, tests/export_parity.rs) run the same graphs through the crate's CPU
kernels in ONNX Runtime and compare. `.txt`: one line per tensor, `name dim0 dim1 ...`; `.bin`: their float32
values, little-endian, in that order (inputs first, then the outputs the Python emulation gave).

    .venv-diffusers-cn/bin/python models/export/make_fp8_fixtures.py
"""
import hashlib
import json
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fused_kernels  # noqa: E402
import fused_reference  # noqa: E402

FIX = HERE.parent / "fixtures"
F16, F32 = np.float16, np.float32


def write_tensors(stem: pathlib.Path, tensors: list, dtype: str = "<f4"):
    """`dtype` "<f2" (float16, for values that are float16 anyway: half the bytes) marks the .txt with "#f16"."""
    with open(stem.with_suffix(".bin"), "wb") as f:
        for _, a in tensors:
            f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
    head = "#f16\n" if dtype == "<f2" else ""
    stem.with_suffix(".txt").write_text(head + "".join(f"{n} {' '.join(map(str, a.shape))}\n" for n, a in tensors))


def transformer_feeds(model: onnx.ModelProto) -> dict:
    """The inputs fused_reference.py uses: batch 2, 8x12 latent, 29 context tokens, two timesteps."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        last = dims[-1] if dims else None
        shape = {"hidden_states": (2, 16, 8, 12), "encoder_hidden_states": (2, 29, last or 32),
                 "pooled_projections": (2, last or 20), "timestep": (2,)}[i.name]
        a = np.array([981.5, 3.25], F32) if i.name == "timestep" else rng.standard_normal(shape).astype(F32)
        feeds[i.name] = a.astype(F16) if t.elem_type == TensorProto.FLOAT16 else a
    return feeds


def fp8_transformer(src: str, dst: str) -> dict:
    model = onnx.load(str(FIX / src / "transformer" / "model.onnx"))
    counts = fused_kernels.to_fp8(model)
    out = FIX / dst / "transformer" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    feeds = transformer_feeds(model)
    ev = ReferenceEvaluator(model, new_ops=fused_reference.OPS)
    name = model.graph.output[0].name
    y8 = ev.run(None, feeds)[0].astype(F32)
    y16 = ReferenceEvaluator(onnx.load(str(FIX / src / "transformer" / "model.onnx")),
                             new_ops=fused_reference.OPS).run(None, feeds)[0].astype(F32)
    d = np.abs(y8 - y16)
    stats = dict(max_abs_vs_fp16_fused=float(d.max()), mean_abs_vs_fp16_fused=float(d.mean()),
                 output_mean_magnitude=float(np.abs(y16).mean()))
    print(f"{dst}: {counts}; FP8 vs float16 fused (Python emulation): {stats}")
    write_tensors(FIX / "fp8" / dst, [(k, v.astype(F32)) for k, v in feeds.items()] + [(name, y8)])
    if dst == "export-tiny-fp16-fused-fp8":  # (the dual fixture's would be 240 KB more; same operators)
        probe_graph(dst, model, feeds)
    # the float16 fused graph's output from the same numpy operators: how far the emulation of the graph's other
    # operators (ONNX's reference implementations, numpy float16) is from ONNX Runtime's, without FP8
    write_tensors(FIX / "fp8" / (src + "-numpy"), [(k, v.astype(F32)) for k, v in feeds.items()] + [(name, y16)])
    data = out.read_bytes()
    manifest = dict(tool="models/export/make_fp8_fixtures.py -> fused_kernels.to_fp8 (= fused_kernels.py --fp8)",
                    source=f"models/fixtures/{src}/transformer/model.onnx", fp8=counts, python_emulation=stats,
                    files={"transformer/model.onnx": dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())})
    (FIX / dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return stats


def qkv_transformer(src: str, dst: str) -> int:
    """`src`'s FP8 transformer (made by fp8_transformer) with each block's q, k and v merged into one
    LinearConcat3Fp8 (fused_kernels.share_qkv_fp8). The Python emulation of both gives the same output to the bit
    (checked here: the merged node quantizes the same activations with the same scales once instead of three
    times); the Rust test compares the crate's kernels on both graphs the same way."""
    model = onnx.load(str(FIX / src / "transformer" / "model.onnx"))
    merged = fused_kernels.share_qkv_fp8(model)
    out = FIX / dst / "transformer" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    feeds = transformer_feeds(model)
    y = ReferenceEvaluator(model, new_ops=fused_reference.OPS).run(None, feeds)[0]
    y0 = ReferenceEvaluator(onnx.load(str(FIX / src / "transformer" / "model.onnx")),
                            new_ops=fused_reference.OPS).run(None, feeds)[0]
    same = bool(np.array_equal(y.view(np.uint16), y0.view(np.uint16)))
    print(f"{dst}: {merged} LinearConcat3Fp8 nodes, {len(model.graph.node)} nodes; emulation equal to {src}'s to the "
          f"bit: {same}")
    assert merged > 0 and same
    data = out.read_bytes()
    manifest = dict(tool="models/export/make_fp8_fixtures.py -> fused_kernels.share_qkv_fp8 (= fused_kernels.py --fp8)",
                    source=f"models/fixtures/{src}/transformer/model.onnx", fp8_qkv_merged=merged,
                    python_emulation_equal_to_source=same,
                    files={"transformer/model.onnx": dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())})
    (FIX / dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return merged


def probe_graph(dst: str, model: onnx.ModelProto, feeds: dict):
    """models/fixtures/fp8/<dst>-nodes.onnx: every FP8 node of the transformer `model` on its own, with the
    activations it reads in the Python emulation's run on `feeds` as graph inputs (same names) and its weights as
    initializers, so that the Rust test can run the crate's kernels on the transformer's real activations and
    compare node by node (exact up to the accumulation order), free of the numpy-vs-ONNX Runtime differences of
    the graph's other operators. Inputs and the emulation's outputs go to <dst>-nodes.txt/.bin."""
    ev = ReferenceEvaluator(model, new_ops=fused_reference.OPS)
    values = ev.run(None, feeds, intermediate=True)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == "sd3onnx" and n.op_type.endswith("Fp8")]
    used = []
    for n in nodes:
        for i in n.input:
            if i and i not in used:
                used.append(i)
    acts = [i for i in used if i not in inits]
    outs = [o for n in nodes for o in n.output if o]
    # outputs renamed (":out"): a node's output may be another node's recorded input (ff1 -> ff2)
    copies = []
    for n in nodes:
        c = onnx.NodeProto.FromString(n.SerializeToString())
        for k, o in enumerate(c.output):
            if o:
                c.output[k] = o + ":out"
        copies.append(c)
    f16 = TensorProto.FLOAT16
    g = helper.make_graph(copies, "fp8_nodes",
                          [helper.make_tensor_value_info(a, f16, list(values[a].shape)) for a in acts],
                          [helper.make_tensor_value_info(o + ":out", f16, None) for o in outs],
                          [inits[i] for i in used if i in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sd3onnx", 1)])
    m.ir_version = 8
    onnx.save(m, str(FIX / "fp8" / f"{dst}-nodes.onnx"))
    write_tensors(FIX / "fp8" / f"{dst}-nodes", [(a, values[a]) for a in acts] +
                  [(o + ":out", values[o]) for o in outs], dtype="<f2")
    print(f"{dst}-nodes.onnx: {len(nodes)} nodes, {len(acts)} activations, {len(outs)} outputs")
    return len(acts)


def ops_graph():
    """One node of each FP8 operator at K = 64, activations with a few outliers (so the per-tensor scale matters)."""
    rng = np.random.default_rng(19)
    K, N, N2 = 64, 48, 32
    inits, nodes = [], []

    def weight(name, n, k):
        w16 = (rng.standard_normal((k, n)) * 0.05).astype(F16)
        q, s = fused_kernels.e4m3_weight(w16, name)
        inits.extend([q, s])
        b = numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(F16), name + "_b")
        inits.append(b)
        return [q.name, s.name, b.name]

    w1, wa, wb, wsa, wsb = weight("w1", N, K), weight("wa", N, K), weight("wb", N, K), weight("wsa", N2, K), \
        weight("wsb", N2, K)
    # a stored activation scale half the dynamic one would need: the largest values saturate at 448
    inits.append(numpy_helper.from_array(np.array([0.02], F32), "x_static"))
    nodes += [helper.make_node("LinearFp8", ["x", *w1, ""], ["y_gelu"], domain="sd3onnx", activation=1),
              helper.make_node("LinearFp8", ["x", *w1, "x_static"], ["y_static"], domain="sd3onnx", activation=0),
              helper.make_node("LinearConcatFp8", ["x", *wa, "c", *wb, "", ""], ["y_concat"], domain="sd3onnx"),
              helper.make_node("Concat", ["x", "c"], ["xc"], axis=1),
              helper.make_node("LinearSplitFp8", ["xc", *wsa, *wsb, "x", ""], ["y_split_a", "y_split_b"],
                               domain="sd3onnx")]
    f16 = TensorProto.FLOAT16
    g = helper.make_graph(nodes, "fp8_ops",
                          [helper.make_tensor_value_info("x", f16, [2, 7, K]),
                           helper.make_tensor_value_info("c", f16, [2, 3, K])],
                          [helper.make_tensor_value_info(n, f16, None)
                           for n in ("y_gelu", "y_static", "y_concat", "y_split_a", "y_split_b")], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sd3onnx", 1)])
    m.ir_version = 8
    onnx.save(m, str(FIX / "fp8" / "ops.onnx"))
    x = rng.standard_normal((2, 7, K)).astype(F32)
    x[0, 3, 5], x[1, 6, 60] = 14.0, -9.5  # outliers
    c = (rng.standard_normal((2, 3, K)) * 3).astype(F32)
    feeds = {"x": x.astype(F16), "c": c.astype(F16)}
    outs = ReferenceEvaluator(m, new_ops=fused_reference.OPS).run(None, feeds)
    names = [o.name for o in g.output]
    write_tensors(FIX / "fp8" / "ops", [(k, v.astype(F32)) for k, v in feeds.items()] +
                  [(n, o.astype(F32)) for n, o in zip(names, outs)])
    print("ops.onnx:", {n: float(np.abs(o.astype(F32)).max()) for n, o in zip(names, outs)})


def static_scales_check(src: str):
    """Stored activation scales (fp8_calibrate.py -> to_fp8(act_scales=...)), calibrated on the float16 graph with
    the fixture's own input (margin 1), against dynamic scaling: on that input they differ only where FP8 moved the
    activations of later blocks away from the float16 ones; on another input (other timestep and noise) clipping
    can appear. Printed, not written (the operators' stored-scale input is tested by ops.onnx's y_static); the
    FP8 graphs' own difference from float16 is printed beside for scale."""
    import fp8_calibrate
    path = str(FIX / src / "transformer" / "model.onnx")
    fused = onnx.load(path)
    f0 = transformer_feeds(fused)
    f1 = fp8_calibrate.feeds(fused, np.random.default_rng(7), (8, 12), 29, 250.0)
    scales = fp8_calibrate.calibrate(fused, [f0])
    static, dynamic = onnx.load(path), onnx.load(path)
    fused_kernels.to_fp8(static, act_scales=scales)
    fused_kernels.to_fp8(dynamic)

    def run(m, f):
        return ReferenceEvaluator(m, new_ops=fused_reference.OPS).run(None, f)[0].astype(F32)

    for what, f in (("the calibration input", f0), ("another input", f1)):
        ref = run(fused, f)
        ys, yd = run(static, f), run(dynamic, f)
        d, e, g = np.abs(ys - yd), np.abs(yd - ref), np.abs(ys - ref)
        print(f"{src}, {what}: static vs dynamic scales max {d.max():.3g}, mean {d.mean():.3g}; vs float16: "
              f"dynamic max {e.max():.3g}, mean {e.mean():.3g}, static max {g.max():.3g}, mean {g.mean():.3g}")


def mlp_graphs():
    """fp8/mlp.onnx: a feed-forward as `--fp8 --fp8-scales` writes it (a GELU LinearFp8, K 64 -> 96, then a
    LinearFp8 96 -> 48, both with stored activation scales; the second scale half what the GELU output's amax needs,
    so its largest values saturate at 448), and fp8/mlp_merged.onnx, the same through `merge_mlp_fp8` (one MlpFp8).
    fp8/mlp.txt/.bin: the input and the emulation's output of the two-node graph."""
    rng = np.random.default_rng(22)
    K, H, N = 64, 96, 48
    inits = []

    def weight(name, n, k):
        w16 = (rng.standard_normal((k, n)) * 0.08).astype(F16)
        q, sc = fused_kernels.e4m3_weight(w16, name)
        b = numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(F16), name + "_b")
        inits.extend([q, sc, b])
        return [q.name, sc.name, b.name]

    w1, w2 = weight("fc1", H, K), weight("fc2", N, H)
    x = rng.standard_normal((2, 7, K)).astype(F32)
    x[1, 2, 9] = 11.0  # an outlier
    x16 = x.astype(F16)
    x_scale = float(np.abs(x16.astype(F32)).max()) / 448 * 1.25
    f16 = TensorProto.FLOAT16

    def model(h_scale):
        sc = [numpy_helper.from_array(np.array([x_scale], F32), "x_scale"),
              numpy_helper.from_array(np.array([h_scale], F32), "h_scale")]
        nodes = [helper.make_node("LinearFp8", ["x", *w1, "x_scale"], ["h"], name="ff1", domain="sd3onnx",
                                  activation=1),
                 helper.make_node("LinearFp8", ["h", *w2, "h_scale"], ["y"], name="ff2", domain="sd3onnx",
                                  activation=0)]
        g = helper.make_graph(nodes, "fp8_mlp", [helper.make_tensor_value_info("x", f16, [2, 7, K])],
                              [helper.make_tensor_value_info("y", f16, None)], inits + sc)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sd3onnx", 1)])
        m.ir_version = 8
        return m

    h = ReferenceEvaluator(model(1.0), new_ops=fused_reference.OPS).run(["h"], {"x": x16})[0]
    h_scale = float(np.abs(h.astype(F32)).max()) / 448 * 0.5
    m = model(h_scale)
    onnx.save(m, str(FIX / "fp8" / "mlp.onnx"))
    y = ReferenceEvaluator(m, new_ops=fused_reference.OPS).run(None, {"x": x16})[0]
    merged = onnx.ModelProto.FromString(m.SerializeToString())
    count = fused_kernels.merge_mlp_fp8(merged)
    assert count == 1 and [n.op_type for n in merged.graph.node] == ["MlpFp8"], count
    y2 = ReferenceEvaluator(merged, new_ops=fused_reference.OPS).run(None, {"x": x16})[0]
    assert (y.view(np.uint16) == y2.view(np.uint16)).all(), "merged emulation differs"
    onnx.save(merged, str(FIX / "fp8" / "mlp_merged.onnx"))
    write_tensors(FIX / "fp8" / "mlp", [("x", x16.astype(F32)), ("y", y.astype(F32))])
    sat = int((np.abs(h.astype(F32)) / np.float32(h_scale) > 448).sum())
    print(f"fp8/mlp.onnx, mlp_merged.onnx: |y| max {float(np.abs(y.astype(F32)).max()):.3f}, "
          f"h values saturating at the stored scale: {sat}")


def fast_accum_graphs():
    """fp8/ops_fast.onnx: ops.onnx with fast_accum=1 on its FP8 nodes (`fused_kernels.set_fast_accum`: cuBLASLt's
    fast accumulation on CUDA; the same values as ops.onnx's through the CPU kernels and the emulation, so ops.bin
    serves both); fp8/ops_bad_accum.onnx: fast_accum=2 on them, which the kernels refuse."""
    for name, value in (("ops_fast", 1), ("ops_bad_accum", 2)):
        m = onnx.load(str(FIX / "fp8" / "ops.onnx"))
        n = fused_kernels.set_fast_accum(m)
        for node in m.graph.node:
            for a in node.attribute:
                if a.name == "fast_accum":
                    a.i = value
        onnx.save(m, str(FIX / "fp8" / f"{name}.onnx"))
        print(f"fp8/{name}.onnx: fast_accum={value} on {n} nodes")


if __name__ == "__main__":
    (FIX / "fp8").mkdir(exist_ok=True)
    if sys.argv[1:] == ["--qkv-only"]:  # the merged fixtures from the committed FP8 ones
        for src in ("export-tiny-fp16-fused-fp8", "export-tiny-dual-fp16-fused-fp8"):
            qkv_transformer(src, src + "-qkv")
        sys.exit(0)
    if sys.argv[1:] == ["--fast-accum-only"]:  # from the committed ops.onnx
        fast_accum_graphs()
        sys.exit(0)
    if sys.argv[1:] == ["--mlp-only"]:
        mlp_graphs()
        sys.exit(0)
    ops_graph()
    fast_accum_graphs()
    mlp_graphs()
    fp8_transformer("export-tiny-fp16-fused", "export-tiny-fp16-fused-fp8")
    fp8_transformer("export-tiny-dual-fp16-fused", "export-tiny-dual-fp16-fused-fp8")
    for src in ("export-tiny-fp16-fused-fp8", "export-tiny-dual-fp16-fused-fp8"):
        qkv_transformer(src, src + "-qkv")
    for src in ("export-tiny-fp16-fused", "export-tiny-dual-fp16-fused"):
        static_scales_check(src)
