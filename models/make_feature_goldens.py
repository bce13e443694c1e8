#!/usr/bin/env python3
"""Golden outputs for the pipeline features beyond plain text-to-image: img2img, inpainting, other samplers and
skip-layer guidance, made by Hugging Face diffusers (PyTorch) on the tiny random-weight fixtures.

Companion of models/make_fixtures.py (whose helpers it imports): that script must have run its `models` stage, so
the diffusers checkpoints are in the build folder ($SD3_FIXTURE_BUILD, default <tmp>/sd3-onnx-fixture-build) and
the ONNX fixtures in models/fixtures/<fixture>/. Run from anywhere:

    .venv-tools/bin/python models/make_feature_goldens.py [--cases a,b] [--fixtures x,y]

(about 10 s on 2 cores). It writes only the case folders it owns, models/goldens/<fixture>/<case>/ for the cases
below (each is deleted and rewritten), nothing else. Deterministic: PyTorch and ONNX Runtime run single-threaded, every
random draw comes from a seeded torch.Generator; running it twice gives byte-identical PNG/NPY/JSON files.

Cases (both fixtures unless noted; request.json, diffusers.png and summary.json in every folder):
  img2img           StableDiffusion3Img2ImgPipeline (same components as the text-to-image pipeline): init.png
                    (a generated 96x64 RGB picture), strength 0.6, 8 steps, guidance 5, generator seeded with
                    request.json's "seed" and NO explicit latents, so the golden checks both random draws (VAE
                    posterior sample, then noise). Debug tensors: latent_parameters.npy (VAE encoder output, mean ++
                    logvar), image_latents.npy ((sample - shift) * scale), noise.npy, initial_latents.npy (after
                    scheduler.scale_noise), final_latents.npy, timesteps.npy / sigmas.npy (the truncated schedule that
                    runs). optimum.png: optimum's ORTStableDiffusion3Img2ImgPipeline on the ONNX fixture, same seed.
  inpaint           StableDiffusion3InpaintPipeline (16-channel transformer: per-step blending), same init.png plus
                    mask.png (8-bit "L", white = repaint, a rectangle whose edges are off the 8-pixel latent grid),
                    strength 0.85, 8 steps, seeded generator, no explicit latents. Same debug tensors plus
                    mask_latent.npy (the binarised mask resized to the latent grid); decoded_with_shift_factor.png is
                    the final latents decoded the text-to-image way (diffusers' inpaint decode omits shift_factor).
                    optimum.png from ORTStableDiffusion3InpaintPipeline.
  sampler_heun      text-to-image with FlowMatchHeunDiscreteScheduler.from_config(fixture scheduler config),
  sampler_dpmpp_2m  resp. DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction, flow_shift = the fixture's
                    shift, dpmsolver++, solver_order 2); scheduler_config.json is the exact config used. 64x64,
                    6 steps, explicit latents.npy; final_latents.npy, timesteps.npy, sigmas.npy; optimum.png from
                    optimum's text-to-image pipeline with the same scheduler object swapped in.
  slg               (tiny-sd35 only) skip-layer guidance: skip_guidance_layers [1], scale 2.8, start 0.0, stop 0.5,
                    10 steps, explicit latents. No optimum.png: the exported transformer graph cannot skip a block.

summary.json of every case: the request, notes for an implementer (preprocessing, random draw order, schedule,
blending, SLG condition, as read from diffusers 0.35.2 and 0.42.1), pixel statistics, diffusers vs optimum, and a sensitivity
table: plausible implementation mistakes, each computed with diffusers' own components, and how far they move the
golden image (max / mean abs over 8-bit channels). Every row without an x-prefix must move it by more than 3 levels
(the script fails otherwise), so a Rust test with a 1-level tolerance catches the mistake.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (also sets torch single-threaded + deterministic, silences logs)

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402

from make_fixtures import Case, diff_stats, log, pixel_stats, to_uint8, write_json  # noqa: E402

FIXTURE_NAMES = ["tiny-sd3", "tiny-sd35"]
CASE_NAMES = ["img2img", "inpaint", "sampler_heun", "sampler_dpmpp_2m", "slg"]
SLG_FIXTURES = {"tiny-sd35"}  # SD3.5-medium-like (3 blocks); SLG is an SD3.5 feature

IMG2IMG = Case("img2img", "a watercolor painting of a harbour with sailing boats at sunset", "blurry, low quality",
               96, 64, 8, 5.0, 256, 21)
IMG2IMG_STRENGTH = 0.6
INPAINT = Case("inpaint", "a red hot air balloon floating in a clear blue sky", "blurry, low quality",
               96, 64, 8, 5.0, 256, 22)
INPAINT_STRENGTH = 0.85
# White (repaint) rectangle of mask.png: x0, y0, x1, y1 (x1/y1 exclusive). No edge is a multiple of 8, so sampling
# the mask at the latent cells' top-left pixels (diffusers) and at their centres gives different latent masks.
MASK_BOX = (45, 13, 83, 51)
HEUN = Case("sampler_heun", "a cozy wooden cabin in a snowy pine forest at night", "blurry, low quality",
            64, 64, 6, 5.0, 256, 23)
DPM = Case("sampler_dpmpp_2m", "a bowl of lemons and grapes on a kitchen table, oil painting", "ugly, dark",
           64, 64, 6, 5.0, 256, 24)
SLG = Case("slg", "a portrait of an old fisherman with a grey beard and a yellow raincoat", "blurry, low quality",
           64, 64, 10, 5.0, 256, 25)
SLG_PARAMS = dict(layers=[1], scale=2.8, start=0.0, stop=0.5)

CAUGHT = 3  # a mistake must move the golden by more than this many levels


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


class KeptOptimum(Exception):
    """SD3_GOLDENS_OPTIMUM=keep: take optimum.png from the optimum environment's run instead of running optimum."""


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def save_npy(path: Path, t):
    a = t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)
    np.save(path, a.astype(np.float32))


