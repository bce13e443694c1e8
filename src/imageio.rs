//! Tensors to pictures and back.

use std::path::Path;

use image::{DynamicImage, GrayImage, RgbImage};
use ndarray::{ArrayView3, ArrayView4};

use crate::error::{boxed, Error, Result};

/// Converts one decoded image `[3, H, W]` with values in `[-1, 1]` to 8-bit RGB, as diffusers'
/// `VaeImageProcessor.postprocess` + `numpy_to_pil` do: `clamp(x / 2 + 0.5, 0, 1)`, then `round(x * 255)`
/// with ties to even (numpy's rounding).
pub fn tensor_to_rgb(chw: ArrayView3<'_, f32>) -> Result<RgbImage> {
    let (c, h, w) = chw.dim();
    if c != 3 {
        return Err(Error::InvalidLatents {
            message: format!("the VAE decoder returned {c} channels, expected 3 (RGB)"),
        });
    }
    let (w32, h32) = (u32::try_from(w), u32::try_from(h));
    let (Ok(w32), Ok(h32)) = (w32, h32) else {
        return Err(Error::InvalidLatents {
            message: format!("a {w}x{h} image is too large for a picture (at most {} pixels a side)", u32::MAX),
        });
    };
    // Plane by plane over contiguous memory (a 1024x1024 image is 3M values: indexing `chw[[c, y, x]]` per value
    // cost about 12 ms on a 2-core machine).
    let standard = chw.as_standard_layout();
    let plane = h * w;
    let (r, g, b) = match standard.as_slice() {
        Some(s) if s.len() == 3 * plane => (&s[..plane], &s[plane..2 * plane], &s[2 * plane..]),
        _ => return Err(Error::internal("the decoded image is not contiguous")),
    };
    let mut raw = vec![0u8; 3 * plane];
    for (px, ((r, g), b)) in raw.chunks_exact_mut(3).zip(r.iter().zip(g).zip(b)) {
        px[0] = to_level(*r);
        px[1] = to_level(*g);
        px[2] = to_level(*b);
    }
    RgbImage::from_raw(w32, h32, raw).ok_or_else(|| Error::internal("image buffer of the wrong size"))
}

/// A value in `[-1, 1]` as an 8-bit level: `(v / 2 + 0.5).clamp(0, 1) * 255`, rounded half to even (diffusers'
/// `(image / 2 + 0.5).clamp(0, 1)`, then numpy's `round`). NaN clamps to NaN and casts to 0: a broken graph gives
/// black pixels, never a panic.
#[inline]
fn to_level(v: f32) -> u8 {
    // Rounding half to even by adding and subtracting 2^23: exact for 0 <= x < 2^23 in f32's default rounding
    // mode, and it compiles to two additions where `round_ties_even` is a library call on baseline x86-64.
    const MAGIC: f32 = 8_388_608.0;
    let x = (v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
    ((x + MAGIC) - MAGIC) as u8
}

/// Converts a batch `[B, 3, H, W]` in `[-1, 1]` to images.
pub fn batch_to_rgb(nchw: ArrayView4<'_, f32>) -> Result<Vec<RgbImage>> {
    nchw.outer_iter().map(tensor_to_rgb).collect()
}

/// The PNG text keyword under which AUTOMATIC1111's web UI (and tools that read its images) keep the
/// generation parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Writes `image` as PNG, with `parameters` (if any) in a `parameters` text chunk: `tEXt` when the text is
/// Latin-1, `iTXt` (UTF-8) otherwise.
pub fn save_png(path: impl AsRef<Path>, image: &RgbImage, parameters: Option<&str>) -> Result<()> {
    let path = path.as_ref();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let png_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(io) => Error::io(path, io),
        other => Error::Image {
            path: Some(path.to_path_buf()),
            message: format!("cannot encode the PNG: {other}"),
            source: boxed(other),
        },
    };
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(text) = parameters {
        if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk(PARAMETERS_KEYWORD.to_string(), text.to_string()).map_err(png_err)?;
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEYWORD.to_string(), text.to_string()).map_err(png_err)?;
        }
    }
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(image.as_raw()).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

