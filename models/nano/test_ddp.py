"""train.py's data-parallel mode (class Dist) on this CPU: two processes started by torchrun (gloo) with --dit-batch
B each must train what one process trains with --dit-batch 2B, from the same seed: the same global batches, the
gradients averaged. Checked on a tiny configuration (the shipped VAE kept, --vae-from; a few minutes on two cores):

- the first step's loss (the global batch's mean, before any update) equal to 1e-6 relative: the processes draw
  the same global batch and each computes its own slice (a process drawing its own batch gives another loss);
- after the steps, the saved float16 weights: almost all equal, none far off; the same comparison against a run
  with another seed shows what a difference in training looks like (it must be far larger);
- torchrun with a new VAE to train is refused with a message.

Run: python models/nano/test_ddp.py [--keep DIR] (the models/requirements.txt environment). On this CPU
(2026-12-05, 60 s): first losses 2.3459661 / 2.3459659, weights after 8 steps max |diff| 6.1e-5 in 0.010% of the
elements. Sabotaged by hand, it fails: gradients left unsummed (the loss still averaged) 34.6% of the elements
differ (max 0.0081); each process drawing its own batch, or nothing summed, fails the first-loss check (2.457 and
1.192 against 2.346)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent / "sd3-nano"
PY = sys.executable
STEPS = 8
COMMON = ["--split", "train5", "--n-train", "256", "--workers", "1", "--t5-len", "77", "--dit-steps", str(STEPS),
          "--warmup", "2", "--no-compile", "--dit-lr", "1e-3"]


def run(args, procs=1, expect_fail=False):
    env = dict(os.environ, OMP_NUM_THREADS="1" if procs > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    launcher = ([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1
                else [PY])
    r = subprocess.run(launcher + ["train.py", *map(str, args)], cwd=HERE, capture_output=True, text=True, env=env)
    if expect_fail:
        assert r.returncode != 0, "expected a refusal"
        return r.stdout + r.stderr
    if r.returncode != 0:
        raise AssertionError(f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def weights(pipeline: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for comp in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        for f in sorted((pipeline / comp).glob("*.safetensors")):
            out.update({f"{comp}/{k}": v.astype(np.float32) for k, v in load_file(f).items()})
    return out


def compare(a: dict, b: dict) -> tuple[float, float]:
    """(largest |a - b| over all weights, share of the elements that differ at all)."""
    assert a.keys() == b.keys()
    worst, differ, total = 0.0, 0, 0
    for k in a:
        d = np.abs(a[k] - b[k])
        worst = max(worst, float(d.max()) if d.size else 0.0)
        differ += int((d > 0).sum())
        total += d.size
    return worst, differ / total


def first_loss(run_dir: Path) -> float:
    log = json.loads((run_dir / "train_log.json").read_text())
    assert log["dit"]["steps"] == STEPS, log["dit"]
    return log["dit"]["history"][0]["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        vae = work / "vae-src"
        if not (vae / "vae").is_dir():  # the shipped VAE, rebuilt from its graphs (prepare_retrain.sh does the same)
            subprocess.run([PY, "from_onnx.py", "--model", MODEL, "--components", "vae_decoder,vae_encoder", "--out",
                            vae], cwd=HERE, check=True, capture_output=True)
        one = work / "one"
        two = work / "two"
        other = work / "other-seed"
        run(["--out", one, "--vae-from", vae, "--seed", 3, "--dit-batch", 8, *COMMON])
        run(["--out", two, "--vae-from", vae, "--seed", 3, "--dit-batch", 4, *COMMON], procs=2)
        run(["--out", other, "--vae-from", vae, "--seed", 4, "--dit-batch", 8, *COMMON])
        l1, l2, lo = first_loss(one), first_loss(two), first_loss(other)
        log2 = json.loads((two / "train_log.json").read_text())
        assert log2["processes"] == 2 and log2["dit"]["batch"] == 8 and log2["dit"]["batch_per_process"] == 4
        print(f"first step's loss: one process {l1:.7f}, two {l2:.7f}, other seed {lo:.7f}")
        assert abs(l1 - l2) <= 1e-6 * abs(l1), (l1, l2)
        assert abs(l1 - lo) > 1e-3 * abs(l1), "the other seed should draw another batch"
        w1, w2, wo = weights(one / "pipeline"), weights(two / "pipeline"), weights(other / "pipeline")
        same_max, same_share = compare(w1, w2)
        other_max, other_share = compare(w1, wo)
        print(f"float16 weights after {STEPS} steps: one vs two processes max |diff| {same_max:.3g}, "
              f"{100 * same_share:.3f}% of elements differ; one vs another seed {other_max:.3g}, "
              f"{100 * other_share:.1f}%")
        # float sums in another order: a few elements one float16 step apart (an Adam update of a near-zero gradient
        # can flip), never a training's worth of difference
        assert same_share < 0.01 and same_max < 0.1 * other_max, (same_max, same_share)
        msg = run(["--out", work / "refused", "--seed", 3, "--dit-batch", 4, *COMMON], procs=2, expect_fail=True)
        assert "give the VAE" in msg, msg[-2000:]
        print("ok")


if __name__ == "__main__":
    main()