def euler(pipe) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with the fixture's config (schedulers are stateful: never share one between pipelines)."""
    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def derived(cls, pipe, scheduler=None):
    """A pipeline of class `cls` built from the text-to-image pipeline's components, with its own scheduler."""
    p = cls(**{**pipe.components, "scheduler": scheduler if scheduler is not None else euler(pipe)})
    p.set_progress_bar_config(disable=True)
    return p


def load_ort(cls_name: str, folder: Path):
    import optimum.onnxruntime as oo

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    p = getattr(oo, cls_name).from_pretrained(folder, session_options=so)
    p.set_progress_bar_config(disable=True)
    return p


def scheduler_json(s) -> dict:
    return json.loads(s.to_json_string())


def t_start_of(steps: int, strength: float) -> int:
    """StableDiffusion3Img2ImgPipeline/InpaintPipeline.get_timesteps (python floats = f64)."""
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


def make_init_image(width=96, height=64) -> Image.Image:
    """A deterministic RGB picture: smooth gradients, a sun, a house-like block, a bright diagonal stripe."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 30 + 190 * x / (width - 1)
    g = 60 + 140 * y / (height - 1)
    b = 210 - 150 * (x + y) / (width + height - 2) + 20 * np.sin(x / 7.0)
    img = np.stack([r, g, b], axis=-1)
    sun = (x - 22) ** 2 + (y - 18) ** 2 <= 11 ** 2
    img[sun] = (250, 215, 60)
    house = (x >= 58) & (x < 86) & (y >= 34) & (y < 60)
    img[house] = (115, 35, 40)
    roof = (y >= 22) & (y < 34) & (np.abs(x - 72) <= (y - 22) * 14 / 12)
    img[roof] = (60, 40, 30)
    stripe = np.abs(x - 1.2 * y - 6) < 2.5
    img[stripe] = (240, 240, 235)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def make_mask(width=96, height=64) -> Image.Image:
    m = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = MASK_BOX
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, "L")


def image_tensor(pil: Image.Image) -> torch.Tensor:
    """What VaeImageProcessor.preprocess does for an RGB PIL image of the requested size (asserted below)."""
    u8 = np.asarray(pil, dtype=np.uint8)
    x = torch.from_numpy((u8.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy())
    return 2.0 * x - 1.0


def sensitivity_rows(golden: np.ndarray, rows) -> list[dict]:
    """rows: (id, mistake, uint8 image). Rows whose id starts with 'x' are informative, the others must be caught."""
    table = []
    for key, what, img in rows:
        d = diff_stats(golden, img)
        caught = d["max_abs"] > CAUGHT
        table.append(dict(id=key, mistake=what, max_abs=d["max_abs"], mean_abs=d["mean_abs"],
                          pixels_differing=d["pixels_differing"], caught=caught))
        log(f"    ({key:2s}) {what[:92]:92s} max {d['max_abs']:3d} mean {d['mean_abs']:8.4f} "
            f"{'caught' if caught else 'NOT CAUGHT'}")
    return table


def check_caught(where: str, table: list[dict]):
    missed = [r for r in table if not r["id"].startswith("x") and not r["caught"]]
    if missed:
        raise SystemExit(f"{where}: mistakes not caught (<= {CAUGHT} levels): {missed}")


def kept_optimum_compare(d_img: np.ndarray, out: Path) -> dict:
    """SD3_GOLDENS_OPTIMUM=keep (an environment without optimum): optimum.png as the optimum environment wrote it
    (restored into the rewritten case folder); optimum's final latents are not kept, so no latents difference."""
    o_pil = mf.kept_optimum(out / "optimum.png")
    mf.write_kept_optimum(out / "optimum.png")
    r = optimum_compare(d_img, o_pil)
    r["optimum_note"] = "optimum.png kept from the optimum environment (models/requirements.txt)"
    return r


def optimum_compare(d_img: np.ndarray, o_pil, d_lat=None, o_lat=None) -> dict:
    o = to_uint8(o_pil)
    r = dict(diffusers_vs_optimum=diff_stats(d_img, o), optimum_pixels=pixel_stats(o))
    if d_lat is not None:
        r["final_latents_max_abs_diff"] = float((d_lat - o_lat.float()).abs().max())
    return r


def i2i_kwargs(case: Case, image, strength: float) -> dict:
    return dict(prompt=case.prompt, negative_prompt=case.negative_prompt or None, image=image, width=case.width,
                height=case.height, strength=strength, num_inference_steps=case.steps, guidance_scale=case.guidance,
                max_sequence_length=case.max_sequence_length)


def image_request(case: Case, strength: float) -> dict:
    return dict(prompt=case.prompt, negative_prompt=case.negative_prompt, width=case.width, height=case.height,
                steps=case.steps, guidance=case.guidance, strength=strength, seed=case.latent_seed,
                max_sequence_length=case.max_sequence_length, init_image="init.png")


def latents_request(case: Case) -> dict:
    req = mf.request_json(case)
    req["latents"] = "latents.npy"
    req["latent_seed"] = case.latent_seed
    return req


