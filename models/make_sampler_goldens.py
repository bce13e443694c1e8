#!/usr/bin/env python3
"""Writes models/goldens/samplers.json: schedules and full trajectories of diffusers' flow-matching samplers.

    .venv-tools/bin/python models/make_sampler_goldens.py

Samplers (diffusers 0.42.1, models/requirements-diffusers-0.42.1.txt; run by models/regen_goldens.sh):
  euler     FlowMatchEulerDiscreteScheduler (schedulers/scheduling_flow_match_euler_discrete.py), SD3's own.
  heun      FlowMatchHeunDiscreteScheduler (schedulers/scheduling_flow_match_heun_discrete.py).
  dpmpp_2m  DPMSolverMultistepScheduler (schedulers/scheduling_dpmsolver_multistep.py) with use_flow_sigmas=True,
            prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2, flow_shift = the
            config's `shift` (or exp(mu) with use_dynamic_shifting), every other argument at its default.

Each case drives the scheduler the way StableDiffusion3Pipeline.__call__ does
(pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py): `retrieve_timesteps(scheduler, steps, "cpu",
**({"mu": mu} if dynamic else {}))`, then for every `t` in `scheduler.timesteps`: `v = model(latents, t)` and
`latents = scheduler.step(v, t, latents, return_dict=False)[0]`. The "model" is a fixed float32 expression with
only +, -, * and / (so the Rust test computes it bit-identically, no transcendental functions):

    v = 0.7 * x + n * (t / 1000) - 0.05 * (x * x)

with `n` a fixed seeded tensor (seed 0) and `t` the timestep as the transformer gets it, as float32.
The starting latents of case k are torch.randn([1, 4, 3, 5], generator=torch.Generator("cpu").manual_seed(k)).

Every float written is a float32 value, as the shortest decimal that parses back (as float64, then rounded to
float32) to exactly that float32; the script asserts the round trip for each value. Deterministic: PyTorch runs
single-threaded, nothing random is unseeded, so re-running writes the same file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (  # noqa: E402
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()

OUT = Path(__file__).resolve().parent / "goldens" / "samplers.json"
SHAPE = [1, 4, 3, 5]
NUM_TRAIN = 1000


def f32(x) -> float:
    """One float32 value as the shortest decimal that round-trips through float64 back to the same float32."""
    v = np.float32(x)
    if not np.isfinite(v):
        raise ValueError(f"non-finite value {v}")
    short = float(str(v))  # str(np.float32) is the shortest repr that identifies the float32
    assert np.float32(short) == v and np.float32(short).tobytes() == v.tobytes(), (v, short)
    return short


def f32list(t) -> list[float]:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    assert a.dtype == np.float32, a.dtype
    return [f32(x) for x in a.reshape(-1)]


NOISE = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0), dtype=torch.float32)


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The fake transformer: float32 in, float32 out, only correctly rounded operations."""
    assert x.dtype == torch.float32
    tf = t.to(torch.float32)  # the transformer's time embedding takes the timestep as float32
    return 0.7 * x + NOISE * (tf / 1000) - 0.05 * (x * x)


def make_scheduler(sampler: str, config: dict):
    shift = config["shift"]
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(**config)
    if sampler == "heun":
        assert set(config) == {"num_train_timesteps", "shift"}, config
        return FlowMatchHeunDiscreteScheduler(**config)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=config["num_train_timesteps"],
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            algorithm_type="dpmsolver++",
            solver_order=2,
            flow_shift=shift,
            use_dynamic_shifting=config.get("use_dynamic_shifting", False),
            time_shift_type=config.get("time_shift_type", "exponential"),
        )
    raise ValueError(sampler)


def torch_scalar_math_correctly_rounded(sigmas: torch.Tensor) -> bool:
    """Whether every float32 log/exp DPMSolverMultistepScheduler.step takes of a 0-dim tensor (log(1 - sigma),
    log(sigma), exp(-h) for consecutive sigmas) equals the correctly rounded value. torch's vectorised kernels are
    sometimes 1 ulp off; sd3-onnx rounds correctly, so its trajectory is bit-identical exactly when this holds."""

    def correctly_rounded(got: torch.Tensor, exact: float) -> bool:
        return bool(got.numpy() == np.float32(exact))

    lambdas = []
    for s in sigmas:
        a = 1 - s
        if float(s) > 0 and not correctly_rounded(torch.log(s), math.log(float(s))):
            return False
        if float(a) > 0 and not correctly_rounded(torch.log(a), math.log(float(a))):
            return False
        lambdas.append(torch.log(a) - torch.log(s))
    for lam_s, lam_t in zip(lambdas, lambdas[1:]):
        h = lam_t - lam_s
        if bool(torch.isfinite(h)) and not correctly_rounded(torch.exp(-h), math.exp(-float(h))):
            return False
    return True


