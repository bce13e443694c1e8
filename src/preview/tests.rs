use ndarray::Array3;

use super::*;

#[test]
fn zero_latents_give_the_bias_colour() {
    let img = latents_to_rgb(Array3::<f32>::zeros((16, 2, 3)).view()).unwrap();
    assert_eq!(img.dimensions(), (3, 2));
    // (0.2394 + 1) / 2 * 255 = 158.02, (0.2135 + 1) / 2 * 255 = 154.72, (0.1925 + 1) / 2 * 255 = 152.04
    assert_eq!(img.get_pixel(2, 1).0, [158, 155, 152]);
}

#[test]
fn channels_map_through_the_factors() {
    let mut l = Array3::<f32>::zeros((16, 1, 1));
    l[[15, 0, 0]] = 8.0; // channel 15 darkens all three: R 0.2394 - 8 * 0.1448 = -0.92 -> 10
    let px = latents_to_rgb(l.view()).unwrap().get_pixel(0, 0).0;
    assert!(px.iter().all(|v| *v < 70), "{px:?}");
    l[[15, 0, 0]] = -20.0; // saturates
    assert_eq!(latents_to_rgb(l.view()).unwrap().get_pixel(0, 0).0, [255, 255, 255]);
}

#[test]
fn other_channel_counts_are_refused() {
    let err = latents_to_rgb(Array3::<f32>::zeros((4, 2, 2)).view()).unwrap_err();
    assert!(err.to_string().contains("16-channel"), "{err}");
}