PREPROCESS_NOTE = (
    "Image -> tensor (VaeImageProcessor.preprocess, resize_mode 'default'): width/height are rounded down to "
    "multiples of 8; a PIL image of another size is resized with PIL LANCZOS (reducing_gap None) to (width, "
    "height) - a same-size resize is a no-op in Pillow (here the image is already 96x64, so no resampling happens); "
    "no colour conversion (diffusers' image_processor has do_convert_rgb False: an RGBA or L PNG would give a "
    "4- or 1-channel tensor and fail in the VAE, so convert to RGB yourself if you accept those); then "
    "x = (u8 as f32 / 255) * 2 - 1 in float32 (np.float32(u8) / 255.0, then 2.0 * x - 1.0), NCHW [1, 3, H, W]. "
    "Asserted bit-exact against diffusers here."
)
VAE_SAMPLE_NOTE = (
    "VAE posterior sample (DiagonalGaussianDistribution.sample): the encoder outputs latent_parameters [1, 32, H/8, "
    "W/8] = mean (channels 0..15) ++ logvar (16..31); logvar = clamp(logvar, -30, 20); std = exp(0.5 * logvar); "
    "sample = mean + std * eps with eps = torch.randn([1, 16, H/8, W/8], generator) (float32). Then "
    "image_latents = (sample - shift_factor) * scaling_factor (vae config)."
)
SCHEDULE_NOTE = (
    "Strength -> start index (get_timesteps, python float64 math): init_timestep = min(steps * strength, steps); "
    "t_start = int(max(steps - init_timestep, 0)) (truncation); the full FlowMatchEuler schedule for `steps` is "
    "computed as in text-to-image, then timesteps[t_start:] run (steps - t_start transformer steps) and the "
    "scheduler's begin_index is t_start, so step k uses sigmas[t_start + k] -> sigmas[t_start + k + 1]. Compute it in "
    "f64, as steps as f64 * strength (an f64 parsed from the request, not an f32 widened) and then steps - that: "
    "the truncation sits exactly on the rounding at whole multiples (f64: 25 * 0.56 = 14.000000000000002 -> "
    "t_start 10, not 11; strength 0.2 held as f32 and widened: 5 * 0.2f32 = 1.0000000149 -> t_start 3, while "
    "diffusers gets 4). Initial latents "
    "(scheduler.scale_noise with begin_index set): sigma = sigmas[t_start]; x = sigma * noise + (1 - sigma) * "
    "image_latents. timesteps.npy / sigmas.npy hold the truncated schedule (sigmas with the final 0)."
)


# ----------------------------------------------------------------------------------------------------------------
# img2img
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def case_img2img(name: str, pipe, out: Path):
    case, strength, seed = IMG2IMG, IMG2IMG_STRENGTH, IMG2IMG.latent_seed
    make_init_image(case.width, case.height).save(out / "init.png")
    init = Image.open(out / "init.png")
    init.load()
    assert init.mode == "RGB" and init.size == (case.width, case.height)
    write_json(out / "request.json", image_request(case, strength))

    p = derived(StableDiffusion3Img2ImgPipeline, pipe)
    kw = i2i_kwargs(case, init, strength)
    img_pil = p(**kw, generator=gen(seed)).images[0]
    img_pil.save(out / "diffusers.png")
    golden = to_uint8(img_pil)
    final = p(**kw, generator=gen(seed), output_type="latent").images

    # The same, step by step (asserted to reproduce the pipeline).
    vae = p.vae
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    x = p.image_processor.preprocess(init, height=case.height, width=case.width)
    assert torch.equal(x, image_tensor(init)), "preprocess != 2 * (u8 / 255) - 1"
    dist = vae.encode(x).latent_dist
    g = gen(seed)
    image_latents = (dist.sample(g) - shift) * sf
    noise = randn_tensor(image_latents.shape, generator=g, dtype=torch.float32)
    sched = euler(pipe)
    sched.set_timesteps(case.steps)
    t0 = t_start_of(case.steps, strength)
    sched.set_begin_index(t0)
    initial = sched.scale_noise(image_latents, sched.timesteps[t0:t0 + 1], noise)
    sigma0 = sched.sigmas[t0]
    assert torch.equal(initial, sigma0 * noise + (1.0 - sigma0) * image_latents)
    # prepare_latents itself, with a fresh generator
    s2 = euler(pipe)
    s2.set_timesteps(case.steps)
    s2.set_begin_index(t0)
    p_chk = derived(StableDiffusion3Img2ImgPipeline, pipe, s2)
    assert torch.equal(p_chk.prepare_latents(x, s2.timesteps[t0:t0 + 1], 1, 1, torch.float32, "cpu", gen(seed)),
                       initial), "prepare_latents differs from the step-by-step draws"
    assert torch.equal(p(**kw, latents=initial, output_type="latent").images, final)

    save_npy(out / "latent_parameters.npy", dist.parameters)
    save_npy(out / "image_latents.npy", image_latents)
    save_npy(out / "noise.npy", noise)
    save_npy(out / "initial_latents.npy", initial)
    save_npy(out / "final_latents.npy", final)
    save_npy(out / "timesteps.npy", sched.timesteps[t0:])
    save_npy(out / "sigmas.npy", sched.sigmas[t0:])

    # optimum
    try:
        if mf.OPTIMUM_MODE == "keep":
            raise KeptOptimum
        op = load_ort("ORTStableDiffusion3Img2ImgPipeline", mf.FIXTURES / name)
        o_pil = op(**kw, generator=gen(seed)).images[0]
        o_lat = op(**kw, generator=gen(seed), output_type="latent").images
        o_pil.save(out / "optimum.png")
        optimum = optimum_compare(golden, o_pil, final, o_lat)
    except KeptOptimum:
        optimum = kept_optimum_compare(golden, out)
    except Exception as e:  # pragma: no cover - recorded, not fatal
        optimum = dict(optimum=f"failed: {type(e).__name__}: {e}")
    log(f"  img2img diffusers {pixel_stats(golden)}; optimum {optimum.get('diffusers_vs_optimum', optimum)}")

    # Sensitivity: each mistake computed with diffusers' components.
    def from_initial(lat, strength_=strength):
        return to_uint8(p(**{**kw, "strength": strength_}, latents=lat).images[0])

    def draws(first_noise=False, use_mean=False, draw_sample=True, factors=True):
        g = gen(seed)
        if first_noise:
            n = randn_tensor(image_latents.shape, generator=g, dtype=torch.float32)
        s = dist.sample(g) if draw_sample else None
        z = dist.mean if use_mean else s
        if not first_noise:
            n = randn_tensor(image_latents.shape, generator=g, dtype=torch.float32)
        lat = (z - shift) * sf if factors else z
        return sigma0 * n + (1.0 - sigma0) * lat

    rows = [
        ("a", "strength ignored: all 8 steps from pure noise (t_start 0; diffusers with strength 1.0)",
         to_uint8(p(**{**kw, "strength": 1.0}, generator=gen(seed)).images[0])),
        ("b", "random draws swapped: noise drawn first, then the VAE posterior sample",
         from_initial(draws(first_noise=True))),
        ("c", "VAE posterior mean instead of a sample (no posterior draw: noise is the generator's first draw)",
         from_initial(draws(use_mean=True, draw_sample=False))),
        ("d", f"start index one later (t_start {t0 + 1} instead of {t0}; diffusers with strength 0.5)",
         to_uint8(p(**{**kw, "strength": 0.5}, generator=gen(seed)).images[0])),
        ("e", f"start index one earlier (t_start {t0 - 1} instead of {t0}; diffusers with strength 0.75)",
         to_uint8(p(**{**kw, "strength": 0.75}, generator=gen(seed)).images[0])),
        ("f", "encoded latents without (x - shift_factor) * scaling_factor (raw posterior sample)",
         from_initial(draws(factors=False))),
        ("x1", "VAE posterior mean, noise still the second draw", from_initial(draws(use_mean=True))),
    ]
    assert t_start_of(case.steps, 0.5) == t0 + 1 and t_start_of(case.steps, 0.75) == t0 - 1
    table = sensitivity_rows(golden, rows)
    check_caught(f"{name}/img2img", table)
    write_json(out / "summary.json", dict(
        case="img2img", request=image_request(case, strength),
        pipeline="diffusers StableDiffusion3Img2ImgPipeline(**text_to_image_pipe.components), generator="
                 f"torch.Generator('cpu').manual_seed({seed}), no latents",
        t_start=t0, steps_run=case.steps - t0,
        vae=dict(scaling_factor=sf, shift_factor=shift),
        notes=[
            PREPROCESS_NOTE,
            VAE_SAMPLE_NOTE,
            "Random draws, in this order, from ONE torch.Generator('cpu').manual_seed(seed): (1) eps of the VAE "
            "posterior sample of the init image, shape [1, 16, H/8, W/8]; (2) noise, same shape "
            "(prepare_latents: retrieve_latents(vae.encode(image), generator) then randn_tensor(shape, generator)). "
            "No other draw.",
            SCHEDULE_NOTE,
            "Denoising loop, CFG and decode exactly as text-to-image (z = x / scaling_factor + shift_factor).",
            "Files: latent_parameters.npy = VAE encoder output for init.png; image_latents.npy = (sample - shift) * "
            "scale; noise.npy; initial_latents.npy; final_latents.npy (output_type='latent', before VAE scaling); "
            "timesteps.npy / sigmas.npy = truncated schedule.",
        ],
        diffusers_pixels=pixel_stats(golden), init_pixels=pixel_stats(to_uint8(init)), **optimum,
        sensitivity=table,
    ))


