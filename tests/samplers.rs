//! The samplers against diffusers 0.42.1 (models/goldens/samplers.json, written by models/make_sampler_goldens.py):
//! `FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler` and `DPMSolverMultistepScheduler` (flow
//! sigmas, flow_prediction, dpmsolver++, order 2), each driven like `StableDiffusion3Pipeline.__call__` drives it.
//!
//! Timesteps and sigmas must be bit-identical. Trajectories come from a fake model with only correctly rounded
//! `f32` operations, so every difference is the sampler's:
//! - Euler and Heun use only `+ - * /` in `f32` in diffusers' order: bit-identical.
//! - DPM-Solver++ takes `log` and `exp` of `f32` scalars (`lambda = log(1 - sigma) - log(sigma)`, `exp(-h)`),
//!   which torch evaluates with vectorised kernels that are sometimes 1 ulp off the correctly rounded value we
//!   compute. The generator records per case whether all of torch's were correctly rounded
//!   (`torch_scalar_math_correctly_rounded`); those cases must be bit-identical. In the others one ulp in a
//!   `log` (about 6e-8 relative) moves `h = lambda_t - lambda_s` by ~1e-6 relative where `h` is small, and the
//!   update coefficients with it; measured 2.4e-7 (2 ulp) at most here, allowed [`DPM_TOLERANCE`] (2e-6 of
//!   `max(1, |x|)`). A wrong formula (first order where diffusers is second order, a missing factor 0.5, a sigma
//!   off by one step) moves samples by 1e-3 or more (see `a_wrong_formula_is_far_outside_the_tolerance`).

mod common;

use common::*;
use sd3_onnx::{FlowMatchConfig, Sampler, SamplerKind};
use serde_json::Value;

/// Allowed DPM-Solver++ trajectory difference, relative to `max(1, |expected|)` (see the module docs).
const DPM_TOLERANCE: f32 = 2e-6;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// The golden's fake transformer, in the same `f32` operations and order as the generator's torch code:
/// `v = 0.7 * x + n * (t / 1000) - 0.05 * (x * x)`.
fn model(x: &[f32], noise: &[f32], t: f32) -> Vec<f32> {
    let tt = t / 1000.0;
    x.iter().zip(noise).map(|(x, n)| 0.7f32 * x + n * tt - 0.05f32 * (x * x)).collect()
}

struct Case {
    name: String,
    kind: SamplerKind,
    config: FlowMatchConfig,
    steps: usize,
    mu: Option<f64>,
    json: Value,
}

fn golden() -> (Vec<f32>, Vec<Case>) {
    let golden = read_json(&repo().join("models/goldens/samplers.json"));
    let noise = floats(&golden["noise"]);
    let cases = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let kind: SamplerKind = c["sampler"].as_str().expect("sampler").parse().expect("sampler name");
            let config = FlowMatchConfig::from_json(&c["config"]).expect("config parses");
            let steps = c["steps"].as_u64().expect("steps") as usize;
            let mu = c["mu"].as_f64();
            let name = format!("{kind} shift {} steps {steps} mu {mu:?}", config.shift);
            Case { name, kind, config, steps, mu, json: c.clone() }
        })
        .collect();
    (noise, cases)
}

/// Runs a case's trajectory through `sampler`, returning the sample after every step.
fn trajectory(sampler: &mut Sampler, start: &[f32], noise: &[f32]) -> Vec<Vec<f32>> {
    let mut x = start.to_vec();
    let mut out = Vec::new();
    while sampler.index() < sampler.len() {
        let v = model(&x, noise, sampler.timesteps()[sampler.index()]);
        sampler.step(&v, &mut x).expect("step");
        out.push(x.clone());
    }
    assert!(sampler.step(&x.clone(), &mut x).is_err(), "a finished run refuses more steps");
    out
}

/// Largest `|a - b| / max(1, |b|)` over two trajectories.
fn max_relative_difference(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max)
}

