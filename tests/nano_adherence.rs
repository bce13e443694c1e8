//! The default model (models/sd3-nano, trained by models/nano/train.py) must keep drawing what a handful of
//! held-out prompts ask for, so that a pipeline bug fails CI even though no golden image exists for it.
//!
//! The prompts come from models/nano/eval_prompts.json (combinations of color, shape, position and count never
//! seen in training). This file's checker is a small Rust port of the colour, position and count rules of
//! models/nano/checker.py (the full checker, which also judges shapes, sizes and words, is Python and runs in
//! models/nano/eval_rust.sh): background from the image border (row-wise or column-wise, whichever explains the
//! border better), foreground = pixels more than 60 (RGB distance) from it, 4-connected foreground components;
//! the significant ones have at least 25 pixels and 20% of the largest; the largest one's median colour ->
//! nearest colour of scenes.py's palette, its centroid -> a cell of the 3x3 grid; count = significant components.
//!
//! Tolerance: at least `MIN_PASS` of the prompts must pass (a different CPU may round differently and move a
//! borderline image). The negative controls show the test can fail: the checker rejects every image for a wrong
//! colour and a wrong count, and conditioning bugs (wrong CLIP layer, wrong T5 length, T5 lost, no guidance)
//! drop adherence below `MIN_PASS`.

mod common;

use common::*;
use image::RgbImage;
use sd3_onnx::{GenerationRequest, Sd3Pipeline, Variant};

/// scenes.py COLORS
const PALETTE: [(&str, [f32; 3]); 8] = [
    ("red", [220.0, 30.0, 30.0]),
    ("orange", [250.0, 140.0, 0.0]),
    ("yellow", [245.0, 220.0, 30.0]),
    ("green", [30.0, 160.0, 50.0]),
    ("blue", [30.0, 70.0, 220.0]),
    ("purple", [140.0, 40.0, 190.0]),
    ("white", [250.0, 250.0, 250.0]),
    ("black", [20.0, 20.0, 20.0]),
];

/// scenes.py POSITIONS, row-major over the 3x3 grid.
const POSITIONS: [&str; 9] =
    ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"];

/// What a prompt is checked for besides the colour of its largest shape.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    Color,
    Position,
    Count,
}

/// (index into eval_prompts.json, what to check). Seed = index, the model's defaults (28 steps, guidance 5, 77 T5
/// tokens: `Sd3Pipeline::request`, what eval_rust.sh uses). The first four prompts of the color, position and
/// count categories that the Python checker accepted in eval_rust.sh's run of the committed model
/// (models/nano/README.md).
const PROMPTS: [(usize, Check); 12] = [
    (0, Check::Color),
    (5, Check::Color),
    (10, Check::Color),
    (15, Check::Color),
    (2, Check::Position),
    (7, Check::Position),
    (12, Check::Position),
    (17, Check::Position),
    (3, Check::Count),
    (8, Check::Count),
    (13, Check::Count),
    (18, Check::Count),
];
const MIN_PASS: usize = 11;

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn px(img: &RgbImage, x: u32, y: u32) -> [f32; 3] {
    let p = img.get_pixel(x, y).0;
    [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]
}

fn mean(v: &[[f32; 3]]) -> [f32; 3] {
    let n = v.len().max(1) as f32;
    let s = v.iter().fold([0.0; 3], |a, p| [a[0] + p[0], a[1] + p[1], a[2] + p[2]]);
    [s[0] / n, s[1] / n, s[2] / n]
}

/// Per-pixel background: the border's rows or columns, whichever fits the border better.
fn background(img: &RgbImage) -> Vec<[f32; 3]> {
    let (w, h) = img.dimensions();
    let row: Vec<[f32; 3]> =
        (0..h).map(|y| mean(&[px(img, 0, y), px(img, 1, y), px(img, w - 1, y), px(img, w - 2, y)])).collect();
    let col: Vec<[f32; 3]> =
        (0..w).map(|x| mean(&[px(img, x, 0), px(img, x, 1), px(img, x, h - 1), px(img, x, h - 2)])).collect();
    let mut err_row = 0.0;
    let mut err_col = 0.0;
    for x in 0..w {
        for y in [0, h - 1] {
            err_row += dist(px(img, x, y), row[y as usize]);
            err_col += dist(px(img, x, y), col[x as usize]);
        }
    }
    for y in 0..h {
        for x in [0, w - 1] {
            err_row += dist(px(img, x, y), row[y as usize]);
            err_col += dist(px(img, x, y), col[x as usize]);
        }
    }
    let mut bg = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            bg.push(if err_row <= err_col { row[y as usize] } else { col[x as usize] });
        }
    }
    bg
}

