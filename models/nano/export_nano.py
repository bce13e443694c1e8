#!/usr/bin/env python3
"""Exports a trained nano pipeline (train.py's `pipeline/` folder) into the repository's default model folder with
the project's export tool, then makes the folder small:

- float32 graphs whose MatMul/Gemm/Conv weights are stored as int8 with a float16-valued scale per output
  channel (`--weights-int8`: DequantizeLinear in the graph, float32 arithmetic) and every other weight as float16;
- CLIP and T5 token-embedding tables cut to the token ids of the training captions (`--keep-token-ids`,
  `--keep-t5-token-ids`; token_ids.py lists them; every other id maps to one shared row: the model never saw
  those tokens);
- `tokenizer_2/vocab.json` and `merges.txt` as relative symlinks to `tokenizer/` (same bytes; CLIP-G's pad token
  "!" lives in tokenizer_2's own configs); `tokenizer_3/spiece.model` dropped (our T5 loader reads tokenizer.json);
- the VAE encoder only with `--vae-encoder` (issue 22: the encoder train.py --init-from-onnx trains against the
  committed decoder; `vae_encoder/model.onnx` takes `sample` [B, 3, H, W] and gives `latent_parameters`
  [B, 32, H/8, W/8], mean ++ logvar, what the crate's img2img and inpainting need; the models before had none);
- `--shift X` writes the sampling shift into the scheduler config (the one `sweep.py` chose on tuning prompts);
- tensor names shortened and node names dropped (the exporter's long names are ~10% of a small graph).

    python models/nano/token_ids.py --runs 0:200000 1:200000 2:200000 --clip runs/clip_token_ids.json \
        --t5 runs/t5_token_ids.json
    python models/nano/export_nano.py --pipeline RUN/pipeline --token-ids runs/clip_token_ids.json \
        --t5-token-ids runs/t5_token_ids.json --out models/sd3-nano [--shift 3] [--vae-encoder]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "export"))

import export_sd3  # noqa: E402

COMPONENTS = "text_encoder,text_encoder_2,text_encoder_3,transformer,vae_decoder"


def short_names(path: Path) -> int:
    """Renames every tensor that is not a graph input or output to a short id and drops node names: the
    exporter's names ("/transformer_blocks.0/attn/Reshape_3_output_0") are about a tenth of a small graph's bytes.
    The computation is unchanged. Returns the bytes saved."""
    import onnx

    before = path.stat().st_size
    m = onnx.load(str(path))
    keep = {v.name for v in list(m.graph.input) + list(m.graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            n, s = len(names), ""
            while True:
                s = "0123456789abcdefghijklmnopqrstuvwxyz"[n % 36] + s
                n //= 36
                if n == 0:
                    break
            names[name] = "t" + s
        return names[name]

    for t in m.graph.initializer:
        t.name = short(t.name)
    for node in m.graph.node:
        node.name = ""
        for i, x in enumerate(node.input):
            node.input[i] = short(x)
        for i, x in enumerate(node.output):
            node.output[i] = short(x)
    del m.graph.value_info[:]
    export_sd3.topological_sort(m)
    onnx.save(m, str(path))
    return before - path.stat().st_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, required=True, help="train.py's pipeline/ folder (diffusers layout)")
    ap.add_argument("--token-ids", type=Path, required=True, help="CLIP token ids (token_ids.py --clip)")
    ap.add_argument("--t5-token-ids", type=Path, required=True, help="T5 token ids (token_ids.py --t5)")
    ap.add_argument("--tokenizers-from", type=Path, default=HERE.parent / "fixtures" / "tiny-sd35",
                    help="tokenizer folders to use when the pipeline folder has none (train.py's tar leaves them out)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shift", type=float, default=None,
                    help="the sampling shift to write into scheduler/scheduler_config.json (default: the pipeline's, "
                         "train.py --infer-shift); sweep.py picks it on tuning prompts")
    ap.add_argument("--vae-encoder", action="store_true",
                    help="also export vae_encoder/ (a pipeline whose VAE encoder was trained: train.py "
                         "--init-from-onnx, or a run that trained the whole VAE)")
    a = ap.parse_args()
    src = a.pipeline
    components = COMPONENTS + (",vae_encoder" if a.vae_encoder else "")
    if not (src / "tokenizer").is_dir():
        for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            shutil.copytree(a.tokenizers_from / t, src / t, symlinks=True)
    if a.out.exists():
        shutil.rmtree(a.out)
    export_sd3.main(["--model", str(src), "--dtype", "fp32", "--weights-int8", "--keep-token-ids", str(a.token_ids),
                     "--keep-t5-token-ids", str(a.t5_token_ids), "--components", components, "--out", str(a.out)])
    out = a.out
    for name in ("vocab.json", "merges.txt"):
        one, two = out / "tokenizer" / name, out / "tokenizer_2" / name
        if one.is_file() and two.is_file() and one.read_bytes() == two.read_bytes():
            two.unlink()
            os.symlink(f"../tokenizer/{name}", two)
    (out / "tokenizer_3" / "spiece.model").unlink(missing_ok=True)
    if a.shift is not None:
        sched = out / "scheduler" / "scheduler_config.json"
        cfg = json.loads(sched.read_text())
        cfg["shift"] = a.shift
        sched.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")  # diffusers' own layout
    for graph in sorted(out.glob("*/model.onnx")):
        print(f"{graph}: short names saved {short_names(graph)} bytes")
    manifest = json.loads((out / "manifest.json").read_text())
    files = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if rel == "manifest.json" or p.is_dir():
            continue
        if p.is_symlink():
            files[rel] = dict(symlink=os.readlink(p))
        else:
            files[rel] = dict(size=p.stat().st_size, sha256=export_sd3.sha256_file(p))
    manifest["files"] = files
    manifest["nano"] = dict(note="models/nano/export_nano.py: tokenizer_2 vocab/merges are symlinks to tokenizer/, "
                                 "tokenizer_3/spiece.model removed")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(v.get("size", 0) for v in files.values())
    print(f"{out}: {len(files)} files, {total} bytes")


if __name__ == "__main__":
    main()
