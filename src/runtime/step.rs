//! The denoising loop's arithmetic on a graph's own execution provider: classifier-free guidance, the sampler
//! update (Euler, Heun's two halves, DPM-Solver++ first and second order), the inpainting blend, and the next
//! transformer input (cast to its element type, doubled for guidance), as one small ONNX graph per evaluation.
//!
//! The graphs are built here as protobuf bytes (the technique of src/runtime/merge.rs) and run by ONNX Runtime
//! on the same provider as the transformer, so on CUDA the latents, the transformer's output and every
//! intermediate stay in device memory between steps (src/pipeline/device_loop.rs). Every operation is the
//! element-wise `f32` operation of the host loop, in the same order (`apply_guidance`, `euler_step`,
//! `heun_step`, `dpm_step`, `scale_noise`, `blend_known`); the scalars come from the same code
//! (`Sampler::advance`), so on the CPU provider the two loops agree to the bit, and on a GPU to the GPU's own
//! rounding of the same operations.

use std::time::Instant;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor};

use super::graph::Graph;
use super::merge::{onnx_type, Message};
use super::{ElementType, ExecutionProvider, Input};
use crate::error::{boxed, Error, Result};

mod rgb;

/// Which update an evaluation applies (see `crate::scheduler::StepScalars` for the formulas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepKind {
    /// Scalars `[dt]`.
    Euler,
    /// Scalars `[sigma, sigma_hat, dt]`; extra output `derivative`.
    HeunFirst,
    /// Scalars `[sigma_next, dt, 0.5]`; extra inputs `d1` (the first half's derivative) and `saved` (the sample
    /// the first half started from).
    HeunSecond,
    /// Scalars `[sigma, ratio, coef]`; extra output `x0`.
    DpmFirst,
    /// Scalars `[sigma, inv_r0, ratio, coef, half_coef]`; extra input `m1` (the previous `x0`), extra output `x0`.
    DpmSecond,
}

impl StepKind {
    fn scalars(self) -> usize {
        match self {
            StepKind::Euler => 1,
            StepKind::HeunFirst | StepKind::HeunSecond | StepKind::DpmFirst => 3,
            StepKind::DpmSecond => 5,
        }
    }

    fn extra_inputs(self) -> &'static [&'static str] {
        match self {
            StepKind::HeunSecond => &["d1", "saved"],
            StepKind::DpmSecond => &["m1"],
            _ => &[],
        }
    }

    /// The extra output of this kind (Heun's first-half derivative, DPM-Solver++'s data prediction).
    pub fn extra_output(self) -> Option<&'static str> {
        match self {
            StepKind::HeunFirst => Some("derivative"),
            StepKind::DpmFirst | StepKind::DpmSecond => Some("x0"),
            _ => None,
        }
    }
}

/// One step graph's signature.
///
/// Inputs: `x` (float32 `[n, c, h, w]`, the sample), `v` (`velocity` type, `[b, c, h, w]`: the transformer's
/// output, `[uncond..., cond...]` with guidance), `s` (float32 `[k]`: the scalars, in order: the guidance
/// scale when `guidance`, the skip-layer guidance scale when `skip`, the kind's scalars, then with `inpaint` the reference's `sigma`, `1 - sigma` and 1),
/// the kind's extra inputs (float32 like `x`), and with `inpaint` `image` and `noise` (like `x`) and `mask`
/// (float32 `[n, 1, h, w]`, 1 where the image is generated).
///
/// Outputs: `x_next` (float32 like `x`), `hidden` (`hidden` type, `[b, c, h, w]`: the next transformer input,
/// `[x_next, x_next]` with guidance), the kind's extra output (float32 like `x`) and with `single`
/// `hidden_single` (`hidden` type, like `x`); with `guided` the guided velocity `guided` (float32 like `x`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepSpec {
    pub kind: StepKind,
    pub guidance: bool,
    /// Skip-layer guidance at this evaluation (with `guidance` only): input `vs`, the skip-layer graph's output
    /// on the conditional half, and a scalar, the scale, after the guidance scale.
    pub skip: bool,
    /// Output `hidden_single` too: the next input of the skip-layer graph (`x_next` cast, not doubled).
    pub single: bool,
    /// Output `guided` too: the guided velocity (float32 like `x`), for previews.
    pub guided: bool,
    pub inpaint: bool,
    /// The transformer's `hidden_states` element type.
    pub hidden: ElementType,
    /// The transformer's `out_hidden_states` element type.
    pub velocity: ElementType,
}

