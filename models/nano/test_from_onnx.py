"""Tests for from_onnx.py: the PyTorch modules rebuilt from models/sd3-nano's ONNX graphs reproduce those graphs under
ONNX Runtime (run: python models/nano/test_from_onnx.py, about a minute on two cores; needs models/requirements.txt's
torch, diffusers, transformers, onnx, onnxruntime)."""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import from_onnx as F  # noqa: E402

MODEL = F.HERE.parent / "sd3-nano"
# max |torch - ONNX Runtime| allowed (float32 arithmetic in different orders; measured 1.4e-6 .. 1.2e-5)
TOL = {"text_encoder": 1e-4, "text_encoder_2": 1e-4, "text_encoder_3": 1e-4, "transformer": 2e-4, "vae_decoder": 1e-4}

_MODS = None


def rebuilt():
    global _MODS
    if _MODS is None:
        _MODS = F.rebuild_all(MODEL)
    return _MODS


def test_reproduces_graphs():
    mods, reps = rebuilt()
    for comp, rep in reps.items():
        assert rep["max_abs_diff"] < TOL[comp], (comp, rep)
        assert rep["max_abs_output"] > 0.5, (comp, rep)  # the outputs are not trivially zero
        # every parameter came from the graph, except the VAE encoder (never exported)
        if comp == "vae_decoder":
            assert rep["unused_parameters"][0] == "encoder", rep
        else:
            assert "unused_parameters" not in rep, (comp, rep)
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert reps[comp]["pruned_tables"] == 1
    assert reps["transformer"]["buffers_from_graph"] == ["pos_embed.pos_embed"]


def test_comparison_is_sensitive():
    # one weight element changed by 1% of its tensor's scale moves the output past the tolerance
    mods, _ = rebuilt()
    for comp, name in (("transformer", "transformer_blocks.3.attn.to_v.weight"),
                       ("text_encoder_3", "encoder.block.1.layer.1.DenseReluDense.wo.weight"),
                       ("vae_decoder", "decoder.conv_out.weight")):
        m = copy.deepcopy(mods[comp])
        with torch.no_grad():
            p = m.get_parameter(name)
            p.view(-1)[7] += 0.5 * p.abs().max()
        rep = F.compare(comp, m, MODEL)
        assert rep["max_abs_diff"] > 10 * TOL[comp], (comp, rep)


def test_pruned_rows_are_the_shared_row():
    # ids the export did not keep all read the table's last (shared) row, as the graph's id map does
    mods, _ = rebuilt()
    for comp in ("text_encoder", "text_encoder_3"):
        m = mods[comp]
        table = m.get_input_embeddings().weight.detach()
        keep = F.kept_ids(MODEL, comp)
        drop = np.setdiff1d(np.arange(table.shape[0]), keep)
        assert torch.equal(table[drop[0]], table[drop[-1]]) and not torch.equal(table[keep[0]], table[drop[0]])


def test_vae_encoder_rebuilt_into_the_saved_vae():
    # the folder's vae_encoder/ (run 13's, since issue 22): rebuilt, it reproduces its graph, a changed weight is
    # seen, and save_pipeline puts it into vae/ beside the decoder (train.py --vae-from keeps that VAE)
    from diffusers import AutoencoderKL

    mods, reps = F.rebuild_all(MODEL, ("vae_decoder", "vae_encoder"))
    rep = reps["vae_encoder"]
    assert rep["max_abs_diff"] < 1e-4 and rep["max_abs_output"] > 0.5, rep
    assert rep["unused_parameters"][0] == "decoder", rep
    m = copy.deepcopy(mods["vae_encoder"])
    with torch.no_grad():
        p = m.get_parameter("encoder.conv_out.weight")
        p.view(-1)[7] += 0.5 * p.abs().max()
    assert F.compare("vae_encoder", m, MODEL)["max_abs_diff"] > 1e-3
    with tempfile.TemporaryDirectory() as d:
        F.save_pipeline(mods, MODEL, Path(d), F.HERE.parent / "fixtures" / "tiny-sd35")
        vae = AutoencoderKL.from_pretrained(Path(d) / "vae")
        for part, src in (("encoder", mods["vae_encoder"]), ("decoder", mods["vae_decoder"])):
            sa, sb = getattr(vae, part).state_dict(), getattr(src, part).state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sb), part
        assert not (Path(d) / "transformer").exists()


def test_saved_pipeline_loads():
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    mods, _ = rebuilt()
    with tempfile.TemporaryDirectory() as d:
        F.save_pipeline(mods, MODEL, Path(d), F.HERE.parent / "fixtures" / "tiny-sd35")
        t = SD3Transformer2DModel.from_pretrained(Path(d) / "transformer")
        vae = AutoencoderKL.from_pretrained(Path(d) / "vae")
        te = CLIPTextModelWithProjection.from_pretrained(Path(d) / "text_encoder")
        assert abs(vae.config.scaling_factor - json.loads((MODEL / "vae_decoder" / "config.json").read_text())[
            "scaling_factor"]) < 1e-12
        for a, b in ((t, mods["transformer"]), (te, mods["text_encoder"])):
            sa, sb = a.state_dict(), b.state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sb)
        assert json.loads((Path(d) / "onnx_kept_token_ids.json").read_text())["text_encoder"] == F.kept_ids(
            MODEL, "text_encoder")


if __name__ == "__main__":
    import time

    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            t = time.perf_counter()
            fn()
            print(f"ok  {name}  ({time.perf_counter() - t:.1f} s)")
    print("all passed")
