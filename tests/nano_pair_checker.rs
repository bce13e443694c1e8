//! A Rust port of models/nano/checker.py's pair rules (issue 22: two objects, colour attribution, relations), for
//! the adherence test of the default model's second generation, checked here against renders of held-out pair
//! prompts (models/goldens/sd3-nano-pairs, made by models/nano/pair_renders.py from scenes.py): every clean,
//! degraded (blur, colour shift, JPEG, noise) and coarse (4x down and up) render passes its own prompt, and fails the negatives the Python checker fails (the two objects'
//! colours or shapes exchanged, the relation reversed, the second shape replaced by one neither object has). The
//! model that these prompts will run on is not trained yet (models/nano/README.md, "Second generation"); until
//! then this file checks the checker.
//!
//! The port (checker.py `Analysis`, `check_pair`): a robust quadratic background per channel fitted on a 6-pixel
//! border ring (five rounds of inlier selection), foreground = residual above `clamp(0.5 * p99.7, 35, 75)`,
//! 8-connected components; a pair's components have at least 40 pixels and 2% of the largest, and there must be
//! exactly two. Per component: the colour is the palette colour nearest the median of its stronger half of
//! pixels (within 130 and nearer than the background there), the shape the best intersection-over-union of its
//! mask with each shape's template resized to its bounding box (templates blurred by 0, 3.5, 7 and 10% of the side
//! and cut at half height, as a blurred render looks; at least 0.6, aspect at most 1.5), its place the bounding
//! box's centre. A relation holds when the centres are at least 10 px apart along the relation's axis in the
//! stated direction and no farther apart across it. One assignment of the two components to the prompt's two
//! objects must satisfy everything the prompt states.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::*;
use image::RgbImage;
use serde_json::Value;

