#!/usr/bin/env python3
"""Writes the skip-layer-guidance graph of the tiny SD3.5 fixture:

    models/fixtures/tiny-sd35/transformer/model_skip_layers.onnx   skip_layers [1], float32

from the SAME weights as the committed models/fixtures/tiny-sd35/transformer/model.onnx (optimum's export): the
diffusers checkpoint that models/make_fixtures.py's `models` stage leaves in its build folder
($SD3_FIXTURE_BUILD/tiny-sd35-diffusers/transformer, default /tmp/sd3-onnx-fixture-build). Nothing else in the
fixture folder is written.

    /work/pyenv/bin/python models/export/make_skip_fixture.py [--checkpoint DIR] [--check-only]

Steps (any failure stops before or instead of writing):
  1. the checkpoint must reproduce the committed transformer/model.onnx (onnxruntime CPU vs torch float32, 1e-4);
  2. export_sd3.export_component(..., skip_layers=[1], exporter torchscript, attention plain, fp32): a wrapper that
     calls the transformer with skip_layers=[1] fixed, TorchScript export at opset 17, attention as
     MatMul/Softmax, no rewrites -- the same kind of graph as the fixture's optimum export (which is opset 18,
     plain), so the two graphs round alike; ONNX metadata "skip_layers" = "[1]";
  3. the graph inputs/outputs get the committed model.onnx's exact types and dimension names (optimum calls the
     timestep axis "step"; our exporter "batch_size"), then the IO is compared with onnx;
  4. verified on the fixture's input shapes (batch 1 and 2 as the pipeline runs it, latents 8x8 and 12x8, the 333
     context tokens of 77 CLIP + 256 T5 tokens, and 589 for max_sequence_length 512): the skip graph against
     diffusers' transformer(..., skip_layers=[1]) within 1e-4, and clearly apart from the unskipped output;
  5. transformer/model.onnx and transformer/config.json unchanged (sha256 before/after, and `git diff` if git is
     there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import export_sd3 as ex  # noqa: E402

FIXTURE = REPO / "models" / "fixtures" / "tiny-sd35"
BUILD = Path(os.environ.get("SD3_FIXTURE_BUILD", os.path.join(tempfile.gettempdir(), "sd3-onnx-fixture-build")))
CHECKPOINT = BUILD / "tiny-sd35-diffusers" / "transformer"
SKIP_LAYERS = [1]
TOL = 1e-4


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cases(cfg):
    """(label, feeds) on the shapes the pipeline feeds the fixture (64x64 images: 8x8 latents; 96x64: 12x8)."""
    out = []
    for k, (batch, h, w, seq, ts) in enumerate(((1, 8, 8, 333, [1000.0]), (1, 8, 8, 333, [312.5]),
                                                (2, 8, 8, 333, [750.0, 750.0]), (1, 12, 8, 333, [500.0]),
                                                (1, 8, 8, 589, [875.0]))):
        g = torch.Generator().manual_seed(100 + k)
        out.append((f"batch {batch}, latents {h}x{w}, {seq} tokens, t {ts[0]}", dict(
            hidden_states=torch.randn(batch, cfg.in_channels, h, w, generator=g),
            encoder_hidden_states=torch.randn(batch, seq, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor(ts, dtype=torch.float32))))
    return out


def run(sess: ort.InferenceSession, feeds: dict) -> np.ndarray:
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def copy_io_types(dst: onnx.ModelProto, ref: onnx.ModelProto):
    """dst's graph inputs/outputs get ref's element types and dims (values and names), matched by name."""
    ref_io = {v.name: v for v in list(ref.graph.input) + list(ref.graph.output)}
    for v in list(dst.graph.input) + list(dst.graph.output):
        r = ref_io.get(v.name)
        if r is None:
            raise SystemExit(f"{v.name} is not an input/output of the committed graph")
        if v.type.tensor_type.elem_type != r.type.tensor_type.elem_type or \
                len(v.type.tensor_type.shape.dim) != len(r.type.tensor_type.shape.dim):
            raise SystemExit(f"{v.name}: type/rank {v.type} differs from the committed graph's {r.type}")
        v.type.CopyFrom(r.type)


def io_of(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString(deterministic=True)) for v in list(model.graph.input) + list(model.graph.output)]


def git_clean(paths: list[Path]) -> str:
    try:
        res = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *map(str, paths)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"git not available ({e})"
    if res.returncode != 0:
        return f"git status failed: {res.stderr.strip()[:200]}"
    return "clean" if not res.stdout.strip() else res.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help=f"diffusers transformer folder ({CHECKPOINT})")
    ap.add_argument("--check-only", action="store_true", help="verify the committed skip graph, write nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"{args.checkpoint} is missing: it is the diffusers checkpoint of tiny-sd35 that "
                         "models/make_fixtures.py's `models` stage saves in its build folder (SD3_FIXTURE_BUILD); "
                         "rebuilding it re-exports the whole fixture, so get the build folder it came from")
    main_path = FIXTURE / "transformer" / "model.onnx"
    config_path = FIXTURE / "transformer" / "config.json"
    skip_path = FIXTURE / "transformer" / ex.SKIP_FILE
    before = {p: ex.sha256_file(p) for p in (main_path, config_path)}

    from diffusers import SD3Transformer2DModel

    module = SD3Transformer2DModel.from_pretrained(args.checkpoint, torch_dtype=torch.float32).eval()
    committed_cfg = json.loads(config_path.read_text())
    for k, v in module.config.items():
        if not k.startswith("_") and k in committed_cfg and committed_cfg[k] != v and \
                not (isinstance(v, (list, tuple)) and list(v) == committed_cfg[k]):
            raise SystemExit(f"{args.checkpoint}: config {k}={v}, the fixture's config.json says {committed_cfg[k]}")
    main_sess = session(main_path)
    tests = cases(module.config)

    # 1. same weights as the committed optimum graph
    err = 0.0
    refs = []
    for _, feeds in tests:
        with torch.no_grad():
            full = module(**feeds, return_dict=False)[0].numpy()
            skip = module(**feeds, return_dict=False, skip_layers=SKIP_LAYERS)[0].numpy()
        refs.append((full, skip))
        err = max(err, float(np.abs(run(main_sess, feeds) - full).max()))
    print(f"checkpoint vs committed {main_path.relative_to(REPO)}: max abs {err:.3g} (tolerance {TOL})")
    if not err <= TOL:
        raise SystemExit("the checkpoint does not reproduce the committed tiny-sd35 transformer: not the same weights")

    # 2.-3. export
    if not args.check_only:
        with tempfile.TemporaryDirectory(prefix="skip-fixture-") as tmp:
            info = ex.export_component("transformer", module, Path(tmp), exporter="torchscript", attention="plain",
                                       dtype="fp32", opset=None, t5_precision="mixed", external=False,
                                       skip_layers=SKIP_LAYERS)
            m = onnx.load(str(Path(tmp) / "transformer" / ex.SKIP_FILE))
        copy_io_types(m, onnx.load(str(main_path), load_external_data=False))
        onnx.checker.check_model(m)
        onnx.save_model(m, str(skip_path))
        print(f"wrote {skip_path.relative_to(REPO)}: {skip_path.stat().st_size} bytes, opset {info['opset']}, "
              f"{info['node_count']} nodes, sha256 {ex.sha256_file(skip_path)}")

    # 4. verify what is on disk
    m = onnx.load(str(skip_path))
    ref = onnx.load(str(main_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    problems = []
    if io_of(m) != io_of(ref):
        problems.append("inputs/outputs differ from model.onnx")
    if meta.get(ex.SKIP_METADATA_KEY) != json.dumps(SKIP_LAYERS):
        problems.append(f"metadata {meta}")
    sess = session(skip_path)
    custom = dict(sess.get_modelmeta().custom_metadata_map)
    print(f"skip graph: metadata (onnxruntime custom_metadata_map) {custom}; inputs/outputs "
          f"{[(i.name, i.type, i.shape) for i in sess.get_inputs() + sess.get_outputs()]}")
    print(f"committed : inputs/outputs "
          f"{[(i.name, i.type, i.shape) for i in main_sess.get_inputs() + main_sess.get_outputs()]}")
    worst = 0.0
    for (label, feeds), (full, skip) in zip(tests, refs):
        got = run(sess, feeds)
        e = float(np.abs(got - skip).max())
        apart = float(np.abs(got - full).max())
        worst = max(worst, e)
        print(f"  {label:44s} skip graph vs torch skip_layers=[1] {e:.3g}; vs unskipped torch {apart:.3g} "
              f"(max |out| {np.abs(skip).max():.3g})")
        if not e <= TOL:
            problems.append(f"{label}: {e} > {TOL}")
        if not apart > 100 * TOL:
            problems.append(f"{label}: only {apart} from the unskipped output")

    # 5. the committed graph and config untouched
    after = {p: ex.sha256_file(p) for p in before}
    if after != before:
        problems.append("transformer/model.onnx or config.json changed")
    status = git_clean([main_path, config_path])
    print(f"model.onnx / config.json: sha256 unchanged {after == before}; git status: {status}")
    if status != "clean" and not status.startswith("git "):
        problems.append(f"git status of model.onnx/config.json: {status}")
    if problems:
        raise SystemExit("FAILED: " + "; ".join(problems))
    print(f"ok: max abs {worst:.3g} vs diffusers (tolerance {TOL}), {skip_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