# ----------------------------------------------------------------------------------------------------------------
# inpaint
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def inpaint_loop(p, emb, image_latents, noise, mask_latent, steps, strength, guidance, initial=None, blend="next"):
    """The denoising loop of StableDiffusion3InpaintPipeline.__call__ for a 16-channel transformer (diffusers
    0.35.2 to 0.42.1), with hooks for mistakes. blend: 'next' (diffusers), 'current', 'none', 'no_final'."""
    pe, ppe, npe, nppe = emb
    sched = FlowMatchEulerDiscreteScheduler.from_config(p.scheduler.config)
    sched.set_timesteps(steps)
    t0 = t_start_of(steps, strength)
    ts = sched.timesteps[t0:]
    sched.set_begin_index(t0)
    x = sched.scale_noise(image_latents, ts[:1], noise) if initial is None else initial.clone()
    ctx, pooled = torch.cat([npe, pe]), torch.cat([nppe, ppe])
    for i, t in enumerate(ts):
        inp = torch.cat([x] * 2)
        v = p.transformer(hidden_states=inp, timestep=t.expand(2), encoder_hidden_states=ctx,
                          pooled_projections=pooled, return_dict=False)[0]
        vu, vc = v.chunk(2)
        v = vu + guidance * (vc - vu)
        x = sched.step(v, t, x, return_dict=False)[0]
        if blend == "none":
            continue
        proper = image_latents
        if i < len(ts) - 1:
            k = sched.step_index if blend != "current" else sched.step_index - 1
            sigma = sched.sigmas[k]
            proper = sigma * noise + (1.0 - sigma) * image_latents
        elif blend == "no_final":
            continue
        x = (1 - mask_latent) * proper + mask_latent * x
    return x


