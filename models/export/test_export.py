#!/usr/bin/env python3
"""Checks of models/export/export_sd3.py (needs torch; not part of CI, which has none):

    /work/pyenv/bin/python models/export/test_export.py            # everything (~2 minutes on 2 cores)
    /work/pyenv/bin/python models/export/test_export.py t5 parity  # a subset: t5, parity, nodes, slg, cli

t5      T5 float16 overflow: a tiny T5 whose feed-forward output exceeds 65504, exported naive fp16 (inf/nan) and
        with the mixed precision of --t5-precision mixed (close to torch fp32); plus T5-XXL size arithmetic.
parity  every component of `--random tiny`, exported fp32 and fp16 with fused attention by both exporters (and
        plain opset 17 for reference), run with onnxruntime CPU against the diffusers/transformers torch module
        (float32) on the same inputs: max abs errors against stated tolerances.
nodes   node counts by op type for the tiny transformer before/after the rewrites (the table in README.md).
slg     skip-layer guidance graph (--skip-layers): transformer/model_skip_layers.onnx of two 3-block transformers
        (SD3-like, SD3.5-medium-like) vs diffusers' transformer(..., skip_layers=[1]) for every exporter/precision,
        that it differs from the unskipped output, metadata/manifest/signature, --components transformer_skip_layers,
        and the refusal of invalid layer lists.
small   --weights-fp16 and --keep-token-ids (models/nano's size options): outputs vs torch, unkept ids share one
        row, files smaller, a relative --out.
int8    quantize_int8 (per-channel scales, float16-valued, zero channels) and --weights-int8 --keep-t5-token-ids:
        transformer, VAE decoder and T5 vs torch with the same dequantized weights (tight), DequantizeLinear nodes,
        files smaller than --weights-fp16.
controlnet  ControlNets (issue 21): --controlnet-graph's transformer/model_controlnet.onnx (fp32 and fp16, the same
        fusions as model.onnx) vs diffusers' transformer(..., block_controlnet_hidden_states) with 1 and 2 residuals,
        and export_controlnet.py's optimized ControlNet graphs of both kinds (InstantX, SD3.5) vs the torch module.
groupnorm  groupnorm_as_instancenorm: GroupNormalization-21 graphs (4-D and 3-D, fp32 and fp16) before and after
        the rewrite vs numpy, a sabotaged rewrite (twice the groups) that must fail, opset 18 left alone, and (with
        onnxscript) a dynamo-exported VAE decoder with and without the rewrite vs diffusers.
qkv     fused_kernels.share_qkv_fp8: q/k/v merged into LinearConcat3Fp8 with dynamic and static scales, the same
        emulated output, and a block whose stored scales differ left alone.
cli     the command line end to end (`--random tiny`), the manifest, and that the folder has the graph names and
        files the crate expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import export_sd3 as ex  # noqa: E402

TOKENIZERS = REPO / "models" / "fixtures" / "tiny-sd3"
FAILURES: list[str] = []


def check(label: str, err: float, tol: float):
    ok = bool(np.isfinite(err)) and err <= tol
    print(f"  {label:58s} max abs {err:10.3g}  tolerance {tol:8.2g}  {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        FAILURES.append(f"{label}: {err} > {tol}")


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # what the crate sets (src/runtime/graph.rs): float32 activations for int8-stored weights
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(path: Path, feeds: dict) -> dict:
    sess = session(path)
    types = {i.name: i.type for i in sess.get_inputs()}
    arrays = {}
    for k, v in feeds.items():
        a = v.numpy() if isinstance(v, torch.Tensor) else v
        if a.dtype.kind == "f":
            a = a.astype({"tensor(float16)": np.float16, "tensor(float)": np.float32}[types[k]])
        arrays[k] = a
    names = [o.name for o in sess.get_outputs()]
    return {n: v.astype(np.float32) for n, v in zip(names, sess.run(None, arrays))}


# ----------------------------------------------------------------------------------------------------------------
# T5 float16 overflow
# ----------------------------------------------------------------------------------------------------------------


def overflowing_t5():
    """A tiny T5 v1.1 encoder (gated-gelu) whose feed-forward output reaches ~1e6 in float32: wi_0/wi_1 scaled so
    that the gated product stays inside float16 (a few thousand), wo scaled so that its output and the residual
    stream do not. Real T5-XXL overflows the same way (activations above 65504 in its late blocks)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=256, num_layers=3, num_heads=4,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    m = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        m.shared.weight.normal_(0, 1.0)
        for block in m.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wi_0.weight.mul_(12.0)
            ff.wi_1.weight.mul_(12.0)
            ff.wo.weight.mul_(400.0)
    return m