def run_case(sampler: str, config: dict, steps: int, seed: int, image_seq_len=None) -> dict:
    sched = make_scheduler(sampler, config)
    kwargs = {}
    mu = None
    if config.get("use_dynamic_shifting"):
        # As StableDiffusion3Pipeline.__call__ computes it (with our config's bounds written explicitly).
        mu = calculate_shift(
            image_seq_len,
            config["base_image_seq_len"],
            config["max_image_seq_len"],
            config["base_shift"],
            config["max_shift"],
        )
        kwargs["mu"] = mu
    timesteps, n = retrieve_timesteps(sched, steps, "cpu", **kwargs)
    assert n == steps
    sigmas = sched.sigmas
    assert sigmas.dtype == torch.float32
    latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    case = {"sampler": sampler, "config": config, "steps": steps}
    if mu is not None:
        case["mu"] = mu
        case["image_seq_len"] = image_seq_len
        case["np_exp_mu_equals_math_exp_mu"] = bool(np.exp(mu) == math.exp(mu))
    case["timestep_dtype"] = str(timesteps.dtype).replace("torch.", "")
    case["timesteps"] = f32list(timesteps.to(torch.float32))
    case["sigmas"] = f32list(sigmas)
    if sampler == "dpmpp_2m":
        case["torch_scalar_math_correctly_rounded"] = torch_scalar_math_correctly_rounded(sigmas)
    case["seed"] = seed
    case["latents"] = f32list(latents)
    trajectory = []
    for t in timesteps:  # the pipeline's loop (pipeline_stable_diffusion_3.py, "7. Denoising loop")
        v = model(latents, t)
        latents = sched.step(v, t, latents, return_dict=False)[0]
        assert latents.dtype == torch.float32
        trajectory.append(f32list(latents))
    case["trajectory"] = trajectory
    return case


def main():
    static = lambda shift: {"num_train_timesteps": NUM_TRAIN, "shift": shift}  # noqa: E731
    dynamic = {
        "num_train_timesteps": NUM_TRAIN,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "time_shift_type": "exponential",
    }
    plan = []  # (sampler, config, steps, image_seq_len)
    for sampler in ("heun", "dpmpp_2m"):
        for steps in (1, 2, 3, 4, 10, 28):
            plan.append((sampler, static(3.0), steps, None))
        plan.append((sampler, static(1.0), 5, None))
        plan.append((sampler, static(2.5), 7, None))
    # Dynamic shifting: DPMSolverMultistepScheduler.set_timesteps takes mu (flow_shift = exp(mu)); the Heun
    # scheduler has no mu, so it has no dynamic cases. image_seq_len = (px / 8 / 2)^2 for 512 and 1024 px.
    plan.append(("dpmpp_2m", dynamic, 6, 1024))
    plan.append(("dpmpp_2m", dynamic, 12, 4096))
    # Euler through the same loop: the Sampler's Euler path against diffusers, and shifts whose `shift - 1` is not
    # exact in float32 (the training sigma_max is then not 1.0 in torch).
    plan.append(("euler", static(3.0), 4, None))
    plan.append(("euler", static(2.07), 4, None))
    plan.append(("euler", static(1.18), 3, None))
    plan.append(("euler", dynamic, 5, 1024))

    cases = [run_case(s, c, n, seed=k + 1, image_seq_len=q) for k, (s, c, n, q) in enumerate(plan)]
    doc = {
        "generator": f"models/make_sampler_goldens.py, diffusers {diffusers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}, numpy {np.__version__}",
        "notes": [
            "Samplers: euler = FlowMatchEulerDiscreteScheduler; heun = FlowMatchHeunDiscreteScheduler; dpmpp_2m = "
            "DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', "
            "algorithm_type='dpmsolver++', solver_order=2, flow_shift=config.shift, use_dynamic_shifting="
            "config.use_dynamic_shifting), other arguments at their defaults (final_sigmas_type 'zero', "
            "lower_order_final True, euler_at_final False, solver_type 'midpoint').",
            "`config` is a scheduler_config.json that sd3-onnx's FlowMatchConfig reads; for dpmpp_2m its `shift` "
            "is the flow_shift. `mu` (dynamic shifting) is calculate_shift(image_seq_len, base_image_seq_len, "
            "max_image_seq_len, base_shift, max_shift), passed through retrieve_timesteps like the SD3 pipeline.",
            "`timesteps` are scheduler.timesteps (one per model evaluation, what the transformer gets as "
            "`timestep`) as float32; `timestep_dtype` is their dtype in diffusers (int64 for dpmpp_2m: "
            "sigma * 1000 truncated). `sigmas` are scheduler.sigmas (heun: 2 * steps entries, interleaved).",
            "Model: v = 0.7 * x + n * (t / 1000) - 0.05 * (x * x) in float32 (t as float32), `n` = `noise`; "
            "`latents` is the starting sample (torch.randn, CPU generator seeded with `seed`); `trajectory[i]` is "
            "the sample after the i-th scheduler.step.",
            "dpmpp_2m takes float32 log/exp of 0-dim tensors (lambda = log(1 - sigma) - log(sigma), exp(-h)); "
            "torch's vectorised kernels are within 1 ulp of the correctly rounded values. "
            "`torch_scalar_math_correctly_rounded` says whether all of them were correctly rounded in this case "
            "(then a correctly rounded implementation reproduces the trajectory bit for bit).",
            "Floats: each value is float32, written as the shortest decimal that rounds back to it (parse as "
            "float64, round to float32).",
        ],
        "shape": SHAPE,
        "noise": f32list(NOISE),
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per case (and per top-level key): small, and a regenerated file diffs case by case.
    compact = lambda obj: json.dumps(obj, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    lines = ["{"]
    for key, value in doc.items():
        if key == "cases":
            lines.append('"cases":[')
            lines.append(",\n".join(compact(c) for c in value))
            lines.append("]")
        else:
            lines.append(f"{compact(key)}:{compact(value)},")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == doc
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {len(cases)} cases, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
