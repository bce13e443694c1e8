use super::*;

fn sd3() -> FlowMatchConfig {
    FlowMatchConfig { shift: 3.0, ..Default::default() }
}

fn dynamic() -> FlowMatchConfig {
    FlowMatchConfig { use_dynamic_shifting: true, ..sd3() }
}

/// Runs a whole trajectory with a velocity that depends on the sample and the timestep.
fn run(sampler: &mut Sampler, x: &mut [f32]) {
    while sampler.index() < sampler.len() {
        let t = sampler.timesteps()[sampler.index()];
        let v: Vec<f32> = x.iter().map(|x| 0.7 * x + (t / 1000.0) - 0.05 * x * x).collect();
        sampler.step(&v, x).unwrap();
    }
}

fn start() -> Vec<f32> {
    (0..24).map(|i| ((i as f32) * 0.37).sin() * 1.5).collect()
}

#[test]
fn names_round_trip_and_unknown_names_list_the_valid_ones() {
    for kind in SamplerKind::ALL {
        assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.name());
    }
    assert_eq!(["euler", "heun", "dpmpp_2m"], SamplerKind::ALL.map(|k| k.name()));
    assert_eq!("dpm++2m".parse::<SamplerKind>().unwrap(), SamplerKind::DpmSolverPlusPlus2M);
    assert_eq!(" Heun ".parse::<SamplerKind>().unwrap(), SamplerKind::Heun);
    assert_eq!(SamplerKind::default(), SamplerKind::Euler);
    let message = "ddim".parse::<SamplerKind>().unwrap_err().to_string();
    for name in ["ddim", "euler", "heun", "dpmpp_2m", "dpm++2m"] {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn heun_evaluates_twice_per_step_but_the_last() {
    for steps in [1, 2, 3, 28] {
        let s = Sampler::new(SamplerKind::Heun, &sd3(), steps, None).unwrap();
        let base = sd3().schedule(steps, None).unwrap();
        assert_eq!(s.len(), 2 * steps - 1);
        assert_eq!(s.sigmas().len(), 2 * steps);
        assert_eq!(s.timesteps()[0], base.timesteps[0]);
        for k in 1..steps {
            assert_eq!(s.timesteps()[2 * k - 1], base.timesteps[k]);
            assert_eq!(s.timesteps()[2 * k], base.timesteps[k]);
            assert_eq!(s.sigmas()[2 * k - 1], base.sigmas[k]);
            assert_eq!(s.sigmas()[2 * k], base.sigmas[k]);
        }
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert_eq!(s.sigma(s.len()), 0.0);
        assert_eq!(s.sigma(usize::MAX), 0.0);
    }
}

#[test]
fn euler_sampler_is_schedule_plus_euler_step() {
    for config in [sd3(), FlowMatchConfig { shift_terminal: Some(0.1), ..sd3() }] {
        let schedule = config.schedule(10, None).unwrap();
        let mut sampler = Sampler::new(SamplerKind::Euler, &config, 10, None).unwrap();
        assert_eq!(sampler.timesteps(), schedule.timesteps.as_slice());
        assert_eq!(sampler.sigmas(), schedule.sigmas.as_slice());
        let (mut a, mut b) = (start(), start());
        for i in 0..schedule.len() {
            let t = schedule.timesteps[i];
            let uncond: Vec<f32> = a.iter().map(|x| 0.5 * x - t / 1000.0).collect();
            let cond: Vec<f32> = a.iter().map(|x| 0.7 * x + t / 1000.0).collect();
            let mut guided = cond.clone();
            apply_guidance_for_test(&mut guided, &uncond, 4.5);
            sampler.step(&guided, &mut a).unwrap();
            euler_step(&mut b, &guided, schedule.sigmas[i], schedule.sigmas[i + 1]);
            assert_eq!(a, b);
        }
    }
}

fn apply_guidance_for_test(cond: &mut [f32], uncond: &[f32], g: f32) {
    crate::scheduler::apply_guidance(cond, uncond, g);
}

#[test]
fn euler_with_dynamic_shifting_is_the_dynamic_schedule() {
    let s = Sampler::new(SamplerKind::Euler, &dynamic(), 8, Some(0.9)).unwrap();
    assert_eq!(s.sigmas(), dynamic().schedule(8, Some(0.9)).unwrap().sigmas.as_slice());
}

#[test]
fn heun_second_half_averages_the_two_derivatives() {
    // Constant velocities: the first half sees 2.0, the second 4.0, so the step uses their mean 3.0 from the
    // kept sample over the whole dt (not the predicted sample, not either derivative alone).
    let mut s = Sampler::new(SamplerKind::Heun, &sd3(), 3, None).unwrap();
    let (s0, s1) = (s.sigmas()[0], s.sigmas()[1]);
    let mut x = vec![0.25f32; 4];
    s.step(&[2.0; 4], &mut x).unwrap();
    let predicted = 0.25 + 2.0 * (s1 - s0);
    assert!((x[0] - predicted).abs() < 1e-6, "{} vs {predicted}", x[0]);
    s.step(&[4.0; 4], &mut x).unwrap();
    let corrected = 0.25 + 3.0 * (s1 - s0);
    assert!((x[0] - corrected).abs() < 1e-6, "{} vs {corrected}", x[0]);
    // The last evaluation is a plain first-order step to sigma 0.
    s.step(&[1.0; 4], &mut x).unwrap();
    s.step(&[1.0; 4], &mut x).unwrap();
    let before = x[0];
    let sigma = s.sigma(4);
    s.step(&[1.0; 4], &mut x).unwrap();
    assert!((x[0] - (before - sigma)).abs() < 1e-6);
    assert_eq!(s.index(), s.len());
}

#[test]
fn dpm_first_order_is_euler_and_the_middle_steps_are_second_order() {
    // With alpha = 1 - sigma the DPM-Solver++ first-order update equals Euler's x + (sigma_t - sigma_s) * v, up to
    // rounding; the steps between the first and the last use the previous x0 and differ from it.
    let mut s = Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &sd3(), 4, None).unwrap();
    let sig = s.sigmas().to_vec();
    let mut x = start();
    for i in 0..4 {
        let t = s.timesteps()[i];
        let v: Vec<f32> = x.iter().map(|x| 0.7 * x + (t / 1000.0) - 0.05 * x * x).collect();
        let mut e = x.clone();
        euler_step(&mut e, &v, sig[i], sig[i + 1]);
        s.step(&v, &mut x).unwrap();
        let diff = x.iter().zip(&e).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        if i == 0 || i == 3 {
            assert!(diff < 1e-5, "step {i} is first order: {diff}");
        } else {
            assert!(diff > 1e-4, "step {i} is second order: {diff}");
        }
    }
}