def test_t5_overflow():
    print("[t5] float16 overflow in the T5 feed-forward", flush=True)
    m = overflowing_t5()
    ids = torch.randint(2, 128, (2, 24))
    ids[:, -1] = 1
    peaks = {}

    def hook(name):
        def f(_mod, _inp, out):
            peaks[name] = max(peaks.get(name, 0.0), float(out.abs().max()))
        return f

    handles = []
    for i, block in enumerate(m.encoder.block):
        handles.append(block.layer[1].DenseReluDense.wo.register_forward_hook(hook(f"block{i}.wo")))
        handles.append(block.layer[1].DenseReluDense.wo.register_forward_pre_hook(lambda mod, inp, i=i: peaks.__setitem__(
            f"block{i}.wo_input", max(peaks.get(f"block{i}.wo_input", 0.0), float(inp[0].abs().max())))))
    with torch.no_grad():
        ref = m(input_ids=ids).last_hidden_state.numpy()
    for h in handles:
        h.remove()
    print("  torch fp32 peaks: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(peaks.items())))
    print(f"  torch fp32 output max abs {np.abs(ref).max():.3g}")
    assert max(v for k, v in peaks.items() if k.endswith(".wo")) > 65504, "the test model does not overflow fp16"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for exporter, label, dtype, prec in (
                ("torchscript", "fp32", "fp32", "mixed"),
                ("torchscript", "fp16 naive (--t5-precision fp16)", "fp16", "fp16"),
                ("torchscript", "fp16 mixed (--t5-precision mixed)", "fp16", "mixed"),
                ("dynamo", "dynamo fp16 naive", "fp16", "fp16"),
                ("dynamo", "dynamo fp16 mixed", "fp16", "mixed")):
            out = Path(tmp) / exporter / label.split()[0] / prec
            info = ex.export_component("text_encoder_3", m, out, exporter=exporter, attention="fused",
                                       dtype=dtype, opset=None, t5_precision=prec, external=False)
            path = out / "text_encoder_3" / "model.onnx"
            got = run(path, {"input_ids": ids.numpy()})["last_hidden_state"]
            finite = np.isfinite(got)
            err = float(np.abs(got - ref).max()) if finite.all() else float("inf")
            results[label] = err
            print(f"  {exporter:11s} {label:36s} {path.stat().st_size / 1024:7.1f} KiB  non-finite values {int((~finite).sum()):5d}"
                  f"  max abs error vs torch fp32 {err:.3g}  (fp32 nodes: {info.get('fp32_nodes', 'all')})")
    for naive in ("fp16 naive (--t5-precision fp16)", "dynamo fp16 naive"):
        if np.isfinite(results[naive]) and results[naive] < 1:
            FAILURES.append(f"{naive}: T5 did not overflow: the demonstration is broken")
    check("T5 fp16 mixed vs torch fp32 (output max |3.4|)", results["fp16 mixed (--t5-precision mixed)"], 0.02)
    check("T5 fp16 mixed (dynamo) vs torch fp32", results["dynamo fp16 mixed"], 0.02)
    check("T5 fp32 vs torch fp32", results["fp32"], 1e-4)

    # Size arithmetic for the real T5-XXL encoder (google/t5-v1_1-xxl, SD3 text_encoder_3).
    c = ex.T5_XXL
    d, ff, L, vocab = c["d_model"], c["d_ff"], c["num_layers"], 32128
    attn = 4 * d * c["num_heads"] * c["d_kv"]
    per_layer = attn + 3 * d * ff
    total = vocab * d + L * per_layer
    wo = L * ff * d
    gb = 1e9
    print(f"  T5-XXL encoder: {total / 1e9:.2f} B parameters; fp32 {4 * total / gb:.1f} GB, fp16 {2 * total / gb:.1f} GB, "
          f"mixed (wo in fp32: {wo / 1e9:.2f} B parameters) {(2 * total + 2 * wo) / gb:.1f} GB")


# ----------------------------------------------------------------------------------------------------------------
# Parity of every component, tiny random pipeline
# ----------------------------------------------------------------------------------------------------------------


def component_inputs(component: str, module, seed=1):
    g = torch.Generator().manual_seed(seed)
    if component in ("text_encoder", "text_encoder_2"):
        ids = torch.randint(0, 49406, (2, 77), generator=g)
        ids[:, 0] = 49406
        ids[0, 9:] = 49407
        ids[1, 30:] = 49407
        return {"input_ids": ids}
    if component == "text_encoder_3":
        ids = torch.randint(2, 1100, (2, 40), generator=g)
        ids[:, 30] = 1
        ids[:, 31:] = 0
        return {"input_ids": ids}
    if component == "transformer":
        c = module.config
        return dict(hidden_states=torch.randn(2, c.in_channels, 12, 8, generator=g),
                    encoder_hidden_states=torch.randn(2, 45, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([999.0, 17.5]))
    if component == "vae_decoder":
        return {"latent_sample": torch.randn(1, module.config.latent_channels, 8, 12, generator=g)}
    return {"sample": torch.rand(1, 3, 64, 96, generator=g) * 2 - 1}


def torch_outputs(component: str, module, feeds: dict) -> dict:
    spec = ex.export_spec(component, module)
    with torch.no_grad():
        outs = spec["wrapper"](*[feeds[n] for n in spec["inputs"]])
    outs = outs if isinstance(outs, tuple) else (outs,)
    return {n: o.numpy() for n, o in zip(spec["outputs"], outs)}


# (exporter, attention, dtype, relative tolerance): errors are max abs over all outputs divided by max(1, max|ref|)
VARIANTS = [
    ("torchscript", "fused", "fp32", 1e-4),
    ("torchscript", "fused", "fp16", 2e-2),
    ("dynamo", "fused", "fp32", 1e-4),
    ("dynamo", "fused", "fp16", 2e-2),
    ("torchscript", "plain", "fp32", 1e-4),
]


def test_parity():
    print("[parity] --random tiny, onnxruntime CPU vs torch fp32 (errors relative to max(1, max|ref|))", flush=True)
    src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
    modules = {c: src.load(c) for c in ex.ALL_COMPONENTS}
    with tempfile.TemporaryDirectory() as tmp:
        for exporter, attention, dtype, tol in VARIANTS:
            out = Path(tmp) / f"{exporter}-{attention}-{dtype}"
            print(f" {exporter} {attention} {dtype}:", flush=True)
            for component, module in modules.items():
                feeds = component_inputs(component, module)
                ref = torch_outputs(component, module, feeds)
                try:
                    info = ex.export_component(component, module, out, exporter=exporter, attention=attention,
                                               dtype=dtype, opset=None, t5_precision="mixed", external=False)
                    got = run(out / component / "model.onnx", feeds)
                except Exception as e:  # noqa: BLE001
                    FAILURES.append(f"{exporter}/{attention}/{dtype}/{component}: {type(e).__name__}: {e}")
                    print(f"  {component}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                scale = max(1.0, max(float(np.abs(v).max()) for v in ref.values()))
                err = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
                fused = {k: v for k, v in info["nodes_final"].items()
                         if k in ("MultiHeadAttention", "Attention", "LayerNormalization", "SkipLayerNormalization",
                                  "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu",
                                  "BiasGelu", "Gelu", "QuickGelu", "Softmax")}
                check(f"{component} ({info['node_count']} nodes) {fused}"[:58], err / scale, tol)


# ----------------------------------------------------------------------------------------------------------------
# Node counts (README table)
# ----------------------------------------------------------------------------------------------------------------


def test_nodes():
    print("[nodes] tiny transformer (2 joint blocks), node counts by op type", flush=True)
    src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
    module = src.load("transformer")
    cols = {}
    with tempfile.TemporaryDirectory() as tmp:
        for exporter, attention in (("torchscript", "plain"), ("torchscript", "fused"), ("dynamo", "plain"),
                                    ("dynamo", "fused")):
            info = ex.export_component("transformer", module, Path(tmp) / f"{exporter}{attention}",
                                       exporter=exporter, attention=attention, dtype="fp32", opset=None,
                                       t5_precision="mixed", external=False)
            label = f"{exporter} {attention} (opset {info['opset']})"
            if attention == "fused":
                cols[f"{exporter} opset {info['opset']} as exported"] = info["nodes_exported"]
            cols[label] = info["nodes_final"]
    ops = sorted({k for c in cols.values() for k in c}, key=lambda k: -max(c.get(k, 0) for c in cols.values()))
    print("| op | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    print("| **total** | " + " | ".join(str(sum(c.values())) for c in cols.values()) + " |")
    print("| total without Constant | " + " | ".join(str(sum(v for k, v in c.items() if k != "Constant"))
                                                 for c in cols.values()) + " |")
    for op in ops:
        print(f"| {op} | " + " | ".join(str(c.get(op, 0)) for c in cols.values()) + " |")


# ----------------------------------------------------------------------------------------------------------------
# Skip-layer guidance graph (transformer/model_skip_layers.onnx)
# ----------------------------------------------------------------------------------------------------------------


def tiny_sd35_transformer(seed=7):
    """SD3.5-medium-like tiny MMDiT (3 blocks, qk RMS-norm, dual attention in blocks 0 and 1; the shapes of
    models/fixtures/tiny-sd35), random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24,
                                 pooled_projection_dim=22, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
                                 dual_attention_layers=[0, 1]).eval()


def onnx_meta(path: Path) -> dict:
    return dict(session(path).get_modelmeta().custom_metadata_map)


def io_of(path: Path) -> list:
    sess = session(path)
    return [(p.name, p.type, list(p.shape)) for p in sess.get_inputs() + sess.get_outputs()]


# (exporter, attention, dtype, relative tolerance vs diffusers' transformer(..., skip_layers=[1]) in float32)
SLG_VARIANTS = [
    ("torchscript", "fused", "fp32", 1e-4),
    ("torchscript", "fused", "fp16", 5e-3),
    ("dynamo", "fused", "fp32", 1e-4),
    ("dynamo", "fused", "fp16", 5e-3),
    ("torchscript", "plain", "fp32", 1e-4),
]
# The tolerances are well below what skipping block 1 changes (~0.08 of the output scale on both test models), and
# the skip graph must be more than 10x its tolerance away from the unskipped output: a graph that ignores the skip
# (or skips another block) fails.


def test_slg():
    print("[slg] skip-layer guidance graph (skip_layers [1], 3-block transformers) vs diffusers "
          "transformer(..., skip_layers=[1]); errors relative to max(1, max|ref|)", flush=True)
    src = ex.Source(None, "tiny", TOKENIZERS, seed=0, layers=3)
    modules = {"tiny (SD3-like)": src.load("transformer"), "tiny-sd35-like": tiny_sd35_transformer()}
    skip = [1]
    with tempfile.TemporaryDirectory() as tmp:
        for mname, module in modules.items():
            feeds = component_inputs("transformer", module)
            with torch.no_grad():
                full = module(**feeds, return_dict=False)[0].numpy()
                ref = module(**feeds, return_dict=False, skip_layers=skip)[0].numpy()
            scale = max(1.0, float(np.abs(ref).max()))
            effect = float(np.abs(ref - full).max()) / scale
            print(f" {mname}: torch skip [1] vs no skip {effect:.3g} (what a graph ignoring the skip would be off)")
            for exporter, attention, dtype, tol in SLG_VARIANTS:
                out = Path(tmp) / f"{mname}-{exporter}-{attention}-{dtype}"
                try:
                    ex.export_component("transformer", module, out, exporter=exporter, attention=attention,
                                        dtype=dtype, opset=None, t5_precision="mixed", external=False)
                    info = ex.export_component("transformer", module, out, exporter=exporter, attention=attention,
                                               dtype=dtype, opset=None, t5_precision="mixed", external=False,
                                               skip_layers=skip)
                    path = out / "transformer" / ex.SKIP_FILE
                    got = run(path, feeds)["out_hidden_states"]
                    main_got = run(out / "transformer" / "model.onnx", feeds)["out_hidden_states"]
                except Exception as e:  # noqa: BLE001
                    FAILURES.append(f"slg {mname} {exporter}/{attention}/{dtype}: {type(e).__name__}: {e}")
                    print(f"  {exporter} {attention} {dtype}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                label = f"{exporter} {attention} {dtype} skip graph vs torch skip [1]"
                check(label, float(np.abs(got - ref).max()) / scale, tol)
                # (b) the skip must be visible: far from the unskipped output, and the main graph far from the skip one
                off = float(np.abs(got - full).max()) / scale
                apart = float(np.abs(got - main_got).max()) / scale
                ok = off > 10 * tol and off > 0.5 * effect and apart > 10 * tol
                print(f"    vs unskipped torch {off:.3g}, vs model.onnx {apart:.3g} (must exceed {10 * tol:.2g})  "
                      f"{'ok' if ok else 'FAIL'}")
                if not ok:
                    FAILURES.append(f"slg {mname} {label}: the skip graph is not different from the full transformer")
                # (c) metadata, signature equal to model.onnx, skipped block's weights not in the graph
                meta = onnx_meta(path)
                same_io = io_of(path) == io_of(out / "transformer" / "model.onnx")
                import onnx

                inits = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer]
                leaked = [n for n in inits if "transformer_blocks.1." in n]
                ok = meta.get("skip_layers") == "[1]" and json.loads(meta["skip_layers"]) == skip and same_io and \
                    not leaked and info.get("skip_layers") == skip
                print(f"    metadata {meta}, same inputs/outputs as model.onnx {same_io}, block-1 weights in graph "
                      f"{len(leaked)}, {path.stat().st_size / 1024:.0f} KiB vs model.onnx "
                      f"{(out / 'transformer' / 'model.onnx').stat().st_size / 1024:.0f} KiB  {'ok' if ok else 'FAIL'}")
                if not ok:
                    FAILURES.append(f"slg {mname} {exporter}/{attention}/{dtype}: metadata {meta}, same io {same_io}, "
                                    f"leaked {leaked[:3]}")
            del module
    test_slg_cli()
    test_slg_invalid()


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "export_sd3.py"), *args], capture_output=True, text=True)


def test_slg_cli():
    print("[slg cli] --random tiny --layers 3 --components transformer --skip-layers 1 --dtype fp16", flush=True)
    base = ["--random", "tiny", "--layers", "3", "--tokenizers-from", str(TOKENIZERS)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slg"
        res = _cli(base + ["--components", "transformer", "--skip-layers", "1", "--dtype", "fp16", "--out", str(out)])
        if res.returncode != 0:
            FAILURES.append("slg cli: " + res.stderr[-2000:])
            print(res.stderr[-2000:])
            return
        t = out / "transformer"
        manifest = json.loads((out / "manifest.json").read_text())
        problems = []
        for f in ("transformer/model.onnx", "transformer/" + ex.SKIP_FILE):
            meta = manifest["files"].get(f)
            if meta is None or meta["sha256"] != ex.sha256_file(out / f) or meta["size"] != (out / f).stat().st_size:
                problems.append(f"manifest entry of {f}: {meta}")
        entry = manifest["components"].get(ex.SKIP_COMPONENT, {})
        if entry.get("skip_layers") != [1] or entry.get("files") != ["transformer/" + ex.SKIP_FILE] or \
                entry.get("signature") != manifest["components"]["transformer"]["signature"]:
            problems.append(f"manifest component entry {ex.SKIP_COMPONENT}: {str(entry)[:300]}")
        if manifest["options"].get("skip_layers") != [1]:
            problems.append(f"options {manifest['options']}")
        if onnx_meta(t / ex.SKIP_FILE).get("skip_layers") != "[1]":
            problems.append(f"metadata {onnx_meta(t / ex.SKIP_FILE)}")
        io_main, io_skip = io_of(t / "model.onnx"), io_of(t / ex.SKIP_FILE)
        types = {n: ty for n, ty, _ in io_skip}
        if io_main != io_skip or types != {"hidden_states": "tensor(float16)", "encoder_hidden_states": "tensor(float16)",
                                           "pooled_projections": "tensor(float16)", "timestep": "tensor(float)",
                                           "out_hidden_states": "tensor(float16)"}:
            problems.append(f"io {io_skip} vs model.onnx {io_main}")
        print(f"  fp16: manifest entries, metadata, io {types}  {'ok' if not problems else 'FAIL ' + str(problems)}")

        # --components transformer_skip_layers: only the skip graph, into the existing folder (unsorted list given).
        main_sha = ex.sha256_file(t / "model.onnx")
        res = _cli(base + ["--components", ex.SKIP_COMPONENT, "--skip-layers", "2,0", "--dtype", "fp16",
                           "--out", str(out)])
        manifest = json.loads((out / "manifest.json").read_text())
        p2 = []
        if res.returncode != 0:
            p2.append(res.stderr[-1000:])
        else:
            if ex.sha256_file(t / "model.onnx") != main_sha:
                p2.append("model.onnx changed")
            if onnx_meta(t / ex.SKIP_FILE).get("skip_layers") != "[0, 2]":
                p2.append(f"metadata {onnx_meta(t / ex.SKIP_FILE)}")
            if manifest["files"]["transformer/" + ex.SKIP_FILE]["sha256"] != ex.sha256_file(t / ex.SKIP_FILE):
                p2.append("manifest hash of the new skip graph")
            if manifest["components"][ex.SKIP_COMPONENT]["skip_layers"] != [0, 2]:
                p2.append("manifest component entry")
        print(f"  --components {ex.SKIP_COMPONENT} --skip-layers 2,0 into the folder: model.onnx unchanged, metadata "
              f"[0, 2]  {'ok' if not p2 else 'FAIL ' + str(p2)}")
        # A skip graph of another dtype than model.onnx is refused (and not left behind).
        res = _cli(base + ["--components", ex.SKIP_COMPONENT, "--skip-layers", "1", "--dtype", "fp32",
                           "--out", str(out)])
        p3 = [] if res.returncode != 0 and "inputs/outputs" in res.stderr and not (t / ex.SKIP_FILE).exists() \
            else [f"rc {res.returncode}: {res.stderr[-500:]}"]
        print(f"  fp32 skip graph next to an fp16 model.onnx refused: {res.stderr.strip().splitlines()[-1][:150] if res.stderr.strip() else ''}"
              f"  {'ok' if not p3 else 'FAIL ' + str(p3)}")
        # Re-exporting the transformer without --skip-layers drops the stale skip graph.
        _cli(base + ["--components", ex.SKIP_COMPONENT, "--skip-layers", "1", "--dtype", "fp16", "--out", str(out)])
        res = _cli(base + ["--components", "transformer", "--dtype", "fp16", "--out", str(out)])
        manifest = json.loads((out / "manifest.json").read_text())
        p4 = [] if res.returncode == 0 and not (t / ex.SKIP_FILE).exists() and \
            ex.SKIP_COMPONENT not in manifest["components"] and "transformer/" + ex.SKIP_FILE not in manifest["files"] \
            else [f"rc {res.returncode}, exists {(t / ex.SKIP_FILE).exists()}"]
        print(f"  transformer re-exported without --skip-layers: stale skip graph removed  {'ok' if not p4 else 'FAIL ' + str(p4)}")
        # --external-data always: the weights go to model_skip_layers.onnx.data, listed in the manifest too.
        out_x = Path(tmp) / "slg-external"
        res = _cli(base + ["--components", "transformer", "--skip-layers", "1", "--external-data", "always",
                           "--out", str(out_x)])
        p5 = []
        if res.returncode != 0:
            p5.append(res.stderr[-500:])
        else:
            files = json.loads((out_x / "manifest.json").read_text())["files"]
            for f in ("transformer/" + ex.SKIP_FILE, "transformer/" + ex.SKIP_FILE + ".data"):
                if f not in files or files[f]["sha256"] != ex.sha256_file(out_x / f):
                    p5.append(f"manifest {f}")
            if onnx_meta(out_x / "transformer" / ex.SKIP_FILE).get("skip_layers") != "[1]":
                p5.append("metadata")
        print(f"  --external-data always: {ex.SKIP_FILE} + {ex.SKIP_FILE}.data in the manifest, loads  "
              f"{'ok' if not p5 else 'FAIL ' + str(p5)}")
        problems += p2 + p3 + p4 + p5
        if problems:
            FAILURES.append(f"slg cli: {problems}")


def test_slg_invalid():
    print("[slg invalid] layer lists refused (3-block transformer)", flush=True)
    base = ["--random", "tiny", "--layers", "3", "--tokenizers-from", str(TOKENIZERS)]
    cases = [("3", "outside 0..2"), ("-1", "outside 0..2"), ("1,1", "more than once"), ("0,1,2", "every one of the 3"),
             ("2,0,1", "every one of the 3"), ("a", "not an integer"), ("1.5", "not an integer"), ("", "expected"),
             ("1,,2", "expected")]
    with tempfile.TemporaryDirectory() as tmp:
        for k, (value, why) in enumerate(cases):
            out = Path(tmp) / f"bad{k}"
            try:
                ex.main(base + ["--components", "transformer", f"--skip-layers={value}", "--out", str(out)])
                msg, ok = "accepted", False
            except SystemExit as e:
                msg = str(e.code)
                ok = why in msg and not out.exists()
            print(f"  --skip-layers={value!r:9s} -> {msg[:110]}  {'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"slg invalid {value!r}: {msg}")
        for argv, why in ((["--components", ex.SKIP_COMPONENT], "needs --skip-layers"),
                          (["--components", "vae_decoder", "--skip-layers", "1"], "needs transformer")):
            try:
                ex.main(base + argv + ["--out", str(Path(tmp) / "other")])
                msg, ok = "accepted", False
            except SystemExit as e:
                msg = str(e.code)
                ok = why in msg
            print(f"  {' '.join(argv):60s} -> {msg[:80]}  {'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"slg invalid {argv}: {msg}")
    for layers, n in (([], 3), ([3], 3), ([0, 0], 3), ([0, 1, 2], 3), ([True], 3)):
        try:
            ex.validate_skip_layers(layers, n)
            FAILURES.append(f"validate_skip_layers({layers}, {n}) accepted")
        except ValueError:
            pass
    if ex.validate_skip_layers([9, 7, 8], 24) != [7, 8, 9]:
        FAILURES.append("validate_skip_layers does not sort")


# ----------------------------------------------------------------------------------------------------------------
# CLI end to end
# ----------------------------------------------------------------------------------------------------------------


def test_cli():
    print("[cli] export_sd3.py --random tiny --dtype fp16", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiny-fp16"
        t0 = time.time()
        res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny", "--tokenizers-from",
                              str(TOKENIZERS), "--dtype", "fp16", "--out", str(out)], capture_output=True, text=True)
        if res.returncode != 0:
            FAILURES.append("cli: " + res.stderr[-2000:])
            print(res.stderr[-2000:])
            return
        manifest = json.loads((out / "manifest.json").read_text())
        expected = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                    "tokenizer_2/tokenizer.json", "tokenizer_3/tokenizer.json"] + \
                   [f"{c}/{f}" for c in ex.ALL_COMPONENTS for f in ("model.onnx", "config.json")]
        missing = [f for f in expected if f not in manifest["files"]]
        for f, meta in manifest["files"].items():
            if ex.sha256_file(out / f) != meta["sha256"] or (out / f).stat().st_size != meta["size"]:
                missing.append(f"{f} (hash/size mismatch)")
        sig = manifest["components"]["transformer"]["signature"]
        types = {p["name"]: p["dtype"] for p in sig["inputs"] + sig["outputs"]}
        want = {"hidden_states": "float16", "encoder_hidden_states": "float16", "pooled_projections": "float16",
                "timestep": "float", "out_hidden_states": "float16"}
        clip = manifest["components"]["text_encoder"]["signature"]["outputs"]
        names = [p["name"] for p in clip]
        ok = not missing and types == want and names[:2] == ["text_embeds", "last_hidden_state"] and \
            names[2:] == [f"hidden_states.{i}" for i in range(len(names) - 2)]
        print(f"  {len(manifest['files'])} files in {time.time() - t0:.0f} s; transformer io {types}; CLIP outputs "
              f"{names}; versions {manifest['versions']}  {'ok' if ok else 'FAIL ' + str(missing)}")
        if not ok:
            FAILURES.append(f"cli: missing {missing} or wrong signature {types} {names}")
        # --model: a diffusers folder saved from the same random modules exports to the same graphs.
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        from transformers import AutoTokenizer

        src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
        mods = {c: src.load(c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer")}
        pipe = StableDiffusion3Pipeline(
            transformer=mods["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=src.load("vae_decoder"), text_encoder=mods["text_encoder"], text_encoder_2=mods["text_encoder_2"],
            text_encoder_3=mods["text_encoder_3"], tokenizer=AutoTokenizer.from_pretrained(TOKENIZERS / "tokenizer"),
            tokenizer_2=AutoTokenizer.from_pretrained(TOKENIZERS / "tokenizer_2"),
            tokenizer_3=AutoTokenizer.from_pretrained(TOKENIZERS / "tokenizer_3"))
        pipe.save_pretrained(Path(tmp) / "diffusers")
        out_m = Path(tmp) / "from-model"
        res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--model", str(Path(tmp) / "diffusers"),
                              "--skip-layers", "1", "--out", str(out_m)], capture_output=True, text=True)
        if res.returncode != 0:
            FAILURES.append("cli --model: " + res.stderr[-2000:])
            print(res.stderr[-2000:])
        else:
            for c in ("text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"):
                module = mods.get(c) or src.load(c)
                feeds = component_inputs(c, module)
                ref = torch_outputs(c, module, feeds)
                got = run(out_m / c / "model.onnx", feeds)
                err = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
                check(f"--model {c} vs the module it was saved from", err, 1e-4)
            feeds = component_inputs("transformer", mods["transformer"])
            with torch.no_grad():
                ref = mods["transformer"](**feeds, return_dict=False, skip_layers=[1])[0].numpy()
            got = run(out_m / "transformer" / ex.SKIP_FILE, feeds)["out_hidden_states"]
            check("--model --skip-layers 1: skip graph vs transformer(skip_layers=[1])",
                  float(np.abs(got - ref).max()), 1e-4)
            toks = sorted(p.name for p in (out_m / "tokenizer_3").iterdir())
            print(f"  --model folder: tokenizer_3 {toks}, model_index {sorted(json.loads((out_m / 'model_index.json').read_text()))[:6]}...")

        # A bf16 export is well-formed (ONNX Runtime has no CPU kernels for most bf16 ops, so it is not run here).
        out_bf = Path(tmp) / "tiny-bf16"
        res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny", "--tokenizers-from",
                              str(TOKENIZERS), "--dtype", "bf16", "--components", "transformer", "--skip-layers", "0",
                              "--out", str(out_bf)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            FAILURES.append("cli bf16: " + res.stderr[-2000:])
            return
        import onnx

        m = onnx.load(str(out_bf / "transformer" / "model.onnx"))
        onnx.checker.check_model(m)
        inits = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer}
        print(f"  bf16 transformer: checker ok, initializer types {sorted(inits)}, inputs "
              f"{[(i.name, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)) for i in m.graph.input]}")
        ms = onnx.load(str(out_bf / "transformer" / ex.SKIP_FILE))
        onnx.checker.check_model(ms)
        meta = {p.key: p.value for p in ms.metadata_props}
        same = ex.signature(ms) == ex.signature(m)
        print(f"  bf16 skip graph: checker ok, metadata {meta}, same signature as model.onnx {same}")
        if meta.get("skip_layers") != "[0]" or not same:
            FAILURES.append(f"cli bf16 skip graph: metadata {meta}, same signature {same}")


def test_small():
    """--weights-fp16 and --keep-token-ids (the nano model's size options), with a relative --out."""
    print("[small] --dtype fp32 --weights-fp16 --keep-token-ids, relative --out", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "tokenizer")
    kept_text = "a red cat on a blue mat"
    keep = sorted(set(tok(kept_text, padding="max_length", max_length=77).input_ids) | {tok.pad_token_id})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "keep.json").write_text(json.dumps(keep))
        res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny", "--tokenizers-from",
                              str(TOKENIZERS), "--dtype", "fp32", "--weights-fp16", "--keep-token-ids", "keep.json",
                              "--components", "text_encoder,transformer", "--out", "small"],
                             capture_output=True, text=True, cwd=tmp)
        res_full = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny",
                                   "--tokenizers-from", str(TOKENIZERS), "--dtype", "fp32",
                                   "--components", "text_encoder,transformer", "--out", "full"],
                                  capture_output=True, text=True, cwd=tmp)
        if res.returncode or res_full.returncode:
            FAILURES.append("small: " + (res.stderr or res_full.stderr)[-2000:])
            print((res.stderr or res_full.stderr)[-2000:])
            return
        small, full = Path(tmp) / "small", Path(tmp) / "full"
        src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
        te = src.load("text_encoder")
        ids_kept = torch.tensor([tok(kept_text, padding="max_length", max_length=77).input_ids])
        with torch.no_grad():
            ref = te(ids_kept, output_hidden_states=True)
        got = run(small / "text_encoder" / "model.onnx", {"input_ids": ids_kept.numpy()})
        scale = float(ref.last_hidden_state.abs().max())
        check("pruned+fp16 CLIP, kept tokens: last_hidden_state vs torch (rel.)",
              float(np.abs(got["last_hidden_state"] - ref.last_hidden_state.numpy()).max()) / scale, 2e-3)
        # Two prompts that differ only in tokens outside the kept set give the same output (one shared row) ...
        other = [i for i in range(1000, 49000) if i not in keep][:2]
        a, b = ids_kept.clone(), ids_kept.clone()
        a[0, 3], b[0, 3] = other[0], other[1]
        ga = run(small / "text_encoder" / "model.onnx", {"input_ids": a.numpy()})["last_hidden_state"]
        gb = run(small / "text_encoder" / "model.onnx", {"input_ids": b.numpy()})["last_hidden_state"]
        check("pruned CLIP: two unkept ids give the same output", float(np.abs(ga - gb).max()), 0.0)
        # ... while the full export tells them apart.
        fa = run(full / "text_encoder" / "model.onnx", {"input_ids": a.numpy()})["last_hidden_state"]
        fb = run(full / "text_encoder" / "model.onnx", {"input_ids": b.numpy()})["last_hidden_state"]
        ok = float(np.abs(fa - fb).max()) > 1e-4
        print(f"  full CLIP: the two unkept ids differ  {'ok' if ok else 'FAIL'}")
        if not ok:
            FAILURES.append("small: the full export gives the same output for different ids (vacuous check)")
        tr = src.load("transformer")
        feeds = component_inputs("transformer", tr)
        reft = torch_outputs("transformer", tr, feeds)
        gott = run(small / "transformer" / "model.onnx", feeds)
        k = next(iter(reft))
        check("fp16-stored transformer vs torch fp32 (rel.)",
              float(np.abs(gott[k] - reft[k]).max()) / float(np.abs(reft[k]).max()), 3e-3)
        sizes = {c: ((small / c / "model.onnx").stat().st_size, (full / c / "model.onnx").stat().st_size)
                 for c in ("text_encoder", "transformer")}
        # tiny graphs: small initializers (< 256 values) stay float32 and the graph itself is a quarter of the file
        ok = sizes["text_encoder"][0] < 0.1 * sizes["text_encoder"][1] and sizes["transformer"][0] < 0.8 * sizes["transformer"][1]
        print(f"  sizes (small, full) {sizes}  {'ok' if ok else 'FAIL'}")
        if not ok:
            FAILURES.append(f"small: files not smaller {sizes}")
        man = json.loads((small / "manifest.json").read_text())
        if man["components"]["text_encoder"].get("pruned_vocabulary", {}).get("kept") != len(keep):
            FAILURES.append(f"small: manifest lacks pruned_vocabulary: {man['components']['text_encoder']}")