@torch.no_grad()
def case_inpaint(name: str, pipe, out: Path):
    case, strength, seed = INPAINT, INPAINT_STRENGTH, INPAINT.latent_seed
    make_init_image(case.width, case.height).save(out / "init.png")
    make_mask(case.width, case.height).save(out / "mask.png")
    init, mask = Image.open(out / "init.png"), Image.open(out / "mask.png")
    init.load()
    mask.load()
    assert init.mode == "RGB" and mask.mode == "L" and mask.size == init.size == (case.width, case.height)
    req = image_request(case, strength)
    req["mask_image"] = "mask.png"
    write_json(out / "request.json", req)

    p = derived(StableDiffusion3InpaintPipeline, pipe)
    assert p.transformer.config.in_channels == 16
    kw = {**i2i_kwargs(case, init, strength), "mask_image": mask}
    img_pil = p(**kw, generator=gen(seed)).images[0]
    img_pil.save(out / "diffusers.png")
    golden = to_uint8(img_pil)
    final = p(**kw, generator=gen(seed), output_type="latent").images

    vae = p.vae
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    h8, w8 = case.height // p.vae_scale_factor, case.width // p.vae_scale_factor
    x = p.image_processor.preprocess(init, height=case.height, width=case.width).to(torch.float32)
    assert torch.equal(x, image_tensor(init))
    m = p.mask_processor.preprocess(mask, height=case.height, width=case.width)
    mask_u8 = np.asarray(mask, dtype=np.uint8)
    assert torch.equal(m, torch.from_numpy((mask_u8 >= 128).astype(np.float32))[None, None]), "binarisation"
    dist = vae.encode(x).latent_dist
    g = gen(seed)
    image_latents = (dist.sample(g) - shift) * sf  # draw 1
    noise = randn_tensor(image_latents.shape, generator=g, dtype=torch.float32)  # draw 2
    masked_image = x * (m < 0.5)
    _unused = vae.encode(masked_image).latent_dist.sample(g)  # draw 3 (masked_image_latents, unused at 16 ch)
    mask_latent = F.interpolate(m, size=(h8, w8))
    assert torch.equal(mask_latent, m[:, :, ::8, ::8]), "nearest = top-left pixel of every 8x8 cell"
    emb = mf.encode(pipe, case)
    sched = euler(pipe)
    sched.set_timesteps(case.steps)
    t0 = t_start_of(case.steps, strength)
    sched.set_begin_index(t0)
    initial = sched.scale_noise(image_latents, sched.timesteps[t0:t0 + 1], noise)
    x_ref = inpaint_loop(p, emb, image_latents, noise, mask_latent, case.steps, strength, case.guidance)
    assert torch.equal(x_ref, final), "reference inpaint loop does not reproduce the pipeline's latents"
    # .contiguous(): x_ref comes out of the blending with a channels-last layout, and in diffusers 0.42.1 (not 0.35.2) the VAE
    # decoder's ResnetBlock2D no longer makes the conv_shortcut input contiguous in eval mode (models/resnet.py), so
    # its float rounding depends on the memory layout (1 level on this fixture). The pipeline's latents are contiguous.
    x_ref = x_ref.contiguous()
    assert np.array_equal(mf.decode(p, x_ref, shift_factor=0.0), golden), "inpaint decode is z = x / scaling"
    with_shift = mf.decode(p, x_ref)
    Image.fromarray(with_shift, "RGB").save(out / "decoded_with_shift_factor.png")

    save_npy(out / "latent_parameters.npy", dist.parameters)
    save_npy(out / "image_latents.npy", image_latents)
    save_npy(out / "noise.npy", noise)
    save_npy(out / "initial_latents.npy", initial)
    save_npy(out / "final_latents.npy", final)
    save_npy(out / "mask_latent.npy", mask_latent)
    save_npy(out / "timesteps.npy", sched.timesteps[t0:])
    save_npy(out / "sigmas.npy", sched.sigmas[t0:])

    try:
        if mf.OPTIMUM_MODE == "keep":
            raise KeptOptimum
        op = load_ort("ORTStableDiffusion3InpaintPipeline", mf.FIXTURES / name)
        o_pil = op(**kw, generator=gen(seed)).images[0]
        o_lat = op(**kw, generator=gen(seed), output_type="latent").images
        o_pil.save(out / "optimum.png")
        optimum = optimum_compare(golden, o_pil, final, o_lat)
    except KeptOptimum:
        optimum = kept_optimum_compare(golden, out)
    except Exception as e:  # pragma: no cover
        optimum = dict(optimum=f"failed: {type(e).__name__}: {e}")
    log(f"  inpaint diffusers {pixel_stats(golden)}; optimum {optimum.get('diffusers_vs_optimum', optimum)}")

    def run(**k):
        return mf.decode(p, inpaint_loop(p, emb, k.pop("il", image_latents), k.pop("n", noise),
                                         k.pop("ml", mask_latent), case.steps, strength, case.guidance, **k),
                         shift_factor=0.0)

    g = gen(seed)
    n_first = randn_tensor(image_latents.shape, generator=g, dtype=torch.float32)
    il_second = (dist.sample(g) - shift) * sf
    rows = [
        ("a", "mask inverted (white = keep)", run(ml=1 - mask_latent)),
        ("b", "no per-step blending (plain img2img with the same draws)", run(blend="none")),
        ("c", "blending with the current sigma (sigmas[t_start + i]) instead of the next one", run(blend="current")),
        ("d", "no blend after the last step (final latents not replaced by the clean image latents outside the "
              "mask)", run(blend="no_final")),
        ("e", "latent mask sampled at the 8x8 cells' centre pixels (8i + 4, 8j + 4) instead of the top-left "
              "(nearest)", run(ml=m[:, :, 4::8, 4::8])),
        ("f", "random draws swapped: noise first, then the VAE posterior sample", run(il=il_second, n=n_first)),
        ("x1", "decoded with shift_factor (z = x / scaling + shift, like text-to-image) instead of diffusers' "
               "inpaint decode z = x / scaling", with_shift),
    ]
    table = sensitivity_rows(golden, rows)
    check_caught(f"{name}/inpaint", table)
    lm = mask_latent[0, 0].numpy().astype(int)
    write_json(out / "summary.json", dict(
        case="inpaint", request=req,
        pipeline="diffusers StableDiffusion3InpaintPipeline(**text_to_image_pipe.components), 16-channel "
                 f"transformer, generator=torch.Generator('cpu').manual_seed({seed}), no latents, "
                 "padding_mask_crop None, masked_image_latents None",
        t_start=t0, steps_run=case.steps - t0, mask_box_xyxy_exclusive=list(MASK_BOX),
        mask_latent_rows=["".join(str(v) for v in row) for row in lm],
        vae=dict(scaling_factor=sf, shift_factor=shift),
        notes=[
            PREPROCESS_NOTE,
            "Mask -> latent mask (mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, "
            "do_convert_grayscale=True)): PIL resize (LANCZOS) to (width, height) if the size differs; "
            "image.convert('L') (a no-op for an L image; from RGB Pillow computes L = (R * 19595 + G * 38470 + "
            "B * 7471 + 0x8000) >> 16 in integers, exhaustively verified; from RGBA the same, alpha ignored); "
            "m = u8 as f32 / 255; binarise m < 0.5 -> 0, m >= 0.5 -> 1 (i.e. u8 >= 128 -> 1); NOT normalised to "
            "[-1, 1]. Latent mask = torch.nn.functional.interpolate(m, size=(H/8, W/8)) with the default mode "
            "'nearest': mask_latent[i][j] = m[8 i][8 j] (the top-left pixel of each 8x8 cell, not an average). "
            "White (1) = repaint, black (0) = keep.",
            VAE_SAMPLE_NOTE,
            "Random draws, in this order, from ONE torch.Generator('cpu').manual_seed(seed): (1) eps of the VAE "
            "posterior sample of the init image (prepare_latents -> _encode_vae_image; done whenever the "
            "transformer has 16 input channels, even at strength 1.0); (2) noise [1, 16, H/8, W/8] "
            "(randn_tensor); (3) eps of the VAE posterior sample of the masked image init_image * (m < 0.5) "
            "(prepare_mask_latents). Draw 3's masked_image_latents are only used by 33-channel inpainting "
            "transformers, and nothing is drawn after it, so with a 16-channel transformer it may be skipped "
            "without changing anything.",
            SCHEDULE_NOTE + " At strength 1.0 exactly (is_strength_max) the initial latents are the noise itself "
            "(no scale_noise), and a schedule of fewer than 1 step is an error.",
            "Per-step blending, after every scheduler step i (0-based over the truncated timesteps, n = steps - "
            "t_start of them): x = euler_step(x, v) (sigmas[t_start + i] -> sigmas[t_start + i + 1]); then "
            "if i < n - 1: proper = s * noise + (1 - s) * image_latents with s = sigmas[t_start + i + 1] (the NEXT "
            "sigma, the one x is now at; diffusers passes timesteps[i + 1] to scale_noise, which ignores it and "
            "uses scheduler.step_index = t_start + i + 1); on the last step proper = image_latents (clean); "
            "x = (1 - mask_latent) * proper + mask_latent * x. The same `noise` tensor (draw 2) is reused every step. "
            "Blending is in latent space only: no pixel-space paste of the original (padding_mask_crop None).",
            "CFG as text-to-image; the transformer input is the 16-channel latents only (no mask/masked-image "
            "channels).",
            f"Decode: diffusers {mf.DIFFUSERS}'s inpaint pipeline decodes z = x / scaling_factor WITHOUT adding "
            "shift_factor (text-to-image and img2img add it). diffusers.png (and optimum.png) follow that; "
            "decoded_with_shift_factor.png is the same final latents decoded the text-to-image way (row x1 shows "
            "the difference). Decide which one the Rust pipeline reproduces.",
            "Files: as img2img plus mask.png, mask_latent.npy [1, 1, H/8, W/8] (0/1), decoded_with_shift_factor.png.",
        ],
        diffusers_pixels=pixel_stats(golden), **optimum, sensitivity=table,
    ))


