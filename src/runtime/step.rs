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
        self.node_in("", op, inputs, outputs, attrs);
    }

    /// [`node`](Self::node) in operator domain `domain` ("" is ONNX's own).
    fn node_in(&mut self, domain: &str, op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, i64)]) {
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
        if !domain.is_empty() {
            n = n.str(7, domain); // NodeProto.domain
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
        // Opset 18: Split with `num_outputs`; our operators' domain, version 1 (src/runtime/kernels).
        let opset = Message::new().str(1, "").int(2, 18);
        let ours = Message::new().str(1, super::kernels::DOMAIN).int(2, 1);
        // ModelProto { ir_version = 8, producer_name, graph, opset_import }
        Message::new().int(1, 8).str(2, "sd3-onnx").msg(7, graph).msg(8, opset).msg(8, ours).0
    }
}

/// The step of `spec` as one node of our `EulerStepF16` / `EulerStepF32` operator (src/runtime/kernels/mod.rs;
/// its CPU and CUDA kernels compute every value as [`step_graph`]'s graph does), when the operator covers it: an
/// Euler step with or without guidance, no skip-layer guidance, inpainting blend or preview output, and the
/// transformer's input and output of one element type, float16 or float32. `None` otherwise: the caller uses
/// [`step_graph`]. Same inputs and outputs as [`step_graph`]'s for that spec.
pub(crate) fn fused_step_graph(spec: &StepSpec) -> Option<Vec<u8>> {
    const F32: i64 = 1;
    let op = match (spec.hidden, spec.velocity) {
        (ElementType::Float16, ElementType::Float16) => "EulerStepF16",
        (ElementType::Float32, ElementType::Float32) => "EulerStepF32",
        _ => return None,
    };
    if spec.kind != StepKind::Euler || spec.skip || spec.single || spec.guided || spec.inpaint {
        return None;
    }
    let t = onnx_type(spec.hidden)?;
    let x_dims = ["n", "c", "h", "w"];
    let mut g = Builder::new();
    g.input("x", F32, &x_dims);
    g.input("v", t, &["b", "c", "h", "w"]);
    g.input("s", F32, &["k"]);
    let guidance = i64::from(spec.guidance);
    g.node_in(super::kernels::DOMAIN, op, &["x", "v", "s"], &["x_next", "hidden"], &[("guidance", guidance)]);
    g.output("x_next", F32, &x_dims);
    g.output("hidden", t, &["b", "c", "h", "w"]);
    Some(g.finish())
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
    /// Whether a step our `EulerStep*` operator covers runs as that one node ([`fused_step_graph`]) instead of
    /// the stock operators' graph ([`step_graph`]); `Sd3PipelineBuilder::fused_step`, on by default.
    pub fused: Option<bool>,
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

    /// Whether the device loop's steps that our `EulerStep*` operator covers run as that one node (`true`, the
    /// default) or as the stock operators' graph ([`Steppers::fused`]); a change drops the step sessions made.
    pub(crate) fn set_fused_step(&mut self, on: bool) {
        if self.steppers.fused != Some(on) {
            self.steppers.fused = Some(on);
            self.steppers.sessions.clear();
        }
    }

    /// The step session of `spec` on this graph's provider (TensorRT graphs step on CUDA, like the LoRA merges),
    /// created on first use.
    fn stepper(&mut self, spec: &StepSpec) -> Result<usize> {
        if let Some(i) = self.steppers.sessions.iter().position(|(s, _)| s == spec) {
            return Ok(i);
        }
        // Our operator has CPU and CUDA kernels (TensorRT graphs step on CUDA); on DirectML it would run on the
        // CPU, with copies both ways, so the stock graph stays there.
        let kernels = matches!(
            self.provider,
            ExecutionProvider::Cpu | ExecutionProvider::Cuda(_) | ExecutionProvider::TensorRt(_)
        );
        let fused = match self.steppers.fused.unwrap_or(true) && kernels {
            true => fused_step_graph(spec),
            false => None,
        };
        let session = match fused {
            Some(bytes) => self.small_session_with(
                &bytes,
                "the fused Euler step session (Sd3PipelineBuilder::fused_step(false) runs the stock step graph instead)",
                true,
            )?,
            None => {
                let bytes = step_graph(spec).ok_or_else(|| {
                    Error::internal(format!("no step graph for element types {} / {}", spec.hidden, spec.velocity))
                })?;
                self.small_session(&bytes, "the step session")?
            }
        };
        self.steppers.sessions.push((*spec, session));
        Ok(self.steppers.sessions.len() - 1)
    }

    /// A session of a small element-wise graph on this graph's provider (TensorRT graphs run them on CUDA).
    fn small_session(&self, bytes: &[u8], what: &str) -> Result<Session> {
        self.small_session_with(bytes, what, false)
    }

    /// [`small_session`](Self::small_session), with our operators registered when `ours`.
    fn small_session_with(&self, bytes: &[u8], what: &str, ours: bool) -> Result<Session> {
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
        let builder = match ours {
            true => {
                let ops = super::kernels::domain().map_err(err)?;
                let builder = builder.with_operators(ops).map_err(|e| err(e.into()))?;
                // On a GPU our node must get the provider's kernel: without the CPU fallback ONNX Runtime refuses
                // the session instead of running the node on the CPU with copies both ways.
                match provider {
                    ExecutionProvider::Cpu => builder,
                    _ => {
                        builder.with_config_entry("session.disable_cpu_ep_fallback", "1").map_err(|e| err(e.into()))?
                    }
                }
            }
            false => builder,
        };
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

#[cfg(test)]
mod fused_tests {
    //! `EulerStepF16` / `EulerStepF32` (the fused step, one node) against the stock step graph of the same spec on
    //! the CPU provider: the same bits, output by output, over random values and edge values.

    use half::f16;
    use ort::value::DynValue;

    use super::*;

    fn spec(guidance: bool, t: ElementType) -> StepSpec {
        StepSpec {
            kind: StepKind::Euler,
            guidance,
            skip: false,
            single: false,
            guided: false,
            inpaint: false,
            hidden: t,
            velocity: t,
        }
    }

    /// Values that stress the arithmetic: signed zeros, subnormals, values near float16's range, large float32
    /// values whose products overflow, and a spread of ordinary ones.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1e-40, -1e-40, 6.0e-8, 65504.0, -65504.0, 7.0e4, 3.0e38, -3.0e38, 1.0, -1.0];
        let mut state = seed;
        while v.len() < n {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            v.push((u - 0.5) * 8.0);
        }
        v.truncate(n);
        v
    }

    fn tensor(shape: &[usize], data: Vec<f32>, t: ElementType) -> DynValue {
        match t {
            ElementType::Float16 => {
                let d: Vec<f16> = data.iter().map(|x| f16::from_f32(*x)).collect();
                Tensor::from_array((shape.to_vec(), d)).expect("tensor").into_dyn()
            }
            _ => Tensor::from_array((shape.to_vec(), data)).expect("tensor").into_dyn(),
        }
    }

    /// Every output of a run as raw bits (float16 widened bit-exactly to u32 by value).
    fn run(bytes: &[u8], ours: bool, inputs: Vec<(&str, DynValue)>, t: ElementType) -> Vec<Vec<u32>> {
        run_on(bytes, ours, inputs, t, &ExecutionProvider::Cpu)
    }

    /// [`run`] on `provider`; on a GPU the session refuses ONNX Runtime's CPU fallback, so every node runs there.
    fn run_on(
        bytes: &[u8],
        ours: bool,
        inputs: Vec<(&str, DynValue)>,
        t: ElementType,
        provider: &ExecutionProvider,
    ) -> Vec<Vec<u32>> {
        let env = crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let mut builder = Session::builder(&env).expect("builder");
        if ours {
            builder = builder.with_operators(crate::runtime::kernels::domain().expect("domain")).expect("ops");
        }
        if *provider != ExecutionProvider::Cpu {
            builder = builder.with_config_entry("session.disable_cpu_ep_fallback", "1").expect("option");
        }
        let mut builder = provider.register(builder, crate::Component::Transformer).expect("execution provider");
        let mut session = builder.commit_from_memory(bytes).expect("session");
        let outputs = session.run(inputs).expect("run");
        let x_next = outputs["x_next"].try_extract_tensor::<f32>().expect("x_next").1.iter().map(|v| v.to_bits());
        let x_next: Vec<u32> = x_next.collect();
        let hidden: Vec<u32> = match t {
            ElementType::Float16 => outputs["hidden"]
                .try_extract_tensor::<f16>()
                .expect("hidden")
                .1
                .iter()
                .map(|v| v.to_bits() as u32)
                .collect(),
            _ => outputs["hidden"].try_extract_tensor::<f32>().expect("hidden").1.iter().map(|v| v.to_bits()).collect(),
        };
        vec![x_next, hidden]
    }

    #[test]
    fn the_fused_step_equals_the_stock_graph_to_the_bit() {
        for t in [ElementType::Float16, ElementType::Float32] {
            for guidance in [true, false] {
                for (n, c, h, w) in [(1, 2, 3, 5), (2, 16, 8, 8), (3, 4, 7, 9)] {
                    let spec = spec(guidance, t);
                    let stock = step_graph(&spec).expect("stock graph");
                    let fused = fused_step_graph(&spec).expect("fused graph");
                    let b = if guidance { 2 * n } else { n };
                    let total = n * c * h * w;
                    let x = values(total, 11 + n as u64);
                    let v = values(b * c * h * w, 97 + c as u64);
                    let s: Vec<f32> = if guidance { vec![7.0, -0.0357] } else { vec![-0.0357] };
                    let inputs = || {
                        vec![
                            ("x", tensor(&[n, c, h, w], x.clone(), ElementType::Float32)),
                            ("v", tensor(&[b, c, h, w], v.clone(), t)),
                            ("s", tensor(&[s.len()], s.clone(), ElementType::Float32)),
                        ]
                    };
                    let want = run(&stock, false, inputs(), t);
                    let got = run(&fused, true, inputs(), t);
                    for (k, name) in ["x_next", "hidden"].iter().enumerate() {
                        assert_eq!(got[k].len(), want[k].len(), "{t} guidance {guidance} {name}: length");
                        let wrong = got[k].iter().zip(&want[k]).filter(|(a, b)| a != b).count();
                        assert_eq!(wrong, 0, "{t} guidance {guidance} [{n},{c},{h},{w}] {name}: {wrong} values differ");
                    }
                }
            }
        }
    }

    /// On CUDA: the fused step (our CUDA kernel, `s` read from host memory) and the stock graph on CUDA against
    /// the stock graph on the CPU, to the bit (every operation is one IEEE float32 operation, rounded on its own,
    /// in both; float16 conversions round to nearest even). The session refuses a CPU fallback, so the node ran
    /// on the GPU. `cargo test --features cuda --lib -- --ignored step_cuda`.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU and ONNX Runtime's CUDA provider"]
    fn step_cuda_fused_and_stock_equal_the_cpu_to_the_bit() {
        let cuda = ExecutionProvider::Cuda(Default::default());
        let mut failed = Vec::new();
        for t in [ElementType::Float16, ElementType::Float32] {
            for guidance in [true, false] {
                // SD3-medium's latents at 1024x1024 (16 x 128 x 128), and an odd small shape
                for (n, c, h, w) in [(1, 16, 128, 128), (3, 4, 7, 9)] {
                    let spec = spec(guidance, t);
                    let b = if guidance { 2 * n } else { n };
                    let x = values(n * c * h * w, 5);
                    let v = values(b * c * h * w, 6);
                    let s: Vec<f32> = if guidance { vec![7.0, -0.0357] } else { vec![-0.0357] };
                    let inputs = || {
                        vec![
                            ("x", tensor(&[n, c, h, w], x.clone(), ElementType::Float32)),
                            ("v", tensor(&[b, c, h, w], v.clone(), t)),
                            ("s", tensor(&[s.len()], s.clone(), ElementType::Float32)),
                        ]
                    };
                    let want = run(&step_graph(&spec).expect("stock"), false, inputs(), t);
                    for (what, bytes, ours) in [
                        ("fused", fused_step_graph(&spec).expect("fused"), true),
                        ("stock", step_graph(&spec).expect("stock"), false),
                    ] {
                        let got = run_on(&bytes, ours, inputs(), t, &cuda);
                        for (k, (name, got)) in ["x_next", "hidden"].into_iter().zip(got).enumerate() {
                            let wrong = got.iter().zip(&want[k]).filter(|(a, b)| a != b).count();
                            let case = format!("{t} guidance {guidance} [{n},{c},{h},{w}] {what} {name}");
                            eprintln!("CUDA step {case}: {wrong} of {} values differ from the CPU", got.len());
                            if wrong != 0 || got.len() != want[k].len() {
                                failed.push(case);
                            }
                        }
                    }
                }
            }
        }
        assert!(failed.is_empty(), "CUDA step outputs differ from the CPU's: {failed:?}");
    }

    #[test]
    fn the_fused_step_covers_plain_euler_only() {
        let t = ElementType::Float16;
        assert!(fused_step_graph(&spec(true, t)).is_some());
        assert!(fused_step_graph(&StepSpec { kind: StepKind::HeunFirst, ..spec(true, t) }).is_none());
        assert!(fused_step_graph(&StepSpec { skip: true, ..spec(true, t) }).is_none());
        assert!(fused_step_graph(&StepSpec { single: true, ..spec(true, t) }).is_none());
        assert!(fused_step_graph(&StepSpec { guided: true, ..spec(true, t) }).is_none());
        assert!(fused_step_graph(&StepSpec { inpaint: true, ..spec(false, t) }).is_none());
        assert!(fused_step_graph(&StepSpec { hidden: ElementType::Float32, ..spec(true, t) }).is_none());
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let spec = spec(true, ElementType::Float32);
        let fused = fused_step_graph(&spec).expect("fused graph");
        let env = crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let builder = Session::builder(&env).expect("builder");
        let mut builder = builder.with_operators(crate::runtime::kernels::domain().expect("domain")).expect("ops");
        let mut session = builder.commit_from_memory(&fused).expect("session");
        let f = |shape: &[usize], n: usize| tensor(shape, vec![0.5; n], ElementType::Float32);
        // v's batch is not twice x's; s has one scalar where guidance needs two; a non-finite scale
        for (v, s, what) in [
            (f(&[3, 2, 2, 2], 24), f(&[2], 2), "batch"),
            (f(&[2, 2, 2, 2], 16), f(&[1], 1), "scalars"),
            (f(&[2, 2, 2, 2], 16), tensor(&[2], vec![f32::NAN, 0.1], ElementType::Float32), "nan"),
        ] {
            let r = session.run(ort::inputs!["x" => f(&[1, 2, 2, 2], 8), "v" => v, "s" => s]);
            let e = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(e.to_string().contains("EulerStepF32"), "{what}: {e}");
        }
    }
}