/// Reads the `parameters` text chunk of a PNG file, if it has one.
pub fn read_png_parameters(path: impl AsRef<Path>) -> Result<Option<String>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let png_err = |what: &str, e: png::DecodingError| match e {
        png::DecodingError::IoError(io) => Error::io(path, io),
        other => Error::Image {
            path: Some(path.to_path_buf()),
            message: format!("{what}: {other}; pass a PNG file"),
            source: boxed(other),
        },
    };
    let reader = decoder.read_info().map_err(|e| png_err("not a PNG file this crate can read", e))?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return Ok(Some(t.text.clone()));
    }
    let text_err = |e: png::DecodingError| png_err("the `parameters` text chunk cannot be decoded", e);
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return t.get_text().map(Some).map_err(text_err);
    }
    if let Some(t) = info.compressed_latin1_text.iter().find(|t| t.keyword == PARAMETERS_KEYWORD) {
        return t.get_text().map(Some).map_err(text_err);
    }
    Ok(None)
}

/// Reads a PNG picture for img2img / inpainting as 8-bit RGB (alpha dropped; 16-bit samples scaled to 8).
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    decode_rgb(&read(path)?).map_err(|e| e.in_file(path))
}

/// Reads a PNG inpainting mask as 8-bit gray. Colour pictures become gray as PIL's `convert("L")` does
/// (what diffusers' mask processor calls): `(R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16`, alpha ignored.
pub fn load_mask(path: impl AsRef<Path>) -> Result<GrayImage> {
    let path = path.as_ref();
    decode_mask(&read(path)?).map_err(|e| e.in_file(path))
}

/// Decodes the bytes of a PNG file as [`load_rgb`] reads it: 8-bit RGB, alpha dropped, 16-bit samples scaled to 8.
/// Pictures wider or taller than [`MAX_IMAGE_SIDE`](crate::MAX_IMAGE_SIDE), or whose decoded pixels would take
/// more than 512 MiB, are refused before their pixels are allocated, with an [`Error::Image`] that says what is
/// wrong and has the decoder's error as its source.
///
/// ```
/// let mut png = Vec::new();
/// image::RgbImage::new(4, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
/// assert_eq!(sd3_onnx::imageio::decode_rgb(&png).unwrap().dimensions(), (4, 2));
/// assert!(sd3_onnx::imageio::decode_rgb(b"not a png").is_err());
/// ```
pub fn decode_rgb(png: &[u8]) -> Result<RgbImage> {
    Ok(decode(png)?.to_rgb8())
}

/// Decodes the bytes of a PNG file as [`load_mask`] reads it: 8-bit gray, colour converted as PIL's
/// `convert("L")`, alpha ignored. The same size limits as [`decode_rgb`] apply.
pub fn decode_mask(png: &[u8]) -> Result<GrayImage> {
    Ok(match decode(png)? {
        DynamicImage::ImageLuma8(g) => g,
        DynamicImage::ImageLumaA8(g) => {
            GrayImage::from_fn(g.width(), g.height(), |x, y| image::Luma([g.get_pixel(x, y).0[0]]))
        }
        other if other.color().has_color() => pil_gray(&other.to_rgb8()),
        other => other.to_luma8(),
    })
}

/// PIL's RGB -> L conversion (`Convert.c`, `rgb2l`: ITU-R 601-2 luma in 16-bit fixed point, rounded).
pub(crate) fn pil_gray(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let l = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
        image::Luma([l as u8])
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The largest decoded picture accepted, in bytes (the `image` crate's default allocation limit, made explicit).
const MAX_DECODED_BYTES: u64 = 512 << 20;

fn decode(png: &[u8]) -> Result<DynamicImage> {
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(png), image::ImageFormat::Png);
    let side = crate::MAX_IMAGE_SIDE as u32;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| Error::Image {
        path: None,
        message: format!(
            "not a PNG picture this crate can read: {e}; pass an 8- or 16-bit PNG of at most {side} pixels a side \
             and {} MiB of decoded pixels",
            MAX_DECODED_BYTES >> 20
        ),
        source: boxed(e),
    })
}

#[cfg(test)]
mod tests;