#[test]
fn schedules_equal_diffusers_bit_for_bit() {
    let (_, cases) = golden();
    assert!(cases.len() >= 20, "expected a broad set of sampler cases");
    for case in &cases {
        let sampler = Sampler::new(case.kind, &case.config, case.steps, case.mu).expect(&case.name);
        assert_eq!(sampler.timesteps(), floats(&case.json["timesteps"]).as_slice(), "timesteps: {}", case.name);
        assert_eq!(sampler.sigmas(), floats(&case.json["sigmas"]).as_slice(), "sigmas: {}", case.name);
        let evaluations = match case.kind {
            SamplerKind::Heun => 2 * case.steps - 1,
            _ => case.steps,
        };
        assert_eq!(sampler.len(), evaluations, "{}", case.name);
        for i in 0..sampler.len() {
            assert_eq!(sampler.sigma(i), sampler.sigmas()[i]);
        }
        assert_eq!(sampler.sigma(sampler.len()), 0.0);
    }
}

#[test]
fn trajectories_equal_diffusers() {
    let (noise, cases) = golden();
    let mut covered = std::collections::BTreeMap::<&str, usize>::new();
    let mut dpm_worst = 0.0f32;
    let mut dpm_exact = 0;
    for case in &cases {
        let mut sampler = Sampler::new(case.kind, &case.config, case.steps, case.mu).expect(&case.name);
        let start = floats(&case.json["latents"]);
        let want: Vec<Vec<f32>> = case.json["trajectory"].as_array().expect("trajectory").iter().map(floats).collect();
        let got = trajectory(&mut sampler, &start, &noise);
        assert_eq!(got.len(), want.len(), "evaluations: {}", case.name);
        match case.kind {
            SamplerKind::DpmSolverPlusPlus2M => {
                if case.json["torch_scalar_math_correctly_rounded"].as_bool().expect("flag") {
                    // torch's log/exp were correctly rounded for every scalar of this run: nothing may differ.
                    assert_eq!(got, want, "{}: trajectory differs from diffusers", case.name);
                    dpm_exact += 1;
                } else {
                    let d = max_relative_difference(&got, &want);
                    assert!(d <= DPM_TOLERANCE, "{}: max relative difference {d:e} > {DPM_TOLERANCE:e}", case.name);
                    dpm_worst = dpm_worst.max(d);
                }
            }
            _ => {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "{}: sample after evaluation {i} differs from diffusers", case.name);
                }
            }
        }
        *covered.entry(case.kind.name()).or_default() += 1;
    }
    eprintln!("DPM-Solver++: {dpm_exact} cases bit-identical, worst relative difference elsewhere {dpm_worst:e}");
    assert!(dpm_exact >= 4, "most DPM-Solver++ cases are checked bit for bit");
    assert!(covered["heun"] >= 8 && covered["dpmpp_2m"] >= 8 && covered["euler"] >= 3, "{covered:?}");
    let dynamic = cases.iter().filter(|c| c.config.use_dynamic_shifting && c.kind == SamplerKind::DpmSolverPlusPlus2M);
    assert!(dynamic.count() >= 2, "dynamic shifting covered for dpmpp_2m");
}

#[test]
fn a_wrong_formula_is_far_outside_the_tolerance() {
    // The DPM tolerance is only meaningful if plausible mistakes land well outside it. With flow sigmas
    // (alpha = 1 - sigma) DPM-Solver++'s first-order update is exactly Euler's `x + (sigma_t - sigma_s) * v`, so
    // Euler on the DPM sigmas is "first order everywhere": it must be far from diffusers' 2M trajectory.
    let (noise, cases) = golden();
    let case = cases
        .iter()
        .find(|c| c.kind == SamplerKind::DpmSolverPlusPlus2M && c.steps == 10 && !c.config.use_dynamic_shifting)
        .expect("dpmpp_2m 10-step case");
    let want: Vec<Vec<f32>> = case.json["trajectory"].as_array().unwrap().iter().map(floats).collect();
    let sigmas = floats(&case.json["sigmas"]);
    let timesteps = floats(&case.json["timesteps"]);
    let mut x = floats(&case.json["latents"]);
    let mut euler = Vec::new();
    for (i, t) in timesteps.iter().enumerate() {
        let v = model(&x, &noise, *t);
        sd3_onnx::scheduler::euler_step(&mut x, &v, sigmas[i], sigmas[i + 1]);
        euler.push(x.clone());
    }
    let d = max_relative_difference(&euler, &want);
    assert!(d > 1000.0 * DPM_TOLERANCE, "first-order stand-in only {d:e} away");
}
