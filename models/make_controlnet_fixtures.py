#!/usr/bin/env python3
"""ControlNet fixtures and goldens for tests/controlnet.rs (issue 21): tiny random SD3 ControlNets of both kinds that
diffusers 0.42.1 supports, the tiny-sd3 transformer exported with a residual input, and diffusers'
`StableDiffusion3ControlNetPipeline` images on the same weights.

    .venv-diffusers-cn/bin/python models/make_controlnet_fixtures.py   # pins: models/requirements-controlnet.txt

No PyTorch checkpoint is needed: the tiny-sd3 transformer and VAE are rebuilt from the committed ONNX graphs'
initializers (named ones by name, MatMul weights by the node that consumes them, transposed) and the script checks
that the rebuilt modules reproduce the committed graphs under ONNX Runtime before it uses them. The prompt
conditioning is diffusers' own, from models/goldens/tiny-sd3/cfg_negative/*prompt_embeds.npy (tests/golden_images.rs
checks that the crate's conditioning equals it), and so are the starting latents (latents.npy there).

Writes
  models/fixtures/controlnet/transformer/model_controlnet.onnx
      tiny-sd3's transformer taking `controlnet_residuals` [N, B, S, D] (the ControlNets' block outputs, already
      scaled and summed) and `controlnet_block_index` int64 [num_layers] (which residual each block adds; the crate
      computes it as diffusers' SD3Transformer2DModel.forward does, transformer_sd3.py lines 323-326).
  models/fixtures/controlnet/{instantx,instantx-b,sd35}/{config.json,model.onnx}
      SD3ControlNetModel graphs: inputs hidden_states, controlnet_cond, timestep, pooled_projections
      (+ encoder_hidden_states when joint_attention_dim is set), output controlnet_block_samples [N, B, S, D]
      (unscaled: conditioning_scale=1). instantx*: InstantX SD3-medium style (own pos embed, text input,
      force_zeros_for_pooled_projection). sd35: Stability SD3.5 style (use_pos_embed=False: the transformer's pos
      embed is copied in as the pipeline does at __init__, joint_attention_dim=None, real pooled embeddings).
  models/goldens/controlnet/tiny-sd3/*.png, control.png, control_b.png, interval.json, summary.json
      diffusers' images (VAE posterior sample patched to the mean, see below) and the sabotaged variants.

The control image goes through the VAE's posterior MEAN (`DiagonalGaussianDistribution.sample` patched to
`mode()`), as the crate does; diffusers itself samples without a generator (pipeline_stable_diffusion_3_controlnet.py
lines 1077 and 1095), which cannot be reproduced.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw

import diffusers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3Transformer2DModel
from diffusers import StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet_sd3 import SD3MultiControlNetModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

ROOT = Path(__file__).resolve().parent
BASE = ROOT / "fixtures" / "tiny-sd3"
CASE = ROOT / "goldens" / "tiny-sd3" / "cfg_negative"
FIX = ROOT / "fixtures" / "controlnet"
OUT = ROOT / "goldens" / "controlnet" / "tiny-sd3"
OPSET = 17

assert diffusers.__version__ == "0.42.1", diffusers.__version__
torch.set_grad_enabled(False)


# ------------------------------------------------------------------------------------------------------------------
# Rebuilding torch modules from the committed ONNX graphs
# ------------------------------------------------------------------------------------------------------------------


def onnx_state(path: Path) -> dict[str, torch.Tensor]:
    m = onnx.load(str(path))
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    state = {}
    for name, t in inits.items():
        if not name.startswith("onnx::"):
            state[name] = t
    for node in m.graph.node:
        for inp in node.input:
            if inp.startswith("onnx::") and inp in inits:
                # e.g. /transformer_blocks.0/attn/to_q/MatMul -> transformer_blocks.0.attn.to_q.weight
                if node.op_type != "MatMul":
                    continue  # constants (e.g. the sincos position table, recomputed by the module)
                module = ".".join(p for p in node.name.split("/")[1:-1])
                state[module + ".weight"] = inits[inp].T.contiguous()
    return state


def load_into(module: torch.nn.Module, state: dict, prefix: str = "") -> None:
    own = module.state_dict()
    # Kept at the module's own values: pos_embed.pos_embed (the fixed sincos table the module computes itself) and
    # GroupNorm affine parameters (the exporter folds them into deduplicated, unnamed Mul/Add constants: the
    # fixtures' are the initial ones and zeros). The checks after loading compare the rebuilt module with the graph.
    kept = ("pos_embed.pos_embed", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm.weight",
            "norm.bias", "group_norm.weight", "group_norm.bias", "conv_norm_out.weight", "conv_norm_out.bias")
    missing = [k for k in own if prefix + k not in state and not k.endswith(kept)]
    if missing:
        raise SystemExit(f"not in the ONNX graph: {missing[:8]}")
    module.load_state_dict({k: state.get(prefix + k, v) for k, v in own.items()}, strict=True)


def ort_session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rebuild_transformer() -> SD3Transformer2DModel:
    cfg = json.loads((BASE / "transformer" / "config.json").read_text())
    m = SD3Transformer2DModel.from_config(cfg).eval()
    load_into(m, onnx_state(BASE / "transformer" / "model.onnx"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    c = torch.randn(2, 10, cfg["joint_attention_dim"], generator=g)
    p = torch.randn(2, cfg["pooled_projection_dim"], generator=g)
    t = torch.tensor([900.0, 900.0])
    ref = ort_session(BASE / "transformer" / "model.onnx").run(
        None, {"hidden_states": x.numpy(), "encoder_hidden_states": c.numpy(), "pooled_projections": p.numpy(),
               "timestep": t.numpy()})[0]
    got = m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample.numpy()
    err = float(np.abs(ref - got).max())
    print(f"rebuilt transformer vs committed ONNX: max |diff| {err:.2e}")
    assert err < 1e-4, err
    return m


def rebuild_vae() -> AutoencoderKL:
    cfg = json.loads((BASE / "vae_decoder" / "config.json").read_text())
    vae = AutoencoderKL.from_config(cfg).eval()
    state = {}
    state.update(onnx_state(BASE / "vae_encoder" / "model.onnx"))
    state.update(onnx_state(BASE / "vae_decoder" / "model.onnx"))
    load_into(vae, state)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ref = ort_session(BASE / "vae_encoder" / "model.onnx").run(None, {"sample": img.numpy()})[0]
    got = vae.encode(img).latent_dist.parameters.numpy()
    lat = torch.randn(1, 16, 8, 8, generator=g)
    ref2 = ort_session(BASE / "vae_decoder" / "model.onnx").run(None, {"latent_sample": lat.numpy()})[0]
    got2 = vae.decode(lat).sample.numpy()
    err = max(float(np.abs(ref - got).max()), float(np.abs(ref2 - got2).max()))
    print(f"rebuilt VAE vs committed ONNX: max |diff| {err:.2e}")
    assert err < 1e-4, err
    return vae


# ------------------------------------------------------------------------------------------------------------------
# The transformer with residuals, and the ControlNets
# ------------------------------------------------------------------------------------------------------------------


def block_index(num_layers: int, num_residuals: int) -> list[int]:
    """diffusers transformer_sd3.py lines 325-326: `interval_control = len(blocks) / len(residuals)`,
    `residuals[int(index_block / interval_control)]` (Python floats)."""
    interval = num_layers / num_residuals
    return [int(i / interval) for i in range(num_layers)]


def forward_with_residuals(m: SD3Transformer2DModel, hidden_states, encoder_hidden_states, pooled_projections,
                           timestep, residuals, index, add_to_last: bool = False):
    """SD3Transformer2DModel.forward (transformer_sd3.py lines 287-347) with the residual of block i taken as
    residuals[index[i]] (a tensor index, so the ONNX export has it as an input). `add_to_last` also adds one after
    the context_pre_only last block (only for the sabotaged golden)."""
    height, width = hidden_states.shape[-2:]
    h = m.pos_embed(hidden_states).contiguous()
    temb = m.time_text_embed(timestep, pooled_projections)
    enc = m.context_embedder(encoder_hidden_states)
    for i, block in enumerate(m.transformer_blocks):
        enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb)
        if block.context_pre_only is False or add_to_last:
            h = h + residuals[index[i]]
    h = m.norm_out(h, temb)
    h = m.proj_out(h)
    p = m.config.patch_size
    h = h.reshape(h.shape[0], height // p, width // p, p, p, m.out_channels)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(h.shape[0], m.out_channels, height, width)


class ResidualTransformer(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, controlnet_residuals,
                controlnet_block_index):
        return forward_with_residuals(self.m, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                      controlnet_residuals, controlnet_block_index)


class ControlNetWrapper(torch.nn.Module):
    def __init__(self, cn: SD3ControlNetModel, text: bool):
        super().__init__()
        self.cn = cn
        self.text = text

    def forward(self, hidden_states, controlnet_cond, timestep, pooled_projections, encoder_hidden_states=None):
        out = self.cn(hidden_states=hidden_states, controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                      encoder_hidden_states=encoder_hidden_states if self.text else None,
                      pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
        return torch.stack(list(out), dim=0)


def make_controlnet(kind: str, seed: int, tcfg: dict, transformer: SD3Transformer2DModel) -> SD3ControlNetModel:
    common = dict(sample_size=tcfg["sample_size"], patch_size=tcfg["patch_size"], in_channels=tcfg["in_channels"],
                  num_layers=tcfg["num_layers"], attention_head_dim=tcfg["attention_head_dim"],
                  num_attention_heads=tcfg["num_attention_heads"], caption_projection_dim=tcfg["caption_projection_dim"],
                  pooled_projection_dim=tcfg["pooled_projection_dim"], out_channels=tcfg["out_channels"],
                  pos_embed_max_size=tcfg["pos_embed_max_size"])
    torch.manual_seed(seed)
    if kind == "instantx":
        cn = SD3ControlNetModel(joint_attention_dim=tcfg["joint_attention_dim"], use_pos_embed=True,
                                force_zeros_for_pooled_projection=True, **common)
    else:
        cn = SD3ControlNetModel(joint_attention_dim=None, use_pos_embed=False,
                                force_zeros_for_pooled_projection=False, **common)
    # zero_module() leaves controlnet_blocks and pos_embed_input at zero (controlnet_sd3.py): redraw every weight
    # so the residuals and the control image both matter.
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in cn.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    cn.eval()
    if kind == "sd35":
        # As StableDiffusion3ControlNetPipeline.__init__ does (pipeline_stable_diffusion_3_controlnet.py 222-224).
        cn.pos_embed = cn._get_pos_embed_from_transformer(transformer)
    return cn


def export(module, args, inputs, outputs, dyn, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dyn,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))


def export_controlnet(cn: SD3ControlNetModel, kind: str, folder: Path, tcfg: dict) -> None:
    text = cn.config.joint_attention_dim is not None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 12, generator=g)
    cond = torch.randn(2, 16, 8, 12, generator=g)
    t = torch.tensor([500.0, 500.0])
    pooled = torch.randn(2, tcfg["pooled_projection_dim"], generator=g)
    args = [x, cond, t, pooled]
    inputs = ["hidden_states", "controlnet_cond", "timestep", "pooled_projections"]
    dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
           "controlnet_cond": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
           "pooled_projections": {0: "batch_size"},
           "controlnet_block_samples": {1: "batch_size", 2: "image_tokens"}}
    if text:
        args.append(torch.randn(2, 10, tcfg["joint_attention_dim"], generator=g))
        inputs.append("encoder_hidden_states")
        dyn["encoder_hidden_states"] = {0: "batch_size", 1: "sequence_length"}
    if folder.exists():
        shutil.rmtree(folder)
    export(ControlNetWrapper(cn, text), tuple(args), inputs, ["controlnet_block_samples"], dyn, folder / "model.onnx")
    cfg = dict(cn.config)
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}
    cfg = {"_class_name": "SD3ControlNetModel", "_diffusers_version": diffusers.__version__, **cfg}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # The graph reproduces the module.
    feeds = {n: a.numpy() for n, a in zip(inputs, args)}
    ref = ControlNetWrapper(cn, text)(*args).numpy()
    got = ort_session(folder / "model.onnx").run(None, feeds)[0]
    err = float(np.abs(ref - got).max())
    rel = err / float(np.abs(ref).max())
    print(f"{folder.name}: {kind}, {cn.config.num_layers} block(s), ONNX vs torch max |diff| {err:.2e} "
          f"(relative to the largest output {rel:.1e})")
    assert rel < 1e-5, rel


# ------------------------------------------------------------------------------------------------------------------
# Goldens
# ------------------------------------------------------------------------------------------------------------------


def control_images() -> tuple[Image.Image, Image.Image]:
    a = Image.new("RGB", (64, 64), (0, 0, 0))
    d = ImageDraw.Draw(a)
    d.rectangle([12, 10, 40, 30], outline=(255, 255, 255), width=2)
    d.ellipse([30, 34, 58, 58], outline=(255, 255, 255), width=2)
    d.line([4, 60, 60, 4], fill=(255, 255, 255), width=1)
    b = Image.new("RGB", (64, 64), (0, 0, 0))
    d = ImageDraw.Draw(b)
    for k in range(0, 64, 8):
        d.line([k, 0, 63 - k, 63], fill=(255, 200, 100), width=2)
    return a, b


def levels(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tcfg = json.loads((BASE / "transformer" / "config.json").read_text())
    transformer = rebuild_transformer()
    vae = rebuild_vae()

    # --- the transformer with residuals
    L = tcfg["num_layers"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 12, generator=g)
    c = torch.randn(2, 10, tcfg["joint_attention_dim"], generator=g)
    p = torch.randn(2, tcfg["pooled_projection_dim"], generator=g)
    t = torch.tensor([700.0, 700.0])
    inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    res = torch.randn(1, 2, 8 * 12 // 4, inner, generator=g)
    idx = torch.tensor(block_index(L, 1), dtype=torch.int64)
    path = FIX / "transformer" / "model_controlnet.onnx"
    dyn = {"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
           "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
           "pooled_projections": {0: "batch_size"}, "timestep": {0: "step"},
           "controlnet_residuals": {0: "residuals", 1: "batch_size", 2: "image_tokens"},
           "out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}}
    export(ResidualTransformer(transformer), (x, c, p, t, res, idx),
           ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "controlnet_residuals",
            "controlnet_block_index"], ["out_hidden_states"], dyn, path)
    # It equals diffusers' own forward with block_controlnet_hidden_states, for 1 and 2 residuals.
    sess = ort_session(path)
    for n in (1, 2):
        r = torch.randn(n, 2, 8 * 12 // 4, inner, generator=g)
        ref = transformer(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t,
                          block_controlnet_hidden_states=list(r)).sample.numpy()
        got = sess.run(None, {"hidden_states": x.numpy(), "encoder_hidden_states": c.numpy(),
                              "pooled_projections": p.numpy(), "timestep": t.numpy(), "controlnet_residuals": r.numpy(),
                              "controlnet_block_index": np.array(block_index(L, n), dtype=np.int64)})[0]
        err = float(np.abs(ref - got).max())
        print(f"residual transformer, {n} residual(s): ONNX vs diffusers forward max |diff| {err:.2e}")
        assert err < 1e-4, err

    # --- the ControlNets
    nets = {"instantx": make_controlnet("instantx", 2101, tcfg, transformer),
            "instantx-b": make_controlnet("instantx", 2201, tcfg, transformer),
            "sd35": make_controlnet("sd35", 2301, tcfg, transformer)}
    for name, cn in nets.items():
        export_controlnet(cn, "sd35" if name == "sd35" else "instantx", FIX / name, tcfg)

    # --- the interval table for the crate's unit test (diffusers' formula, Python floats)
    pairs = [(2, 1), (2, 2), (3, 2), (4, 3), (5, 2), (24, 6), (24, 12), (24, 9), (24, 5), (24, 7), (38, 19),
             (38, 5), (38, 13), (38, 3), (24, 24), (38, 38), (7, 3), (100, 30)]
    (OUT / "interval.json").write_text(json.dumps(
        [{"num_layers": a, "residuals": b, "index": block_index(a, b)} for a, b in pairs]) + "\n")

    # --- diffusers' images
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()  # the posterior mean
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(BASE / "scheduler")
    request = json.loads((CASE / "request.json").read_text())
    embeds = {k: torch.from_numpy(np.load(CASE / f"{k}.npy")) for k in
              ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]}
    latents = torch.from_numpy(np.load(CASE / "latents.npy"))
    ctrl_a, ctrl_b = control_images()
    ctrl_a.save(OUT / "control.png")
    ctrl_b.save(OUT / "control_b.png")

    def run(controlnet, image, scale, start, end, guidance=None, transformer_forward=None, force_zeros=None):
        pipe = StableDiffusion3ControlNetPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, controlnet=controlnet)
        saved = transformer.forward
        if transformer_forward is not None:
            transformer.forward = transformer_forward
        cfgs = [controlnet] if isinstance(controlnet, SD3ControlNetModel) else list(controlnet.nets)
        before = [n.config.force_zeros_for_pooled_projection for n in cfgs]
        if force_zeros is not None:
            for n in cfgs:
                n.register_to_config(force_zeros_for_pooled_projection=force_zeros)
        try:
            guidance = request["guidance"] if guidance is None else guidance
            kw = dict(embeds)
            if guidance <= 1:
                kw = {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
            img = pipe(prompt_embeds=kw.pop("prompt_embeds"), pooled_prompt_embeds=kw.pop("pooled_prompt_embeds"),
                       **kw, control_image=image, controlnet_conditioning_scale=scale, control_guidance_start=start,
                       control_guidance_end=end, num_inference_steps=request["steps"], guidance_scale=guidance,
                       height=request["height"], width=request["width"], latents=latents.clone()).images[0]
        finally:
            transformer.forward = saved
            for n, b in zip(cfgs, before):
                n.register_to_config(force_zeros_for_pooled_projection=b)
        return img

    cases = {}

    def case(name, desc, img, **req):
        img.save(OUT / f"{name}.png")
        cases[name] = {"description": desc, **req}

    ix, ixb, sd = nets["instantx"], nets["instantx-b"], nets["sd35"]
    case("instantx", "InstantX-style ControlNet, scale 0.7, window [0, 1]", run(ix, ctrl_a, 0.7, 0.0, 1.0),
         controlnets=[{"name": "instantx", "image": "control.png", "scale": 0.7, "start": 0.0, "end": 1.0}])
    case("sd35", "SD3.5-style ControlNet, scale 0.8, window [0.25, 0.75] (steps 1 and 2 of 4)",
         run(sd, ctrl_a, 0.8, 0.25, 0.75),
         controlnets=[{"name": "sd35", "image": "control.png", "scale": 0.8, "start": 0.25, "end": 0.75}])
    case("multi", "instantx (0.7, [0, 1]) + instantx-b (0.5, [0, 0.5])",
         run(SD3MultiControlNetModel([ix, ixb]), [ctrl_a, ctrl_b], [0.7, 0.5], [0.0, 0.0], [1.0, 0.5]),
         controlnets=[{"name": "instantx", "image": "control.png", "scale": 0.7, "start": 0.0, "end": 1.0},
                      {"name": "instantx-b", "image": "control_b.png", "scale": 0.5, "start": 0.0, "end": 0.5}])
    case("sd35_guidance_1", "SD3.5-style ControlNet without classifier-free guidance (guidance 1), scale 0.6",
         run(sd, ctrl_b, 0.6, 0.0, 1.0, guidance=1.0), guidance=1.0,
         controlnets=[{"name": "sd35", "image": "control_b.png", "scale": 0.6, "start": 0.0, "end": 1.0}])

    # Sabotaged variants: each must be > 3 levels from the image it mimics a bug of.
    sab = {}
    sab["instantx_scale_ignored"] = ("instantx", run(ix, ctrl_a, 1.0, 0.0, 1.0))
    sab["sd35_window_off_by_one"] = ("sd35", run(sd, ctrl_a, 0.8, 0.0, 0.75))
    sab["sd35_window_late"] = ("sd35", run(sd, ctrl_a, 0.8, 0.25, 1.0))

    def patched(index, add_to_last):
        def forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                    block_controlnet_hidden_states=None, **kw):
            r = torch.stack(list(block_controlnet_hidden_states))
            r = torch.cat([r, torch.zeros_like(r)])  # index len(r) and up: zeros
            out = forward_with_residuals(transformer, hidden_states, encoder_hidden_states, pooled_projections,
                                         timestep, r, index, add_to_last=add_to_last)
            return (out,) if kw.get("return_dict") is False else Transformer2DModelOutput(sample=out)
        return forward

    # Both ControlNets have num_layers = 2 = the transformer's blocks: block 0 adds residual 0, block 1 (the
    # context_pre_only last block) none. Wrong: block 0 adds residual 1; or residual 0 goes after the last block.
    assert block_index(L, 2) == [0, 1]
    sab["instantx_wrong_residual"] = ("instantx", run(ix, ctrl_a, 0.7, 0.0, 1.0,
                                                      transformer_forward=patched([1, 0], False)))
    sab["instantx_after_last_block"] = ("instantx", run(ix, ctrl_a, 0.7, 0.0, 1.0,
                                                        transformer_forward=patched([2, 0], True)))
    # The other kind's preparation: SD3.5 ControlNet with InstantX rules (no shift, zero pooled).
    sab["sd35_as_instantx"] = ("sd35", run(sd, ctrl_a, 0.8, 0.25, 0.75, force_zeros=True))
    sab["multi_second_ignored"] = ("multi", run(ix, ctrl_a, 0.7, 0.0, 1.0))
    sab["no_controlnet"] = ("instantx", Image.open(CASE / "diffusers.png").convert("RGB"))

    summary = {"request": request, "posterior": "mean (DiagonalGaussianDistribution.sample patched to mode())",
               "cases": cases, "sabotaged": {}}
    for name, (target, img) in sab.items():
        img.save(OUT / f"sabotaged_{name}.png")
        d = levels(img, Image.open(OUT / f"{target}.png"))
        summary["sabotaged"][name] = {"mimics_a_bug_in": target, "max_levels_from_it": d}
        print(f"sabotaged {name}: {d} levels from {target}")
        assert d > 3, (name, d)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