impl StepSpec {
    /// How many scalars `s` holds.
    pub fn scalars(&self) -> usize {
        usize::from(self.guidance) + usize::from(self.skip) + self.kind.scalars() + if self.inpaint { 3 } else { 0 }
    }

    /// The output names, in the order [`Graph::run_step`] returns them.
    pub fn outputs(&self) -> Vec<&'static str> {
        let mut v = vec!["x_next", "hidden"];
        v.extend(self.kind.extra_output());
        if self.single {
            v.push("hidden_single");
        }
        if self.guided {
            v.push("guided");
        }
        v
    }
}

/// A value in the memory the graph computes in (device memory on CUDA and TensorRT, host memory otherwise).
pub(crate) struct DeviceTensor(DynValue);

impl DeviceTensor {
    /// The tensor's shape.
    pub fn shape(&self) -> Vec<usize> {
        match self.0.dtype() {
            ort::value::ValueType::Tensor { shape, .. } => {
                shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl DeviceTensor {
    /// The tensor's element type, `None` for a value that is not a tensor.
    pub fn element_type(&self) -> Option<ElementType> {
        match self.0.dtype() {
            ort::value::ValueType::Tensor { ty, .. } => Some(ElementType::from_ort(*ty)),
            _ => None,
        }
    }
}

/// The ControlNet residual mix of `n` ControlNets: inputs `r0 .. r{n-1}` (the ControlNets' block samples, of
/// element type `from`, `[layers, batch, tokens, width]`) and `s0 .. s{n-1}` (float32 `[1]`, each unit's
/// `scale * keep`); output `residuals` of element type `to` = `r0 * s0 + r1 * s1 + ...`, every product and sum in
/// float32 in that order: the host code's arithmetic (`controlled_velocity`: the residuals converted to f32,
/// multiplied by the scale, added unit by unit, then converted at the transformer's input). `None` for element
/// types we cannot cast, or `n == 0`.
pub(crate) fn mix_graph(n: usize, from: ElementType, to: ElementType) -> Option<Vec<u8>> {
    const F32: i64 = 1;
    let (tf, tt) = (onnx_type(from)?, onnx_type(to)?);
    if n == 0 {
        return None;
    }
    let dims = ["l", "b", "s", "d"];
    let mut g = Builder::new();
    let mut acc = String::new();
    for k in 0..n {
        let (r, sc) = (format!("r{k}"), format!("s{k}"));
        g.input(&r, tf, &dims);
        g.input(&sc, F32, &["one"]);
        let r32 = g.cast(&r, tf, F32);
        let scaled = g.op("Mul", &[&r32, &sc]);
        acc = if k == 0 { scaled } else { g.op("Add", &[&acc, &scaled]) };
    }
    let out = g.cast(&acc, F32, tt);
    g.node("Identity", &[&out], &["residuals"], &[]);
    g.output("residuals", tt, &dims);
    Some(g.finish())
}

/// Builds a `GraphProto` node by node.
struct Builder {
    nodes: Vec<Message>,
    inputs: Vec<Message>,
    outputs: Vec<Message>,
    next: usize,
}

/// `ValueInfoProto` of a tensor whose dimensions are all symbolic (`dim_param`).
fn value_info(name: &str, elem_type: i64, dims: &[&str]) -> Message {
    let mut shape = Message::new();
    for d in dims {
        shape = shape.msg(1, Message::new().str(2, d)); // TensorShapeProto.dim { dim_param }
    }
    let tensor = Message::new().int(1, elem_type).msg(2, shape); // TypeProto.Tensor
    Message::new().str(1, name).msg(2, Message::new().msg(1, tensor)) // ValueInfoProto { name, type }
}

impl Builder {
    fn new() -> Self {
        Builder { nodes: Vec::new(), inputs: Vec::new(), outputs: Vec::new(), next: 0 }
    }

    fn input(&mut self, name: &str, elem_type: i64, dims: &[&str]) {
        self.inputs.push(value_info(name, elem_type, dims));
    }

    fn output(&mut self, name: &str, elem_type: i64, dims: &[&str]) {
        self.outputs.push(value_info(name, elem_type, dims));
    }

    /// Adds `op(inputs)` with integer attributes, writing `outputs`.
    fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, i64)]) {
        let mut n = Message::new();
        for i in inputs {
            n = n.str(1, i);
        }
        for o in outputs {
            n = n.str(2, o);
        }
        n = n.str(3, &format!("{op}_{}", self.nodes.len())).str(4, op);
        for (name, value) in attrs {
            // AttributeProto { name, i, type = INT (2) }
            n = n.msg(5, Message::new().str(1, name).int(3, *value).int(20, 2));
        }
        self.nodes.push(n);
    }

    /// Adds `op(inputs)` and returns the name of its (fresh) output.
    fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        let out = format!("t{}", self.next);
        self.next += 1;
        self.node(op, inputs, &[&out], &[]);
        out
    }

