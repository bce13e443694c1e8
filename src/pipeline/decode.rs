//! Decoding: latents through the VAE decoder to images, whole or in tiles (diffusers' `tiled_decode`).

use ndarray::{concatenate, s, Array4, ArrayD, Axis, Ix4};

use super::Sd3Pipeline;
use crate::error::{Component, Error, Result};
use crate::imageio::batch_to_rgb;
use crate::runtime::Input;

impl Sd3Pipeline {
    /// Decodes latents `[B, C, h, w]` to images: `z / scaling_factor + shift_factor` through the VAE decoder
    /// (diffusers `StableDiffusion3Pipeline.__call__`).
    pub fn decode(&mut self, latents: Array4<f32>) -> Result<Vec<image::RgbImage>> {
        let (sf, shift) = (self.info.vae_scaling_factor, self.info.vae_shift_factor);
        let z = latents.mapv(|v| v / sf + shift);
        let tile = self.info.vae_tile_size / self.info.vae_scale_factor;
        let sample = if self.vae_tiling && tile > 0 && (z.shape()[2] > tile || z.shape()[3] > tile) {
            self.tiled_decode(&z)?
        } else if self.vae_decoder.computes_on_device() {
            // On a GPU the image stays there and only its RGB bytes come back (issue 19).
            return self.decode_on_device(z);
        } else {
            self.decode_raw(z)?
        };
        batch_to_rgb(sample.view())
    }

    /// The VAE decoder with its output left in the memory it computes in, then converted to RGB bytes there
    /// (`Graph::rgb_bytes`: the host conversion's arithmetic; equal to the bit on the CPU provider: the tests below and src/runtime/step/rgb.rs).
    pub(super) fn decode_on_device(&mut self, z: Array4<f32>) -> Result<Vec<image::RgbImage>> {
        let z = z.into_dyn();
        let sample = self.vae_decoder.run_to_device(&[("latent_sample", Input::Float(z.view()))], "sample")?;
        self.check_sample_shape(&sample.shape(), z.shape())?;
        let ([b, h, w], bytes) = self.vae_decoder.rgb_bytes(&sample)?;
        let (w32, h32) = (u32::try_from(w), u32::try_from(h));
        let (Ok(w32), Ok(h32)) = (w32, h32) else {
            return Err(Error::internal(format!("a decoded image of {w}x{h} pixels")));
        };
        bytes
            .chunks_exact(h * w * 3)
            .take(b)
            .map(|one| {
                image::RgbImage::from_raw(w32, h32, one.to_vec())
                    .ok_or_else(|| Error::internal("image buffer of the wrong size"))
            })
            .collect()
    }

    pub(super) fn decode_raw(&mut self, z: Array4<f32>) -> Result<Array4<f32>> {
        let z = z.into_dyn();
        let mut out = self.vae_decoder.run(&[("latent_sample", Input::Float(z.view()))], &["sample"])?;
        let sample = out.pop().ok_or_else(|| Error::internal("the VAE decoder session returned no output"))?;
        let sample = to4(Component::VaeDecoder, sample)?;
        // The tiled decode blends and joins tiles by these sizes: a graph that answers with another shape is
        // reported here, not left to fail (or panic) in the blend.
        self.check_sample_shape(sample.shape(), z.shape())?;
        Ok(sample)
    }

    /// The decoder's `sample` must be `[b, 3, h * f, w * f]` for latents `[b, C, h, w]` (f the VAE factor).
    fn check_sample_shape(&self, sample: &[usize], latents: &[usize]) -> Result<()> {
        let f = self.info.vae_scale_factor;
        let (b, h, w) = (latents[0], latents[2], latents[3]);
        let expected = [b, 3, h * f, w * f];
        if sample != expected {
            return Err(Error::inference(
                Component::VaeDecoder,
                format!(
                    "`sample` has shape {sample:?} for latents of shape {latents:?}; expected {expected:?} (the VAE \
                     factor is {f})"
                ),
                None,
            ));
        }
        Ok(())
    }

