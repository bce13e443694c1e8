use image::{GrayImage, Luma, Rgb, RgbImage};
use ndarray::Array4;

use super::*;

#[test]
fn start_step_truncates_like_python() {
    assert_eq!(start_step(8, 0.6), 3); // 8 - 4.8 = 3.2
    assert_eq!(start_step(10, 0.3), 7); // 10 * 0.3 = 3.0 in f64
    assert_eq!(start_step(25, 0.56), 10); // 25 * 0.56 = 14.000000000000002: 10.999999999999998 -> 10
    assert_eq!(start_step(28, 1.0), 0);
    assert_eq!(start_step(28, 1.5), 0);
    assert_eq!(start_step(4, 0.0), 4);
}

#[test]
fn image_is_scaled_to_minus_one_one() {
    let mut img = RgbImage::new(2, 1);
    img.put_pixel(0, 0, Rgb([0, 255, 128]));
    let mut w = Vec::new();
    let t = image_tensor(&img, 2, 1, "init_image", &mut w);
    assert!(w.is_empty());
    assert_eq!(t[[0, 0, 0, 0]], -1.0);
    assert_eq!(t[[0, 1, 0, 0]], 1.0);
    assert_eq!(t[[0, 2, 0, 0]], 2.0 * (128.0f32 / 255.0) - 1.0);
    let t = image_tensor(&img, 4, 2, "init_image", &mut w);
    assert_eq!(t.shape(), &[1, 3, 2, 4]);
    assert!(matches!(w[0], Warning::InputResized { input: "init_image", from: (2, 1), to: (4, 2) }));
}

#[test]
fn mask_is_binarised_and_sampled_nearest() {
    // 16x8 pixels, factor 8 -> 2x1 latents; pixel (8, 0) decides latent (1, 0).
    let mut m = GrayImage::from_pixel(16, 8, Luma([0]));
    m.put_pixel(8, 0, Luma([128])); // 128 / 255 >= 0.5
    m.put_pixel(0, 0, Luma([127])); // 127 / 255 < 0.5
    m.put_pixel(1, 1, Luma([255])); // not a sampled pixel
    let t = mask_tensor(&m, 16, 8, 8, &mut Vec::new());
    assert_eq!(t.shape(), &[1, 1, 1, 2]);
    assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![0.0, 1.0]);
}

#[test]
fn posterior_sample_uses_mean_and_clamped_logvar() {
    let mut p = Array4::<f32>::zeros((1, 2, 1, 2));
    p[[0, 0, 0, 0]] = 1.0;
    p[[0, 1, 0, 0]] = (4.0f32).ln() * 2.0; // std 4
    p[[0, 1, 0, 1]] = 100.0; // clamped to 20: std e^10
    let eps = Array4::from_elem((1, 1, 1, 2), 0.5f32);
    let s = sample_posterior(p.view(), &eps).unwrap();
    assert!((s[[0, 0, 0, 0]] - 3.0).abs() < 1e-6);
    assert!((s[[0, 0, 0, 1]] - 0.5 * 10f32.exp()).abs() < 1.0);
    assert!(sample_posterior(p.view(), &Array4::zeros((1, 2, 1, 2))).is_err());
}

#[test]
fn blend_keeps_unmasked_latents_from_the_reference() {
    let mut x = vec![1.0, 2.0, 3.0, 4.0]; // 2 channels x 2 pixels
    blend_known(&mut x, &[10.0, 20.0, 30.0, 40.0], &[0.0, 1.0]);
    assert_eq!(x, vec![10.0, 2.0, 30.0, 4.0]);
    let mut out = vec![0.0; 2];
    scale_noise(&[1.0, 1.0], &[3.0, -1.0], 0.25, &mut out);
    assert_eq!(out, vec![0.25 * 3.0 + 0.75, -0.25 + 0.75]);
}