    /// `Cast` to ONNX type `to`, or the value itself when it already has that type.
    fn cast(&mut self, input: &str, from: i64, to: i64) -> String {
        if from == to {
            return input.to_string();
        }
        let out = format!("t{}", self.next);
        self.next += 1;
        self.node("Cast", &[input], &[&out], &[("to", to)]);
        out
    }

    fn finish(self) -> Vec<u8> {
        let mut graph = Message::new();
        for n in self.nodes {
            graph = graph.msg(1, n);
        }
        graph = graph.str(2, "sd3_step");
        for i in self.inputs {
            graph = graph.msg(11, i);
        }
        for o in self.outputs {
            graph = graph.msg(12, o);
        }
        // Opset 18: Split with `num_outputs`.
        let opset = Message::new().str(1, "").int(2, 18);
        // ModelProto { ir_version = 8, producer_name, graph, opset_import }
        Message::new().int(1, 8).str(2, "sd3-onnx").msg(7, graph).msg(8, opset).0
    }
}

/// The step graph of `spec` (see [`StepSpec`] for its inputs and outputs), `None` for element types we cannot
/// cast to.
pub(crate) fn step_graph(spec: &StepSpec) -> Option<Vec<u8>> {
    const F32: i64 = 1;
    let th = onnx_type(spec.hidden)?;
    let tv = onnx_type(spec.velocity)?;
    let x_dims = ["n", "c", "h", "w"];
    let mut g = Builder::new();
    g.input("x", F32, &x_dims);
    g.input("v", tv, &["b", "c", "h", "w"]);
    g.input("s", F32, &["k"]);
    for name in spec.kind.extra_inputs() {
        g.input(name, F32, &x_dims);
    }
    if spec.skip {
        g.input("vs", tv, &x_dims);
    }
    if spec.inpaint {
        g.input("image", F32, &x_dims);
        g.input("noise", F32, &x_dims);
        g.input("mask", F32, &["n", "one", "h", "w"]);
    }

    // The scalars, one [1] tensor each.
    let k = spec.scalars();
    let names: Vec<String> = (0..k).map(|i| format!("s{i}")).collect();
    if k == 1 {
        g.node("Identity", &["s"], &[&names[0]], &[]);
    } else {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        g.node("Split", &["s"], &refs, &[("axis", 0), ("num_outputs", k as i64)]);
    }
    let mut scalars = names.iter().map(String::as_str);
    let mut next = || scalars.next().unwrap_or("s");

    // Classifier-free guidance (apply_guidance): u + g * (c - u), on the float32 output.
    let v32 = g.cast("v", tv, F32);
    let guided = if spec.guidance {
        let scale = next();
        g.node("Split", &[&v32], &["uncond", "cond"], &[("axis", 0), ("num_outputs", 2)]);
        let diff = g.op("Sub", &["cond", "uncond"]);
        let scaled = g.op("Mul", &[scale, &diff]);
        let guided = g.op("Add", &["uncond", &scaled]);
        if spec.skip {
            // Skip-layer guidance (DenoiseLoop::run): guided + (cond - skipped) * scale.
            let slg_scale = next();
            let vs32 = g.cast("vs", tv, F32);
            let diff = g.op("Sub", &["cond", &vs32]);
            let scaled = g.op("Mul", &[&diff, slg_scale]);
            g.op("Add", &[&guided, &scaled])
        } else {
            guided
        }
    } else {
        v32
    };

    // The sampler update.
    let (stepped, extra) = match spec.kind {
        StepKind::Euler => {
            // euler_step: x + dt * v.
            let dt = next();
            let delta = g.op("Mul", &[dt, &guided]);
            (g.op("Add", &["x", &delta]), None)
        }
        StepKind::HeunFirst => {
            // heun_step, first half: denoised = x - v * sigma; d = (x - denoised) / sigma_hat; x + d * dt.
            let (sigma, sigma_hat, dt) = (next(), next(), next());
            let vs = g.op("Mul", &[&guided, sigma]);
            let denoised = g.op("Sub", &["x", &vs]);
            let diff = g.op("Sub", &["x", &denoised]);
            let d = g.op("Div", &[&diff, sigma_hat]);
            let delta = g.op("Mul", &[&d, dt]);
            (g.op("Add", &["x", &delta]), Some(d))
        }
        StepKind::HeunSecond => {
            // heun_step, second half: denoised = x - v * sn; d = 0.5 * (d1 + (x - denoised) / sn); saved + d * dt.
            let (sn, dt, half) = (next(), next(), next());
            let vs = g.op("Mul", &[&guided, sn]);
            let denoised = g.op("Sub", &["x", &vs]);
            let diff = g.op("Sub", &["x", &denoised]);
            let q = g.op("Div", &[&diff, sn]);
            let sum = g.op("Add", &["d1", &q]);
            let d = g.op("Mul", &[half, &sum]);
            let delta = g.op("Mul", &[&d, dt]);
            (g.op("Add", &["saved", &delta]), None)
        }
        StepKind::DpmFirst => {
            // dpm_step: x0 = x - sigma * v; dpm_first_order: ratio * x - coef * x0.
            let (sigma, ratio, coef) = (next(), next(), next());
            let sv = g.op("Mul", &[sigma, &guided]);
            let x0 = g.op("Sub", &["x", &sv]);
            let rx = g.op("Mul", &[ratio, "x"]);
            let cx = g.op("Mul", &[coef, &x0]);
            (g.op("Sub", &[&rx, &cx]), Some(x0))
        }
        StepKind::DpmSecond => {
            // dpm_second_order: d1 = inv_r0 * (m0 - m1); ratio * x - coef * m0 - half_coef * d1.
            let (sigma, inv_r0, ratio, coef, half_coef) = (next(), next(), next(), next(), next());
            let sv = g.op("Mul", &[sigma, &guided]);
            let x0 = g.op("Sub", &["x", &sv]);
            let diff = g.op("Sub", &[&x0, "m1"]);
            let d1 = g.op("Mul", &[inv_r0, &diff]);
            let rx = g.op("Mul", &[ratio, "x"]);
            let cx = g.op("Mul", &[coef, &x0]);
            let first = g.op("Sub", &[&rx, &cx]);
            let hd = g.op("Mul", &[half_coef, &d1]);
            (g.op("Sub", &[&first, &hd]), Some(x0))
        }
    };

    // The inpainting blend (scale_noise, blend_known): (1 - m) * (sigma * noise + keep * image) + m * x.
    let result = if spec.inpaint {
        let (sigma, keep, one) = (next(), next(), next());
        let sn = g.op("Mul", &[sigma, "noise"]);
        let ki = g.op("Mul", &[keep, "image"]);
        let reference = g.op("Add", &[&sn, &ki]);
        let inv = g.op("Sub", &[one, "mask"]);
        let kept = g.op("Mul", &[&inv, &reference]);
        let generated = g.op("Mul", &["mask", &stepped]);
        g.op("Add", &[&kept, &generated])
    } else {
        stepped
    };

    g.node("Identity", &[&result], &["x_next"], &[]);
    let cast = g.cast(&result, F32, th);
    if spec.guidance {
        g.node("Concat", &[&cast, &cast], &["hidden"], &[("axis", 0)]);
    } else {
        g.node("Identity", &[&cast], &["hidden"], &[]);
    }
    g.output("x_next", F32, &x_dims);
    g.output("hidden", th, &["b", "c", "h", "w"]);
    if let (Some(name), Some(value)) = (spec.kind.extra_output(), extra) {
        g.node("Identity", &[&value], &[name], &[]);
        g.output(name, F32, &x_dims);
    }
    if spec.single {
        g.node("Identity", &[&cast], &["hidden_single"], &[]);
        g.output("hidden_single", th, &x_dims);
    }
    if spec.guided {
        g.node("Identity", &[&guided], &["guided"], &[]);
        g.output("guided", F32, &x_dims);
    }
    Some(g.finish())
}

