#!/usr/bin/env python3
"""Writes tokenizer*/kept_token_ids.json for a model folder whose text encoders' token-embedding tables were pruned
(export_sd3.py --keep-token-ids / --keep-t5-token-ids; the nano model's export). sd3-onnx reads these files to warn
about prompt words the model never saw (`Warning::UnknownWords`).

export_sd3.py writes them itself (`write_kept_token_ids`). For a folder exported before it did, this script reads
the kept ids back from the graphs: prune_token_embedding stores them as the ScatterElements that builds the id map
(ConstantOfShape([vocab_size]) filled with the shared row, kept ids -> rows 0..n-1), so the files list exactly the
ids the export kept. It also records the new files in manifest.json's `files`, when the folder has one.

    python models/export/kept_token_ids.py models/sd3-nano
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

FILE = "kept_token_ids.json"
# Each pruned text encoder and the tokenizer folder whose ids it takes.
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def write_kept_token_ids(out: Path, text_encoder: str, ids: list[int], vocab_size: int) -> Path:
    """Writes `{"vocab_size": N, "kept": [sorted ids]}` into the tokenizer folder of `text_encoder`."""
    path = out / TOKENIZER_OF[text_encoder] / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = sorted(set(int(i) for i in ids))
    path.write_text(json.dumps({"vocab_size": int(vocab_size), "kept": kept}) + "\n")
    return path


def kept_ids_from_graph(graph: Path) -> tuple[list[int], int] | None:
    """The kept ids and vocabulary size of a pruned text encoder graph, or None if it was not pruned."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    found = []
    for n in m.graph.node:
        if n.op_type != "ScatterElements" or n.input[1] not in inits:
            continue
        fill = producer.get(n.input[0])
        if fill is None or fill.op_type != "ConstantOfShape" or fill.input[0] not in inits:
            continue
        vocab = numpy_helper.to_array(inits[fill.input[0]]).reshape(-1)
        ids = numpy_helper.to_array(inits[n.input[1]]).reshape(-1)
        found.append(([int(i) for i in ids], int(vocab[0])))
    if len(found) > 1:
        raise SystemExit(f"{graph}: {len(found)} id maps; expected one (export_sd3.py prune_token_embedding)")
    return found[0] if found else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model folder")
    a = ap.parse_args()
    written = []
    for encoder in TOKENIZER_OF:
        graph = a.model / encoder / "model.onnx"
        if not graph.is_file():
            continue
        found = kept_ids_from_graph(graph)
        if found is None:
            print(f"{encoder}: whole vocabulary (no file)")
            continue
        ids, vocab = found
        path = write_kept_token_ids(a.model, encoder, ids, vocab)
        written.append(path)
        print(f"{encoder}: {len(set(ids))} of {vocab} ids kept -> {path}")
    manifest = a.model / "manifest.json"
    if written and manifest.is_file():
        m = json.loads(manifest.read_text())
        for path in written:
            data = path.read_bytes()
            m.setdefault("files", {})[str(path.relative_to(a.model))] = dict(
                size=len(data), sha256=hashlib.sha256(data).hexdigest())
        m["files"] = dict(sorted(m["files"].items()))
        manifest.write_text(json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    main()