    /// diffusers' `AutoencoderKL.tiled_decode` (0.35.2 `models/autoencoders/autoencoder_kl.py`; in 0.42.1 the same code moved to a tiling mixin, docs/diffusers-versions.md): latent tiles
    /// of `sample_size / vae_scale_factor` with an overlap factor of 0.25, each decoded on its own, blended
    /// linearly into the tile above and the tile to the left (in place, in that order), then cropped and joined.
    fn tiled_decode(&mut self, z: &Array4<f32>) -> Result<Array4<f32>> {
        const OVERLAP_FACTOR: f64 = 0.25; // AutoencoderKL.tile_overlap_factor
        let tile_latent = self.info.vae_tile_size / self.info.vae_scale_factor;
        let tile_sample = self.info.vae_tile_size;
        let overlap = (tile_latent as f64 * (1.0 - OVERLAP_FACTOR)) as usize;
        let blend_extent = (tile_sample as f64 * OVERLAP_FACTOR) as usize;
        let row_limit = tile_sample - blend_extent;
        if overlap == 0 {
            return self.decode_raw(z.clone());
        }
        let (h, w) = (z.shape()[2], z.shape()[3]);
        let mut rows: Vec<Vec<Array4<f32>>> = Vec::new();
        for i in (0..h).step_by(overlap) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap) {
                let part = z.slice(s![.., .., i..(i + tile_latent).min(h), j..(j + tile_latent).min(w)]);
                row.push(self.decode_raw(part.to_owned())?);
            }
            rows.push(row);
        }
        let mut joined_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let (above, current) = rows.split_at_mut(i);
            let row = &mut current[0];
            for j in 0..row.len() {
                if let Some(prev) = above.last() {
                    let tile_above = prev.get(j).ok_or_else(|| Error::internal("tile rows of different lengths"))?;
                    blend(tile_above, &mut row[j], blend_extent, 2)?;
                }
                if j > 0 {
                    let (left, rest) = row.split_at_mut(j);
                    blend(&left[j - 1], &mut rest[0], blend_extent, 3)?;
                }
            }
            let crops: Vec<_> = row
                .iter()
                .map(|t| t.slice(s![.., .., ..row_limit.min(t.shape()[2]), ..row_limit.min(t.shape()[3])]))
                .collect();
            joined_rows.push(
                concatenate(Axis(3), &crops).map_err(|e| Error::internal(format!("joining decoded tiles: {e}")))?,
            );
        }
        let views: Vec<_> = joined_rows.iter().map(|r| r.view()).collect();
        concatenate(Axis(2), &views).map_err(|e| Error::internal(format!("joining decoded tiles: {e}")))
    }
}

/// Linear blend of the last `extent` rows (axis 2, `AutoencoderKL.blend_v`) or columns (axis 3, `blend_h`) of
/// `a` into the first ones of `b`, in place: `b[k] = a[len - extent + k] * (1 - k / extent) + b[k] * (k / extent)`,
/// with the weights computed in f64 and rounded to f32 as torch does for Python scalars. The tiles must agree on
/// every other axis (an internal error otherwise: `decode_raw` checks each tile's shape).
fn blend(a: &Array4<f32>, b: &mut Array4<f32>, extent: usize, axis: usize) -> Result<()> {
    let other_axes_agree = (0..4).filter(|k| *k != axis).all(|k| a.shape()[k] == b.shape()[k]);
    if axis > 3 || !other_axes_agree {
        return Err(Error::internal(format!(
            "cannot blend a tile of shape {:?} into one of shape {:?} along axis {axis}",
            a.shape(),
            b.shape()
        )));
    }
    let extent = extent.min(a.shape()[axis]).min(b.shape()[axis]);
    let a_len = a.shape()[axis];
    for k in 0..extent {
        let wb = (k as f64 / extent as f64) as f32;
        let wa = (1.0 - k as f64 / extent as f64) as f32;
        let from = a.index_axis(Axis(axis), a_len - extent + k);
        let mut to = b.index_axis_mut(Axis(axis), k);
        to.zip_mut_with(&from, |t, f| *t = f * wa + *t * wb);
    }
    Ok(())
}