def test_int8():
    """--weights-int8 and --keep-t5-token-ids (the nano model's storage since its second version)."""
    print("[int8] quantize_int8; --dtype fp32 --weights-int8 --keep-t5-token-ids", flush=True)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7)).astype(np.float32)
    w[2] = 0.0
    q, scale = ex.quantize_int8(w, axis=0)
    deq = q.astype(np.float32) * scale[:, None]
    check("quantize_int8: |w - q*scale| beyond scale/2, per channel",
          max(0.0, float((np.abs(w - deq) - scale[:, None] / 2).max())), 1e-7)
    check("quantize_int8: each channel's largest |w| maps to 127 (or 126/127 after float16 rounding)",
          float(np.abs(np.abs(q[[0, 1, 3, 4]]).max(axis=1) - 127).max()), 1.0)
    check("quantize_int8: scales are float16 values", float(np.abs(scale - scale.astype(np.float16)).max()), 0.0)
    check("quantize_int8: an all-zero channel has scale 1 and zeros", float(abs(scale[2] - 1) + np.abs(q[2]).max()), 0.0)
    from transformers import AutoTokenizer

    tok3 = AutoTokenizer.from_pretrained(TOKENIZERS / "tokenizer_3")
    text = "a red cat on a blue mat"
    ids = tok3(text, padding="max_length", max_length=16, truncation=True).input_ids
    keep = sorted(set(ids) | {tok3.pad_token_id})
    comps = "text_encoder_3,transformer,vae_decoder"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "keep_t5.json").write_text(json.dumps(keep))
        outs = {}
        for name, flags in (("int8", ["--weights-int8", "--keep-t5-token-ids", "keep_t5.json"]),
                            ("fp16", ["--weights-fp16"])):
            res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny", "--tokenizers-from",
                                  str(TOKENIZERS), "--dtype", "fp32", *flags, "--components", comps, "--out", name],
                                 capture_output=True, text=True, cwd=tmp)
            if res.returncode:
                FAILURES.append("int8: " + res.stderr[-2000:])
                print(res.stderr[-2000:])
                return
            outs[name] = Path(tmp) / name
        src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
        for comp in ("transformer", "vae_decoder", "text_encoder_3"):
            mod = src.load(comp)
            ex.weights_as_stored_int8(mod)  # the weights the int8 graph holds
            if comp == "text_encoder_3":
                feeds = {"input_ids": torch.tensor([ids])}
            else:
                feeds = component_inputs(comp, mod)
            ref = torch_outputs(comp, mod, feeds)
            got = run(outs["int8"] / comp / "model.onnx", feeds)
            k = next(iter(ref))
            check(f"int8-stored {comp} vs torch with the same weights (rel.)",
                  float(np.abs(got[k] - ref[k]).max()) / float(np.abs(ref[k]).max()), 1e-4)
            import onnx

            graph = onnx.load(str(outs["int8"] / comp / "model.onnx"))
            n_dq = sum(n.op_type == "DequantizeLinear" for n in graph.graph.node)
            a, b = ((outs[x] / comp / "model.onnx").stat().st_size for x in ("int8", "fp16"))
            ok = n_dq > 0 and a < b
            print(f"  {comp}: {n_dq} DequantizeLinear, {a} bytes (fp16-stored {b})  {'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"int8: {comp} has {n_dq} DequantizeLinear, {a} vs {b} bytes")
        man = json.loads((outs["int8"] / "manifest.json").read_text())
        if man["components"]["text_encoder_3"].get("pruned_vocabulary", {}).get("kept") != len(keep):
            FAILURES.append(f"int8: manifest lacks the T5 pruned_vocabulary: {man['components']['text_encoder_3']}")


def test_controlnet():
    print("[controlnet] residual transformer and optimized ControlNets vs torch (errors relative to max|ref|)",
          flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from diffusers import SD3ControlNetModel
    from make_controlnet_fixtures import ControlNetWrapper, block_index

    from export_controlnet import write_controlnet

    src = ex.Source(None, "tiny", TOKENIZERS, seed=0)
    tr = src.load("transformer")
    c = tr.config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, c.in_channels, 8, 12, generator=g)
    ctx = torch.randn(2, 7, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    t = torch.tensor([700.0, 300.0])
    inner = c.num_attention_heads * c.attention_head_dim
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, tol in (("fp32", 1e-5), ("fp16", 5e-3)):
            out = Path(tmp) / dtype
            ex.export_component("transformer", tr, out, exporter="torchscript", attention="fused", dtype=dtype,
                                opset=None, t5_precision="mixed", controlnet_graph=True)
            for n in (1, 2):
                r = torch.randn(n, 2, 8 * 12 // 4, inner, generator=g)
                with torch.no_grad():
                    ref = tr(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                             block_controlnet_hidden_states=list(r)).sample.numpy()
                got = run(out / "transformer" / ex.CONTROLNET_FILE,
                          {"hidden_states": x.numpy(), "encoder_hidden_states": ctx.numpy(),
                           "pooled_projections": pooled.numpy(), "timestep": t.numpy(), "controlnet_residuals": r.numpy(),
                           "controlnet_block_index": np.array(block_index(c.num_layers, n), dtype=np.int64)})
                got = next(iter(got.values()))
                check(f"residual transformer {dtype}, {n} residual(s)", float(np.abs(got - ref).max()) /
                      float(np.abs(ref).max()), tol)
        common = dict(attention_head_dim=c.attention_head_dim, caption_projection_dim=c.caption_projection_dim,
                      in_channels=c.in_channels, num_attention_heads=c.num_attention_heads, num_layers=2,
                      out_channels=c.out_channels, patch_size=c.patch_size, pooled_projection_dim=c.pooled_projection_dim,
                      pos_embed_max_size=c.pos_embed_max_size, sample_size=c.sample_size)
        torch.manual_seed(7)
        nets = {"instantx": SD3ControlNetModel(joint_attention_dim=c.joint_attention_dim, **common),
                "sd35": SD3ControlNetModel(joint_attention_dim=None, use_pos_embed=False,
                                           force_zeros_for_pooled_projection=False, **common)}
        nets["sd35"].pos_embed = nets["sd35"]._get_pos_embed_from_transformer(tr)
        cond = torch.randn(2, c.in_channels, 8, 12, generator=g)
        for kind, cn in nets.items():
            with torch.no_grad():  # zero_module() leaves the outputs at zero: redraw every weight
                for name, p in cn.named_parameters():
                    p.copy_(0.05 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and name.endswith(
                        "weight") else 0.0))
            cn.eval()
            text = kind == "instantx"
            args = [x, cond, t, pooled] + ([ctx] if text else [])
            names = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections", "encoder_hidden_states"]
            with torch.no_grad():
                ref = ControlNetWrapper(cn, text)(*args).numpy()
            for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
                out = Path(tmp) / f"cn-{kind}-{dtype}"
                with torch.no_grad():
                    write_controlnet(cn, out, dtype, optimize=True)
                got = next(iter(run(out / "model.onnx", {n: a.numpy() for n, a in zip(names, args)}).values()))
                mha = sum(n.op_type == "MultiHeadAttention" for n in __import__("onnx").load(
                    str(out / "model.onnx")).graph.node)
                check(f"ControlNet {kind} optimized {str(dtype)[6:]} ({mha} fused attention)",
                      float(np.abs(got - ref).max()) / float(np.abs(ref).max()), tol)
                if text and mha == 0:
                    FAILURES.append(f"ControlNet {kind}: no fused attention in the optimized graph")


# ----------------------------------------------------------------------------------------------------------------
# GroupNormalization -> InstanceNormalization (groupnorm_as_instancenorm)
# ----------------------------------------------------------------------------------------------------------------


def groupnorm_graph(shape: list[int], groups: int, eps: float, dtype: int, scale: np.ndarray, bias: np.ndarray):
    from onnx import helper, numpy_helper

    npt = {1: np.float32, 10: np.float16}[dtype]
    g = helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=eps)], "gn",
        [helper.make_tensor_value_info("x", dtype, shape)], [helper.make_tensor_value_info("y", dtype, shape)],
        initializer=[numpy_helper.from_array(scale.astype(npt), "s"), numpy_helper.from_array(bias.astype(npt), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def groupnorm_reference(x: np.ndarray, groups: int, eps: float, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c = x.shape[:2]
    xg = x.astype(np.float64).reshape(n, groups, -1)
    y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    y = y.reshape(n, c, -1) * scale.reshape(1, c, 1) + bias.reshape(1, c, 1)
    return y.reshape(x.shape)


def test_groupnorm():
    import copy

    import onnx

    print("GroupNormalization -> InstanceNormalization")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, groups in (([2, 32, 6, 5], 8), ([1, 16, 40], 4)):  # a VAE block's [N, C, H, W], its attention's [N, C, HW]
            c = shape[1]
            scale, bias = rng.normal(1, 0.5, c), rng.normal(0, 0.5, c)
            x = (rng.normal(0, 3, shape) + rng.normal(0, 2, (1, c) + (1,) * (len(shape) - 2))).astype(np.float32)
            ref = groupnorm_reference(x, groups, 1e-5, scale, bias)
            for dtype, tol in ((1, 1e-4), (10, 2e-2)):
                m = groupnorm_graph(shape, groups, 1e-5, dtype, scale, bias)
                rewritten = copy.deepcopy(m)
                assert ex.groupnorm_as_instancenorm(rewritten) == 1
                ops = [n.op_type for n in rewritten.graph.node]
                if "GroupNormalization" in ops or "InstanceNormalization" not in ops:
                    FAILURES.append(f"groupnorm rewrite left {ops}")
                feeds = {"x": x.astype(np.float16 if dtype == 10 else np.float32)}
                errs = {}
                for label, model in (("GroupNormalization", m), ("rewritten", rewritten)):
                    path = Path(tmp) / f"gn-{label}.onnx"
                    onnx.save(model, str(path))
                    errs[label] = float(np.abs(run(path, feeds)["y"] - ref).max())
                name = f"{'x'.join(map(str, shape))} G={groups} {'fp16' if dtype == 10 else 'fp32'}"
                check(f"{name}: ONNX Runtime's own GroupNormalization vs numpy", errs["GroupNormalization"], tol)
                check(f"{name}: rewritten vs numpy", errs["rewritten"], tol)
                # sabotage: the rewrite with the group count off by a factor of two must fail the same check
                bad = copy.deepcopy(m)
                for a in bad.graph.node[0].attribute:
                    if a.name == "num_groups":
                        a.i = groups * 2
                ex.groupnorm_as_instancenorm(bad)
                path = Path(tmp) / "gn-bad.onnx"
                onnx.save(bad, str(path))
                err_bad = float(np.abs(run(path, feeds)["y"] - ref).max())
                print(f"  {name}: sabotaged rewrite (twice the groups) max abs {err_bad:.3g}, must exceed {tol:.2g}")
                if err_bad <= tol:
                    FAILURES.append(f"{name}: a rewrite with twice the groups passes ({err_bad})")
        # below opset 21 (GroupNormalization-18: scale and bias per group) nothing is rewritten
        m = groupnorm_graph([1, 8, 4, 4], 4, 1e-5, 1, np.ones(4), np.zeros(4))
        m.opset_import[0].version = 18
        assert ex.groupnorm_as_instancenorm(m) == 0 and m.graph.node[0].op_type == "GroupNormalization"
        # the default keeps GroupNormalization: the rewrite's InstanceNormalization nodes ran on the CPU provider on
        # an H200 (docs/gpu-results/2026-12-04-h200-round23: 3,969 ms against 72.8 for the kept op)
        import inspect
        assert inspect.signature(ex.export_component).parameters["groupnorm"].default == "onnx"
        # a VAE decoder through the dynamo exporter (needs onnxscript), both ways, against diffusers
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            print("  (no onnxscript here: the dynamo VAE export check is skipped)")
            return
        vae = ex.Source(None, "tiny", TOKENIZERS, seed=0).load("vae_decoder")
        z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = vae.decode(z).sample.numpy()
        for mode in ("instancenorm", "onnx"):
            out = Path(tmp) / f"vae-{mode}"
            info = ex.export_component("vae_decoder", vae, out, exporter="dynamo", attention="fused", dtype="fp32",
                                       opset=None, t5_precision="fp32", groupnorm=mode)
            ops = info["nodes_final"]
            got = run(out / "vae_decoder" / "model.onnx", {"latent_sample": z.numpy()})["sample"]
            check(f"dynamo VAE decoder, --groupnorm {mode} ({ops.get('GroupNormalization', 0)} GroupNormalization, "
                  f"{ops.get('InstanceNormalization', 0)} InstanceNormalization) vs diffusers",
                  float(np.abs(got - ref).max()), 1e-4)


def test_qkv():
    """share_qkv_fp8 (fused_kernels.py --fp8): on the tiny fused fixture, dynamic scales merge every block's q/k/v
    (two LinearConcat3Fp8, no LinearConcatFp8 left) with the same emulated output to the bit; static scales merge
    when a block's three nodes share their scales and leave a block alone when one of them differs."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    import fused_kernels
    import fused_reference
    src = HERE.parent / "fixtures" / "export-tiny-fp16-fused" / "transformer" / "model.onnx"

    def ops(m):
        return [n.op_type for n in m.graph.node if n.domain == "sd3onnx"]

    dyn = onnx.load(str(src))
    fused_kernels.to_fp8(dyn)
    sep = onnx.ModelProto.FromString(dyn.SerializeToString())
    merged = fused_kernels.share_qkv_fp8(dyn)
    check("dynamic scales: merged q/k/v nodes (the fixture's 2 blocks)", abs(merged - 2), 0)
    check("dynamic scales: LinearConcatFp8 left", ops(dyn).count("LinearConcatFp8"), 0)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 16, 8, 12)).astype(np.float16),
             "encoder_hidden_states": rng.standard_normal((2, 29, 32)).astype(np.float16),
             "pooled_projections": rng.standard_normal((2, 20)).astype(np.float16),
             "timestep": np.array([981.5, 3.25], np.float32)}
    feeds = {i.name: feeds[i.name] for i in dyn.graph.input}
    y = ReferenceEvaluator(dyn, new_ops=fused_reference.OPS).run(None, feeds)[0]
    y0 = ReferenceEvaluator(sep, new_ops=fused_reference.OPS).run(None, feeds)[0]
    check("dynamic scales: merged vs separate emulated output (bits that differ)",
          int((y.view(np.uint16) != y0.view(np.uint16)).sum()), 0)
    # static scales: one per activation input; every node 0.01 but one block's k with 0.02 for xa
    base = onnx.load(str(src))
    names = {n.name: n.op_type for n in base.graph.node if n.domain == "sd3onnx" and n.op_type in fused_kernels.FP8_OPS}
    concat = [n for n, op in names.items() if op == "LinearConcat"]
    for differ in (False, True):
        scales = {n: [0.01, 0.01] if op == "LinearConcat" else [0.01] for n, op in names.items()}
        if differ:
            scales[concat[1]] = [0.02, 0.01]
        m = onnx.load(str(src))
        fused_kernels.to_fp8(m, act_scales=scales)
        got = fused_kernels.share_qkv_fp8(m)
        want = 1 if differ else 2
        check(f"static scales{', one k scale differs' if differ else ''}: merged blocks {got}, expected {want}",
              abs(got - want), 0)
        check(f"static scales{', one k scale differs' if differ else ''}: LinearConcatFp8 left",
              abs(ops(m).count("LinearConcatFp8") - (3 if differ else 0)), 0)


def test_fast_accum():
    """--fp8-fast-accum: set_fast_accum puts fast_accum=1 on every FP8 node (and nothing else) without changing the
    emulated output; the graph-only CLI mode on an FP8 folder writes only the graph (the other files hard-linked)
    and refuses a folder without FP8 nodes."""
    import tempfile
    import onnx
    from onnx.reference import ReferenceEvaluator
    import fused_kernels
    import fused_reference
    fixtures = HERE.parent / "fixtures"
    src = fixtures / "export-tiny-fp16-fused-fp8-qkv"
    base = onnx.load(str(src / "transformer" / "model.onnx"))
    fp8 = [n.name for n in base.graph.node if n.domain == "sd3onnx" and n.op_type in fused_kernels.FP8_NODE_TYPES]
    m = onnx.ModelProto.FromString(base.SerializeToString())
    got = fused_kernels.set_fast_accum(m)
    check(f"fast_accum set on {got} nodes, the graph's FP8 nodes: {len(fp8)}", abs(got - len(fp8)), 0)
    marked = [n.name for n in m.graph.node if any(a.name == "fast_accum" and a.i == 1 for a in n.attribute)]
    check("nodes with fast_accum=1 that are not FP8 nodes (or FP8 nodes without)", len(set(marked) ^ set(fp8)), 0)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 16, 8, 12)).astype(np.float16),
             "encoder_hidden_states": rng.standard_normal((2, 29, 32)).astype(np.float16),
             "pooled_projections": rng.standard_normal((2, 20)).astype(np.float16),
             "timestep": np.array([981.5, 3.25], np.float32)}
    feeds = {i.name: feeds[i.name] for i in m.graph.input}
    y = ReferenceEvaluator(m, new_ops=fused_reference.OPS).run(None, feeds)[0]
    y0 = ReferenceEvaluator(base, new_ops=fused_reference.OPS).run(None, feeds)[0]
    check("fast_accum: emulated output vs without (bits that differ)", int((y.view(np.uint16) != y0.view(np.uint16)).sum()), 0)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "fast"
        fused_kernels.main(["--fp8-fast-accum", str(src), str(dst)])
        out = onnx.load(str(dst / "transformer" / "model.onnx"))
        n_fast = sum(any(a.name == "fast_accum" and a.i == 1 for a in n.attribute) for n in out.graph.node)
        check(f"CLI graph-only: FP8 nodes with fast_accum=1 ({n_fast} of {len(fp8)})", abs(n_fast - len(fp8)), 0)
        same = [n.name for n in out.graph.node] == [n.name for n in base.graph.node]
        check("CLI graph-only: the same nodes in the same order", 0 if same else 1, 0)
        linked = os.path.samefile(src / "manifest.json", dst / "manifest.json")
        check("CLI graph-only: the other files hard-linked", 0 if linked else 1, 0)
        for argv, why in ((["--fp8-fast-accum", str(fixtures / "export-tiny-fp16-fused"), str(Path(tmp) / "x")],
                           "no FP8 node"),
                          (["--fp8-fast-accum", "--from-fused", str(src), str(Path(tmp) / "y")],
                           "--from-fused only makes sense with --fp8")):
            try:
                fused_kernels.main(argv)
                msg = "no error"
            except SystemExit as e:
                msg = str(e)
            ok = why in msg
            print(f"  {' '.join(a.rsplit('/', 1)[-1] for a in argv):70s} -> {msg[:70]}  {'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"fast_accum CLI {argv}: {msg}")


def test_mlp():
    """--fp8-merge-mlp: merge_mlp_fp8 makes each feed-forward of the tiny fused fixture with stored scales one MlpFp8
    (every GELU LinearFp8 with its reader) with the same emulated output to the bit, and merges nothing with dynamic
    scales; the CLI refuses --fp8-merge-mlp without stored scales, and a dynamic FP8 folder in graph-only mode."""
    import tempfile
    import onnx
    from onnx.reference import ReferenceEvaluator
    import fused_kernels
    import fused_reference
    fixtures = HERE.parent / "fixtures"
    src = fixtures / "export-tiny-fp16-fused" / "transformer" / "model.onnx"
    base = onnx.load(str(src))
    names = {n.name: n.op_type for n in base.graph.node if n.domain == "sd3onnx" and n.op_type in fused_kernels.FP8_OPS}
    scales = {n: [0.01, 0.01] if op == "LinearConcat" else [0.02] for n, op in names.items()}
    m = onnx.load(str(src))
    fused_kernels.to_fp8(m, act_scales=scales)
    before = onnx.ModelProto.FromString(m.SerializeToString())
    gelu = sum(n.op_type == "LinearFp8" and any(a.name == "activation" and a.i == 1 for a in n.attribute)
               for n in m.graph.node)
    merged = fused_kernels.merge_mlp_fp8(m)
    check(f"static scales: feed-forwards merged {merged}, GELU LinearFp8 nodes {gelu}", abs(merged - gelu), 0)
    check("static scales: MlpFp8 nodes in the graph", abs([n.op_type for n in m.graph.node].count("MlpFp8") - gelu), 0)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 16, 8, 12)).astype(np.float16),
             "encoder_hidden_states": rng.standard_normal((2, 29, 32)).astype(np.float16),
             "pooled_projections": rng.standard_normal((2, 20)).astype(np.float16),
             "timestep": np.array([981.5, 3.25], np.float32)}
    feeds = {i.name: feeds[i.name] for i in m.graph.input}
    y = ReferenceEvaluator(m, new_ops=fused_reference.OPS).run(None, feeds)[0]
    y0 = ReferenceEvaluator(before, new_ops=fused_reference.OPS).run(None, feeds)[0]
    check("static scales: merged vs two nodes, emulated output (bits that differ)",
          int((y.view(np.uint16) != y0.view(np.uint16)).sum()), 0)
    dyn = onnx.load(str(src))
    fused_kernels.to_fp8(dyn)
    check("dynamic scales: feed-forwards merged", fused_kernels.merge_mlp_fp8(dyn), 0)
    with tempfile.TemporaryDirectory() as tmp:
        for argv, why in ((["--fp8", "--fp8-merge-mlp", str(fixtures / "export-tiny-fp16"), str(Path(tmp) / "a")],
                           "needs stored activation scales"),
                          (["--fp8-merge-mlp", str(fixtures / "export-tiny-fp16-fused-fp8-qkv"), str(Path(tmp) / "b")],
                           "no FP8 feed-forward with stored activation scales")):
            try:
                fused_kernels.main(argv)
                msg = "no error"
            except SystemExit as e:
                msg = str(e)
            ok = why in msg
            print(f"  {' '.join(a.rsplit('/', 1)[-1] for a in argv):70s} -> {msg[:70]}  {'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"merge-mlp CLI {argv}: {msg}")


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    wanted = sys.argv[1:] or ["t5", "parity", "nodes", "slg", "cli", "small", "int8", "controlnet", "groupnorm", "qkv",
                              "fast_accum", "mlp"]
    for name in wanted:
        {"t5": test_t5_overflow, "parity": test_parity, "nodes": test_nodes, "slg": test_slg, "cli": test_cli,
         "small": test_small, "int8": test_int8, "controlnet": test_controlnet, "groupnorm": test_groupnorm,
         "qkv": test_qkv, "fast_accum": test_fast_accum,
         "mlp": test_mlp}[name]()
    if FAILURES:
        print(f"\n{len(FAILURES)} FAILED:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
