#!/usr/bin/env python3
"""Writes the small graphs that tests/export_parity.rs overlays onto a copy of models/fixtures/tiny-sd3:

    models/fixtures/export-tiny/transformer/model.onnx        fused attention (MultiHeadAttention), float32
    models/fixtures/export-tiny-fp16/transformer/model.onnx   the same, float16 (timestep input stays float32)
    models/fixtures/export-tiny-fp16-fused/transformer/model.onnx  the float16 graph rewritten to the crate's fused
                                                               operators (--fused-kernels; only the Rust crate
                                                               runs them, so tests/export_parity.rs checks it)
    models/fixtures/export-tiny-qk-fp16{,-fused}/transformer/model.onnx  random tiny transformer with SD3.5's q/k
                                                               RMS-norm, float16, without / with --fused-kernels
    models/fixtures/export-tiny-dual-fp16{,-fused}/transformer/model.onnx  random tiny SD3.5-medium-like transformer
                                                               (MMDiT-X dual attention in blocks 0-1 of 4, q/k
                                                               RMS-norm), float16, without / with --fused-kernels

Both come from the SAME weights as models/fixtures/tiny-sd3/transformer/model.onnx: the diffusers transformer is
rebuilt by models/make_fixtures.py's own deterministic construction (build_pipeline: seeded init + informative
gains), then exported by export_sd3.py. Before writing anything, the rebuilt module is checked against the
committed optimum graph of tiny-sd3 on random inputs (they must agree to float32 noise), so a change of
make_fixtures.py that changes the weights is caught here instead of producing a silently different fixture.

    /work/pyenv/bin/python models/export/make_export_fixtures.py
    /work/pyenv/bin/python models/export/make_export_fixtures.py --only dual   # the dual-attention pair only
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(MODELS))

# make_fixtures.py keeps its intermediate files in a build folder; use a private one (nothing is written there by
# the parts used here, but keep out of the way of a concurrent fixture build).
os.environ["SD3_FIXTURE_BUILD"] = tempfile.mkdtemp(prefix="sd3-export-fixture-")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import export_sd3 as ex  # noqa: E402


def rebuild_tiny_sd3_transformer():
    import make_fixtures as mf

    # build_pipeline ends by loading the tokenizers from the build folder; the transformer does not need them.
    mf.load_layout_tokenizers = lambda layout: (None, None, None)
    pipe = mf.build_pipeline(mf.SPECS["tiny-sd3"])
    return pipe.transformer.eval()


def transformer_inputs(cfg, seed=0, batch=2, h=8, w=12, seq=29):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, seq, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([981.5, 3.25][:batch], dtype=torch.float32),
    )


def run_onnx(path: Path, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    arrays = {}
    for k, v in feeds.items():
        a = v.numpy()
        arrays[k] = a.astype(np.float16) if types[k] == "tensor(float16)" else a.astype(np.float32)
    return sess.run(None, arrays)[0].astype(np.float32)


def main():
    torch.set_num_threads(1)
    if sys.argv[1:] == ["--only", "dual"]:
        dual_fixtures()
        return
    fixture = MODELS / "fixtures" / "tiny-sd3" / "transformer" / "model.onnx"
    module = rebuild_tiny_sd3_transformer()
    feeds = transformer_inputs(module.config)
    with torch.no_grad():
        ref = module(**feeds, return_dict=False)[0].numpy()
    err = float(np.abs(run_onnx(fixture, feeds) - ref).max())
    print(f"rebuilt transformer vs committed {fixture.relative_to(MODELS.parent)}: max abs {err:.3g}")
    if err > 1e-4:
        raise SystemExit("the rebuilt transformer does not reproduce the committed tiny-sd3 transformer; "
                         "make_fixtures.py and models/fixtures/tiny-sd3 are out of sync")
    for name, dtype, tol, fused in (("export-tiny", "fp32", 1e-4, False), ("export-tiny-fp16", "fp16", 5e-2, False),
                                    ("export-tiny-fp16-fused", "fp16", None, True)):
        out = MODELS / "fixtures" / name
        info = ex.export_component("transformer", module, out, exporter="torchscript", attention="fused",
                                   dtype=dtype, opset=None, t5_precision="mixed", external=False,
                                   fused_kernels=fused)
        e = None
        if not fused:  # Python's onnxruntime has no sd3onnx operators: tests/export_parity.rs checks that one
            got = run_onnx(out / "transformer" / "model.onnx", feeds)
            e = float(np.abs(got - ref).max())
            print(f"{name}: {info['node_count']} nodes, max abs vs torch fp32 {e:.3g} (tolerance {tol})")
            if not e <= tol:
                raise SystemExit(f"{name}: error {e} above {tol}")
        else:
            print(f"{name}: {info['node_count']} nodes, {info['fused_kernels']}")
        write_manifest(out, "models/export/make_export_fixtures.py -> export_sd3.export_component",
                       "models/fixtures/tiny-sd3 transformer (make_fixtures.build_pipeline, spec tiny-sd3)",
                       dtype, fused, info, e)
    qk_fixtures(feeds)
    dual_fixtures(feeds)


def write_manifest(out: Path, tool: str, weights: str, dtype: str, fused: bool, info: dict, err: float | None):
    """out/manifest.json of a fixture: how it was made, its node counts, its error against torch, its sha256."""
    path = out / "transformer" / "model.onnx"
    manifest = dict(
        tool=tool,
        weights=weights,
        options=dict(exporter="torchscript", attention="fused", dtype=dtype, opset=info["opset"],
                     fused_kernels=fused),
        nodes=info["nodes_final"],
        max_abs_vs_torch_fp32=err,
        versions=ex.tool_versions(),
        files={"transformer/model.onnx": dict(size=path.stat().st_size, sha256=ex.sha256_file(path))},
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def qk_fixtures(feeds: dict):
    """export-tiny-qk-fp16{,-fused}: random tiny-shaped transformer with SD3.5's q/k RMS-norm (export_sd3.py variant
    tiny-qk, seed 0), float16, without and with --fused-kernels (HeadRmsNorm). Same shapes as tiny-sd3, so
    tests/export_parity.rs overlays them on it and compares the fused graph's images with the unfused one's."""
    source = ex.Source(None, "tiny-qk", MODELS / "fixtures" / "tiny-sd3", 0)
    module = source.load("transformer")
    with torch.no_grad():
        ref = module(**feeds, return_dict=False)[0].numpy()
    for name, fused in (("export-tiny-qk-fp16", False), ("export-tiny-qk-fp16-fused", True)):
        out = MODELS / "fixtures" / name
        info = ex.export_component("transformer", module, out, exporter="torchscript", attention="fused",
                                   dtype="fp16", opset=None, t5_precision="mixed", external=False,
                                   fused_kernels=fused)
        e = None
        if not fused:
            e = float(np.abs(run_onnx(out / "transformer" / "model.onnx", feeds) - ref).max())
            print(f"{name}: {info['node_count']} nodes, max abs vs torch fp32 {e:.3g} (tolerance 5e-2)")
            if not e <= 5e-2:
                raise SystemExit(f"{name}: error {e} above 5e-2")
        else:
            print(f"{name}: {info['node_count']} nodes, {info['fused_kernels']}")
        write_manifest(out, "models/export/make_export_fixtures.py (qk_fixtures) -> export_sd3.export_component",
                       "export_sd3.py --random tiny-qk --seed 0 transformer (tiny-sd3 shapes, qk_norm rms_norm)",
                       "fp16", fused, info, e)


def dual_fixtures(feeds: dict | None = None):
    """export-tiny-dual-fp16{,-fused}: random tiny-shaped transformer like SD3.5-medium's MMDiT-X (export_sd3.py
    variant tiny-dual, seed 0: 4 blocks, dual attention in blocks 0 and 1, q/k RMS-norm with norm weights drawn in
    0.5..1.5), float16, without and with --fused-kernels. Same input and output shapes as tiny-sd3, so
    tests/export_parity.rs overlays them on it and compares the fused graph's images with the unfused one's."""
    source = ex.Source(None, "tiny-dual", MODELS / "fixtures" / "tiny-sd3", 0)
    module = source.load("transformer")
    feeds = feeds or transformer_inputs(module.config)
    with torch.no_grad():
        ref = module(**feeds, return_dict=False)[0].numpy()
    for name, fused in (("export-tiny-dual-fp16", False), ("export-tiny-dual-fp16-fused", True)):
        out = MODELS / "fixtures" / name
        info = ex.export_component("transformer", module, out, exporter="torchscript", attention="fused",
                                   dtype="fp16", opset=None, t5_precision="mixed", external=False,
                                   fused_kernels=fused)
        e = None
        if not fused:
            e = float(np.abs(run_onnx(out / "transformer" / "model.onnx", feeds) - ref).max())
            print(f"{name}: {info['node_count']} nodes, max abs vs torch fp32 {e:.3g} (tolerance 5e-2)")
            if not e <= 5e-2:
                raise SystemExit(f"{name}: error {e} above 5e-2")
        else:
            print(f"{name}: {info['node_count']} nodes, {info['fused_kernels']}")
        write_manifest(out, "models/export/make_export_fixtures.py (dual_fixtures) -> export_sd3.export_component",
                       "export_sd3.py --random tiny-dual --seed 0 transformer (tiny-sd3 shapes, 4 blocks, dual "
                       "attention in blocks 0-1, qk_norm rms_norm)", "fp16", fused, info, e)


if __name__ == "__main__":
    main()