const N: usize = 128;
/// scenes.py SHAPES
const SHAPES: [&str; 5] = ["circle", "square", "triangle", "star", "cross"];
// checker.py's constants
const SHAPE_IOU: f32 = 0.6;
const SHAPE_ASPECT: f32 = 1.5;
const COLOR_MAX_DIST: f32 = 130.0;
const PAIR_MIN_AREA: usize = 40;
const PAIR_REL_AREA: f32 = 0.02;
const REL_MARGIN: f32 = 10.0;
const SHAPE_BLURS: [f32; 4] = [0.0, 0.035, 0.07, 0.1];

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Solves the 6x6 system `a x = b` (Gaussian elimination with partial pivoting).
#[allow(clippy::needless_range_loop)] // row operations read two rows of `a` by index
fn solve6(mut a: [[f64; 6]; 6], mut b: [f64; 6]) -> [f64; 6] {
    for c in 0..6 {
        let p = (c..6).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs())).unwrap();
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..6 {
            let f = a[r][c] / a[c][c];
            for k in c..6 {
                a[r][k] -= f * a[c][k];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0.0; 6];
    for r in (0..6).rev() {
        let s: f64 = (r + 1..6).map(|k| a[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x
}

/// checker.py `background`: per channel `c0 + c1 x + c2 y + c3 xy + c4 x^2 + c5 y^2` (x, y in [-0.5, 0.5]) fitted
/// by least squares on the 6-pixel border ring, then five times on the pixels within `max(18, 3 * median)` of the
/// fit (stopping when fewer than 200 are left).
fn background(img: &[[f32; 3]]) -> Vec<[f32; 3]> {
    let basis = |i: usize| {
        let (x, y) = ((i % N) as f64 / (N - 1) as f64 - 0.5, (i / N) as f64 / (N - 1) as f64 - 0.5);
        [1.0, x, y, x * y, x * x, y * y]
    };
    let ring = |i: usize| {
        let (x, y) = (i % N, i / N);
        x < 6 || y < 6 || x >= N - 6 || y >= N - 6
    };
    let mut inliers: Vec<bool> = (0..N * N).map(ring).collect();
    let mut fit = vec![[0f32; 3]; N * N];
    for _ in 0..5 {
        let mut ata = [[0f64; 6]; 6];
        let mut atb = [[0f64; 6]; 3];
        for i in (0..N * N).filter(|&i| inliers[i]) {
            let b = basis(i);
            for r in 0..6 {
                for c in 0..6 {
                    ata[r][c] += b[r] * b[c];
                }
                for ch in 0..3 {
                    atb[ch][r] += b[r] * f64::from(img[i][ch]);
                }
            }
        }
        let coef: Vec<[f64; 6]> = (0..3).map(|ch| solve6(ata, atb[ch])).collect();
        for (i, f) in fit.iter_mut().enumerate() {
            let b = basis(i);
            for ch in 0..3 {
                f[ch] = (0..6).map(|k| coef[ch][k] * b[k]).sum::<f64>() as f32;
            }
        }
        let r: Vec<f32> = (0..N * N).map(|i| dist(img[i], fit[i])).collect();
        let mut inl: Vec<f32> = (0..N * N).filter(|&i| inliers[i]).map(|i| r[i]).collect();
        inl.sort_by(f32::total_cmp);
        let med =
            if inl.len() % 2 == 1 { inl[inl.len() / 2] } else { (inl[inl.len() / 2 - 1] + inl[inl.len() / 2]) / 2.0 };
        let thr = (3.0 * med).max(18.0);
        let new: Vec<bool> = r.iter().map(|v| *v < thr).collect();
        if new.iter().filter(|v| **v).count() < 200 {
            break;
        }
        inliers = new;
    }
    fit
}

/// numpy's default (linear) percentile of `v`.
fn percentile(v: &[f32], q: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    let pos = q / 100.0 * (s.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(s.len() - 1);
    (f64::from(s[lo]) + frac * f64::from(s[hi] - s[lo])) as f32
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One foreground component: its pixels (flat indices) and bounding box (inclusive).
struct Component {
    pixels: Vec<usize>,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

/// What the pair rules read of one component.
#[derive(Debug, Clone, PartialEq)]
struct Object {
    shape: Option<&'static str>,
    /// nearest palette colour, its distance, the distance of the colour to the background there
    color: (&'static str, f32, f32),
    center: (f32, f32),
}

/// A shape filling the unit box [-1, 1]^2 (scenes.py `shape_polygon`, `draw_shape`): whether (x, y) is inside.
fn inside(shape: &str, x: f64, y: f64) -> bool {
    let polygon = |pts: &[(f64, f64)]| {
        let mut c = false;
        let mut j = pts.len() - 1;
        for i in 0..pts.len() {
            let ((xi, yi), (xj, yj)) = (pts[i], pts[j]);
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                c = !c;
            }
            j = i;
        }
        c
    };
    match shape {
        "circle" => x * x + y * y <= 1.0,
        "square" => x.abs() <= 1.0 && y.abs() <= 1.0,
        "triangle" => polygon(&[(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
        "star" => {
            let pts: Vec<(f64, f64)> = (0..10)
                .map(|k| {
                    let r = if k % 2 == 0 { 1.0 } else { 0.5 };
                    let a = -std::f64::consts::FRAC_PI_2 + f64::from(k) * std::f64::consts::PI / 5.0;
                    (r * a.cos(), r * a.sin())
                })
                .collect();
            let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let scaled: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| (-1.0 + 2.0 * (p.0 - x0) / (x1 - x0), -1.0 + 2.0 * (p.1 - y0) / (y1 - y0)))
                .collect();
            polygon(&scaled)
        }
        "cross" => {
            let w = 0.36;
            (x.abs() <= w && y.abs() <= 1.0) || (y.abs() <= w && x.abs() <= 1.0)
        }
        _ => false,
    }
}

/// checker.py `_shape_unit`: the shape drawn with side 128 in a 192 canvas, blurred by `sig * 128` (separable
/// gaussian, zero padded), cut at half height and cropped: (width, height, mask).
/// A cropped shape mask: (width, height, mask).
type Unit = (usize, usize, Vec<bool>);

fn shape_unit(shape: &'static str, sig: f32) -> &'static Unit {
    static UNITS: OnceLock<std::sync::Mutex<HashMap<(String, u32), &'static Unit>>> = OnceLock::new();
    let key = (shape.to_string(), sig.to_bits());
    let mut units = UNITS.get_or_init(Default::default).lock().unwrap();
    if let Some(u) = units.get(&key) {
        return u;
    }
    const R: usize = 192;
    let mut a: Vec<f32> = (0..R * R)
        .map(|i| {
            let (x, y) = ((i % R) as f64 + 0.5, (i / R) as f64 + 0.5);
            f32::from(u8::from(inside(shape, (x - 96.0) / 64.0, (y - 96.0) / 64.0)))
        })
        .collect();
    if sig > 0.0 {
        let sigma = sig * 128.0;
        let r = (3.0 * sigma).ceil() as i64;
        let k: Vec<f32> = (-r..=r).map(|i| (-0.5 * (i as f32 / sigma).powi(2)).exp()).collect();
        let total: f32 = k.iter().sum();
        let k: Vec<f32> = k.iter().map(|v| v / total).collect();
        let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
            (0..R * R)
                .map(|i| {
                    let (x, y) = ((i % R) as i64, (i / R) as i64);
                    k.iter()
                        .enumerate()
                        .map(|(j, w)| {
                            let d = j as i64 - r;
                            let (xs, ys) = if horizontal { (x + d, y) } else { (x, y + d) };
                            if xs < 0 || ys < 0 || xs >= R as i64 || ys >= R as i64 {
                                0.0
                            } else {
                                w * src[ys as usize * R + xs as usize]
                            }
                        })
                        .sum()
                })
                .collect()
        };
        a = pass(&pass(&a, true), false);
    }
    let m: Vec<bool> = a.iter().map(|v| *v >= 0.5).collect();
    let (mut x0, mut y0, mut x1, mut y1) = (R, R, 0, 0);
    for (i, _) in m.iter().enumerate().filter(|(_, v)| **v) {
        let (x, y) = (i % R, i / R);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    let crop: Vec<bool> = (0..w * h).map(|i| m[(y0 + i / w) * R + x0 + i % w]).collect();
    let unit: &'static Unit = Box::leak(Box::new((w, h, crop)));
    units.insert(key, unit);
    unit
}

/// The unit shape resized to `w` x `h` (bilinear on the 0/1 mask, cut at half: checker.py's PIL resize).
fn template(shape: &'static str, sig: f32, w: usize, h: usize) -> Vec<bool> {
    let (uw, uh, m) = shape_unit(shape, sig);
    let at = |x: i64, y: i64| -> f32 {
        let (x, y) = (x.clamp(0, *uw as i64 - 1) as usize, y.clamp(0, *uh as i64 - 1) as usize);
        f32::from(u8::from(m[y * uw + x]))
    };
    (0..w * h)
        .map(|i| {
            let (tx, ty) = (i % w, i / w);
            let sx = (tx as f32 + 0.5) * *uw as f32 / w as f32 - 0.5;
            let sy = (ty as f32 + 0.5) * *uh as f32 / h as f32 - 0.5;
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx, sy - fy);
            let (x, y) = (fx as i64, fy as i64);
            let v = (1.0 - ax) * (1.0 - ay) * at(x, y)
                + ax * (1.0 - ay) * at(x + 1, y)
                + (1.0 - ax) * ay * at(x, y + 1)
                + ax * ay * at(x + 1, y + 1);
            v >= 0.5
        })
        .collect()
}

/// The pair rules' reading of an image: every component of at least 40 pixels and 2% of the largest, largest
/// first.
fn pair_objects(img: &RgbImage) -> Vec<Object> {
    assert_eq!(img.dimensions(), (N as u32, N as u32), "the pair checker reads 128x128 images");
    let pixels: Vec<[f32; 3]> = img.pixels().map(|p| [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]).collect();
    let bg = background(&pixels);
    let r: Vec<f32> = pixels.iter().zip(&bg).map(|(p, b)| dist(*p, *b)).collect();
    let t = (0.5 * percentile(&r, 99.7)).clamp(35.0, 75.0);
    let fg: Vec<bool> = r.iter().map(|v| *v > t).collect();
    // 8-connected components
    let mut seen = vec![false; N * N];
    let mut comps: Vec<Component> = Vec::new();
    for start in 0..N * N {
        if !fg[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut c = Component { pixels: vec![start], x0: N, y0: N, x1: 0, y1: 0 };
        let mut i = 0;
        while i < c.pixels.len() {
            let p = c.pixels[i];
            i += 1;
            let (x, y) = ((p % N) as i64, (p / N) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= N as i64 || ny >= N as i64 {
                        continue;
                    }
                    let q = ny as usize * N + nx as usize;
                    if fg[q] && !seen[q] {
                        seen[q] = true;
                        c.pixels.push(q);
                    }
                }
            }
        }
        for &p in &c.pixels {
            let (x, y) = (p % N, p / N);
            (c.x0, c.y0, c.x1, c.y1) = (c.x0.min(x), c.y0.min(y), c.x1.max(x), c.y1.max(y));
        }
        comps.push(c);
    }
    comps.sort_by_key(|c| std::cmp::Reverse(c.pixels.len()));
    let big = comps.first().map_or(0, |c| c.pixels.len());
    let min = (PAIR_MIN_AREA as f32).max(PAIR_REL_AREA * big as f32);
    comps
        .iter()
        .filter(|c| c.pixels.len() as f32 >= min)
        .map(|c| {
            // colour: the median RGB of the stronger half of the pixels (residual at least the component's median)
            let rm = median(c.pixels.iter().map(|&p| r[p]).collect());
            let core: Vec<usize> = c.pixels.iter().copied().filter(|&p| r[p] >= rm).collect();
            let med = |v: &[[f32; 3]]| [0, 1, 2].map(|k| median(core.iter().map(|&p| v[p][k]).collect()));
            let (m, b) = (med(&pixels), med(&bg));
            let (name, d) = PALETTE
                .iter()
                .map(|(n, rgb)| (*n, dist(*rgb, m)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap_or(("?", f32::MAX));
            // shape: the best IoU over the templates at the bounding box's size
            let (w, h) = (c.x1 - c.x0 + 1, c.y1 - c.y0 + 1);
            let shape = if w.max(h) as f32 / w.min(h).max(1) as f32 > SHAPE_ASPECT {
                None
            } else {
                let mut crop = vec![false; w * h];
                for &p in &c.pixels {
                    crop[(p / N - c.y0) * w + p % N - c.x0] = true;
                }
                let score = |s: &'static str| {
                    SHAPE_BLURS
                        .iter()
                        .map(|&sig| {
                            let t = template(s, sig, w, h);
                            let and = crop.iter().zip(&t).filter(|(a, b)| **a && **b).count();
                            let or = crop.iter().zip(&t).filter(|(a, b)| **a || **b).count();
                            and as f32 / or.max(1) as f32
                        })
                        .fold(0.0f32, f32::max)
                };
                let (best, iou) =
                    SHAPES.iter().map(|s| (*s, score(s))).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or(("?", 0.0));
                (iou >= SHAPE_IOU).then_some(best)
            };
            let center = ((c.x0 + c.x1 + 1) as f32 / 2.0, (c.y0 + c.y1 + 1) as f32 / 2.0);
            Object { shape, color: (name, d, dist(m, b)), center }
        })
        .collect()
}

/// checker.py `relation_holds`: `a` is `rel` of `b` (pixels, y down).
fn relation_holds(rel: &str, a: (f32, f32), b: (f32, f32)) -> bool {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (along, across) = match rel {
        "left" => (dx, dy),
        "right" => (-dx, dy),
        "above" => (dy, dx),
        "below" => (-dy, dx),
        _ => return false,
    };
    along >= REL_MARGIN && across.abs() <= along
}

/// A pair prompt's scene: what it states about its two objects.
#[derive(Debug, Clone)]
struct PairScene {
    shape: String,
    color: String,
    shape2: String,
    color2: String,
    relation: Option<String>,
    stated: Vec<String>,
}

impl PairScene {
    fn from_json(scene: &Value, stated: &Value) -> PairScene {
        let s = |k: &str| scene[k].as_str().unwrap_or_default().to_string();
        PairScene {
            shape: s("shape"),
            color: s("color"),
            shape2: s("shape2"),
            color2: s("color2"),
            relation: scene["relation"].as_str().map(str::to_string),
            stated: stated.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        }
    }
}

/// checker.py `check_pair` + `prompt_pass` for a pair prompt: exactly two components, and one assignment of them
/// to the scene's two objects satisfying every stated attribute.
fn pair_passes(objs: &[Object], scene: &PairScene) -> bool {
    if objs.len() != 2 {
        return false;
    }
    [(0, 1), (1, 0)].iter().any(|&(i, j)| {
        let (a, b) = (&objs[i], &objs[j]);
        let color_ok =
            |o: &Object, want: &str| o.color.0 == want && o.color.1 <= COLOR_MAX_DIST && o.color.1 < o.color.2;
        scene.stated.iter().all(|attr| match attr.as_str() {
            "shape" => a.shape == Some(scene.shape.as_str()),
            "shape2" => b.shape == Some(scene.shape2.as_str()),
            "color" => color_ok(a, &scene.color),
            "color2" => color_ok(b, &scene.color2),
            "relation" => scene.relation.as_deref().is_some_and(|r| relation_holds(r, a.center, b.center)),
            _ => false,
        })
    })
}

fn dir() -> std::path::PathBuf {
    repo().join("models/goldens/sd3-nano-pairs")
}

fn cases() -> Vec<Value> {
    read_json(&dir().join("cases.json")).as_array().unwrap().clone()
}

#[test]
fn pair_renders_pass_their_prompts_and_fail_the_negatives_as_in_python() {
    let cases = cases();
    assert_eq!(cases.len(), 12, "pair_renders.py writes 4 prompts of each of the 3 pair categories");
    let mut negatives = 0;
    for case in &cases {
        let scene = PairScene::from_json(&case["scene"], &case["stated"]);
        for tag in ["clean", "degraded", "coarse"] {
            let img = load_png(&dir().join(case["files"][tag].as_str().unwrap()));
            let objs = pair_objects(&img);
            let want = case["python"][tag].as_bool().unwrap();
            assert_eq!(
                pair_passes(&objs, &scene),
                want,
                "{} ({tag}): the Rust checker says otherwise; saw {objs:?}",
                case["prompt"]
            );
        }
        let img = load_png(&dir().join(case["files"]["clean"].as_str().unwrap()));
        let objs = pair_objects(&img);
        for neg in case["negatives"].as_array().unwrap() {
            let wrong = PairScene::from_json(&neg["scene"], &case["stated"]);
            assert_eq!(
                pair_passes(&objs, &wrong),
                neg["python_clean"].as_bool().unwrap(),
                "{}: negative {} ({wrong:?}) judged otherwise than by the Python checker; saw {objs:?}",
                case["prompt"],
                neg["what"]
            );
            negatives += 1;
        }
    }
    assert!(negatives >= 20, "only {negatives} negatives");
}

#[test]
fn one_object_left_fails_a_pair_prompt() {
    // The first two-object render with its smaller object painted over by the fitted background: one object left.
    let case = &cases()[0];
    let scene = PairScene::from_json(&case["scene"], &case["stated"]);
    let mut img = load_png(&dir().join(case["files"]["clean"].as_str().unwrap()));
    let objs = pair_objects(&img);
    assert!(pair_passes(&objs, &scene), "the clean render passes: {objs:?}");
    let pixels: Vec<[f32; 3]> = img.pixels().map(|p| [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]).collect();
    let bg = background(&pixels);
    let (cx, cy) = objs[1].center;
    for y in 0..N {
        for x in 0..N {
            if (x as f32 + 0.5 - cx).abs() < 24.0 && (y as f32 + 0.5 - cy).abs() < 24.0 {
                let b = bg[y * N + x].map(|v| v.round().clamp(0.0, 255.0) as u8);
                img.put_pixel(x as u32, y as u32, image::Rgb(b));
            }
        }
    }
    let left = pair_objects(&img);
    assert_eq!(left.len(), 1, "one object left: {left:?}");
    assert!(!pair_passes(&left, &scene));
}
