#!/usr/bin/env python3
"""ControlNets with fewer blocks than the transformer (diffusers' interval > 1): fixtures and goldens for
tests/controlnet.rs `deeper_transformer_uses_every_residual` (issue 21).

    .venv-diffusers-cn/bin/python models/make_controlnet_deep_fixtures.py   # pins: models/requirements-controlnet.txt

tiny-sd3's transformer has 2 blocks, and its last block (context_pre_only) takes no residual, so with the 2-block
ControlNets of models/make_controlnet_fixtures.py only residual 0 is ever added. Here the base transformer is a
4-block one (tiny-sd3's config otherwise, random weights with make_fixtures.py's informative init gains) and the
ControlNets have 2 blocks: diffusers' `interval_control = 4 / 2 = 2` (transformer_sd3.py lines 323-326), so blocks 0
and 1 add residual 0, block 2 adds residual 1 and block 3 (the last, context_pre_only) none. Every residual index is
used, and a crate that took the interval as 1 (block i adds residual i) or dropped residual 1 would draw another
image: the sabotaged goldens below show by how much.

The text encoders, VAE, prompt conditioning and starting latents are tiny-sd3's (models/goldens/tiny-sd3/
cfg_negative), as in make_controlnet_fixtures.py, whose helpers this script uses.

Writes
  models/fixtures/controlnet-deep/transformer/{config.json,model.onnx,model_controlnet.onnx}
      the 4-block transformer (overlay it on a copy of tiny-sd3) and its residual graph.
  models/fixtures/controlnet-deep/{instantx,sd35}/{config.json,model.onnx}
      2-block ControlNets of both kinds on that transformer.
  models/goldens/controlnet/deep/*.png, summary.json
      diffusers 0.42.1's StableDiffusion3ControlNetPipeline (VAE posterior mean), and the sabotaged variants.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers import StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import make_controlnet_fixtures as base
from make_controlnet_fixtures import (BASE, CASE, ResidualTransformer, block_index, control_images, export,
                                      export_controlnet, forward_with_residuals, levels, make_controlnet,
                                      ort_session, rebuild_vae)

ROOT = Path(__file__).resolve().parent
FIX = ROOT / "fixtures" / "controlnet-deep"
OUT = ROOT / "goldens" / "controlnet" / "deep"
LAYERS = 4
CN_LAYERS = 2

assert diffusers.__version__ == "0.42.1", diffusers.__version__
torch.set_grad_enabled(False)


class Plain(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


def make_transformer(tcfg: dict) -> SD3Transformer2DModel:
    cfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    cfg["num_layers"] = LAYERS
    torch.manual_seed(2400)
    m = SD3Transformer2DModel(**cfg).eval()
    # make_fixtures.py informative_init, tiny-sd3's gains: the value projections * 6, proj_out * 4.
    for block in m.transformer_blocks:
        block.attn.to_v.weight.mul_(6.0)
        block.attn.add_v_proj.weight.mul_(6.0)
    m.proj_out.weight.mul_(4.0)
    return m


def main() -> None:
    if FIX.exists():
        shutil.rmtree(FIX)
    OUT.mkdir(parents=True, exist_ok=True)
    tcfg0 = json.loads((BASE / "transformer" / "config.json").read_text())
    transformer = make_transformer(tcfg0)
    vae = rebuild_vae()
    tcfg = dict(tcfg0, num_layers=LAYERS)
    tdir = FIX / "transformer"
    tdir.mkdir(parents=True)
    cfg_out = {k: v for k, v in tcfg.items() if k not in ("_name_or_path",)}
    cfg_out["_diffusers_version"] = diffusers.__version__
    (tdir / "config.json").write_text(json.dumps(cfg_out, indent=2, sort_keys=True) + "\n")

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 12, generator=g)
    c = torch.randn(2, 10, tcfg["joint_attention_dim"], generator=g)
    p = torch.randn(2, tcfg["pooled_projection_dim"], generator=g)
    t = torch.tensor([700.0, 700.0])
    # --- the plain graph (as tiny-sd3's: the same inputs and output names)
    dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
           "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
           "pooled_projections": {0: "batch_size"}, "timestep": {0: "step"},
           "out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}}
    export(Plain(transformer), (x, c, p, t), ["hidden_states", "encoder_hidden_states", "pooled_projections",
                                              "timestep"], ["out_hidden_states"], dyn, tdir / "model.onnx")
    ref = transformer(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample.numpy()
    got = ort_session(tdir / "model.onnx").run(None, {"hidden_states": x.numpy(), "encoder_hidden_states": c.numpy(),
                                                      "pooled_projections": p.numpy(), "timestep": t.numpy()})[0]
    err = float(np.abs(ref - got).max())
    print(f"{LAYERS}-block transformer: ONNX vs diffusers forward max |diff| {err:.2e}")
    assert err < 1e-4, err

    # --- the residual graph, checked against diffusers' forward with 1, 2 and 3 residuals
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    res = torch.randn(1, 2, 8 * 12 // 4, inner, generator=g)
    dyn_r = dict(dyn, controlnet_residuals={0: "residuals", 1: "batch_size", 2: "image_tokens"})
    path = tdir / "model_controlnet.onnx"
    export(ResidualTransformer(transformer), (x, c, p, t, res, torch.tensor(block_index(LAYERS, 1))),
           ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "controlnet_residuals",
            "controlnet_block_index"], ["out_hidden_states"], dyn_r, path)
    sess = ort_session(path)
    for n in (1, 2, 3):
        r = torch.randn(n, 2, 8 * 12 // 4, inner, generator=g)
        ref = transformer(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t,
                          block_controlnet_hidden_states=list(r)).sample.numpy()
        got = sess.run(None, {"hidden_states": x.numpy(), "encoder_hidden_states": c.numpy(),
                              "pooled_projections": p.numpy(), "timestep": t.numpy(), "controlnet_residuals": r.numpy(),
                              "controlnet_block_index": np.array(block_index(LAYERS, n), dtype=np.int64)})[0]
        err = float(np.abs(ref - got).max())
        print(f"residual transformer, {n} residual(s) (index {block_index(LAYERS, n)}): ONNX vs diffusers "
              f"max |diff| {err:.2e}")
        assert err < 1e-4, err

    # --- 2-block ControlNets of both kinds
    cn_cfg = dict(tcfg, num_layers=CN_LAYERS)
    nets = {"instantx": make_controlnet("instantx", 2501, cn_cfg, transformer),
            "instantx-b": make_controlnet("instantx", 2611, cn_cfg, transformer),
            "sd35": make_controlnet("sd35", 2701, cn_cfg, transformer)}
    for name, cn in nets.items():
        export_controlnet(cn, "sd35" if name == "sd35" else "instantx", FIX / name, cn_cfg)
    index = block_index(LAYERS, CN_LAYERS)
    assert index == [0, 0, 1, 1], index  # block 3 is context_pre_only: its entry is never used

    # --- diffusers' images
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()  # the posterior mean
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(BASE / "scheduler")
    request = json.loads((CASE / "request.json").read_text())
    embeds = {k: torch.from_numpy(np.load(CASE / f"{k}.npy")) for k in
              ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]}
    latents = torch.from_numpy(np.load(CASE / "latents.npy"))
    ctrl_a, ctrl_b = control_images()

    def run(controlnet, image, scale, start, end, transformer_forward=None):
        pipe = StableDiffusion3ControlNetPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, controlnet=controlnet)
        saved = transformer.forward
        if transformer_forward is not None:
            transformer.forward = transformer_forward
        try:
            return pipe(**embeds, control_image=image, controlnet_conditioning_scale=scale,
                        control_guidance_start=start, control_guidance_end=end,
                        num_inference_steps=request["steps"], guidance_scale=request["guidance"],
                        height=request["height"], width=request["width"], latents=latents.clone()).images[0]
        finally:
            transformer.forward = saved

    cases = {}

    def case(name, desc, img, units):
        img.save(OUT / f"{name}.png")
        cases[name] = {"description": desc, "controlnets": units}

    ix, ixb, sd = nets["instantx"], nets["instantx-b"], nets["sd35"]
    case("instantx", "2-block InstantX-style ControlNet on the 4-block transformer, scale 0.7, window [0, 1]",
         run(ix, ctrl_a, 0.7, 0.0, 1.0),
         [{"name": "instantx", "image": "control.png", "scale": 0.7, "start": 0.0, "end": 1.0}])
    case("sd35", "2-block SD3.5-style ControlNet on the 4-block transformer, scale 0.8, window [0, 0.75]",
         run(sd, ctrl_a, 0.8, 0.0, 0.75),
         [{"name": "sd35", "image": "control.png", "scale": 0.8, "start": 0.0, "end": 0.75}])
    case("multi", "instantx (0.7, [0, 1]) + instantx-b (0.5, [0.25, 1])",
         run(SD3MultiControlNetModel([ix, ixb]), [ctrl_a, ctrl_b], [0.7, 0.5], [0.0, 0.25], [1.0, 1.0]),
         [{"name": "instantx", "image": "control.png", "scale": 0.7, "start": 0.0, "end": 1.0},
          {"name": "instantx-b", "image": "control_b.png", "scale": 0.5, "start": 0.25, "end": 1.0}])

    def patched(idx):
        def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                    block_controlnet_hidden_states=None, **kw):
            r = torch.stack(list(block_controlnet_hidden_states))
            r = torch.cat([r, torch.zeros_like(r)])  # index len(r) and up: zeros (no residual)
            out = forward_with_residuals(transformer, hidden_states, encoder_hidden_states, pooled_projections,
                                         timestep, r, idx)
            return (out,) if kw.get("return_dict") is False else Transformer2DModelOutput(sample=out)
        return forward

    # Sabotaged variants: each must be > 3 levels from the image it mimics a bug of.
    z = CN_LAYERS  # an index that reads zeros
    sab = {
        # interval taken as 1: block i adds residual i, block 2 gets none
        "instantx_interval_one": ("instantx", run(ix, ctrl_a, 0.7, 0.0, 1.0, patched([0, 1, z, z]))),
        # residual 1 dropped: only blocks 0 and 1 get residual 0
        "instantx_residual_1_dropped": ("instantx", run(ix, ctrl_a, 0.7, 0.0, 1.0, patched([0, 0, z, z]))),
        # residual 0 only on block 0 (the interval's second block forgotten)
        "instantx_block_1_without_residual": ("instantx", run(ix, ctrl_a, 0.7, 0.0, 1.0, patched([0, z, 1, z]))),
        "sd35_interval_one": ("sd35", run(sd, ctrl_a, 0.8, 0.0, 0.75, patched([0, 1, z, z]))),
        "multi_interval_one": ("multi", run(SD3MultiControlNetModel([ix, ixb]), [ctrl_a, ctrl_b], [0.7, 0.5],
                                            [0.0, 0.25], [1.0, 1.0], patched([0, 1, z, z]))),
    }
    plain = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                     tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                     tokenizer_3=None)
    no_cn = plain(**embeds, num_inference_steps=request["steps"], guidance_scale=request["guidance"],
                  height=request["height"], width=request["width"], latents=latents.clone()).images[0]
    sab["no_controlnet"] = ("instantx", no_cn)

    summary = {"request": request, "posterior": "mean (DiagonalGaussianDistribution.sample patched to mode())",
               "transformer_layers": LAYERS, "controlnet_layers": CN_LAYERS, "block_index": index,
               "cases": cases, "sabotaged": {}}
    for name, (target, img) in sab.items():
        img.save(OUT / f"sabotaged_{name}.png")
        d = levels(img, Image.open(OUT / f"{target}.png"))
        summary["sabotaged"][name] = {"mimics_a_bug_in": target, "max_levels_from_it": d}
        print(f"sabotaged {name}: {d} levels from {target}")
        assert d > 3, (name, d)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for f in ("control.png", "control_b.png"):
        shutil.copy(base.OUT / f, OUT / f)


if __name__ == "__main__":
    main()
