//! The decoded image to 8-bit RGB on the VAE decoder's own execution provider (issue 19: our time outside ONNX
//! Runtime). On CUDA the decoder's `sample` stays in device memory, this small graph turns it into interleaved
//! `[B, H, W, 3]` bytes there, and only those bytes come back: a quarter of the float32 image (half of a float16
//! one), and no conversion on the host.
//!
//! The arithmetic is `crate::imageio`'s `to_level`, in float32 and in the same order: `(v / 2 + 0.5)` clamped to
//! `[0, 1]`, times 255, rounded half to even (ONNX `Round`), cast to uint8; NaN gives level 0 (the host's `NaN as
//! u8`), here by replacing NaN with -1 first so that no NaN reaches `Max`/`Min`, whose NaN handling differs
//! between providers. On the CPU provider the two agree to the bit (tests below).

use ort::session::Session;
use ort::value::{DynTensorValueType, Tensor};

use super::super::graph::Graph;
use super::super::merge::{onnx_type, Message};
use super::super::{ElementType, Input};
use super::{Builder, DeviceTensor};
use crate::error::{boxed, Error, Result};

/// The constants the graph reads, in this order, as one float32 input `k` (the builder has no initializers).
const CONSTANTS: [f32; 6] = [-1.0, 2.0, 0.5, 0.0, 1.0, 255.0];

/// The RGB graph for a `sample` of element type `sample` (`[b, 3, h, w]`): output `rgb`, uint8 `[b, h, w, 3]`.
/// `None` for element types we cannot cast.
pub(crate) fn rgb_graph(sample: ElementType) -> Option<Vec<u8>> {
    const F32: i64 = 1;
    const U8: i64 = 2;
    let ts = onnx_type(sample)?;
    let mut g = Builder::new();
    g.input("sample", ts, &["b", "c", "h", "w"]);
    g.input("k", F32, &["six"]);
    let names = ["minus_one", "two", "half", "zero", "one", "levels"];
    g.node("Split", &["k"], &names, &[("axis", 0), ("num_outputs", CONSTANTS.len() as i64)]);
    let x = g.cast("sample", ts, F32);
    let nan = g.op("IsNaN", &[&x]);
    let x = g.op("Where", &[&nan, "minus_one", &x]);
    let x = g.op("Div", &[&x, "two"]);
    let x = g.op("Add", &[&x, "half"]);
    let x = g.op("Max", &[&x, "zero"]);
    let x = g.op("Min", &[&x, "one"]);
    let x = g.op("Mul", &[&x, "levels"]);
    let x = g.op("Round", &[&x]);
    let x = g.cast(&x, F32, U8);
    // Transpose with perm [0, 2, 3, 1] (an INTS attribute: AttributeProto { name, ints, type = INTS (7) }).
    let mut attr = Message::new().str(1, "perm");
    for p in [0, 2, 3, 1] {
        attr = attr.int(8, p);
    }
    attr = attr.int(20, 7);
    let node = Message::new().str(1, &x).str(2, "rgb").str(3, "Transpose_rgb").str(4, "Transpose").msg(5, attr);
    g.nodes.push(node);
    g.output("rgb", U8, &["b", "h", "w", "three"]);
    Some(g.finish())
}

impl Graph {
    /// Whether this graph computes in device memory (CUDA, TensorRT), where [`Graph::rgb_bytes`] saves a copy.
    pub(crate) fn computes_on_device(&self) -> bool {
        self.device().is_some()
    }

