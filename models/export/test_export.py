#!/usr/bin/env python3
"""Checks of models/export/export_sd3.py (needs torch; not part of CI, which has none):

    /work/pyenv/bin/python models/export/test_export.py            # everything (~2 minutes on 2 cores)
    /work/pyenv/bin/python models/export/test_export.py t5 parity  # a subset: t5, parity, nodes, cli

t5      T5 float16 overflow: a tiny T5 whose feed-forward output exceeds 65504, exported naive fp16 (inf/nan) and
        with the mixed precision of --t5-precision mixed (close to torch fp32); plus T5-XXL size arithmetic.
parity  every component of `--random tiny`, exported fp32 and fp16 with fused attention by both exporters (and
        plain opset 17 for reference), run with onnxruntime CPU against the diffusers/transformers torch module
        (float32) on the same inputs: max abs errors against stated tolerances.
nodes   node counts by op type for the tiny transformer before/after the rewrites (the table in README.md).
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
                              "--out", str(out_m)], capture_output=True, text=True)
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
            toks = sorted(p.name for p in (out_m / "tokenizer_3").iterdir())
            print(f"  --model folder: tokenizer_3 {toks}, model_index {sorted(json.loads((out_m / 'model_index.json').read_text()))[:6]}...")

        # A bf16 export is well-formed (ONNX Runtime has no CPU kernels for most bf16 ops, so it is not run here).
        out_bf = Path(tmp) / "tiny-bf16"
        res = subprocess.run([sys.executable, str(HERE / "export_sd3.py"), "--random", "tiny", "--tokenizers-from",
                              str(TOKENIZERS), "--dtype", "bf16", "--components", "transformer", "--out", str(out_bf)],
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


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    wanted = sys.argv[1:] or ["t5", "parity", "nodes", "cli"]
    for name in wanted:
        {"t5": test_t5_overflow, "parity": test_parity, "nodes": test_nodes, "cli": test_cli}[name]()
    if FAILURES:
        print(f"\n{len(FAILURES)} FAILED:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
