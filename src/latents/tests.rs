use super::*;

#[test]
fn matches_torch_manual_seed_42() {
    // torch.randn(64, generator=torch.Generator("cpu").manual_seed(42))[:4] (torch 2.8.0)
    let mut v = [0f32; 64];
    NoiseGenerator::new(42).fill_normal(&mut v);
    for (got, want) in v[..4].iter().zip([1.9269153f32, 1.4872841, 0.9007172, -2.105521]) {
        assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
    }
}

#[test]
fn noise_is_deterministic_and_standard() {
    let a = NoiseGenerator::new(7).latents([1, 4, 16, 16]);
    let b = NoiseGenerator::new(7).latents([1, 4, 16, 16]);
    let c = NoiseGenerator::new(8).latents([1, 4, 16, 16]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n = a.len() as f32;
    let mean = a.sum() / n;
    let var = a.mapv(|v| (v - mean) * (v - mean)).sum() / n;
    assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
}

#[test]
fn npy_round_trip_and_errors() {
    let dir = std::env::temp_dir().join(format!("sd3-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("a.npy");
    let a = ArrayD::from_shape_vec(IxDyn(&[1, 2, 3]), (0..6).map(|v| v as f32 * 0.5).collect()).unwrap();
    write_npy_f32(&p, &a).unwrap();
    assert_eq!(read_npy_f32(&p).unwrap(), a);
    assert!(parse_npy_f32(b"garbage").is_err());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.pop();
    assert!(parse_npy_f32(&bytes).unwrap_err().to_string().contains("data bytes"));
    let mut f8 = std::fs::read(&p).unwrap();
    let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
    f8[at + 2] = b'8';
    assert!(parse_npy_f32(&f8).unwrap_err().to_string().contains("float32"));
}

#[test]
fn box_muller_with_and_without_hardware_fma_gives_the_same_bits() {
    // The run-time dispatch (hardware FMA where the CPU has it) against the code compiled for the build's baseline
    // target (libm's software fmaf on x86-64): every fused multiply-add is rounded once either way.
    let mut uniforms = vec![0f32; 16 * 4096];
    let mut g = NoiseGenerator::new(1234);
    for v in uniforms.iter_mut() {
        *v = g.uniform();
    }
    // the edges of (0, 1]: 1 - u reaches 2^-24 and 1, the angle 0 and just below 2 pi
    uniforms[..4].copy_from_slice(&[0.0, 1.0 - f32::EPSILON / 2.0, 0.5, 0.999_999_9]);
    let mut dispatched = uniforms.clone();
    box_muller_blocks(&mut dispatched);
    let mut plain = uniforms;
    box_muller_blocks_plain(&mut plain);
    let differ = dispatched.iter().zip(&plain).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} values differ", plain.len());
}
