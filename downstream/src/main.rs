use std::process::ExitCode;

use sd3_onnx::{image, ndarray, Sd3Pipeline};

// Usage: downstream [MODEL_DIR] [PROMPT] [WIDTHxHEIGHT]; writes image.png.
fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "models/sd3-nano".into());
    let prompt = args.next().unwrap_or_else(|| "three red circles".into());

    // ONNX Runtime comes from ORT_DYLIB_PATH (or `.onnxruntime_library(path)` on the builder).
    let mut pipe = Sd3Pipeline::builder(&model).build()?; // every graph is opened and checked here
    let mut request = pipe.request(&prompt).seed(7); // the model card's steps, guidance, T5 tokens and size
    if let Some((w, h)) = args.next().as_deref().and_then(|s| s.split_once('x')) {
        request = request.size(w.parse()?, h.parse()?);
    }
    let out = pipe.generate(&request)?;
    for warning in &out.warnings {
        eprintln!("warning: {warning}"); // e.g. a prompt longer than CLIP's 77 tokens was truncated
    }

    let img: &image::RgbImage = &out.images[0];
    let pixels = ndarray::ArrayView3::from_shape((img.height() as usize, img.width() as usize, 3), img.as_raw())?;
    let mean = pixels.map(|&v| f64::from(v)).mean_axis(ndarray::Axis(0)).unwrap().mean_axis(ndarray::Axis(0));
    println!("{}x{} image, mean RGB {:.1?}", img.width(), img.height(), mean.unwrap().to_vec());
    sd3_onnx::imageio::save_png("image.png", img, Some(&out.parameters[0]))?;
    println!("{}", out.timings);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}"); // the readable message, with what to do about it
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
