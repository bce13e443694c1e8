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
