#!/usr/bin/env python3
"""Writes models/goldens/torch_randn/: what torch's CPU generator draws, for the bit-exact test of
sd3_onnx::latents::NoiseGenerator (tests/seeds.rs).

    .venv-tools/bin/python models/make_rng_goldens.py

Each file `seed<S>_<n1>[_<n2>...].npy` holds the concatenated draws of consecutive
`torch.randn(n_k, generator=g)` calls from one `g = torch.Generator("cpu").manual_seed(S)` (several calls show that
the generator's state carries over, as img2img's two draws need). Sizes cover a multiple of 16, a size below 16,
sizes with a remainder (torch redraws the last 16 values) and a [1, 16, 64, 64] latent (SD3 at 512x512).
torch 2.8.0 (models/requirements.txt), one thread; the CPU's capability is recorded in index.json.
Cases over HEAD_ONLY values keep only their first HEAD values in the .npy (for diagnosis) and the sha256 of all
draws (float32 little-endian) in index.json: the test compares every draw bit for bit through the hash, and the
repository stays small.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "goldens" / "torch_randn"
CASES = [
    (0, [1024]),
    (7, [40]),
    (3, [9]),
    (42, [4099]),
    (123, [1536, 1536]),  # img2img: VAE posterior sample, then noise, from one generator
    (2**32 + 5, [64]),  # at::mt19937 keeps the low 32 bits of the seed
    (80085, [16 * 64 * 64]),
]
HEAD_ONLY = 16384  # larger cases: hash + head
HEAD = 1024


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    index = {"generator": "models/make_rng_goldens.py", "torch": torch.__version__,
             "cpu_capability": torch.backends.cpu.get_cpu_capability(), "files": []}
    for seed, sizes in CASES:
        g = torch.Generator("cpu").manual_seed(seed)
        draws = np.concatenate([torch.randn(n, generator=g).numpy() for n in sizes]).astype(np.float32)
        name = f"seed{seed}_" + "_".join(str(n) for n in sizes) + ".npy"
        entry = {"file": name, "seed": seed, "sizes": sizes}
        if draws.size > HEAD_ONLY:
            name = f"seed{seed}_" + "_".join(str(n) for n in sizes) + f"_head{HEAD}.npy"
            entry = {"file": name, "seed": seed, "sizes": sizes, "head": HEAD,
                     "sha256_f32le": hashlib.sha256(draws.astype("<f4").tobytes()).hexdigest()}
            draws = draws[:HEAD]
        np.save(OUT / name, draws)
        index["files"].append(entry)
    (OUT / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(CASES)} files to {OUT}")


if __name__ == "__main__":
    main()
