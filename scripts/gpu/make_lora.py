"""A random LoRA in the diffusers / PEFT layout for every module of a LoRA-ready transformer folder
(`lora_targets.json`, models/export/lora_inputs.py): `transformer.<module>.lora_A.weight` [r, in] and
`lora_B.weight` [out, r] from seeded normals, alpha = rank in the file's `lora_adapter_metadata` (scale 1).
B is scaled so that B @ A changes each weight by about 1% of a unit-variance weight's size (a visible, not
destructive, LoRA). For benchmarks on the GPU machine (scripts/gpu/lora.sh).

    python3 scripts/gpu/make_lora.py MODEL/transformer/lora_targets.json --rank 64 --seed 1 --out a.safetensors
"""
import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", type=Path)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    modules = json.loads(a.targets.read_text())["modules"]
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for name, m in sorted(modules.items()):
        rows, cols = m["shape"]
        out_f, in_f = (rows, cols) if m["layout"] == "out_in" else (cols, rows)
        A = rng.standard_normal((a.rank, in_f), dtype=np.float32) / np.sqrt(in_f)
        B = rng.standard_normal((out_f, a.rank), dtype=np.float32) * (0.01 / np.sqrt(a.rank))
        tensors[f"transformer.{name}.lora_A.weight"] = A.astype(np.float16)
        tensors[f"transformer.{name}.lora_B.weight"] = B.astype(np.float16)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": a.rank, "transformer.lora_alpha": a.rank})}
    save_file(tensors, str(a.out), metadata=meta)
    n = sum(t.size for t in tensors.values())
    print(f"{a.out}: {len(modules)} modules, rank {a.rank}, {n / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