/// The step sessions of one graph, one per [`StepSpec`], created on first use.
#[derive(Default)]
pub(crate) struct Steppers {
    pub sessions: Vec<(StepSpec, Session)>,
    /// The ControlNet residual mixes ([`mix_graph`]), by unit count and element types.
    pub mixers: Vec<((usize, ElementType, ElementType), Session)>,
    /// The decoded image's conversion to RGB bytes (`rgb::rgb_graph`), by the image's element type.
    pub rgb: Vec<(ElementType, Session)>,
}

impl Graph {
    /// The memory this graph computes in, for device-bound outputs.
    fn compute_memory(&self) -> ort::Result<MemoryInfo<'static>> {
        match self.device() {
            Some((device, id)) => MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default),
            None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
        }
    }

    /// Copies `array` into the memory this graph computes in, as `dtype`.
    pub(crate) fn upload(&self, name: &str, array: ArrayViewD<'_, f32>, dtype: ElementType) -> Result<DeviceTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("uploading `{name}`: {e}"), boxed(e));
        let value = self.value_as(name, &Input::Float(array), dtype)?;
        let value = match self.device() {
            Some((device, id)) => value.to(device, id).map_err(infer)?,
            None => value,
        };
        Ok(DeviceTensor(value.into_dyn()))
    }

    /// Copies a float32 tensor back to the host.
    pub(crate) fn download(&self, tensor: &DeviceTensor) -> Result<ArrayD<f32>> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("downloading the latents: {e}"), boxed(e));
        let copied: DynValue;
        let value: &DynValue = match self.device() {
            Some(_) => {
                let t = tensor.0.view().downcast::<ort::value::DynTensorValueType>().map_err(infer)?;
                copied = t.to(AllocationDevice::CPU, 0).map_err(infer)?.into_dyn();
                &copied
            }
            None => &tensor.0,
        };
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(infer)?;
        let dims: Vec<usize> = shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect();
        ArrayD::from_shape_vec(IxDyn(&dims), data.to_vec()).map_err(|e| Error::internal(format!("latents: {e}")))
    }

    /// Runs with `binding`'s fixed inputs, `device` inputs already in the graph's memory and `host` inputs, and
    /// returns output `output` left in the graph's memory (the device loop's transformer evaluation).
    pub(crate) fn run_bound_device(
        &mut self,
        binding: &mut super::Binding,
        device: &[(&str, &DeviceTensor)],
        host: &[(&str, Input<'_>)],
        output: &str,
    ) -> Result<DeviceTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        for (name, tensor) in device {
            binding.inner.bind_input(*name, &tensor.0).map_err(infer)?;
        }
        for (name, input) in host {
            let value = self.value(name, input)?;
            binding.inner.bind_input(*name, &value).map_err(infer)?;
        }
        let memory = self.compute_memory().map_err(infer)?;
        binding.inner.bind_output_to_device(output, &memory).map_err(infer)?;
        let started = Instant::now();
        self.ensure_loaded()?;
        let mut outputs =
            super::graph::live(&mut self.session, component)?.run_binding(&binding.inner).map_err(infer)?;
        self.run_time += started.elapsed();
        let value = outputs
            .remove(output)
            .ok_or_else(|| Error::internal(format!("{component}: output `{output}` was asked for and not produced")))?;
        Ok(DeviceTensor(value))
    }

    /// Makes the fixed buffer of port `name` (`shape`, `dtype`, in the memory this graph computes in) unless one
    /// of that shape and type exists. The buffers live as long as the graph: with a CUDA graph a replay reads
    /// and writes the addresses it recorded, so a buffer of another shape is then an error instead of a new one
    /// (`static_shape` refuses such requests before they get here).
    fn fixed_buffer(&mut self, name: &str, shape: &[usize], dtype: ElementType) -> Result<()> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("the fixed `{name}` buffer: {e}"), boxed(e));
        if let Some(existing) = self.fixed.get(name) {
            let (dims, ty): (Vec<usize>, _) = match existing.dtype() {
                ort::value::ValueType::Tensor { ty, shape, .. } => {
                    (shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect(), Some(ElementType::from_ort(*ty)))
                }
                _ => (Vec::new(), None),
            };
            if dims == shape && ty == Some(dtype) {
                return Ok(());
            }
            if self.provider.cuda_graph() {
                return Err(Error::internal(format!(
                    "the CUDA graph's fixed `{name}` buffer is {dims:?} ({ty:?}) and this run needs {shape:?} \
                     ({dtype}); the static shape should have refused the request"
                )));
            }
        }
        let zeros = ArrayD::<f32>::zeros(IxDyn(shape));
        let host = self.value_as(name, &Input::Float(zeros.view()), dtype)?;
        // A copy made by ONNX Runtime (also on the CPU): a value it allocated, which IO binding accepts as an
        // output buffer (values over Rust memory it does not).
        let (device, id) = self.device().unwrap_or((AllocationDevice::CPU, 0));
        let buffer = host.to(device, id).map_err(infer)?;
        self.fixed.insert(name.to_string(), buffer);
        Ok(())
    }

    fn fixed_mut(&mut self, name: &str) -> Result<&mut DynTensor> {
        self.fixed.get_mut(name).ok_or_else(|| Error::internal(format!("no fixed buffer `{name}`")))
    }

    /// Like [`Graph::bind`], but each input is copied into this graph's fixed buffer of that name (made on first
    /// use, kept for later calls) and the buffer is bound: the text conditioning of the fixed-buffer loop.
    pub(crate) fn bind_fixed(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<super::Binding> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        self.ensure_loaded()?;
        for (name, input) in inputs {
            let shape = match input {
                Input::Float(a) => a.shape().to_vec(),
                Input::Int64(a) => a.shape().to_vec(),
            };
            let dtype = self.input_type(name)?;
            let host = self.value(name, input)?;
            self.fixed_buffer(name, &shape, dtype)?;
            host.copy_into(self.fixed_mut(name)?).map_err(infer)?;
        }
        let mut binding = super::graph::live(&mut self.session, component)?.create_binding().map_err(infer)?;
        for (name, _) in inputs {
            binding.bind_input(*name, &*self.fixed_mut(name)?).map_err(infer)?;
        }
        Ok(super::Binding { inner: binding })
    }

    /// Binds the fixed buffers of the transformer's `hidden_states` (`shape`, `hidden` type), `timestep`
    /// (`[shape[0]]`) and output `out_hidden_states` (`shape`, `velocity` type) to `binding`, made on first use.
    pub(crate) fn bind_fixed_step(
        &mut self,
        binding: &mut super::Binding,
        shape: &[usize],
        hidden: ElementType,
        velocity: ElementType,
    ) -> Result<()> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        let batch = shape.first().copied().ok_or_else(|| Error::internal("hidden_states without a batch axis"))?;
        let timestep = self.input_type("timestep")?;
        self.fixed_buffer("hidden_states", shape, hidden)?;
        self.fixed_buffer("timestep", &[batch], timestep)?;
        self.fixed_buffer("out_hidden_states", shape, velocity)?;
        binding.inner.bind_input("hidden_states", &*self.fixed_mut("hidden_states")?).map_err(infer)?;
        binding.inner.bind_input("timestep", &*self.fixed_mut("timestep")?).map_err(infer)?;
        binding.inner.bind_output("out_hidden_states", self.fixed_mut("out_hidden_states")?).map_err(infer)?;
        Ok(())
    }

    /// One transformer evaluation of the fixed-buffer loop: copies `hidden` into the fixed `hidden_states`
    /// buffer (device to device) and the timestep (`batch` copies of `timestep`) into the fixed `timestep` buffer
    /// (host to device), runs with `binding` ([`bind_fixed`](Self::bind_fixed), then
    /// [`bind_fixed_step`](Self::bind_fixed_step)), and returns the output, which lives in the fixed
    /// `out_hidden_states` buffer: it is overwritten by the next evaluation.
    pub(crate) fn run_fixed(
        &mut self,
        binding: &mut super::Binding,
        hidden: &DeviceTensor,
        timestep: f32,
    ) -> Result<DeviceTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        let batch = hidden.shape().first().copied().unwrap_or(0);
        let source = hidden.0.view().downcast::<DynTensorValueType>().map_err(infer)?;
        source.copy_into(self.fixed_mut("hidden_states")?).map_err(infer)?;
        let t = ndarray::Array1::from_elem(batch, timestep).into_dyn();
        let host = self.value("timestep", &Input::Float(t.view()))?;
        host.copy_into(self.fixed_mut("timestep")?).map_err(infer)?;
        let started = Instant::now();
        self.ensure_loaded()?;
        let mut outputs =
            super::graph::live(&mut self.session, component)?.run_binding(&binding.inner).map_err(infer)?;
        self.run_time += started.elapsed();
        let value = outputs
            .remove("out_hidden_states")
            .ok_or_else(|| Error::internal(format!("{component}: output `out_hidden_states` was not produced")))?;
        Ok(DeviceTensor(value))
    }

    /// The step session of `spec` on this graph's provider (TensorRT graphs step on CUDA, like the LoRA merges),
    /// created on first use.
    fn stepper(&mut self, spec: &StepSpec) -> Result<usize> {
        if let Some(i) = self.steppers.sessions.iter().position(|(s, _)| s == spec) {
            return Ok(i);
        }
        let bytes = step_graph(spec).ok_or_else(|| {
            Error::internal(format!("no step graph for element types {} / {}", spec.hidden, spec.velocity))
        })?;
        let session = self.small_session(&bytes, "the step session")?;
        self.steppers.sessions.push((*spec, session));
        Ok(self.steppers.sessions.len() - 1)
    }

    /// A session of a small element-wise graph on this graph's provider (TensorRT graphs run them on CUDA).
    fn small_session(&self, bytes: &[u8], what: &str) -> Result<Session> {
        let component = self.component;
        let err = |e: ort::Error| Error::inference(component, format!("creating {what}: {e}"), boxed(e));
        // Never a CUDA graph (CudaOptions::cuda_graph is the transformer's alone): these sessions read host
        // scalars and fresh tensors at every run.
        let provider = match &self.provider {
            ExecutionProvider::TensorRt(o) => ExecutionProvider::cuda(o.device_id),
            other => other.without_cuda_graph(),
        };
        // A few element-wise nodes: one thread, no spinning (a thread pool's wake-ups cost more than the work at
        // these sizes on the CPU, and on a GPU the CPU threads only launch kernels).
        let builder = Session::builder(&self.source.env).map_err(err)?;
        let builder = builder.with_intra_threads(1).map_err(|e| err(e.into()))?;
        let builder = builder.with_inter_threads(1).map_err(|e| err(e.into()))?;
        let builder = builder.with_config_entry("session.intra_op.allow_spinning", "0").map_err(|e| err(e.into()))?;
        let mut builder = provider.register(builder, component)?;
        builder.commit_from_memory(bytes).map_err(err)
    }

    /// Binds `tensor` (in any memory ONNX Runtime can read for this graph) as input `name` of `binding`.
    pub(crate) fn bind_device(&self, binding: &mut super::Binding, name: &str, tensor: &DeviceTensor) -> Result<()> {
        let component = self.component;
        binding
            .inner
            .bind_input(name, &tensor.0)
            .map_err(|e| Error::inference(component, format!("binding `{name}`: {e}"), boxed(e)))
    }

    /// `sum_k tensors[k] * scales[k]` ([`mix_graph`]) as this graph's input `name` wants it, computed in the memory
    /// this graph computes in.
    pub(crate) fn mix(&mut self, name: &str, tensors: &[&DeviceTensor], scales: &[f32]) -> Result<DeviceTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("the ControlNet residual mix: {e}"), boxed(e));
        let (Some(first), true) = (tensors.first(), tensors.len() == scales.len()) else {
            return Err(Error::internal(format!("{} residual tensors for {} scales", tensors.len(), scales.len())));
        };
        let from = first.element_type().ok_or_else(|| Error::internal("the ControlNet output is not a tensor"))?;
        if tensors.iter().any(|t| t.element_type() != Some(from)) {
            return Err(Error::internal("the ControlNets' outputs have different element types"));
        }
        let to = self.input_type(name)?;
        let key = (tensors.len(), from, to);
        let index = match self.steppers.mixers.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let bytes = mix_graph(key.0, from, to)
                    .ok_or_else(|| Error::internal(format!("no residual mix for element types {from} -> {to}")))?;
                let session = self.small_session(&bytes, "the ControlNet residual mix")?;
                self.steppers.mixers.push((key, session));
                self.steppers.mixers.len() - 1
            }
        };
        let memory = self.compute_memory().map_err(infer)?;
        let session = &mut self.steppers.mixers[index].1;
        let mut binding = session.create_binding().map_err(infer)?;
        let mut scalars = Vec::with_capacity(scales.len());
        for (k, (tensor, scale)) in tensors.iter().zip(scales).enumerate() {
            binding.bind_input(format!("r{k}"), &tensor.0).map_err(infer)?;
            scalars.push(Tensor::from_array(([1usize], vec![*scale])).map_err(infer)?);
        }
        for (k, s) in scalars.iter().enumerate() {
            binding.bind_input(format!("s{k}"), s).map_err(infer)?;
        }
        binding.bind_output_to_device("residuals", &memory).map_err(infer)?;
        let mut outputs = session.run_binding(&binding).map_err(infer)?;
        let value = outputs.remove("residuals").ok_or_else(|| Error::internal("the residual mix gave no output"))?;
        drop(outputs);
        Ok(DeviceTensor(value))
    }

    /// Runs the step graph of `spec` on `tensors` (every input of [`StepSpec`] but `s`, by name) and `scalars`
    /// (`s`), and returns its outputs ([`StepSpec::outputs`]) in the graph's memory.
    pub(crate) fn run_step(
        &mut self,
        spec: &StepSpec,
        tensors: &[(&str, &DeviceTensor)],
        scalars: &[f32],
    ) -> Result<Vec<DeviceTensor>> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("the denoising step graph: {e}"), boxed(e));
        if scalars.len() != spec.scalars() {
            return Err(Error::internal(format!("{} step scalars, expected {}", scalars.len(), spec.scalars())));
        }
        let index = self.stepper(spec)?;
        let memory = self.compute_memory().map_err(infer)?;
        let s = Tensor::from_array(([scalars.len()], scalars.to_vec())).map_err(infer)?;
        let session = &mut self.steppers.sessions[index].1;
        let mut binding = session.create_binding().map_err(infer)?;
        for (name, tensor) in tensors {
            binding.bind_input(*name, &tensor.0).map_err(infer)?;
        }
        binding.bind_input("s", &s).map_err(infer)?;
        let names = spec.outputs();
        for name in &names {
            binding.bind_output_to_device(*name, &memory).map_err(infer)?;
        }
        let mut outputs = session.run_binding(&binding).map_err(infer)?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let value = outputs
                .remove(name)
                .ok_or_else(|| Error::internal(format!("the step graph gave no output `{name}`")))?;
            out.push(DeviceTensor(value));
        }
        drop(outputs);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_has_a_graph_and_its_scalar_count() {
        for kind in
            [StepKind::Euler, StepKind::HeunFirst, StepKind::HeunSecond, StepKind::DpmFirst, StepKind::DpmSecond]
        {
            for guidance in [false, true] {
                for inpaint in [false, true] {
                    let skip = guidance && inpaint;
                    let spec = StepSpec {
                        kind,
                        guidance,
                        skip,
                        single: guidance,
                        guided: inpaint,
                        inpaint,
                        hidden: ElementType::Float16,
                        velocity: ElementType::Float16,
                    };
                    assert!(step_graph(&spec).is_some_and(|b| !b.is_empty()));
                    let expected =
                        usize::from(guidance) + usize::from(skip) + kind.scalars() + 3 * usize::from(inpaint);
                    assert_eq!(spec.scalars(), expected);
                    let extra =
                        usize::from(kind.extra_output().is_some()) + usize::from(guidance) + usize::from(inpaint);
                    assert_eq!(spec.outputs().len(), 2 + extra);
                }
            }
        }
        let spec = StepSpec {
            kind: StepKind::Euler,
            guidance: false,
            skip: false,
            single: false,
            guided: false,
            inpaint: false,
            hidden: ElementType::Int64,
            velocity: ElementType::Float32,
        };
        assert!(step_graph(&spec).is_none());
    }
}
