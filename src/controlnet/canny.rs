//! Canny edges for canny ControlNets, after OpenCV 4's `cv::Canny` (imgproc/src/canny.cpp) with its defaults as
//! `cv2.Canny(image, low, high)` uses them: 3x3 Sobel with replicated borders, the L1 gradient `|dx| + |dy|`,
//! thresholds `floor(low)` / `floor(high)` compared with `>`, OpenCV's non-maximum suppression (the tan(22.5 deg)
//! sectors in 15-bit fixed point, `>` on one side and `>=` on the other), and 8-connected hysteresis.
//! tests/canny.rs measures the share of pixels that differ from `cv2.Canny` on test images.

use image::{GrayImage, RgbImage};

/// Edges of a grayscale image: 255 on edges, 0 elsewhere. `low` and `high` are the hysteresis thresholds on the
/// L1 gradient magnitude (swapped when `low > high`, as OpenCV does).
pub fn canny_gray(image: &GrayImage, low: f32, high: f32) -> GrayImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = GrayImage::new(image.width(), image.height());
    if w == 0 || h == 0 {
        return out;
    }
    let (mut low, mut high) = (low.floor() as i32, high.floor() as i32);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    let px = |x: isize, y: isize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as u32;
        let y = y.clamp(0, h as isize - 1) as u32;
        i32::from(image.get_pixel(x, y).0[0])
    };
    // Sobel 3x3 (BORDER_REPLICATE), int16 in OpenCV; i32 here (no overflow either way for 8-bit input).
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let gx = (px(x + 1, y - 1) + 2 * px(x + 1, y) + px(x + 1, y + 1))
                - (px(x - 1, y - 1) + 2 * px(x - 1, y) + px(x - 1, y + 1));
            let gy = (px(x - 1, y + 1) + 2 * px(x, y + 1) + px(x + 1, y + 1))
                - (px(x - 1, y - 1) + 2 * px(x, y - 1) + px(x + 1, y - 1));
            let i = y as usize * w + x as usize;
            dx[i] = gx;
            dy[i] = gy;
        }
    }
    let mag: Vec<i32> = dx.iter().zip(&dy).map(|(a, b)| a.abs() + b.abs()).collect();
    // Magnitudes outside the image are 0 (OpenCV's zeroed border rows and columns of its magnitude buffer).
    let m = |x: isize, y: isize| -> i32 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    const SHIFT: i32 = 15;
    // (int)(tan(22.5 deg) * (1 << 15) + 0.5)
    const TG22: i64 = 13573;
    // 0: weak candidate, 1: not an edge, 2: edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (xs, ys) = (dx[i], dy[i]);
            let ax = i64::from(xs.abs());
            let ay = i64::from(ys.abs()) << SHIFT;
            let tg22x = ax * TG22;
            let local_max = if ay < tg22x {
                v > m(x - 1, y) && v >= m(x + 1, y)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    v > m(x, y - 1) && v >= m(x, y + 1)
                } else {
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    v > m(x - s, y - 1) && v > m(x + s, y + 1)
                }
            };
            if local_max {
                if v > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (ox, oy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    for (o, v) in out.pixels_mut().zip(&map) {
        o.0[0] = if *v == 2 { 255 } else { 0 };
    }
    out
}

/// OpenCV's `cvtColor(RGB2GRAY)` for 8-bit images (4.12: 15-bit fixed point of 0.299, 0.587, 0.114):
/// `(R * 9798 + G * 19235 + B * 3735 + 16384) >> 15`.
pub fn rgb_to_gray(image: &RgbImage) -> GrayImage {
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        let [r, g, b] = image.get_pixel(x, y).0;
        let v = (u32::from(r) * 9798 + u32::from(g) * 19235 + u32::from(b) * 3735 + 16384) >> 15;
        image::Luma([v.min(255) as u8])
    })
}

/// The control image of a canny ControlNet: [`rgb_to_gray`], [`canny_gray`], and the edges in all three channels
/// (white on black), as diffusers' examples prepare it with `cv2.Canny`.
pub fn canny(image: &RgbImage, low: f32, high: f32) -> RgbImage {
    let edges = canny_gray(&rgb_to_gray(image), low, high);
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let v = edges.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gives_one_thin_edge() {
        let img = GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 0 } else { 200 }]));
        let e = canny_gray(&img, 100.0, 200.0);
        for y in 0..8 {
            let cols: Vec<u32> = (0..16).filter(|x| e.get_pixel(*x, y).0[0] == 255).collect();
            assert_eq!(cols.len(), 1, "row {y}: {cols:?}");
        }
        assert_eq!(canny_gray(&GrayImage::new(4, 4), 1.0, 2.0).pixels().filter(|p| p.0[0] != 0).count(), 0);
    }
}