# ----------------------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------------------


class DPMFloatTimesteps(DPMSolverMultistepScheduler):
    """Mistake helper: feeds sigma * 1000 as float instead of diffusers' int64-truncated timesteps."""

    def set_timesteps(self, *a, **k):
        super().set_timesteps(*a, **k)
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(torch.float32)


def make_sampler(kind: str, pipe, cls=None, **over):
    shift = pipe.scheduler.config.shift
    if kind == "heun":
        return FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    cfg = dict(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
               flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2)
    cfg.update(over)
    return (cls or DPMSolverMultistepScheduler)(**cfg)


@torch.no_grad()
def case_sampler(name: str, pipe, out: Path, kind: str):
    case = HEUN if kind == "heun" else DPM
    sched = make_sampler(kind, pipe)
    write_json(out / "scheduler_config.json", scheduler_json(sched))
    latents = mf.initial_latents(case)
    np.save(out / "latents.npy", latents.numpy())
    req = latents_request(case)
    req["sampler"] = kind if kind == "heun" else "dpmpp_2m"
    write_json(out / "request.json", req)
    p = derived(StableDiffusion3Pipeline, pipe, sched)
    kw = mf.pipe_kwargs(case, latents)
    img_pil = p(**kw).images[0]
    img_pil.save(out / "diffusers.png")
    golden = to_uint8(img_pil)
    final = p(**kw, output_type="latent").images
    save_npy(out / "final_latents.npy", final)
    ts_dtype = str(p.scheduler.timesteps.dtype)
    save_npy(out / "timesteps.npy", p.scheduler.timesteps)
    save_npy(out / "sigmas.npy", p.scheduler.sigmas)
    timesteps = mf.f32list(p.scheduler.timesteps.float())
    sigmas = mf.f32list(p.scheduler.sigmas)

    try:
        if mf.OPTIMUM_MODE == "keep":
            raise KeptOptimum
        op = load_ort("ORTStableDiffusion3Pipeline", mf.FIXTURES / name)
        op.scheduler = make_sampler(kind, pipe)
        o_pil = op(**kw).images[0]
        o_lat = op(**kw, output_type="latent").images
        o_pil.save(out / "optimum.png")
        optimum = optimum_compare(golden, o_pil, final, o_lat)
        optimum["optimum_note"] = "optimum's ORTStableDiffusion3Pipeline on the fixture with pipe.scheduler replaced"
    except KeptOptimum:
        optimum = kept_optimum_compare(golden, out)
    except Exception as e:  # pragma: no cover
        optimum = dict(optimum=f"failed: {type(e).__name__}: {e}")
    log(f"  {case.name} diffusers {pixel_stats(golden)}; optimum {optimum.get('diffusers_vs_optimum', optimum)}")

    def with_sched(s):
        return to_uint8(derived(StableDiffusion3Pipeline, pipe, s)(**kw).images[0])

    rows = [("a", f"plain FlowMatchEulerDiscreteScheduler (fixture config), {case.steps} steps", with_sched(euler(pipe)))]
    if kind == "dpmpp_2m":
        rows += [
            ("b", "first-order DPM-Solver++ only (solver_order 1; = Euler on the DPM flow-sigma schedule)",
             with_sched(make_sampler(kind, pipe, solver_order=1))),
            ("x1", "timesteps fed as float sigma * 1000 instead of diffusers' int64-truncated values",
             with_sched(make_sampler(kind, pipe, cls=DPMFloatTimesteps))),
        ]
    table = sensitivity_rows(golden, rows)
    check_caught(f"{name}/{case.name}", table)

    if kind == "heun":
        notes = [
            "FlowMatchHeunDiscreteScheduler.from_config(fixture scheduler config): only num_train_timesteps and shift "
            "are used (no dynamic shifting, no shift_terminal). Schedule: sigma_max/sigma_min are the shifted "
            "training sigmas at t = 1000 and t = 1 (sigma_min = shift(0.001) in float32, as in FlowMatchEuler); "
            "ts = linspace(sigma_max * 1000, sigma_min * 1000, N) in float64; s = ts / 1000; s = shift * s / (1 + "
            "(shift - 1) * s) (float64, a second shift - the same quirk as FlowMatchEuler) -> float32; timesteps = "
            "s_f32 * 1000 (float32); then timesteps = [t0, t1, t1, t2, t2, ..., t_{N-1}, t_{N-1}] (2N - 1 entries) "
            "and sigmas = [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0] (2N entries).",
            "The pipeline loop runs once per timestep entry: 2N - 1 transformer evaluations (with CFG each), here "
            f"{len(timesteps)} for N = {case.steps}.",
            "step (s_churn 0, so gamma 0, no noise): state 'first order' when no derivative is pending: "
            "sigma = sigmas[k], sigma_next = sigmas[k + 1]; denoised = x - v * sigma; d = (x - denoised) / sigma; "
            "dt = sigma_next - sigma; keep d, dt and x; x = x + d * dt. Next call ('second order', at timestep "
            "t_next, the model evaluated on that Euler prediction): sigma_next = sigmas[k]; denoised = x_pred - v2 "
            "* sigma_next; d2 = (x_pred - denoised) / sigma_next; d = 0.5 * (d_kept + d2); x = x_kept + d * dt. "
            "The last entry (sigma s_{N-1} -> 0) is a first-order (Euler) step whose correction never runs. "
            "Sample math in float32.",
        ]
    else:
        notes = [
            "DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="
            "'flow_prediction', flow_shift=<fixture shift>, algorithm_type='dpmsolver++', solver_order=2), other "
            "settings default (solver_type 'midpoint', lower_order_final True, final_sigmas_type 'zero', "
            "timestep_spacing 'linspace', euler_at_final False); full config in scheduler_config.json.",
            "Schedule (float64 numpy): a = linspace(1, 1/1000, N + 1); s = 1 - a; s = flip(flow_shift * s / (1 + "
            "(flow_shift - 1) * s))[:-1] (N values, the first is shift(0.999) < 1, not 1); timesteps = s * 1000 cast "
            "to int64 (TRUNCATED: the transformer receives e.g. 999, not 999.67); sigmas = s ++ [0] as float32.",
            "Per step k (float32 torch math; sigma_k = sigmas[k]; alpha = 1 - sigma; lambda = log(alpha) - "
            "log(sigma)): x0_k = x - sigma_k * v_k (flow_prediction). First step (no history) and the last step "
            "(final_sigmas_type zero) are first order: h = lambda_{k+1} - lambda_k; x = (sigma_{k+1} / sigma_k) * "
            "x - alpha_{k+1} * (exp(-h) - 1) * x0_k (at sigma_{k+1} = 0: lambda = inf, exp(-h) = 0, x = x0_k). "
            "Other steps second order (midpoint): h = lambda_{k+1} - lambda_k, h0 = lambda_k - lambda_{k-1}, "
            "r0 = h0 / h, D0 = x0_k, D1 = (x0_k - x0_{k-1}) / r0; x = (sigma_{k+1} / sigma_k) * x - alpha_{k+1} * "
            "(exp(-h) - 1) * D0 - 0.5 * alpha_{k+1} * (exp(-h) - 1) * D1.",
            f"N = {case.steps}: {case.steps} transformer evaluations (with CFG each); timesteps dtype in diffusers: "
            f"{ts_dtype} (timesteps.npy stores them as float32, exact).",
        ]
    write_json(out / "summary.json", dict(
        case=case.name, request=req, scheduler_config=scheduler_json(sched),
        timesteps=timesteps, timesteps_dtype=ts_dtype, sigmas=sigmas,
        transformer_evaluations_per_image=len(timesteps) * 2,
        notes=notes + ["CFG, decode: as text-to-image. Files: latents.npy (explicit initial latents = "
                       "torch.randn(seed = latent_seed)), final_latents.npy, timesteps.npy, sigmas.npy, "
                       "scheduler_config.json."],
        diffusers_pixels=pixel_stats(golden), **optimum, sensitivity=table,
    ))


