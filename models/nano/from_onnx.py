#!/usr/bin/env python3
"""Rebuilds the PyTorch modules of an exported nano model (models/sd3-nano: ONNX only, the training checkpoint is
lost) from its ONNX graphs, so that train.py can fine-tune it (issue 22), and checks that each rebuilt module
reproduces its graph under ONNX Runtime.

The committed graphs went through export_nano.py: TorchScript export, ONNX Runtime's fusions, weights stored as int8
(DequantizeLinear) or float16 (Cast), the CLIP and T5 token tables cut to the kept ids, and every tensor renamed to a
short id ("t1a"). Names cannot say which weight is which, so each component is matched by a **probe**:

1. A module of the same class is built from the folder's config.json (train.py's configs() gave the same ones).
2. Structure: a randomly initialised copy is exported with export_nano's exact options (int8, pruning, short names
   computed but the long names kept aside); its graph must equal the committed one node for node (op types, attributes,
   inputs/outputs in short names, initializer names, shapes and types): then the committed short name of every long
   tensor name is known.
3. Values: a copy whose every parameter element holds a code (4 * its index + 1, exactly representable in float32)
   is exported in plain float32 (no int8, no float16, no pruning: same long names). Every float initializer whose
   values are all codes (or codes + 1: the adaLN fold adds 1 to the scale biases) says, element by element, which
   parameter element it holds (transposes, concatenations and slices included).
4. The committed graph's value of that tensor (DequantizeLinear of its int8 and scale, Cast of its float16, or the
   kept rows of a pruned table with every other row set to the shared row, which is what the graph's id map gives)
   is written into those parameter elements. Every parameter element must be written, all writes must agree, and
   every initializer that is not coded (constants, the position-embedding buffer) must equal the probe's.
5. The rebuilt module and the committed graph are run on the same random inputs (token ids include ids that are not
   kept) under ONNX Runtime with the crate's session settings; the maximum difference is reported.

The first model's VAE encoder was never exported; since issue 22 the folder has run 13's (`vae_encoder/`), which
`--components ...,vae_encoder` rebuilds the same way (its module is a whole AutoencoderKL of which only the encoder
is in the graph); save_pipeline() then puts it into `vae/` beside the decoder. train.py --init-from-onnx trains a
new encoder against the rebuilt decoder either way; train.py --vae-from keeps this VAE as it is.

    python models/nano/from_onnx.py --model models/sd3-nano --out /tmp/nano-pt     # diffusers pipeline folder
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "export"))
sys.path.insert(0, str(HERE))

import export_sd3  # noqa: E402

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder")


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# modules from configs
# ---------------------------------------------------------------------------------------------------------------

def build(component: str, model_dir: Path, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised module of the component's class from the folder's config.json."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = json.loads((model_dir / component / "config.json").read_text())
    if component in ("text_encoder", "text_encoder_2"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    if component == "text_encoder_3":
        return T5EncoderModel(T5Config(**cfg)).eval()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if component == "transformer":
        return SD3Transformer2DModel(**cfg).eval()
    return AutoencoderKL(**cfg).eval()


def kept_ids(model_dir: Path, component: str) -> list[int] | None:
    tok = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}.get(component)
    if tok is None or not (model_dir / tok / "kept_token_ids.json").is_file():
        return None
    return json.loads((model_dir / tok / "kept_token_ids.json").read_text())["kept"]


# ---------------------------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------------------------

def export_probe(component: str, module, work: Path, *, like_committed: bool,
                 keep: list[int] | None) -> onnx.ModelProto:
    """export_sd3.export_component of ``module`` as export_nano.py calls it (like_committed) or in plain float32."""
    out = work / ("struct" if like_committed else "values")
    kw = dict(exporter="torchscript", attention="fused", dtype="fp32", opset=None, t5_precision="fp32")
    if like_committed:
        kw.update(weights_int8=True)
        if component in ("text_encoder", "text_encoder_2"):
            kw["keep_token_ids"] = keep
        if component == "text_encoder_3":
            kw["keep_t5_token_ids"] = keep
    export_sd3.export_component(component, module, out, **kw)
    return onnx.load(str(out / component / "model.onnx"))


def short_name_map(m: onnx.ModelProto) -> dict[str, str]:
    """export_nano.short_names' renaming (long -> short), computed without changing the graph."""
    keep = {v.name for v in list(m.graph.input) + list(m.graph.output)}
    names: dict[str, str] = {}

    def short(name: str):
        if not name or name in keep or name in names:
            return
        n, s = len(names), ""
        while True:
            s = "0123456789abcdefghijklmnopqrstuvwxyz"[n % 36] + s
            n //= 36
            if n == 0:
                break
        names[name] = "t" + s

    for t in m.graph.initializer:
        short(t.name)
    for node in m.graph.node:
        for x in list(node.input) + list(node.output):
            short(x)
    return names