#[test]
fn dpm_schedule_starts_below_one_and_truncates_timesteps() {
    let s = Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &sd3(), 4, None).unwrap();
    // diffusers 0.42.1 (and 0.35.2): timesteps [999, 899, 749, 499], sigmas[0] = shift(0.999) = 0.99966645.
    assert_eq!(s.timesteps(), &[999.0, 899.0, 749.0, 499.0]);
    assert_eq!(s.sigmas()[0], 0.999_666_45);
    assert_eq!(s.sigmas().len(), 5);
    assert_eq!(s.sigmas()[4], 0.0);
    for (t, sg) in s.timesteps().iter().zip(s.sigmas()) {
        assert_eq!(t.fract(), 0.0);
        assert!(*t <= sg * 1000.0 && sg * 1000.0 < t + 1.0);
    }
}

#[test]
fn dpm_dynamic_shifting_is_flow_shift_exp_mu() {
    let mu = 0.8f64;
    let dynamic = Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &dynamic(), 9, Some(mu)).unwrap();
    let fixed = FlowMatchConfig { shift: mu.exp(), ..Default::default() };
    let fixed = Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &fixed, 9, None).unwrap();
    assert_eq!(dynamic.sigmas(), fixed.sigmas());
    assert_eq!(dynamic.timesteps(), fixed.timesteps());
    let static_shift = Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &sd3(), 9, None).unwrap();
    assert_ne!(dynamic.sigmas(), static_shift.sigmas());
}

