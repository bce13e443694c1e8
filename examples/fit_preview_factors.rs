//! Fits a model's latent-to-RGB preview factors and writes `vae_decoder/latent_rgb_factors.json`.
//!
//! ```text
//! cargo run --release --example fit_preview_factors -- --model models/sd3-nano \
//!     --prompts models/nano/eval_prompts.json --samples 48 [--steps 28] [--write]
//! ```
//!
//! For each prompt it generates the final latents (`Sd3Pipeline::denoise`, the model space the transformer works
//! in, what previews map) and decodes them with the model's VAE (`Sd3Pipeline::decode`). Each latent pixel's
//! target is the mean colour of the `f` x `f` block of the decoded image it decodes to, mapped to [-1, 1] (a
//! preview shows `(rgb + 1) / 2`). A least-squares fit (normal equations in f64, with a bias column) gives one
//! `[r, g, b]` row per latent channel and a bias. The fit's error on held-out samples (every fourth) is printed
//! next to the error of SD3's factors on the same samples. `--write` stores the factors in the model folder,
//! where [`LatentRgbFactors::for_model`](sd3_onnx::preview::LatentRgbFactors::for_model) finds them.
//!
//! `--prompts` takes a json list of strings or of objects with a `"prompt"` field, or a text file with one
//! prompt per line; samples cycle through it, each with its own seed (0, 1, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ndarray::{Array4, Axis};
use sd3_onnx::preview::{LatentRgbFactors, FACTORS_FILE};
use sd3_onnx::{Component, Sd3Pipeline};

/// Fits latent-to-RGB preview factors for a model from decoded samples.
#[derive(Parser, Debug)]
#[command(name = "fit_preview_factors", version)]
struct Args {
    /// Model folder
    #[arg(long)]
    model: PathBuf,
    /// Prompts: a json list (strings or objects with "prompt"), or a text file with one prompt per line
    #[arg(long)]
    prompts: PathBuf,
    /// Samples to generate
    #[arg(long, default_value_t = 48)]
    samples: usize,
    /// Denoising steps per sample [default: the model's own]
    #[arg(long)]
    steps: Option<usize>,
    /// Write vae_decoder/latent_rgb_factors.json into the model folder
    #[arg(long)]
    write: bool,
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts: Vec<String> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().or_else(|| v.get("prompt").and_then(|p| p.as_str())).map(str::to_string))
            .collect(),
        _ => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
    };
    if prompts.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(prompts)
}

/// Rows `[latent channels..., 1]` and targets `[r, g, b]` in [-1, 1] of one sample.
fn sample_rows(latents: &Array4<f32>, image: &sd3_onnx::image::RgbImage, rows: &mut Vec<(Vec<f64>, [f64; 3])>) {
    let (c, h, w) = (latents.shape()[1], latents.shape()[2], latents.shape()[3]);
    let f = image.width() as usize / w;
    let l = latents.index_axis(Axis(0), 0);
    for y in 0..h {
        for x in 0..w {
            let mut target = [0f64; 3];
            for dy in 0..f {
                for dx in 0..f {
                    let p = image.get_pixel((x * f + dx) as u32, (y * f + dy) as u32).0;
                    for k in 0..3 {
                        target[k] += f64::from(p[k]);
                    }
                }
            }
            let target = target.map(|v| v / (f * f) as f64 / 255.0 * 2.0 - 1.0);
            let mut row: Vec<f64> = (0..c).map(|ch| f64::from(l[[ch, y, x]])).collect();
            row.push(1.0);
            rows.push((row, target));
        }
    }
}