# ----------------------------------------------------------------------------------------------------------------
# skip-layer guidance
# ----------------------------------------------------------------------------------------------------------------


def slg_kwargs(layers, scale, start, stop):
    return dict(skip_guidance_layers=layers, skip_layer_guidance_scale=scale, skip_layer_guidance_start=start,
                skip_layer_guidance_stop=stop)


@torch.no_grad()
def case_slg(name: str, pipe, out: Path):
    case, sp = SLG, SLG_PARAMS
    latents = mf.initial_latents(case)
    np.save(out / "latents.npy", latents.numpy())
    req = latents_request(case)
    req["skip_layer_guidance"] = dict(sp)
    write_json(out / "request.json", req)
    p = derived(StableDiffusion3Pipeline, pipe)
    n_blocks = len(p.transformer.transformer_blocks)
    assert all(0 <= layer < n_blocks for layer in sp["layers"])

    # Record which transformer calls skip layers (one plain CFG call per step, plus one SLG call where it applies).
    calls = []
    tr = p.transformer
    orig_forward = tr.forward

    def recording_forward(*a, **k):
        calls.append((k.get("skip_layers"), int(k["hidden_states"].shape[0]), float(k["timestep"][0])))
        return orig_forward(*a, **k)

    tr.forward = recording_forward
    try:
        def run(layers=sp["layers"], scale=sp["scale"], start=sp["start"], stop=sp["stop"], output_type="pil"):
            calls.clear()
            r = p(**mf.pipe_kwargs(case, latents), **slg_kwargs(layers, scale, start, stop),
                  output_type=output_type).images
            steps, i = [], -1
            for skip, batch, _t in calls:
                if skip is None:
                    i += 1
                else:
                    assert batch == 1 and list(skip) == list(layers)
                    steps.append(i)
            return (to_uint8(r[0]) if output_type == "pil" else r), steps

        golden, applied = run()
        slg_calls = [c for c in calls if c[0] is not None]
        final, _ = run(output_type="latent")
        Image.fromarray(golden, "RGB").save(out / "diffusers.png")
        save_npy(out / "final_latents.npy", final)
        expect = [i for i in range(case.steps) if i > case.steps * sp["start"] and i < case.steps * sp["stop"]]
        assert applied == expect, (applied, expect)
        without, none_steps = run(layers=None)
        every, every_steps = run(start=-1.0, stop=2.0)
        incl_start, incl_start_steps = run(start=-0.01)
        incl_stop, incl_stop_steps = run(stop=0.51)
        other_layer, _ = run(layers=[0])
    finally:
        del tr.forward
    assert none_steps == [] and every_steps == list(range(case.steps))
    assert incl_start_steps == [0] + applied and incl_stop_steps == applied + [applied[-1] + 1]
    log(f"  slg diffusers {pixel_stats(golden)}; SLG at steps {applied}")
    rows = [
        ("a", "without skip-layer guidance", without),
        ("b", f"SLG on every step (0..{case.steps - 1})", every),
        ("c", f"SLG also at step 0 (start condition i >= steps * start): steps {incl_start_steps}", incl_start),
        ("d", f"SLG also at step {applied[-1] + 1} (stop condition i <= steps * stop): steps {incl_stop_steps}",
         incl_stop),
        ("x1", "block 0 skipped instead of block 1", other_layer),
    ]
    table = sensitivity_rows(golden, rows)
    check_caught(f"{name}/slg", table)
    write_json(out / "summary.json", dict(
        case="slg", request=req, transformer_blocks=n_blocks,
        slg_applied_at_step_indices=applied,
        slg_timesteps=[c[2] for c in slg_calls],
        notes=[
            f"diffusers {mf.DIFFUSERS} StableDiffusion3Pipeline.__call__ with skip_guidance_layers, "
            "skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop (defaults 2.8 / 0.01 "
            "/ 0.2; this case uses [1], 2.8, 0.0, 0.5).",
            "Condition, evaluated only when CFG is on (guidance_scale > 1): at step index i (0-based, "
            "num_inference_steps = len(timesteps)), SLG applies iff i > num_inference_steps * start AND i < "
            "num_inference_steps * stop (both STRICT, python float math). With start 0.0 step 0 is therefore "
            f"excluded; here steps {case.steps}, start {sp['start']}, stop {sp['stop']} -> i in {applied}.",
            "Where it applies, after the normal CFG (noise_pred = v_u + g * (v_c - v_u), batch [negative, "
            "positive]) one extra transformer call with batch 1: the current latents (not duplicated), the same "
            "timestep t, the POSITIVE prompt's embeddings and pooled embeddings only, and skip_layers: the "
            "transformer blocks whose index is in skip_guidance_layers are skipped entirely (hidden and context "
            "streams pass through unchanged; the other blocks and the final norm/proj run as usual). Then "
            "noise_pred = noise_pred + (v_c - v_skip) * skip_layer_guidance_scale, where v_c is the positive half "
            "of the CFG batch. The scheduler step follows as usual.",
            "The exported ONNX transformer has no skip_layers input: reproducing this needs a transformer graph "
            "without the skipped block(s) (e.g. exported from the same weights with that block removed) or a "
            "per-block graph split.",
            "Files: latents.npy (explicit initial latents = torch.randn(seed = latent_seed)), final_latents.npy "
            "(output_type='latent').",
        ],
        diffusers_pixels=pixel_stats(golden), optimum="none: the exported transformer graph cannot skip blocks",
        sensitivity=table,
    ))


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASE_NAMES), help="comma-separated subset of: " + ",".join(CASE_NAMES))
    ap.add_argument("--fixtures", default=",".join(FIXTURE_NAMES),
                    help="comma-separated subset of: " + ",".join(FIXTURE_NAMES))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    names = [n for n in args.fixtures.split(",") if n]
    for c in cases:
        if c not in CASE_NAMES:
            raise SystemExit(f"unknown case {c}")
    for n in names:
        if n not in FIXTURE_NAMES:
            raise SystemExit(f"unknown fixture {n}")
    log(f"build folder: {mf.BUILD}")
    for name in names:
        log(f"[features] {name}")
        pipe = mf.load_diffusers_pipeline(name)
        for c in cases:
            if c == "slg" and name not in SLG_FIXTURES:
                continue
            out = mf.GOLDENS / name / c
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if c == "img2img":
                case_img2img(name, pipe, out)
            elif c == "inpaint":
                case_inpaint(name, pipe, out)
            elif c == "sampler_heun":
                case_sampler(name, pipe, out, "heun")
            elif c == "sampler_dpmpp_2m":
                case_sampler(name, pipe, out, "dpmpp_2m")
            elif c == "slg":
                case_slg(name, pipe, out)
    log("done")


if __name__ == "__main__":
    main()
