//! Our code on the host around the graphs, at full image sizes: the decoded image (`[1, 3, H, W]` float32 in
//! [-1, 1]) to 8-bit RGB, as `Sd3Pipeline::decode` does after the VAE decoder (`sd3_onnx::imageio::batch_to_rgb`),
//! beside the per-value indexing it replaced (issue 19: our time outside ONNX Runtime). Prints a table.
//!
//! ```text
//! cargo bench --bench host_conversions            # RUNS=N (default 15) runs per row, alternating
//! ```

use std::time::Instant;

use sd3_onnx::image::RgbImage;
use sd3_onnx::ndarray::{Array4, ArrayView3, Axis};

/// The implementation before 2026-12-03: `chw[[c, y, x]]` per value, `round_ties_even`.
fn per_value(chw: ArrayView3<'_, f32>) -> RgbImage {
    let (_, h, w) = chw.dim();
    let mut img = RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (xi, yi) = (x as usize, y as usize);
        for ch in 0..3 {
            let v = (chw[[ch, yi, xi]] / 2.0 + 0.5).clamp(0.0, 1.0);
            px[ch] = (v * 255.0).round_ties_even() as u8;
        }
    }
    img
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(15).max(1);
    println!("| image | batch_to_rgb ms (median) | per-value indexing ms (median) | same bytes |");
    println!("|---|---:|---:|---|");
    for side in [512usize, 1024, 2048] {
        let n = 3 * side * side;
        let data: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1.05).collect();
        let Ok(a) = Array4::from_shape_vec((1, 3, side, side), data) else { return };
        let (mut new, mut old, mut same) = (Vec::new(), Vec::new(), true);
        for _ in 0..runs {
            let t = Instant::now();
            let Ok(images) = sd3_onnx::imageio::batch_to_rgb(a.view()) else { return };
            new.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let reference = per_value(a.index_axis(Axis(0), 0));
            old.push(t.elapsed().as_secs_f64() * 1e3);
            same &= images.first().map(|i| i.as_raw() == reference.as_raw()).unwrap_or(false);
        }
        println!("| {side}x{side} | {:.2} | {:.2} | {same} |", median(new), median(old));
    }
}
