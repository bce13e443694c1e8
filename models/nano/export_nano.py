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
- `--only-vae-encoder`: the encoder alone, added to an existing model folder (`--out`) whose every other file stays
  byte-identical. The pipeline's decoder must be the folder's: both VAE graphs are exported to a scratch folder
  with the same options, and the scratch decoder must equal the committed `vae_decoder/model.onnx` byte for byte
  (else nothing is written). Issue 22 shipped run 13's encoder this way (its fine-tuned transformer was worse).
- `--shift X` writes the sampling shift into the scheduler config (the one `sweep.py` chose on tuning prompts);
- tensor names shortened and node names dropped (the exporter's long names are ~10% of a small graph).

    python models/nano/token_ids.py --runs 0:200000 1:200000 2:200000 --clip runs/clip_token_ids.json \
        --t5 runs/t5_token_ids.json
    python models/nano/export_nano.py --pipeline RUN/pipeline --token-ids runs/clip_token_ids.json \
        --t5-token-ids runs/t5_token_ids.json --out models/sd3-nano [--shift 3] [--vae-encoder]
    python models/nano/export_nano.py --pipeline RUN/pipeline --only-vae-encoder --out models/sd3-nano
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
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
    ap.add_argument("--token-ids", type=Path, help="CLIP token ids (token_ids.py --clip)")
    ap.add_argument("--t5-token-ids", type=Path, help="T5 token ids (token_ids.py --t5)")
    ap.add_argument("--tokenizers-from", type=Path, default=HERE.parent / "fixtures" / "tiny-sd35",
                    help="tokenizer folders to use when the pipeline folder has none (train.py's tar leaves them out)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shift", type=float, default=None,
                    help="the sampling shift to write into scheduler/scheduler_config.json (default: the pipeline's, "
                         "train.py --infer-shift); sweep.py picks it on tuning prompts")
    ap.add_argument("--vae-encoder", action="store_true",
                    help="also export vae_encoder/ (a pipeline whose VAE encoder was trained: train.py "
                         "--init-from-onnx, or a run that trained the whole VAE)")
    ap.add_argument("--only-vae-encoder", action="store_true",
                    help="export only vae_encoder/ into the existing model folder --out (nothing else in it changes); "
                         "the pipeline's VAE decoder must export to exactly the folder's vae_decoder/model.onnx")
    a = ap.parse_args()
    if a.only_vae_encoder:
        return only_vae_encoder(a.pipeline, a.out)
    if a.token_ids is None or a.t5_token_ids is None:
        ap.error("--token-ids and --t5-token-ids are required (except with --only-vae-encoder)")
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
    manifest["nano"] = dict(note="models/nano/export_nano.py: tokenizer_2 vocab/merges are symlinks to tokenizer/, "
                                 "tokenizer_3/spiece.model removed")
    write_manifest(out, manifest)


def write_manifest(out: Path, manifest: dict):
    """manifest.json with the size and sha256 of every file of the folder (symlinks as such)."""
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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(v.get("size", 0) for v in files.values())
    print(f"{out}: {len(files)} files, {total} bytes")


def only_vae_encoder(pipeline: Path, out: Path):
    """Adds `vae_encoder/` (model.onnx, config.json) exported from `pipeline`'s VAE to the model folder `out`, whose
    other files are not touched (the manifest gains the encoder's entry and files). Refuses unless the pipeline's
    decoder, exported with the same options (export_sd3 --dtype fp32 --weights-int8, short names), is byte-identical
    to `out/vae_decoder/model.onnx`: the encoder was trained against that decoder and is useless with another."""
    out = out.resolve()
    committed = out / "vae_decoder" / "model.onnx"
    if not committed.is_file() or not (out / "manifest.json").is_file():
        raise SystemExit(f"error: {out} is not an exported model folder (no vae_decoder/model.onnx or manifest.json)")
    with tempfile.TemporaryDirectory(prefix="nano-vae-") as tmp:
        scratch = Path(tmp) / "model"
        export_sd3.main(["--model", str(pipeline), "--tokenizers-from", str(out), "--dtype", "fp32", "--weights-int8",
                         "--components", "vae_encoder,vae_decoder", "--out", str(scratch)])
        for graph in ("vae_encoder", "vae_decoder"):
            print(f"{graph}: short names saved {short_names(scratch / graph / 'model.onnx')} bytes")
        fresh = scratch / "vae_decoder" / "model.onnx"
        if fresh.read_bytes() != committed.read_bytes():
            raise SystemExit(f"error: the decoder of {pipeline} does not export to {committed} byte for byte "
                             f"(sha256 {export_sd3.sha256_file(fresh)} vs {export_sd3.sha256_file(committed)}): "
                             f"this encoder was not trained against the committed decoder; nothing written")
        print(f"vae_decoder: the pipeline's decoder exports byte-identical to {committed} "
              f"(sha256 {export_sd3.sha256_file(committed)})")
        info = json.loads((scratch / "manifest.json").read_text())["components"]["vae_encoder"]
        dest = out / "vae_encoder"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        for name in ("model.onnx", "config.json"):
            shutil.copyfile(scratch / "vae_encoder" / name, dest / name)
    manifest = json.loads((out / "manifest.json").read_text())
    info["source"] = str(pipeline)
    manifest["components"]["vae_encoder"] = info
    manifest.setdefault("nano", {})["vae_encoder"] = (
        "models/nano/export_nano.py --only-vae-encoder: exported from the pipeline named in components.vae_encoder."
        "source, added to this folder; every other graph is unchanged (its decoder exported byte-identical to "
        "vae_decoder/model.onnx)")
    write_manifest(out, manifest)


if __name__ == "__main__":
    main()