    /// Runs with host `inputs` and leaves output `output` in the memory this graph computes in (timed as this
    /// graph's `Session::run`, like [`Graph::run`]).
    pub(crate) fn run_to_device(&mut self, inputs: &[(&str, Input<'_>)], output: &str) -> Result<DeviceTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        self.ensure_loaded()?;
        let memory = self.compute_memory().map_err(infer)?;
        let values =
            inputs.iter().map(|(name, input)| Ok((*name, self.value(name, input)?))).collect::<Result<Vec<_>>>()?;
        let session = super::super::graph::live(&mut self.session, component)?;
        let mut binding = session.create_binding().map_err(infer)?;
        for (name, value) in &values {
            binding.bind_input(*name, value).map_err(infer)?;
        }
        binding.bind_output_to_device(output, &memory).map_err(infer)?;
        let started = std::time::Instant::now();
        let mut outputs = session.run_binding(&binding).map_err(infer)?;
        self.run_time += started.elapsed();
        let value = outputs
            .remove(output)
            .ok_or_else(|| Error::internal(format!("{component}: output `{output}` was asked for and not produced")))?;
        Ok(DeviceTensor(value))
    }

    /// `sample` (`[b, 3, h, w]` in `[-1, 1]`, in this graph's memory) as interleaved 8-bit RGB on the host:
    /// `([b, h, w], bytes)`, through [`rgb_graph`] on this graph's provider.
    pub(crate) fn rgb_bytes(&mut self, sample: &DeviceTensor) -> Result<([usize; 3], Vec<u8>)> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("the RGB conversion: {e}"), boxed(e));
        let dtype = sample.element_type().ok_or_else(|| Error::internal("the decoded image is not a tensor"))?;
        let shape = sample.shape();
        let [b, 3, h, w] = shape[..] else {
            return Err(Error::internal(format!("the decoded image has shape {shape:?}, expected [b, 3, h, w]")));
        };
        let index = match self.steppers.rgb.iter().position(|(t, _)| *t == dtype) {
            Some(i) => i,
            None => {
                let bytes =
                    rgb_graph(dtype).ok_or_else(|| Error::internal(format!("no RGB conversion for {dtype} images")))?;
                let session = self.small_session(&bytes, "the RGB conversion")?;
                self.steppers.rgb.push((dtype, session));
                self.steppers.rgb.len() - 1
            }
        };
        let memory = self.compute_memory().map_err(infer)?;
        let host = self.device().is_none();
        let session: &mut Session = &mut self.steppers.rgb[index].1;
        let k = Tensor::from_array(([CONSTANTS.len()], CONSTANTS.to_vec())).map_err(infer)?;
        let mut binding = session.create_binding().map_err(infer)?;
        binding.bind_input("sample", &sample.0).map_err(infer)?;
        binding.bind_input("k", &k).map_err(infer)?;
        binding.bind_output_to_device("rgb", &memory).map_err(infer)?;
        let mut outputs = session.run_binding(&binding).map_err(infer)?;
        let value = outputs.remove("rgb").ok_or_else(|| Error::internal("the RGB conversion gave no output"))?;
        drop(outputs);
        let bytes = if host {
            value.try_extract_tensor::<u8>().map_err(infer)?.1.to_vec()
        } else {
            let t = value.view().downcast::<DynTensorValueType>().map_err(infer)?;
            let copied = t.to(ort::memory::AllocationDevice::CPU, 0).map_err(infer)?;
            copied.try_extract_tensor::<u8>().map_err(infer)?.1.to_vec()
        };
        if bytes.len() != b * h * w * 3 {
            return Err(Error::internal(format!("the RGB conversion gave {} bytes for {b}x{h}x{w}", bytes.len())));
        }
        Ok(([b, h, w], bytes))
    }
}

#[cfg(test)]
mod tests {
    use half::f16;
    use ndarray::{Array4, ArrayD, ArrayViewD, IxDyn};

    use super::*;
    use crate::imageio::batch_to_rgb;