#[test]
fn bad_step_counts_and_configs_are_errors() {
    for kind in SamplerKind::ALL {
        assert!(Sampler::new(kind, &sd3(), 0, None).is_err(), "{kind}: 0 steps");
        assert!(Sampler::new(kind, &sd3(), 1001, None).is_err(), "{kind}: more steps than training timesteps");
        assert!(Sampler::new(kind, &sd3(), 1000, None).is_ok(), "{kind}: 1000 steps");
        assert!(Sampler::new(kind, &dynamic(), 4, None).is_err(), "{kind}: dynamic shifting without mu");
        assert!(Sampler::new(kind, &dynamic(), 4, Some(f64::NAN)).is_err(), "{kind}: NaN mu");
        for shift in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Sampler::new(kind, &FlowMatchConfig { shift, ..sd3() }, 4, None).is_err(), "{kind}: {shift}");
        }
        for n in [0, usize::MAX] {
            let c = FlowMatchConfig { num_train_timesteps: n, ..sd3() };
            assert!(Sampler::new(kind, &c, 4, None).is_err(), "{kind}: num_train_timesteps {n}");
        }
        assert!(Sampler::new(kind, &sd3(), usize::MAX, None).is_err());
    }
    // mu is ignored without dynamic shifting, as FlowMatchConfig::schedule does.
    assert!(Sampler::new(SamplerKind::Heun, &sd3(), 4, Some(1.0)).is_ok());
}

#[test]
fn unsupported_options_say_what_to_change() {
    let heun = SamplerKind::Heun;
    let dpm = SamplerKind::DpmSolverPlusPlus2M;
    let terminal = FlowMatchConfig { shift_terminal: Some(0.1), ..sd3() };
    let inverted = FlowMatchConfig { invert_sigmas: true, ..sd3() };
    let linear = FlowMatchConfig { time_shift_type: TimeShiftType::Linear, ..dynamic() };
    let cases: [(SamplerKind, &FlowMatchConfig, &str); 6] = [
        (heun, &dynamic(), "use_dynamic_shifting"),
        (heun, &terminal, "shift_terminal"),
        (heun, &inverted, "invert_sigmas"),
        (dpm, &terminal, "shift_terminal"),
        (dpm, &inverted, "invert_sigmas"),
        (dpm, &linear, "time_shift_type"),
    ];
    for (kind, config, setting) in cases {
        let e = Sampler::new(kind, config, 4, Some(0.9)).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.contains(setting) && message.contains("euler"), "{kind}: {message}");
    }
    // Euler honours all of them; shift_terminal 0 means "off" as in diffusers (`if self.config.shift_terminal:`).
    for config in [dynamic(), terminal, inverted, linear] {
        assert!(Sampler::new(SamplerKind::Euler, &config, 4, Some(0.9)).is_ok());
    }
    let zero_terminal = FlowMatchConfig { shift_terminal: Some(0.0), ..sd3() };
    assert!(Sampler::new(heun, &zero_terminal, 4, None).is_ok());
    assert!(Sampler::new(dpm, &dynamic(), 4, Some(0.9)).is_ok());
}

#[test]
fn step_rejects_bad_lengths_and_extra_steps_without_changing_anything() {
    for kind in SamplerKind::ALL {
        let mut s = Sampler::new(kind, &sd3(), 2, None).unwrap();
        let mut x = vec![1.0f32; 8];
        assert!(s.step(&[0.5; 7], &mut x).is_err());
        assert_eq!((s.index(), x.as_slice()), (0, [1.0f32; 8].as_slice()));
        s.step(&[0.5; 8], &mut x).unwrap();
        let mut shorter = vec![1.0f32; 4];
        assert!(s.step(&[0.5; 4], &mut shorter).is_err(), "{kind}: the length must not change mid-run");
        assert_eq!(s.index(), 1);
        run(&mut s, &mut x);
        let done = x.clone();
        assert!(s.step(&[0.5; 8], &mut x).is_err(), "{kind}: no step after the last");
        assert_eq!(x, done);
        assert_eq!(s.index(), s.len());
        assert!(!s.is_empty());
        assert_eq!(s.kind(), kind);
    }
}

