"""Smoke test of the issue-22 fine-tune path on the CPU with tiny step counts (a few minutes on two cores):
train.py --init-from-onnx models/sd3-nano (rebuilt from its graphs) --split train4 -> token_ids.py -> export_nano.py
--vae-encoder, then checks the exported folder: the decoder graph holds the committed decoder's weights exactly (it
is frozen and saved as float32), the transformer moved, the new VAE encoder has the signature the crate checks and
runs, and the folder stays under 15 MB. Run: python models/nano/test_finetune_smoke.py [--keep DIR]."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "sd3-nano"
PY = sys.executable


def run(*args):
    r = subprocess.run([PY, *map(str, args)], cwd=HERE, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_finetune_path(work: Path | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        work = work or Path(tmp)
        run("train.py", "--out", work / "run", "--init-from-onnx", MODEL, "--split", "train4", "--n-train", 96,
            "--workers", 1, "--seed", 22, "--t5-len", 77, "--infer-shift", 3, "--enc-steps", 3, "--enc-batch", 4,
            "--enc-cycle", 4, "--enc-cycle-steps", 2, "--dit-steps", 3, "--dit-batch", 4, "--warmup", 1)
        log = json.loads((work / "run" / "train_log.json").read_text())
        assert log["vae_encoder"]["steps"] == 3 and log["dit"]["steps"] == 3, log
        assert all(r["max_abs_diff"] < 2e-4 for r in log["from_onnx"].values()), log["from_onnx"]
        run("token_ids.py", "--runs", "0:3000", "22:3000:train4", "--check-v2", "--clip", work / "clip.json",
            "--t5", work / "t5.json")
        clip = json.loads((work / "clip.json").read_text())
        assert 537 in clip and 4348 in clip and 3788 in clip  # "and", "above", "below" (not in the committed model)
        run("export_nano.py", "--pipeline", work / "run" / "pipeline", "--token-ids", work / "clip.json",
            "--t5-token-ids", work / "t5.json", "--out", work / "model", "--shift", 3, "--vae-encoder")
        out = work / "model"
        # the decoder is the committed one, weight for weight
        a, b = weights(out / "vae_decoder" / "model.onnx"), weights(MODEL / "vae_decoder" / "model.onnx")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        # the transformer was trained (3 steps move it)
        a, b = weights(out / "transformer" / "model.onnx"), weights(MODEL / "transformer" / "model.onnx")
        assert any(not np.array_equal(a[k], b[k]) for k in a if k in b and a[k].shape == b[k].shape)
        # the VAE encoder: sample [B, 3, H, W] -> latent_parameters [B, 32, H/8, W/8] (src/pipeline/builder.rs)
        import onnxruntime as ort

        enc = ort.InferenceSession(str(out / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in enc.get_inputs()] == ["sample"]
        assert [o.name for o in enc.get_outputs()] == ["latent_parameters"]
        p = enc.run(None, {"sample": np.zeros((1, 3, 128, 128), np.float32)})[0]
        assert p.shape == (1, 32, 16, 16) and np.isfinite(p).all()
        assert json.loads((out / "vae_encoder" / "config.json").read_text())["latent_channels"] == 16
        total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and not f.is_symlink())
        assert total < 15e6, total
        print(f"exported {total} bytes to {out}")


if __name__ == "__main__":
    keep = Path(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    test_finetune_path(keep)
    print("all passed")