def renamed_structure(m: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``m`` as export_nano.short_names leaves it (short names, no node names, no value_info,
    topologically sorted)."""
    c = onnx.ModelProto()
    c.CopyFrom(m)
    r = lambda x: names.get(x, x)  # noqa: E731
    for t in c.graph.initializer:
        t.name = r(t.name)
    for node in c.graph.node:
        node.name = ""
        for i, x in enumerate(node.input):
            node.input[i] = r(x)
        for i, x in enumerate(node.output):
            node.output[i] = r(x)
    del c.graph.value_info[:]
    export_sd3.topological_sort(c)
    return c


def same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """None when the two graphs have the same nodes (op, inputs, outputs, attributes other than tensor values) and
    initializers (name, type, shape); else what differs."""
    if len(a.graph.node) != len(b.graph.node):
        return f"{len(a.graph.node)} vs {len(b.graph.node)} nodes"
    for k, (x, y) in enumerate(zip(a.graph.node, b.graph.node)):
        if (x.op_type, list(x.input), list(x.output)) != (y.op_type, list(y.input), list(y.output)):
            return f"node {k}: {x.op_type} {list(x.input)} vs {y.op_type} {list(y.input)}"
        ax = sorted((t.name, t.type, t.i, t.f, t.s, tuple(t.ints)) for t in x.attribute)
        ay = sorted((t.name, t.type, t.i, t.f, t.s, tuple(t.ints)) for t in y.attribute)
        if ax != ay:
            return f"node {k} ({x.op_type}): attributes differ"
    ia = sorted((t.name, t.data_type, tuple(t.dims)) for t in a.graph.initializer)
    ib = sorted((t.name, t.data_type, tuple(t.dims)) for t in b.graph.initializer)
    if ia != ib:
        diff = sorted(set(ia) ^ set(ib))[:4]
        return f"initializers differ, e.g. {diff}"
    return None


def coded(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Sets every parameter element to 4 * (its global index) + 1; returns [(name, param)] in that order."""
    params = list(module.named_parameters())
    total = sum(p.numel() for _, p in params)
    if 4 * total + 2 >= 2 ** 24:
        raise ValueError(f"{total} parameters: too many for exact float32 codes")
    k = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(torch.arange(k, k + n, dtype=torch.float64).mul(4).add(1).reshape(p.shape).float())
            k += n
    return params


# ---------------------------------------------------------------------------------------------------------------
# the committed graph's tensor values
# ---------------------------------------------------------------------------------------------------------------

class Values:
    """Values of the committed graph's constant tensors: initializers, DequantizeLinear of int8 + scale, Cast."""

    def __init__(self, m: onnx.ModelProto):
        self.inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        self.prod = {o: n for n in m.graph.node for o in n.output}

    def __call__(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.inits[name]
        n = self.prod.get(name)
        if n is None:
            return None
        if n.op_type == "DequantizeLinear":
            q, s = self(n.input[0]), self(n.input[1])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            return q.astype(np.float32) * s.astype(np.float32).reshape(shape)
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            v = self(n.input[0])
            return None if v is None else v.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return None


# ---------------------------------------------------------------------------------------------------------------
# rebuilding one component
# ---------------------------------------------------------------------------------------------------------------

def rebuild(component: str, model_dir: Path, work: Path) -> tuple[torch.nn.Module, dict]:
    committed = onnx.load(str(model_dir / component / "model.onnx"))
    keep = kept_ids(model_dir, component)
    # 2. structure: the committed short name of every long name
    # (distinct random values: the exporter merges equal initializers, e.g. freshly initialised norm weights)
    rnd = build(component, model_dir, seed=1)
    with torch.no_grad():
        for p in rnd.parameters():
            p.add_(0.02 * torch.randn_like(p))
    struct = export_probe(component, rnd, work, like_committed=True, keep=keep)
    names = short_name_map(struct)
    why = same_structure(renamed_structure(struct, names), committed)
    if why is not None:
        raise SystemExit(f"{component}: the probe export's structure differs from the committed graph: {why}")
    # 3. values
    probe = build(component, model_dir, seed=2)
    params = coded(probe)
    plain = export_probe(component, probe, work, like_committed=False, keep=None)
    flat = torch.cat([p.detach().reshape(-1).double() for _, p in params]).numpy()
    total = flat.size
    target = np.full(total, np.nan, np.float64)
    value = Values(committed)
    ref_vals = Values(struct)
    report = dict(coded_tensors=0, plus_one_tensors=0, constant_tensors=0, pruned_tables=0)
    # float buffers (the transformer's position-embedding table) as the graph holds them (float16-rounded)
    buffers = {n: b for n, b in probe.named_buffers() if b.is_floating_point()}
    buffer_values: dict[str, np.ndarray] = {}
    for t in plain.graph.initializer:
        a = numpy_helper.to_array(t)
        long = t.name
        if a.dtype != np.float32 or a.size == 0:
            continue
        x = a.astype(np.float64).reshape(-1)
        r = np.mod(x, 4)
        idx = np.floor(x / 4).astype(np.int64)
        is_code = np.all(r == 1) and idx.min() >= 0 and idx.max() < total
        plus_one = not is_code and np.all(r == 2) and idx.min() >= 0 and idx.max() < total
        got = value(names.get(long, long))
        if got is None and names.get(long + ".kept") is not None:  # a pruned token table
            small = value(names[long + ".kept"])
            ids = value(names[long + ".kept_ids"])
            got = np.repeat(small[-1:], a.shape[0], axis=0)
            got[ids] = small[:-1]
            report["pruned_tables"] += 1
        if got is None:
            raise SystemExit(f"{component}: no committed value for {long}")
        got = np.asarray(got, np.float64).reshape(-1)
        if got.size != x.size:
            raise SystemExit(f"{component}: {long} has {got.size} values, the probe {x.size}")
        if is_code or plus_one:
            v = got - (1.0 if plus_one else 0.0)
            prev = target[idx]
            clash = ~np.isnan(prev) & (prev != v)
            if clash.any():
                raise SystemExit(f"{component}: {long} disagrees with an earlier tensor on {int(clash.sum())} values")
            target[idx] = v
            report["plus_one_tensors" if plus_one else "coded_tensors"] += 1
        else:
            # not a weight: a constant of the graph (its value does not depend on the weights)
            ref = ref_vals(long)
            if ref is None or not np.array_equal(np.asarray(ref, np.float64).reshape(-1), got):
                raise SystemExit(f"{component}: {long} is neither a weight nor the probe's constant")
            report["constant_tensors"] += 1
            for bn, b in buffers.items():
                if b.numel() == a.size and np.array_equal(b.detach().double().numpy().reshape(-1), x):
                    buffer_values[bn] = got.astype(np.float32).reshape(tuple(b.shape))
    missing = int(np.isnan(target).sum())
    if missing:
        bad = []
        k = 0
        for name, p in params:
            if np.isnan(target[k:k + p.numel()]).any():
                bad.append(name)
            k += p.numel()
        # parameters the graph does not use (e.g. CLIP's unused pooler parts) are left as initialised; say which
        report["unused_parameters"] = sorted({".".join(b.split(".")[:1]) for b in bad}) + [f"({len(bad)} tensors)"]
    module = build(component, model_dir, seed=3)
    k = 0
    with torch.no_grad():
        for (name, _), (name2, p) in zip(params, module.named_parameters()):
            assert name == name2
            n = p.numel()
            vals = target[k:k + n]
            if not np.isnan(vals).any():
                p.copy_(torch.from_numpy(vals.astype(np.float32)).reshape(p.shape))
            elif not np.isnan(vals).all():
                raise SystemExit(f"{component}: {name} only partly found in the graph")
            k += n
        for bn, v in buffer_values.items():
            module.get_buffer(bn).copy_(torch.from_numpy(v))
    report["buffers_from_graph"] = sorted(buffer_values)
    report["parameters"] = total
    return module, report


# ---------------------------------------------------------------------------------------------------------------
# checking a rebuilt module against the committed graph
# ---------------------------------------------------------------------------------------------------------------

def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as src/runtime/graph.rs
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare(component: str, module: torch.nn.Module, model_dir: Path, seed: int = 0) -> dict:
    """Max |torch - ONNX Runtime| (and the outputs' max |value|) on random inputs."""
    g = torch.Generator().manual_seed(seed)
    sess = ort_session(model_dir / component / "model.onnx")
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        vocab = module.config.vocab_size
        seq = 77
        ids = torch.randint(0, vocab, (3, seq), generator=g)
        keep = kept_ids(model_dir, component)
        ids[0] = torch.tensor(keep)[torch.randint(0, len(keep), (seq,), generator=g)]  # a row of kept ids only
        if component != "text_encoder_3":
            ids[:, -1] = module.config.eos_token_id
        outs = sess.run(None, {"input_ids": ids.numpy()})
        names = [o.name for o in sess.get_outputs()]
        if component == "text_encoder_3":
            ref = {"last_hidden_state": module(ids)[0]}
        else:
            o = module(ids, output_hidden_states=True)
            ref = {"text_embeds": o.text_embeds, "last_hidden_state": o.last_hidden_state}
            ref.update({f"hidden_states.{i}": h for i, h in enumerate(o.hidden_states)})
    elif component == "transformer":
        c = module.config
        feeds = dict(hidden_states=torch.randn(2, c.in_channels, 16, 16, generator=g),
                     encoder_hidden_states=torch.randn(2, 154, c.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([900.0, 120.0]))
        outs = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        names = [o.name for o in sess.get_outputs()]
        ref = {names[0]: module(**feeds, return_dict=False)[0]}
    elif component == "vae_encoder":
        x = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
        outs = sess.run(None, {"sample": x.numpy()})
        names = [o.name for o in sess.get_outputs()]
        h = module.encoder(x)
        ref = {names[0]: h if module.quant_conv is None else module.quant_conv(h)}
    else:  # vae_decoder
        z = torch.randn(2, module.config.latent_channels, 16, 16, generator=g)
        outs = sess.run(None, {"latent_sample": z.numpy()})
        names = [o.name for o in sess.get_outputs()]
        ref = {names[0]: module.decode(z).sample}
    diff, scale = 0.0, 0.0
    for name, o in zip(names, outs):
        if name in ref:
            diff = max(diff, float(np.abs(ref[name].float().numpy() - o).max()))
            scale = max(scale, float(np.abs(o).max()))
    return dict(max_abs_diff=diff, max_abs_output=scale, outputs=len([n for n in names if n in ref]))


def rebuild_all(model_dir: Path, components=COMPONENTS, check: bool = True) -> tuple[dict, dict]:
    """{component: module}, {component: report}."""
    mods, reports = {}, {}
    with tempfile.TemporaryDirectory(prefix="from-onnx-") as tmp:
        for comp in components:
            m, rep = rebuild(comp, model_dir, Path(tmp) / comp)
            if check:
                rep.update(compare(comp, m, model_dir))
            log(f"{comp}: {json.dumps(rep)}")
            mods[comp], reports[comp] = m, rep
    return mods, reports


def save_pipeline(mods: dict, model_dir: Path, out: Path, tokenizers_from: Path) -> None:
    """A diffusers StableDiffusion3Pipeline folder like train.py's (float32; vae/ holds the rebuilt decoder and, when
    `mods` has "vae_encoder", the rebuilt encoder, else a freshly initialised one; the latent shift/scale from the
    model's VAE config). Components not in `mods` are left out."""
    out.mkdir(parents=True, exist_ok=True)
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        if comp in mods:
            mods[comp].save_pretrained(out / comp)
    if "vae_encoder" in mods:
        enc = mods["vae_encoder"]
        mods["vae_decoder"].encoder.load_state_dict(enc.encoder.state_dict())
        if enc.quant_conv is not None:
            mods["vae_decoder"].quant_conv.load_state_dict(enc.quant_conv.state_dict())
    mods["vae_decoder"].save_pretrained(out / "vae")
    for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if (out / t).exists():
            shutil.rmtree(out / t)
        shutil.copytree(tokenizers_from / t, out / t, symlinks=False)
    shutil.copytree(model_dir / "scheduler", out / "scheduler", dirs_exist_ok=True)
    idx = json.loads((model_dir / "model_index.json").read_text())
    idx["vae"] = ["diffusers", "AutoencoderKL"]
    idx.pop("vae_decoder", None)
    idx.pop("vae_encoder", None)
    (out / "model_index.json").write_text(json.dumps(idx, indent=2) + "\n")
    kept = {c: kept_ids(model_dir, c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in mods}
    (out / "onnx_kept_token_ids.json").write_text(json.dumps(kept) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE.parent / "sd3-nano")
    ap.add_argument("--out", type=Path, default=None, help="write a diffusers pipeline folder here")
    ap.add_argument("--components", default=",".join(COMPONENTS),
                    help="comma-separated; vae_encoder may be added (the folder's vae_encoder/), and --out needs "
                         "vae_decoder")
    ap.add_argument("--tokenizers-from", type=Path, default=HERE.parent / "fixtures" / "tiny-sd35")
    ap.add_argument("--json", type=Path, default=None, help="write the reports here")
    a = ap.parse_args()
    mods, reps = rebuild_all(a.model, a.components.split(","))
    if a.json:
        a.json.write_text(json.dumps(reps, indent=1) + "\n")
    if a.out:
        save_pipeline(mods, a.model, a.out, a.tokenizers_from)
        log("wrote", a.out)


if __name__ == "__main__":
    main()
