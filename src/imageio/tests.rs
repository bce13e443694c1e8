use super::*;
use ndarray::Array3;

#[test]
fn maps_range_and_rounds_half_to_even() {
    let mut t = Array3::<f32>::zeros((3, 1, 4));
    t[[0, 0, 0]] = -1.0; // -> 0
    t[[0, 0, 1]] = 1.0; // -> 255
    t[[0, 0, 2]] = 5.0; // clamped -> 255
                        // 0.5/255 above 0 maps to x*255 = 0.5 -> ties to even -> 0
    t[[0, 0, 3]] = (0.5 / 255.0 - 0.5) * 2.0;
    let img = tensor_to_rgb(t.view()).unwrap();
    assert_eq!(img.get_pixel(0, 0)[0], 0);
    assert_eq!(img.get_pixel(1, 0)[0], 255);
    assert_eq!(img.get_pixel(2, 0)[0], 255);
    assert!(img.get_pixel(3, 0)[0] <= 1);
    assert_eq!(img.get_pixel(0, 0)[1], 128); // 0.0 -> 127.5 -> 128 (ties to even)
}

/// The plane-by-plane conversion equals the per-value definition (x = column, y = row) on a non-square image, a
/// transposed (non-standard layout) view and the special values (NaN -> 0, infinities clamp).
#[test]
fn conversion_matches_the_definition_pixel_by_pixel() {
    let (h, w) = (5, 7);
    let mut t = Array3::<f32>::zeros((3, h, w));
    for ((c, y, x), v) in t.indexed_iter_mut() {
        *v = ((c * 31 + y * 7 + x) as f32 * 0.137).sin() * 1.3;
    }
    t[[0, 0, 0]] = f32::NAN;
    t[[1, 4, 6]] = f32::INFINITY;
    t[[2, 2, 3]] = f32::NEG_INFINITY;
    let def = |v: f32| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    let check = |chw: ndarray::ArrayView3<'_, f32>| {
        let img = tensor_to_rgb(chw).unwrap();
        let (_, hh, ww) = chw.dim();
        assert_eq!((img.width() as usize, img.height() as usize), (ww, hh));
        for y in 0..hh {
            for x in 0..ww {
                for c in 0..3 {
                    assert_eq!(img.get_pixel(x as u32, y as u32)[c], def(chw[[c, y, x]]), "({c}, {y}, {x})");
                }
            }
        }
    };
    check(t.view());
    let transposed = t.view().permuted_axes([0, 2, 1]);
    assert!(!transposed.is_standard_layout());
    check(transposed);
    let img = tensor_to_rgb(t.view()).unwrap();
    assert_eq!(img.get_pixel(0, 0)[0], 0, "NaN");
    assert_eq!(img.get_pixel(6, 4)[1], 255, "+inf");
    assert_eq!(img.get_pixel(3, 2)[2], 0, "-inf");
}

/// The add-and-subtract rounding equals `round_ties_even` over [-1.1, 1.1] (4.4M evenly spaced values, every
/// value whose level is an exact tie k + 0.5, and their neighbours).
#[test]
fn level_rounding_is_round_half_to_even() {
    let def = |v: f32| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    for i in 0..=4_400_000u32 {
        let v = -1.1 + i as f32 * 5e-7;
        assert_eq!(to_level(v), def(v), "{v}");
    }
    for k in 0..255u32 {
        // v with (v / 2 + 0.5) * 255 as close to k + 0.5 as f32 allows, and the f32 values around it
        let v = ((k as f32 + 0.5) / 255.0 - 0.5) * 2.0;
        let mut u = v;
        for _ in 0..8 {
            u = f32::from_bits(u.to_bits().wrapping_sub(1));
        }
        for _ in 0..16 {
            assert_eq!(to_level(u), def(u), "{u}");
            u = f32::from_bits(u.to_bits().wrapping_add(1));
        }
    }
}

#[test]
fn wrong_channel_count_is_an_error() {
    let t = Array3::<f32>::zeros((4, 2, 2));
    assert!(tensor_to_rgb(t.view()).is_err());
}

#[test]
fn colour_masks_become_gray_as_pil_does() {
    let mut rgb = RgbImage::new(3, 1);
    rgb.put_pixel(0, 0, image::Rgb([255, 0, 0])); // PIL: 76
    rgb.put_pixel(1, 0, image::Rgb([0, 255, 0])); // PIL: 150
    rgb.put_pixel(2, 0, image::Rgb([10, 200, 90])); // PIL: 131
    let g = pil_gray(&rgb);
    assert_eq!(g.as_raw(), &vec![76, 150, 131]); // Pillow 13.0.0 convert("L")
}

#[test]
fn unreadable_pictures_are_io_errors() {
    let dir = std::env::temp_dir().join(format!("sd3-onnx-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let err = load_rgb(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.png") && err.contains("PNG"), "{err}");
    assert!(load_mask(dir.join("missing.png")).is_err());
}
