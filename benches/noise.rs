//! The starting latents' noise on the host: `NoiseGenerator::latents` (torch's CPU `randn`, bit for bit) at the
//! latent sizes of 512, 1024 and 2048 pixel images with 16 latent channels (SD3's VAE), as the pipeline draws them
//! before the first step (issue 19: our time outside ONNX Runtime). Prints a table.
//!
//! ```text
//! cargo bench --bench noise            # RUNS=N (default 15) runs per row
//! ```

use std::time::Instant;

use sd3_onnx::latents::NoiseGenerator;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(15).max(1);
    println!("| image | latents | values | ms (median of {runs}) | ns per value | checksum |");
    println!("|---|---|---:|---:|---:|---:|");
    for side in [512usize, 1024, 2048] {
        let shape = [1, 16, side / 8, side / 8];
        let n: usize = shape.iter().product();
        let mut times = Vec::with_capacity(runs);
        let mut checksum = 0.0f64;
        for _ in 0..runs {
            let t = Instant::now();
            let a = NoiseGenerator::new(42).latents(shape);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            checksum = a.iter().map(|v| f64::from(*v)).sum();
        }
        let ms = median(times);
        println!("| {side}x{side} | {:?} | {n} | {ms:.3} | {:.1} | {checksum:.6} |", shape, ms * 1e6 / n as f64);
    }
}
