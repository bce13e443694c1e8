"""Writes the random InstantX-config ControlNet of the ControlNet benchmark (bench_torch_controlnet.py
`random_controlnet`, the same weights PyTorch times) as a ControlNet folder through models/export/
export_controlnet.py's `write_controlnet` (optimize=True: export_sd3.py's fusions, then float16).

    python3 scripts/gpu/make_controlnet_sd3m.py --out /tmp/cn-sd3m [--seed 0]
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
sys.path.insert(0, str(ROOT / "models" / "export"))
from bench_torch_controlnet import random_controlnet  # noqa: E402
from export_controlnet import write_controlnet  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True, type=Path)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.set_grad_enabled(False)
write_controlnet(random_controlnet(a.seed), a.out, torch.float16, optimize=True)
