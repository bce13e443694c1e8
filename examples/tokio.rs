//! The pipeline from async code (tokio): generation is blocking CPU / GPU work, so it runs on tokio's blocking
//! thread pool (`spawn_blocking`), and a `CancellationToken` stops a run from an async task.
//!
//! ```text
//! cargo run --example tokio -- models/sd3-nano
//! ```
//!
//! The one argument is the model folder. The example builds the pipeline, runs one generation, then a second one
//! that an async task cancels as soon as the first denoising step is reported, and checks that it ends with
//! `Error::Cancelled` and that the pipeline still works afterwards. Anything else exits with status 1, so CI
//! runs it as a check (scripts/test.sh). With the `serde` feature it also prints the first output's summary as
//! JSON.
//!
//! `Sd3Pipeline::generate` takes `&mut self`: the pipeline moves into the blocking task and comes back with the
//! result. A server sharing one pipeline between requests would keep it in an `Arc<std::sync::Mutex<_>>` (the
//! pipeline is `Send + Sync`) and lock it inside `spawn_blocking`.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sd3_onnx::{CancellationToken, Error, GenerationOutput, GenerationRequest, Sd3Pipeline};
use tokio::sync::mpsc;
use tokio::task;

const USAGE: &str = "usage: tokio MODEL_DIR";

/// Steps of the run that gets cancelled: far more than can run between the first step's report and the cancel.
const CANCELLED_RUN_STEPS: usize = 50;

/// How long the canceller waits for the first step before it gives up (and cancels anyway).
const FIRST_STEP_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let model = match (args.next(), args.next()) {
        (Some(dir), None) if dir != "-h" && dir != "--help" => PathBuf::from(dir),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(model).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tokio example: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `request` on the blocking pool, handing the pipeline there and back; `on_step` gets each step's index.
async fn generate(
    mut pipe: Sd3Pipeline,
    request: GenerationRequest,
    on_step: Option<mpsc::UnboundedSender<usize>>,
) -> Result<(Sd3Pipeline, sd3_onnx::Result<GenerationOutput>), String> {
    task::spawn_blocking(move || {
        let result = pipe.generate_with_progress(&request, |progress| {
            if let Some(tx) = &on_step {
                // An unbounded channel's send never blocks; a closed receiver is not the run's concern.
                let _ = tx.send(progress.step);
            }
            ControlFlow::Continue(())
        });
        (pipe, result)
    })
    .await
    .map_err(|e| format!("the blocking task failed: {e}"))
}

async fn run(model: PathBuf) -> Result<(), String> {
    // Building opens and checks every graph: blocking work too.
    let shown = model.display().to_string();
    let pipe = task::spawn_blocking(move || Sd3Pipeline::builder(model).build())
        .await
        .map_err(|e| format!("the blocking task failed: {e}"))?
        .map_err(|e| format!("loading {shown}: {e}"))?;

    // 1. A plain generation.
    let steps = 4;
    let request = pipe.request("a red cube on a blue floor").steps(steps).seed(42);
    let (pipe, result) = generate(pipe, request, None).await?;
    let out = result.map_err(|e| format!("first generation: {e}"))?;
    if out.images.len() != 1
        || out.images[0].dimensions() != out.size
        || out.seeds != [Some(42)]
        || out.timings.steps.len() != steps
    {
        return Err(format!(
            "first generation: unexpected output: {} images, size {:?}, seeds {:?}, {} steps timed",
            out.images.len(),
            out.size,
            out.seeds,
            out.timings.steps.len()
        ));
    }
    println!("generated {}x{} in {:.1} ms ({})", out.size.0, out.size.1, ms(out.timings.total), out.timings);
    #[cfg(feature = "serde")]
    println!("summary: {}", serde_json::to_string(&out.summary()).map_err(|e| e.to_string())?);

    // 2. A run cancelled from an async task once its first step is reported.
    let token = CancellationToken::new();
    let (step_tx, mut step_rx) = mpsc::unbounded_channel();
    let canceller = tokio::spawn({
        let token = token.clone();
        async move {
            let first = tokio::time::timeout(FIRST_STEP_TIMEOUT, step_rx.recv()).await;
            token.cancel();
            first
        }
    });
    let request = pipe.request("a green sphere").steps(CANCELLED_RUN_STEPS).seed(7).cancellation(token.clone());
    let (pipe, result) = generate(pipe, request, Some(step_tx)).await?;
    let first = canceller.await.map_err(|e| format!("the cancelling task failed: {e}"))?;
    match (first, result) {
        (Ok(Some(0)), Err(Error::Cancelled { step })) if (1..CANCELLED_RUN_STEPS).contains(&step) => {
            println!("cancelled from an async task after step 0: Error::Cancelled {{ step: {step} }}")
        }
        (Err(_), _) => return Err(format!("no step reported within {FIRST_STEP_TIMEOUT:?}")),
        (Ok(first), Err(e)) => {
            return Err(format!(
                "cancelled run: expected Error::Cancelled after the first step, got {e} (first {first:?})"
            ))
        }
        (Ok(_), Ok(_)) => {
            return Err(format!(
                "cancelled run: all {CANCELLED_RUN_STEPS} steps ran although cancelled after the first"
            ))
        }
    }

    // 3. The pipeline is still usable after a cancelled run.
    let request = pipe.request("a red cube").steps(1).seed(42);
    let (_pipe, result) = generate(pipe, request, None).await?;
    let again = result.map_err(|e| format!("generation after the cancelled run: {e}"))?;
    if again.images.len() != 1 {
        return Err("generation after the cancelled run gave no image".into());
    }
    println!("the pipeline still generates after the cancelled run");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
