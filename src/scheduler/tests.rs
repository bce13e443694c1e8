use super::*;

#[test]
fn linspace_matches_numpy_endpoints() {
    let v = linspace(1000.0, 1.0, 4);
    assert_eq!(v, vec![1000.0, 667.0, 334.0, 1.0]);
    assert_eq!(linspace(3.0, 5.0, 1), vec![3.0]);
}

#[test]
fn zero_steps_is_an_error() {
    assert!(FlowMatchConfig::default().schedule(0, None).is_err());
}

#[test]
fn sigmas_end_at_zero_and_timesteps_scale() {
    let c = FlowMatchConfig { shift: 3.0, ..Default::default() };
    let s = c.schedule(28, None).unwrap();
    assert_eq!(s.sigmas.len(), 29);
    assert_eq!(s.sigmas[0], 1.0);
    assert_eq!(*s.sigmas.last().unwrap(), 0.0);
    for (t, sg) in s.timesteps.iter().zip(&s.sigmas) {
        assert_eq!(*t, sg * 1000.0);
    }
    assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
}

#[test]
fn euler_and_guidance_formulas() {
    let mut x = vec![1.0f32, 2.0];
    euler_step(&mut x, &[0.5, -1.0], 0.75, 0.25);
    assert_eq!(x, vec![0.75, 2.5]);
    let mut c = vec![2.0f32];
    apply_guidance(&mut c, &[1.0], 7.0);
    assert_eq!(c, vec![8.0]);
}

#[test]
fn training_shift_rounds_shift_minus_one_from_f64_like_torch() {
    // torch (FlowMatchEulerDiscreteScheduler.__init__) rounds the Python floats `shift` and `shift - 1` to f32
    // separately: for 2.07, f32(1.07) + 1 is not f32(2.07), so sigma_max is 0.9999999 (1 - 2^-23) and the first
    // timestep 999.99994 (models/goldens/samplers.json, euler shift 2.07).
    assert_eq!(shift_f32(2.07, 1.0), 0.999_999_9); // 1 - 2^-23
    assert_eq!(shift_f32(3.0, 1.0), 1.0);
    let c = FlowMatchConfig { shift: 2.07, ..Default::default() };
    assert_eq!(c.schedule(4, None).unwrap().timesteps[0], 999.999_94);
}