/// Least squares `X b = Y` through the normal equations (a tiny ridge keeps them well posed), solved by Gaussian
/// elimination with partial pivoting. Returns one `[r, g, b]` per column of `X`.
fn fit(rows: &[(Vec<f64>, [f64; 3])]) -> Vec<[f64; 3]> {
    let n = rows[0].0.len();
    let mut a = vec![vec![0f64; n + 3]; n];
    for (x, y) in rows {
        for i in 0..n {
            for j in 0..n {
                a[i][j] += x[i] * x[j];
            }
            for k in 0..3 {
                a[i][n + k] += x[i] * y[k];
            }
        }
    }
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += 1e-6 * rows.len() as f64;
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        for r in 0..n {
            if r != col {
                let factor = a[r][col] / a[col][col];
                let pivot_row = a[col].clone();
                for (v, p) in a[r].iter_mut().zip(&pivot_row).skip(col) {
                    *v -= factor * p;
                }
            }
        }
    }
    (0..n).map(|i| [a[i][n] / a[i][i], a[i][n + 1] / a[i][i], a[i][n + 2] / a[i][i]]).collect()
}

/// Root-mean-square error in [-1, 1] units of `factors` on `rows`, after the preview's clamp.
fn rmse(factors: &LatentRgbFactors, rows: &[(Vec<f64>, [f64; 3])]) -> f64 {
    let mut sum = 0.0;
    for (x, y) in rows {
        for k in 0..3 {
            let mut v = f64::from(factors.bias[k]);
            for (ch, row) in factors.factors.iter().enumerate() {
                v += x[ch] * f64::from(row[k]);
            }
            sum += (v.clamp(-1.0, 1.0) - y[k]).powi(2);
        }
    }
    (sum / (rows.len() * 3) as f64).sqrt()
}

fn run(args: Args) -> Result<(), String> {
    let prompts = read_prompts(&args.prompts)?;
    let mut pipe = Sd3Pipeline::builder(&args.model).build().map_err(|e| e.to_string())?;
    let (mut train, mut held_out) = (Vec::new(), Vec::new());
    for i in 0..args.samples {
        let prompt = &prompts[i % prompts.len()];
        let mut request = pipe.request(prompt.clone()).seed(i as u64);
        if let Some(steps) = args.steps {
            request.steps = steps;
        }
        let latents = pipe.denoise(&request).map_err(|e| e.to_string())?;
        let images = pipe.decode(latents.clone()).map_err(|e| e.to_string())?;
        let rows = if i % 4 == 3 { &mut held_out } else { &mut train };
        sample_rows(&latents, &images[0], rows);
        eprintln!("[{}/{}] {prompt}", i + 1, args.samples);
    }
    if train.is_empty() || held_out.is_empty() {
        return Err("need at least 4 samples (every fourth is held out)".into());
    }
    let solved = fit(&train);
    let (rows, bias) = solved.split_at(solved.len() - 1);
    let to_f32 = |r: &[f64; 3]| r.map(|v| v as f32);
    let factors = LatentRgbFactors::new(rows.iter().map(to_f32).collect(), to_f32(&bias[0]));
    let fitted = rmse(&factors, &held_out);
    let sd3 =
        (factors.channels() == LatentRgbFactors::sd3().channels()).then(|| rmse(&LatentRgbFactors::sd3(), &held_out));
    eprintln!(
        "{} latent pixels fitted, {} held out; held-out RMSE ([-1, 1] units): fitted {fitted:.4}{}",
        train.len(),
        held_out.len(),
        sd3.map(|e| format!(", SD3's factors {e:.4}")).unwrap_or_default()
    );
    let json = serde_json::json!({
        "factors": factors.factors,
        "bias": factors.bias,
        "fitted_by": "examples/fit_preview_factors.rs",
        "samples": args.samples,
        "steps": args.steps,
        "prompts": args.prompts.file_name().map(|n| n.to_string_lossy().to_string()),
        "held_out_rmse": fitted,
        "sd3_factors_held_out_rmse": sd3,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())? + "\n";
    if args.write {
        let path = args.model.join(Component::VaeDecoder.folder()).join(FACTORS_FILE);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    } else {
        print!("{text}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