    /// Runs [`rgb_graph`] on the CPU provider over `sample` (float32 `[b, 3, h, w]`), for tests.
    fn rgb_on_cpu(sample: ArrayViewD<'_, f32>, as_type: ElementType) -> Vec<u8> {
        use half::f16;
        let bytes = rgb_graph(as_type).expect("graph");
        let env = crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let mut session = Session::builder(&env).expect("builder").commit_from_memory(&bytes).expect("session");
        let k = Tensor::from_array(([CONSTANTS.len()], CONSTANTS.to_vec())).expect("k");
        let shape = sample.shape().to_vec();
        let data: Vec<f32> = sample.iter().copied().collect();
        let outputs = match as_type {
            ElementType::Float16 => {
                let s =
                    Tensor::from_array((shape, data.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>())).expect("s");
                session.run(ort::inputs!["sample" => s, "k" => k]).expect("run")
            }
            _ => {
                let s = Tensor::from_array((shape, data)).expect("s");
                session.run(ort::inputs!["sample" => s, "k" => k]).expect("run")
            }
        };
        outputs["rgb"].try_extract_tensor::<u8>().expect("u8").1.to_vec()
    }

    /// Values that test every branch of the host conversion: NaN, infinities, the clamp edges, every tie between
    /// two levels (k + 0.5) / 255 mapped back to [-1, 1] and its float32 neighbours, negative zero, subnormals.
    fn edge_values() -> Vec<f32> {
        let mut v = vec![f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1.0, -1.0, 1.5, -1.5];
        v.extend([f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-45, -1e-45, f32::MAX, f32::MIN]);
        for k in 0..=255 {
            // x = (v / 2 + 0.5) * 255 = k + 0.5  <=>  v = 2 * (k + 0.5) / 255 - 1
            let t = 2.0 * (k as f32 + 0.5) / 255.0 - 1.0;
            v.extend([t, f32::from_bits(t.to_bits().wrapping_add(1)), f32::from_bits(t.to_bits().wrapping_sub(1))]);
            v.push(2.0 * k as f32 / 255.0 - 1.0);
        }
        v
    }

    fn host(sample: &Array4<f32>) -> Vec<u8> {
        batch_to_rgb(sample.view()).expect("rgb").iter().flat_map(|i| i.as_raw().clone()).collect()
    }

    #[test]
    fn the_graph_equals_the_host_conversion_on_every_edge_value() {
        crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let mut v = edge_values();
        // 2 images of 3 x 7 x n: channels and batch must land in the right place too.
        let n = v.len().div_ceil(42) * 42;
        let mut state = 7u64;
        while v.len() < n {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            v.push(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.4 - 1.2);
        }
        let w = n / 42;
        let sample = Array4::from_shape_vec((2, 3, 7, w), v).expect("shape");
        let want = host(&sample);
        let got = rgb_on_cpu(sample.view().into_dyn(), ElementType::Float32);
        assert_eq!(got.len(), want.len());
        let wrong: Vec<usize> = (0..got.len()).filter(|i| got[*i] != want[*i]).collect();
        assert!(wrong.is_empty(), "{} of {} bytes differ, first at {:?}", wrong.len(), got.len(), wrong.first());
    }

    #[test]
    fn float16_samples_equal_the_host_conversion_of_their_float32_values() {
        crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let v: Vec<f32> = edge_values().into_iter().map(|x| f16::from_f32(x).to_f32()).collect();
        let n = v.len().div_ceil(3) * 3;
        let mut v = v;
        v.resize(n, 0.25);
        let sample = Array4::from_shape_vec((1, 3, 1, n / 3), v).expect("shape");
        let want = host(&sample);
        let got = rgb_on_cpu(sample.view().into_dyn(), ElementType::Float16);
        assert_eq!(got, want);
    }

    #[test]
    fn a_swapped_channel_order_would_be_caught() {
        // The interleaving is what the graph's Transpose does: an image whose channels differ must not come out
        // the same with red and blue exchanged.
        crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let mut a = ArrayD::<f32>::zeros(IxDyn(&[1, 3, 2, 2]));
        a.slice_mut(ndarray::s![0, 0, .., ..]).fill(1.0);
        let got = rgb_on_cpu(a.view(), ElementType::Float32);
        // zeros are level 127.5, which rounds half to even: 128
        assert_eq!(&got[..3], &[255, 128, 128]);
    }
}
