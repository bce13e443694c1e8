//! The Rust Canny (`sd3_onnx::controlnet::canny_gray`) against OpenCV's `cv2.Canny` (goldens:
//! models/make_canny_goldens.py): the share of pixels whose edge / no-edge value differs, per image and threshold
//! pair, must stay under `MAX_DIFFERING` (the measured shares are printed; see docs/controlnet.md).

mod common;

use common::*;
use sd3_onnx::controlnet::{canny, canny_gray, rgb_to_gray};

/// At most this share of pixels may differ from cv2.Canny in any case: none (integer arithmetic as OpenCV's; all
/// nine cases measured identical).
const MAX_DIFFERING: f64 = 0.0;

fn gray(path: &std::path::Path) -> image::GrayImage {
    image::open(path).unwrap().to_luma8()
}

#[test]
fn canny_matches_opencv() {
    let dir = repo().join("models/goldens/canny");
    let summary = read_json(&dir.join("summary.json"));
    let mut worst: f64 = 0.0;
    for case in summary["cases"].as_array().unwrap() {
        let input = gray(&dir.join(case["image"].as_str().unwrap()));
        let want = gray(&dir.join(case["edges"].as_str().unwrap()));
        let (low, high) = (case["low"].as_f64().unwrap() as f32, case["high"].as_f64().unwrap() as f32);
        let got = canny_gray(&input, low, high);
        let differ = got.pixels().zip(want.pixels()).filter(|(a, b)| a.0 != b.0).count();
        let edges = want.pixels().filter(|p| p.0[0] > 0).count();
        let share = differ as f64 / want.len() as f64;
        eprintln!(
            "{} {low},{high}: {differ} of {} pixels differ ({:.4}%), OpenCV has {edges} edge pixels",
            case["image"],
            want.len(),
            100.0 * share
        );
        assert!(edges > 0, "the case has no edges: it tests nothing");
        worst = worst.max(share);
    }
    eprintln!("worst share of differing pixels: {:.4}%", 100.0 * worst);
    assert!(worst <= MAX_DIFFERING, "{:.4}% of pixels differ from cv2.Canny", 100.0 * worst);
}

#[test]
fn rgb_to_gray_matches_opencv_and_canny_is_three_channel() {
    let dir = repo().join("models/goldens/canny");
    let rgb = load_png(&repo().join("models/goldens/tiny-sd3/cfg_negative/diffusers.png"));
    let want = gray(&dir.join("rgb_gray.png"));
    assert_eq!(rgb_to_gray(&rgb), want);
    let edges = canny(&rgb, 100.0, 200.0);
    assert!(edges.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    assert!(edges.pixels().any(|p| p.0[0] == 255));
}