/// What the checker sees in an image: the largest foreground component's colour and grid cell, and the number
/// of significant components.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    color: &'static str,
    position: &'static str,
    count: usize,
}

/// The checker's reading of an image, or None for an empty one.
fn judge(img: &RgbImage) -> Option<Seen> {
    let (w, h) = img.dimensions();
    let bg = background(img);
    let fg: Vec<bool> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| dist(px(img, x, y), bg[(y * w + x) as usize]) > 60.0)
        .collect();
    let mut seen = vec![false; fg.len()];
    let mut sizes: Vec<usize> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    for start in 0..fg.len() {
        if !fg[start] || seen[start] {
            continue;
        }
        let mut comp = vec![start];
        seen[start] = true;
        let mut i = 0;
        while i < comp.len() {
            let p = comp[i];
            i += 1;
            let (x, y) = ((p as u32) % w, (p as u32) / w);
            let mut visit = |q: usize| {
                if fg[q] && !seen[q] {
                    seen[q] = true;
                    comp.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - w as usize);
            }
            if y + 1 < h {
                visit(p + w as usize);
            }
        }
        sizes.push(comp.len());
        if comp.len() > best.len() {
            best = comp;
        }
    }
    if best.len() < 12 {
        return None;
    }
    // checker.py: significant components have >= 25 pixels and >= 20% of the largest
    let count = sizes.iter().filter(|&&n| n >= 25 && n as f64 >= 0.2 * best.len() as f64).count();
    let mut channels: [Vec<f32>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let (mut sx, mut sy) = (0.0f64, 0.0f64);
    for &p in &best {
        let (x, y) = ((p as u32) % w, (p as u32) / w);
        let c = px(img, x, y);
        for k in 0..3 {
            channels[k].push(c[k]);
        }
        sx += f64::from(x) + 0.5;
        sy += f64::from(y) + 0.5;
    }
    let median = |v: &mut Vec<f32>| {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let c = [median(&mut channels[0]), median(&mut channels[1]), median(&mut channels[2])];
    let color = PALETTE.iter().min_by(|a, b| dist(a.1, c).total_cmp(&dist(b.1, c))).unwrap().0;
    let n = best.len() as f64;
    let col = ((sx / n) / (f64::from(w) / 3.0)).floor().clamp(0.0, 2.0) as usize;
    let row = ((sy / n) / (f64::from(h) / 3.0)).floor().clamp(0.0, 2.0) as usize;
    Some(Seen { color, position: POSITIONS[row * 3 + col], count })
}

#[derive(Clone)]
struct Case {
    prompt: String,
    color: String,
    position: Option<String>,
    count: Option<usize>,
    seed: u64,
}

fn cases() -> Vec<Case> {
    let prompts = read_json(&repo().join("models/nano/eval_prompts.json"));
    PROMPTS
        .iter()
        .map(|&(i, check)| {
            let p = &prompts[i];
            let scene = &p["scene"];
            Case {
                prompt: p["prompt"].as_str().unwrap().to_string(),
                color: scene["color"].as_str().unwrap().to_string(),
                position: (check == Check::Position).then(|| scene["position"].as_str().unwrap().to_string()),
                count: (check == Check::Count).then(|| scene["count"].as_u64().unwrap() as usize),
                seed: i as u64,
            }
        })
        .collect()
}

fn passes(img: &RgbImage, case: &Case) -> bool {
    match judge(img) {
        Some(seen) => {
            seen.color == case.color
                && case.position.as_deref().is_none_or(|p| p == seen.position)
                && case.count.is_none_or(|n| n == seen.count)
        }
        None => false,
    }
}

fn request(pipe: &Sd3Pipeline, case: &Case) -> GenerationRequest {
    pipe.request(case.prompt.clone()).seed(case.seed)
}

fn nano() -> std::path::PathBuf {
    repo().join("models/sd3-nano")
}

#[test]
fn the_default_model_draws_held_out_prompts() {
    let mut pipe = Sd3Pipeline::builder(nano()).build().unwrap();
    assert_eq!(pipe.info().variant, Variant::Sd3Nano);
    let defaults = pipe.request("x");
    assert_eq!((defaults.steps, defaults.guidance, defaults.max_sequence_length), (28, 5.0, 77));
    let cases = cases();
    let mut passed = 0;
    let mut report = Vec::new();
    for case in &cases {
        let img = pipe.generate(&request(&pipe, case)).unwrap().images.remove(0);
        let ok = passes(&img, case);
        passed += usize::from(ok);
        report.push(format!("{:?} -> {:?} {}", case.prompt, judge(&img), if ok { "ok" } else { "FAIL" }));
        // Negative controls: the same image judged against every other colour, or another count, fails.
        for (other, _) in PALETTE.iter().filter(|(c, _)| *c != case.color) {
            let wrong = Case { color: (*other).to_string(), position: None, count: None, ..case.clone() };
            assert!(!passes(&img, &wrong), "{:?}: the checker accepted colour {other}", case.prompt);
        }
        if let Some(n) = case.count {
            let wrong = Case { count: Some(n + 1), ..case.clone() };
            assert!(!passes(&img, &wrong), "{:?}: the checker accepted count {}", case.prompt, n + 1);
        }
    }
    eprintln!("{passed}/{} held-out prompts drawn as asked:\n{}", cases.len(), report.join("\n"));
    assert!(
        passed >= MIN_PASS,
        "{passed}/{} held-out prompts drawn as asked (need {MIN_PASS}):\n{}",
        cases.len(),
        report.join("\n")
    );
}

/// How many prompts pass when the request is changed by `alter` (a simulated pipeline bug).
fn passing_with(pipe: &mut Sd3Pipeline, alter: impl Fn(GenerationRequest) -> GenerationRequest) -> usize {
    cases()
        .iter()
        .filter(|c| {
            let req = alter(request(pipe, c));
            passes(&pipe.generate(&req).unwrap().images.remove(0), c)
        })
        .count()
}

#[test]
fn conditioning_bugs_break_adherence() {
    // Each stands for a bug in our conditioning code: the wrong CLIP hidden layer (SD3 takes the penultimate one,
    // `clip_skip` 1 takes the one before), T5 padded to the wrong length (256, diffusers' default, instead of the
    // 77 this model was trained with) and the T5 embeddings lost. Measured on this machine (run 11, the committed
    // model, shift 3): 0, 7 and 4 of the 12 prompts pass (12 with the right settings). Not asserted, because too
    // close to MIN_PASS or not caught at all (measure_other_changes below): no guidance (12 of 12), 8 steps (11),
    // guidance 2 (12), shift 1 (12), shift 20 (12); the golden-image tests catch those (nano_parity on this model:
    // shift 1 instead of its 3 moves an image by 162 levels; the fixtures' goldens for the formulas).
    let mut pipe = Sd3Pipeline::builder(nano()).build().unwrap();
    let wrong_layer = passing_with(&mut pipe, |r| r.clip_skip(1));
    let wrong_length = passing_with(&mut pipe, |r| r.max_sequence_length(256));
    let mut no_t5 = Sd3Pipeline::builder(nano()).t5(false).build().unwrap();
    let without_t5 = passing_with(&mut no_t5, |r| r);
    eprintln!("passing: wrong CLIP layer {wrong_layer}, T5 length 256 {wrong_length}, without T5 {without_t5}");
    assert!(wrong_layer < MIN_PASS, "with the wrong CLIP layer {wrong_layer} prompts still pass");
    assert!(wrong_length < MIN_PASS, "with T5 padded to 256 tokens {wrong_length} prompts still pass");
    assert!(without_t5 < MIN_PASS, "without T5 {without_t5} prompts still pass");
}

/// Not a test of the pipeline: prints how many prompts pass under changes the test above does not assert on
/// (`cargo test --release --test nano_adherence -- --ignored --nocapture`), the figures models/nano/README.md
/// quotes.
#[test]
#[ignore]
fn measure_other_changes() {
    let mut pipe = Sd3Pipeline::builder(nano()).build().unwrap();
    let no_guidance = passing_with(&mut pipe, |r| r.guidance(1.0));
    let steps_8 = passing_with(&mut pipe, |r| r.steps(8));
    let guidance_2 = passing_with(&mut pipe, |r| r.guidance(2.0));
    let mut shifted = Sd3Pipeline::builder(nano()).shift(1.0).build().unwrap();
    let shift_1 = passing_with(&mut shifted, |r| r);
    let mut shifted = Sd3Pipeline::builder(nano()).shift(20.0).build().unwrap();
    let shift_20 = passing_with(&mut shifted, |r| r);
    eprintln!(
        "passing: no guidance {no_guidance}, 8 steps {steps_8}, guidance 2 {guidance_2}, shift 1 {shift_1}, \
         shift 20 {shift_20}"
    );
}