pub(super) fn to4(component: Component, a: ArrayD<f32>) -> Result<Array4<f32>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>()
        .map_err(|_| Error::inference(component, format!("expected a rank-4 output, got shape {shape:?}"), None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sd3Pipeline;

    /// This repository's tiny fixture (`SD3ONNX_REPO` when the test binary runs on another machine).
    fn tiny() -> std::path::PathBuf {
        std::env::var_os("SD3ONNX_REPO")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("models/fixtures/tiny-sd3")
    }

    /// Latents `[2, C, 8, 12]` with values over several standard deviations (some pixels clip at both ends).
    fn latents(pipe: &Sd3Pipeline) -> Array4<f32> {
        let c = pipe.info.latent_channels;
        let mut state = 11u64;
        Array4::from_shape_fn((2, c, 8, 12), |_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
    }

    /// The host conversion of the decoder's float32 output, the way `decode` does it off the GPU.
    fn on_host(pipe: &mut Sd3Pipeline, z: &Array4<f32>) -> Vec<image::RgbImage> {
        let (sf, shift) = (pipe.info.vae_scaling_factor, pipe.info.vae_shift_factor);
        let sample = pipe.decode_raw(z.mapv(|v| v / sf + shift)).unwrap();
        batch_to_rgb(sample.view()).unwrap()
    }

    fn on_device(pipe: &mut Sd3Pipeline, z: &Array4<f32>) -> Vec<image::RgbImage> {
        let (sf, shift) = (pipe.info.vae_scaling_factor, pipe.info.vae_shift_factor);
        pipe.decode_on_device(z.mapv(|v| v / sf + shift)).unwrap()
    }

    #[test]
    fn decoding_through_the_rgb_graph_gives_the_host_conversion_bytes() {
        let mut pipe = Sd3Pipeline::builder(tiny()).build().unwrap();
        let z = latents(&pipe);
        let (host, device) = (on_host(&mut pipe, &z), on_device(&mut pipe, &z));
        assert_eq!(host.len(), 2);
        assert_eq!(device.len(), 2);
        for (a, b) in host.iter().zip(&device) {
            assert_eq!(a.dimensions(), b.dimensions());
            assert!(a.as_raw() == b.as_raw(), "the RGB graph's bytes differ from the host conversion's");
        }
        // the two images differ, so a batch mix-up would be seen
        assert!(host[0].as_raw() != host[1].as_raw());
    }

    /// The same on CUDA: the decoder's output converted on the GPU against the same output converted on the
    /// host. `cargo test --features cuda --lib -- --ignored rgb_cuda` (scripts/gpu/ carry the binary).
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU and ONNX Runtime's CUDA provider"]
    fn rgb_cuda_conversion_gives_the_host_conversion_bytes() {
        let cuda = crate::ExecutionProvider::Cuda(Default::default());
        let mut pipe = Sd3Pipeline::builder(tiny()).execution_provider(cuda).build().unwrap();
        let z = latents(&pipe);
        let (host, device) = (on_host(&mut pipe, &z), on_device(&mut pipe, &z));
        let differ: usize =
            host.iter().zip(&device).map(|(a, b)| a.iter().zip(b.iter()).filter(|(x, y)| x != y).count()).sum();
        eprintln!("CUDA RGB conversion vs host conversion of the same decoder output: {differ} bytes differ");
        assert_eq!(differ, 0);
    }

    #[test]
    fn blending_tiles_of_different_shapes_is_an_error_not_a_panic() {
        let a = Array4::<f32>::ones((1, 3, 8, 8));
        let mut b = Array4::<f32>::zeros((1, 3, 8, 6));
        // Along the rows (axis 2) the widths must agree: 8 vs 6.
        let e = blend(&a, &mut b, 2, 2).unwrap_err();
        assert!(matches!(e, Error::Internal { .. }), "{e:?}");
        // Along the columns the heights agree, so this one blends.
        blend(&a, &mut b, 2, 3).unwrap();
        assert_eq!(b[[0, 0, 0, 0]], 1.0); // k = 0: all from the left tile
        assert_eq!(b[[0, 0, 0, 1]], 0.5); // k = 1 of 2: half and half
    }
}