#[test]
fn samplers_are_deterministic_and_clone_mid_run() {
    for kind in SamplerKind::ALL {
        let mut a = Sampler::new(kind, &sd3(), 5, None).unwrap();
        let mut x = start();
        let v = vec![0.3f32; x.len()];
        a.step(&v, &mut x).unwrap();
        let mut b = a.clone();
        let mut y = x.clone();
        run(&mut a, &mut x);
        run(&mut b, &mut y);
        assert_eq!(x, y);
        assert!(x.iter().all(|v| v.is_finite()));
    }
}

/// `Sampler::advance` (the device loop's scalars) applied with the formulas of src/runtime/step.rs gives the
/// trajectory of `Sampler::step` to the bit, for every sampler, also over a truncated Euler schedule.
#[test]
fn advance_reproduces_step() {
    let truncated = Sampler::euler(sd3().schedule(10, None).unwrap().skip(4));
    let samplers = [
        Sampler::new(SamplerKind::Euler, &sd3(), 7, None).unwrap(),
        Sampler::new(SamplerKind::Heun, &sd3(), 7, None).unwrap(),
        Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &sd3(), 7, None).unwrap(),
        Sampler::new(SamplerKind::DpmSolverPlusPlus2M, &dynamic(), 5, Some(0.8)).unwrap(),
        truncated,
    ];
    for reference in samplers {
        let mut stepped = reference.clone();
        let mut advanced = reference.clone();
        let mut x = start();
        let mut y = start();
        let (mut d1, mut saved, mut prev_x0) = (Vec::new(), Vec::new(), Vec::new());
        while stepped.index() < stepped.len() {
            let t = stepped.timesteps()[stepped.index()];
            let v: Vec<f32> = x.iter().map(|x| 0.7 * x + (t / 1000.0) - 0.05 * x * x).collect();
            stepped.step(&v, &mut x).unwrap();
            let w: Vec<f32> = y.iter().map(|y| 0.7 * y + (t / 1000.0) - 0.05 * y * y).collect();
            match advanced.advance().unwrap() {
                StepScalars::Euler { dt } => y.iter_mut().zip(&w).for_each(|(y, v)| *y += dt * v),
                StepScalars::HeunFirst { sigma, sigma_hat, dt } => {
                    saved = y.clone();
                    d1 = y.iter().zip(&w).map(|(y, v)| (y - (y - v * sigma)) / sigma_hat).collect();
                    y.iter_mut().zip(&d1).for_each(|(y, d)| *y += d * dt);
                }
                StepScalars::HeunSecond { sigma_next, dt } => {
                    for (((y, v), d1), s) in y.iter_mut().zip(&w).zip(&d1).zip(&saved) {
                        let d = 0.5 * (d1 + (*y - (*y - v * sigma_next)) / sigma_next);
                        *y = s + d * dt;
                    }
                }
                StepScalars::DpmFirst { sigma, ratio, coef } => {
                    let x0: Vec<f32> = y.iter().zip(&w).map(|(y, v)| y - sigma * v).collect();
                    y.iter_mut().zip(&x0).for_each(|(y, m)| *y = ratio * *y - coef * m);
                    prev_x0 = x0;
                }
                StepScalars::DpmSecond { sigma, inv_r0, ratio, coef, half_coef } => {
                    let x0: Vec<f32> = y.iter().zip(&w).map(|(y, v)| y - sigma * v).collect();
                    for ((y, m0), m1) in y.iter_mut().zip(&x0).zip(&prev_x0) {
                        *y = ratio * *y - coef * m0 - half_coef * (inv_r0 * (m0 - m1));
                    }
                    prev_x0 = x0;
                }
            }
            assert_eq!(x, y, "{} evaluation {}", reference.kind(), stepped.index() - 1);
        }
        assert_eq!(advanced.index(), advanced.len());
        assert!(advanced.advance().is_err(), "a complete run has nothing to advance");
    }
}
