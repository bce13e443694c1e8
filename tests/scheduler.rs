//! Sigmas and timesteps equal diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` output, bit for bit,
//! for many step counts, shifts and dynamic-shifting `mu` values (models/goldens/scheduler.json, written by
//! models/make_fixtures.py from diffusers 0.42.1). Exact equality: a sigma off by one ulp is a different image
//! only in theory, but an off-by-one in the shift formula or a float32/float64 mix-up shows here at once.

mod common;

use common::*;
use sd3_onnx::FlowMatchConfig;

#[test]
fn schedules_equal_diffusers_bit_for_bit() {
    let golden = read_json(&repo().join("models/goldens/scheduler.json"));
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 20, "expected a broad set of scheduler cases");
    let mut shifts = std::collections::BTreeSet::new();
    let mut dynamic = 0;
    for case in cases {
        let config = FlowMatchConfig::from_json(&case["config"]).expect("config parses");
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mu = case["mu"].as_f64();
        let schedule = config.schedule(steps, mu).expect("schedule");
        let want_sigmas: Vec<f32> =
            case["sigmas"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let want_timesteps: Vec<f32> =
            case["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(schedule.sigmas, want_sigmas, "sigmas: shift {} steps {steps} mu {mu:?}", config.shift);
        assert_eq!(schedule.timesteps, want_timesteps, "timesteps: shift {} steps {steps} mu {mu:?}", config.shift);
        shifts.insert((config.shift * 1000.0) as i64);
        dynamic += usize::from(config.use_dynamic_shifting);
    }
    assert!(shifts.len() >= 3, "several shifts covered: {shifts:?}");
    assert!(dynamic >= 2, "dynamic shifting covered");
}

#[test]
fn a_wrong_shift_would_be_caught() {
    // The check above is only worth something if nearby configurations give different numbers.
    let a = FlowMatchConfig::from_json(&serde_json::json!({"shift": 3.0})).unwrap().schedule(28, None).unwrap();
    let b = FlowMatchConfig::from_json(&serde_json::json!({"shift": 3.1})).unwrap().schedule(28, None).unwrap();
    assert_ne!(a.sigmas, b.sigmas);
}
