//! One loaded ONNX graph: its session, its declared inputs and outputs, and typed runs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, IxDyn};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use super::ExecutionProvider;
use crate::error::{boxed, require_file, Component, Error, Result};

/// The element type of a graph input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ElementType {
    /// 32-bit float.
    Float32,
    /// IEEE 16-bit float.
    Float16,
    /// bfloat16.
    BFloat16,
    /// 64-bit float.
    Float64,
    /// 64-bit integer.
    Int64,
    /// 32-bit integer.
    Int32,
    /// Anything else (strings, bools, 8-bit types, ...).
    Other,
}

impl ElementType {
    pub(crate) fn from_ort(t: TensorElementType) -> Self {
        match t {
            TensorElementType::Float32 => ElementType::Float32,
            TensorElementType::Float16 => ElementType::Float16,
            TensorElementType::Bfloat16 => ElementType::BFloat16,
            TensorElementType::Float64 => ElementType::Float64,
            TensorElementType::Int64 => ElementType::Int64,
            TensorElementType::Int32 => ElementType::Int32,
            _ => ElementType::Other,
        }
    }

    /// The floating-point types the pipeline can feed and read (everything is converted to and from `f32`).
    pub(crate) const FLOATS: &'static [ElementType] =
        &[ElementType::Float32, ElementType::Float16, ElementType::BFloat16];
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::Float32 => "float32",
            ElementType::Float16 => "float16",
            ElementType::BFloat16 => "bfloat16",
            ElementType::Float64 => "float64",
            ElementType::Int64 => "int64",
            ElementType::Int32 => "int32",
            ElementType::Other => "a non-numeric or unsupported type",
        })
    }
}

/// A declared input or output of a graph. Dimensions are `-1` where symbolic.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Port {
    pub name: String,
    pub dtype: ElementType,
    /// `None` when the port is not a tensor.
    pub shape: Option<Vec<i64>>,
    /// Names of the symbolic dimensions (empty strings for fixed ones).
    pub symbols: Vec<String>,
}

impl Port {
    /// The size of dimension `axis` when the graph fixes it.
    pub fn fixed_dim(&self, axis: usize) -> Option<usize> {
        self.shape.as_ref()?.get(axis).and_then(|d| usize::try_from(*d).ok()).filter(|d| *d > 0)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shape {
            Some(shape) => {
                let dims: Vec<String> =
                    shape.iter().map(|d| if *d < 0 { "?".to_string() } else { d.to_string() }).collect();
                write!(f, "{} ({} [{}])", self.name, self.dtype, dims.join(", "))
            }
            None => write!(f, "{} (not a tensor)", self.name),
        }
    }
}

/// An input value: floats are converted to whatever float type the graph declares.
pub(crate) enum Input<'a> {
    Float(ArrayViewD<'a, f32>),
    Int64(ArrayViewD<'a, i64>),
}

/// A loaded ONNX graph.
pub(crate) struct Graph {
    pub component: Component,
    pub path: PathBuf,
    /// Where the graph runs.
    pub provider: ExecutionProvider,
    /// Why it runs on the CPU instead of the provider asked for, when it fell back.
    pub fallback: Option<String>,
    /// `None` after [`Graph::unload`]; the next run loads it again.
    pub(super) session: Option<Session>,
    /// What is needed to load the session again.
    pub(super) source: Source,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// Total time spent in `Session::run`.
    pub run_time: Duration,
    /// Total time spent loading the session again after [`Graph::unload`].
    pub reload_time: Duration,
    /// Values fed to overridable initializers (weights the graph also lists as inputs, with their own values as
    /// defaults, which ONNX Runtime does not report among the inputs) on every run: merged LoRA weights, with
    /// their element type in the graph. Empty: the graph runs on its own weights.
    pub overrides: Vec<WeightOverride>,
    /// The base values of the LoRA-targetable weights (by graph input), in the memory the graph computes in, kept
    /// from the first LoRA merge until the LoRAs are unloaded ([`clear_lora`](Self::clear_lora)).
    lora_base: std::collections::HashMap<String, DynTensor>,
    /// The sessions that merge LoRA weights on this graph's provider (src/runtime/merge.rs).
    mergers: super::merge::Mergers,
    /// The device loop's step sessions on this graph's provider (src/runtime/step.rs).
    pub(super) steppers: super::step::Steppers,
    /// The device loop's fixed input and output buffers, by port name, in the memory the graph computes in: made
    /// once and kept for the graph's life, so that every run reads and writes the same addresses (what a CUDA
    /// graph's replay needs; src/runtime/step.rs, `Graph::run_fixed`).
    pub(super) fixed: std::collections::HashMap<String, DynTensor>,
}

/// A value for an overridable initializer: its graph input name and the value, of the graph's element type, in
/// the memory the graph computes in.
pub(crate) type WeightOverride = (String, DynValue);

/// How a graph was loaded, kept so that an unloaded graph can be loaded again (low-memory mode).
#[derive(Clone)]
pub(super) struct Source {
    pub(super) env: ort::environment::Environment,
    requested: ExecutionProvider,
    pub(super) config: SessionConfig,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graph")
            .field("component", &self.component)
            .field("path", &self.path)
            .field("provider", &self.provider)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn ports(outlets: &[ort::value::Outlet]) -> Vec<Port> {
    outlets
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, dimension_symbols } => Port {
                name: o.name().to_string(),
                dtype: ElementType::from_ort(*ty),
                shape: Some(shape.iter().copied().collect()),
                symbols: dimension_symbols.iter().map(|s| s.to_string()).collect(),
            },
            _ => Port { name: o.name().to_string(), dtype: ElementType::Other, shape: None, symbols: Vec::new() },
        })
        .collect()
}

/// Opens a session for `path` on `provider` (or on the CPU, when `config.cpu_fallback` allows and the provider
/// is unavailable): the session, where it runs, and why it fell back.
fn open_session(
    env: &ort::environment::Environment,
    component: Component,
    path: &Path,
    provider: &ExecutionProvider,
    config: &SessionConfig,
) -> Result<(Session, ExecutionProvider, Option<String>)> {
    let load_err = |e: ort::Error| Error::GraphLoad {
        component,
        path: path.to_path_buf(),
        message: e.to_string(),
        source: boxed(e),
    };
    let new_builder = || -> Result<ort::session::builder::SessionBuilder> {
        let mut builder = Session::builder(env).map_err(&load_err)?;
        // ONNX Runtime fuses DequantizeLinear + MatMul (int8 weights, as models/sd3-nano stores them) into
        // MatMulNBits and by default computes it with int8-quantized activations (accuracy level 4), which moves
        // the nano transformer's output by ~1% from the float32 arithmetic of diffusers on the same weights. Level 1
        // keeps float32 activations (parity to ~1e-5, measured in models/nano/README.md). The key is ONNX Runtime's
        // kOrtSessionOptionsQDQMatMulNBitsAccuracyLevel (onnxruntime_session_options_config_keys.h); it changes
        // nothing for graphs without such weights.
        builder =
            builder.with_config_entry("session.qdq_matmulnbits_accuracy_level", "1").map_err(|e| load_err(e.into()))?;
        // Our fused operators (domain `sd3onnx`, src/runtime/kernels): graphs exported with
        // `--fused-kernels` use them; registering them changes nothing for other graphs.
        let ops = super::kernels::domain().map_err(|e| Error::GraphLoad {
            component,
            path: path.to_path_buf(),
            message: format!("registering the sd3onnx operators: {e}"),
            source: boxed(e),
        })?;
        builder = builder.with_operators(ops).map_err(|e| load_err(e.into()))?;
        if let Some(n) = config.intra_threads {
            builder = builder.with_intra_threads(n).map_err(|e| load_err(e.into()))?;
        }
        for (name, size) in &config.dimension_overrides {
            builder = builder.with_dimension_override(name, *size).map_err(|e| load_err(e.into()))?;
        }
        if let Some(dir) = &config.profile_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let prefix = dir.join(component.folder());
            builder = builder.with_profiling(&prefix).map_err(|e| load_err(e.into()))?;
        }
        Ok(builder)
    };
    let (mut builder, provider, fallback) = match provider.register(new_builder()?, component) {
        Ok(b) => (b, provider.clone(), None),
        Err(Error::ExecutionProviderUnavailable { reason, .. }) if config.cpu_fallback => {
            let note = format!("{provider} unavailable ({reason}); running on the CPU as allowed by cpu_fallback");
            (new_builder()?, ExecutionProvider::Cpu, Some(note))
        }
        Err(e) => return Err(e),
    };
    let session = commit_serialising_first(|| builder.commit_from_file(path)).map_err(|e| {
        // ONNX Runtime's refusal of a CUDA graph ("This session cannot use the graph capture feature as requested
        // by the user as all compute graph nodes have not been partitioned to the CUDAExecutionProvider", or "...
        // as the model has control flow nodes ..."), a typed error of its own.
        let message = e.to_string();
        if provider.cuda_graph() && component == Component::Transformer && message.contains("graph capture") {
            let reason = if message.contains("partitioned") {
                format!(
                    "not every node of the graph runs on the CUDA execution provider (some run on the CPU, which a \
                     CUDA graph cannot record; ONNX Runtime: {message})"
                )
            } else {
                format!("ONNX Runtime refused CUDA graph capture for this graph ({message})")
            };
            Error::CudaGraphUnsupported { component, path: path.to_path_buf(), reason, source: boxed(e) }
        } else {
            load_err(e)
        }
    })?;
    Ok((session, provider, fallback))
}

/// Whether a session with our operator domain has been created in this process.
static DOMAIN_REGISTERED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Runs `commit`, one at a time until the first success. ONNX Runtime adds a custom operator domain to a
/// process-wide map the first time a session uses it, with a check-then-insert that is not thread-safe: two
/// sessions created at the same moment from different threads could both try to insert `sd3onnx` and one failed
/// ("the domain is already exist"; seen with tests loading pipelines in parallel). Once one session exists, the
/// domain is in the map and later sessions only read it, so they are not serialised.
fn commit_serialising_first<T>(commit: impl FnOnce() -> ort::Result<T>) -> ort::Result<T> {
    let mut registered = DOMAIN_REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if *registered {
        drop(registered);
        return commit();
    }
    let out = commit();
    if out.is_ok() {
        *registered = true;
    }
    out
}

/// Session options shared by every graph we load.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionConfig {
    pub intra_threads: Option<usize>,
    /// Run on the CPU when the requested provider cannot be registered (recorded in `Graph::fallback`).
    pub cpu_fallback: bool,
    /// Write ONNX Runtime's per-node profile of each session into this folder.
    pub profile_dir: Option<PathBuf>,
    /// Fixed sizes for symbolic dimensions (ONNX Runtime then folds the shape arithmetic at load time).
    pub dimension_overrides: Vec<(String, i64)>,
}

impl Graph {
    /// Loads `path` for `component` on `provider`.
    pub fn load(
        env: &ort::environment::Environment,
        component: Component,
        path: &Path,
        requested: &ExecutionProvider,
        config: &SessionConfig,
    ) -> Result<Graph> {
        require_file(component, path, || {
            format!("Export the model with optimum-cli (see docs/models.md); {} needs model.onnx.", component.folder())
        })?;
        let (session, provider, fallback) = open_session(env, component, path, requested, config)?;
        let inputs = ports(session.inputs());
        let outputs = ports(session.outputs());
        let source = Source { env: env.clone(), requested: requested.clone(), config: config.clone() };
        Ok(Graph {
            component,
            path: path.to_path_buf(),
            provider,
            fallback,
            session: Some(session),
            source,
            inputs,
            outputs,
            run_time: Duration::ZERO,
            reload_time: Duration::ZERO,
            overrides: Vec::new(),
            lora_base: std::collections::HashMap::new(),
            mergers: super::merge::Mergers::default(),
            steppers: super::step::Steppers::default(),
            fixed: std::collections::HashMap::new(),
        })
    }

    /// Loads another graph with this one's ONNX Runtime environment, provider and session settings (without its
    /// dimension overrides): the ControlNet graphs open like the transformer they feed.
    pub fn load_like(&self, component: Component, path: &Path) -> Result<Graph> {
        let config = SessionConfig { dimension_overrides: Vec::new(), ..self.source.config.clone() };
        Graph::load(&self.source.env, component, path, &self.source.requested, &config)
    }

    /// Frees the session (its weights and memory arenas) while keeping what is known about the graph; the next
    /// run loads it again with the same settings. Used by low-memory mode between stages.
    pub fn unload(&mut self) {
        self.session = None;
    }

    /// A custom metadata entry of the model file (`metadata_props` in the ONNX file).
    pub fn custom_metadata(&mut self, key: &str) -> Result<Option<String>> {
        let component = self.component;
        self.ensure_loaded()?;
        let session = live(&mut self.session, component)?;
        let metadata = session.metadata().map_err(|e| Error::inference(component, e.to_string(), boxed(e)))?;
        Ok(metadata.custom(key))
    }

    /// [`unload`](Self::unload)s when `condition` holds.
    pub fn unload_if(&mut self, condition: bool) {
        if condition {
            self.unload();
        }
    }

    /// Whether the session is in memory.
    pub fn is_loaded(&self) -> bool {
        self.session.is_some()
    }

    /// Loads the session again if [`unload`](Self::unload) freed it.
    pub(super) fn ensure_loaded(&mut self) -> Result<()> {
        if self.session.is_none() {
            let started = Instant::now();
            let Source { env, requested, config } = &self.source;
            let (session, _, _) = open_session(env, self.component, &self.path, requested, config)?;
            if ports(session.inputs()) != self.inputs || ports(session.outputs()) != self.outputs {
                return Err(self.mismatch("the graph file changed on disk since the pipeline was built".into()));
            }
            self.reload_time += started.elapsed();
            self.session = Some(session);
        }
        Ok(())
    }

    fn mismatch(&self, message: String) -> Error {
        Error::mismatch(self.component, &self.path, message)
    }

    fn list(ports: &[Port]) -> String {
        ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Stops profiling (when enabled) and returns the profile file ONNX Runtime wrote.
    pub fn end_profiling(&mut self) -> Result<PathBuf> {
        let component = self.component;
        let Some(session) = self.session.as_mut() else {
            return Err(Error::request(
                "low_memory",
                true,
                format!("{component}: its session was unloaded between stages, so its profile cannot be ended; profile without low_memory"),
            ));
        };
        session
            .end_profiling()
            .map(PathBuf::from)
            .map_err(|e| Error::inference(component, format!("profiling: {e}"), boxed(e)))
    }

    /// Finds input `name` and checks its rank and element type.
    pub fn require_input(&self, name: &str, rank: usize, types: &[ElementType]) -> Result<&Port> {
        let port = self.inputs.iter().find(|p| p.name == name).ok_or_else(|| {
            self.mismatch(format!("no input named `{name}`; the graph's inputs are: {}", Self::list(&self.inputs)))
        })?;
        self.check_port("input", port, rank, types)?;
        Ok(port)
    }

    /// Finds output `name` and checks its rank and element type.
    pub fn require_output(&self, name: &str, rank: usize, types: &[ElementType]) -> Result<&Port> {
        let port = self.outputs.iter().find(|p| p.name == name).ok_or_else(|| {
            self.mismatch(format!("no output named `{name}`; the graph's outputs are: {}", Self::list(&self.outputs)))
        })?;
        self.check_port("output", port, rank, types)?;
        Ok(port)
    }

    /// Fails when the graph has inputs beyond `known` (we could not feed them).
    pub fn reject_extra_inputs(&self, known: &[&str]) -> Result<()> {
        match self.inputs.iter().find(|p| !known.contains(&p.name.as_str())) {
            Some(extra) => {
                Err(self.mismatch(format!("unexpected input {extra}; the pipeline feeds only: {}", known.join(", "))))
            }
            None => Ok(()),
        }
    }

    fn check_port(&self, kind: &str, port: &Port, rank: usize, types: &[ElementType]) -> Result<()> {
        let Some(shape) = &port.shape else {
            return Err(self.mismatch(format!("{kind} `{}` is not a tensor", port.name)));
        };
        if shape.len() != rank {
            return Err(self.mismatch(format!("{kind} {port} has rank {}, expected rank {rank}", shape.len())));
        }
        if !types.contains(&port.dtype) {
            let want = types.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or ");
            return Err(self.mismatch(format!("{kind} {port} has element type {}, expected {want}", port.dtype)));
        }
        Ok(())
    }

    pub(crate) fn input_type(&self, name: &str) -> Result<ElementType> {
        self.inputs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.dtype)
            .ok_or_else(|| self.mismatch(format!("no input named `{name}`")))
    }

    fn output_type(&self, name: &str) -> Result<ElementType> {
        self.outputs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.dtype)
            .ok_or_else(|| self.mismatch(format!("no output named `{name}`")))
    }

    /// Runs the graph and returns the named outputs as `f32` arrays, in the order asked for.
    pub fn run(&mut self, inputs: &[(&str, Input<'_>)], wanted: &[&str]) -> Result<Vec<ArrayD<f32>>> {
        let component = self.component;
        let output_types: Vec<ElementType> = wanted.iter().map(|n| self.output_type(n)).collect::<Result<_>>()?;
        self.run_with(inputs, |outputs| collect_outputs(component, outputs, wanted, &output_types))
    }

    /// Runs the graph and writes output `wanted` (float32, float16, bfloat16 or float64) as float32 straight into
    /// `dest`: one copy of the output where [`Graph::run`] and an assignment make two (the T5 states of every
    /// prompt, 4 MB at SD3's widths). `Ok(Err(shape))` when the output's shape is not `dest`'s (nothing written).
    pub(crate) fn run_into(
        &mut self,
        inputs: &[(&str, Input<'_>)],
        wanted: &str,
        dest: ArrayViewMutD<'_, f32>,
    ) -> Result<std::result::Result<(), Vec<usize>>> {
        let component = self.component;
        let dtype = self.output_type(wanted)?;
        self.run_with(inputs, |outputs| {
            let value = outputs.get(wanted).ok_or_else(|| {
                Error::internal(format!("{component}: output `{wanted}` was asked for and not produced"))
            })?;
            write_f32(value, dtype, dest).map_err(|e| Error::inference(component, e.to_string(), boxed(e)))
        })
    }

    /// Runs the graph on `inputs` (and the weight overrides) and hands the outputs to `read`; the run is timed as
    /// this graph's `Session::run`.
    fn run_with<R>(
        &mut self,
        inputs: &[(&str, Input<'_>)],
        read: impl FnOnce(&ort::session::SessionOutputs<'_>) -> Result<R>,
    ) -> Result<R> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        self.ensure_loaded()?;
        let mut values: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, input) in inputs {
            let dtype = self.input_type(name)?;
            let value: SessionInputValue<'_> = match (input, dtype) {
                // float32 and int64 views are passed without a copy when contiguous.
                (Input::Float(a), ElementType::Float32) if a.is_standard_layout() => {
                    TensorRef::from_array_view(a.view()).map_err(infer)?.into()
                }
                (Input::Int64(a), ElementType::Int64) if a.is_standard_layout() => {
                    TensorRef::from_array_view(a.view()).map_err(infer)?.into()
                }
                _ => self.value(name, input)?.into(),
            };
            values.push((name.to_string(), value));
        }
        for (name, w) in &self.overrides {
            values.push((name.clone(), w.into()));
        }
        let session = live(&mut self.session, component)?;
        let started = Instant::now();
        let outputs = session.run(values).map_err(infer)?;
        self.run_time += started.elapsed();
        read(&outputs)
    }
}

/// Inputs bound once and reused across runs of the same graph (IO binding). On a GPU provider the values
/// live in device memory, so e.g. the text conditioning is uploaded once per image instead of once per step.
pub(crate) struct Binding {
    pub(super) inner: IoBinding,
}

impl Graph {
    /// The device memory this graph's provider computes in.
    pub(super) fn device(&self) -> Option<(AllocationDevice<'static>, i32)> {
        match &self.provider {
            ExecutionProvider::Cuda(o) => Some((AllocationDevice::CUDA, o.device_id)),
            ExecutionProvider::TensorRt(o) => Some((AllocationDevice::CUDA, o.device_id)),
            // DirectML and the CPU read host memory through ONNX Runtime's own copies.
            _ => None,
        }
    }

    /// Converts an input to an owned ONNX Runtime value of the element type the graph declares.
    pub(super) fn value(&self, name: &str, input: &Input<'_>) -> Result<DynTensor> {
        self.value_as(name, input, self.input_type(name)?)
    }

    /// Converts an input to an owned ONNX Runtime value of element type `dtype`.
    pub(super) fn value_as(&self, name: &str, input: &Input<'_>, dtype: ElementType) -> Result<DynTensor> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        Ok(match (input, dtype) {
            (Input::Float(a), ElementType::Float32) => Tensor::from_array(a.to_owned()).map_err(infer)?.upcast(),
            (Input::Float(a), ElementType::Float16) => {
                let shape = a.shape().to_vec();
                Tensor::from_array((shape, halves::<f16>(a))).map_err(infer)?.upcast()
            }
            (Input::Float(a), ElementType::BFloat16) => {
                let shape = a.shape().to_vec();
                Tensor::from_array((shape, halves::<bf16>(a))).map_err(infer)?.upcast()
            }
            (Input::Float(a), ElementType::Float64) => Tensor::from_array(a.mapv(f64::from)).map_err(infer)?.upcast(),
            (Input::Int64(a), ElementType::Int64) => Tensor::from_array(a.to_owned()).map_err(infer)?.upcast(),
            (Input::Int64(a), ElementType::Int32) => {
                let converted = a.mapv(|v| i32::try_from(v).unwrap_or(i32::MAX));
                Tensor::from_array(converted).map_err(infer)?.upcast()
            }
            (_, other) => {
                return Err(self.mismatch(format!("input `{name}` has element type {other}, which we cannot feed")))
            }
        })
    }

    /// Binds inputs that stay the same for many runs; on a GPU provider they are copied to the device once.
    pub fn bind(&mut self, inputs: &[(&str, Input<'_>)]) -> Result<Binding> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        self.ensure_loaded()?;
        let mut binding = live(&mut self.session, component)?.create_binding().map_err(infer)?;
        for (name, input) in inputs {
            let value = self.value(name, input)?;
            match self.device() {
                Some((device, id)) => {
                    let on_device = value.to(device, id).map_err(infer)?;
                    binding.bind_input(*name, &on_device).map_err(infer)?;
                }
                None => binding.bind_input(*name, &value).map_err(infer)?,
            }
        }
        Ok(Binding { inner: binding })
    }

    /// Binds the [`overrides`](Self::overrides) (merged LoRA weights, already in the graph's memory) for the
    /// runs of `binding`.
    pub(crate) fn bind_overrides(&mut self, binding: &mut Binding) -> Result<()> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        for (name, w) in &self.overrides {
            binding.inner.bind_input(name.as_str(), w).map_err(infer)?;
        }
        Ok(())
    }

    /// Keeps the base values of the LoRA-targetable weights (graph input, value in the graph's element type), moved
    /// to the graph's device.
    pub(crate) fn set_lora_bases(&mut self, bases: Vec<(String, DynTensor)>) -> Result<()> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, format!("LoRA base weights: {e}"), boxed(e));
        for (name, value) in bases {
            let value = match self.device() {
                Some((device, id)) => value.to(device, id).map_err(infer)?,
                None => value,
            };
            self.lora_base.insert(name, value);
        }
        Ok(())
    }

    /// Drops the LoRA weights: the merged ones (the graph runs on its own weights again) and the base copies.
    pub(crate) fn clear_lora(&mut self) {
        self.overrides.clear();
        self.lora_base.clear();
    }

    /// The merge session for weights of `dtype` on this graph's provider (TensorRT graphs merge on CUDA: a
    /// TensorRT engine per merge shape would cost more than the merge), created on first use.
    fn merger(&mut self, dtype: ElementType) -> Result<usize> {
        if let Some(i) = self.mergers.sessions.iter().position(|(t, _)| *t == dtype) {
            return Ok(i);
        }
        let component = self.component;
        let err =
            |e: ort::Error| Error::inference(component, format!("creating the LoRA merge session: {e}"), boxed(e));
        let bytes = super::merge::merge_graph(dtype).ok_or_else(|| {
            self.mismatch(format!("LoRA-targetable weights of element type {dtype} cannot be merged"))
        })?;
        let provider = match &self.provider {
            ExecutionProvider::TensorRt(o) => ExecutionProvider::cuda(o.device_id),
            // Never a CUDA graph: the merge runs once per weight, on fresh tensors.
            other => other.without_cuda_graph(),
        };
        let mut builder = Session::builder(&self.source.env).map_err(err)?;
        if let Some(n) = self.source.config.intra_threads {
            builder = builder.with_intra_threads(n).map_err(|e| err(e.into()))?;
        }
        let mut builder = provider.register(builder, component)?;
        let session = builder.commit_from_memory(&bytes).map_err(err)?;
        self.mergers.sessions.push((dtype, session));
        Ok(self.mergers.sessions.len() - 1)
    }

    /// Adds the override `input = base + left @ right`, computed on the graph's provider from the base value
    /// given by [`set_lora_bases`](Self::set_lora_bases); the result stays in the graph's memory.
    pub(crate) fn merge_override(
        &mut self,
        input: &str,
        dtype: ElementType,
        left: ndarray::Array2<f32>,
        right: ndarray::Array2<f32>,
    ) -> Result<()> {
        let component = self.component;
        let infer =
            |e: ort::Error| Error::inference(component, format!("merging LoRA weight `{input}`: {e}"), boxed(e));
        let index = self.merger(dtype)?;
        let memory = match self.device() {
            Some((device, id)) => MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default),
            None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
        }
        .map_err(infer)?;
        let base =
            self.lora_base.get(input).ok_or_else(|| Error::internal(format!("no LoRA base weight for `{input}`")))?;
        let session = &mut self.mergers.sessions[index].1;
        // The factors are moved in; only a non-standard layout (a concatenation of transposes may give one) is copied.
        let contiguous =
            |a: ndarray::Array2<f32>| if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        let left = Tensor::from_array(contiguous(left)).map_err(infer)?;
        let right = Tensor::from_array(contiguous(right)).map_err(infer)?;
        let mut binding = session.create_binding().map_err(infer)?;
        binding.bind_input("W", base).map_err(infer)?;
        binding.bind_input("L", &left).map_err(infer)?;
        binding.bind_input("R", &right).map_err(infer)?;
        binding.bind_output_to_device("Y", &memory).map_err(infer)?;
        let merged = session
            .run_binding(&binding)
            .map_err(infer)?
            .remove("Y")
            .ok_or_else(|| Error::internal("the LoRA merge graph gave no output"))?;
        self.overrides.push((input.to_string(), merged));
        Ok(())
    }

    /// Runs with `binding`'s fixed inputs plus `inputs`, and returns the named outputs in host memory as `f32`.
    pub fn run_bound(
        &mut self,
        binding: &mut Binding,
        inputs: &[(&str, Input<'_>)],
        wanted: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        let component = self.component;
        let infer = |e: ort::Error| Error::inference(component, e.to_string(), boxed(e));
        for (name, input) in inputs {
            let value = self.value(name, input)?;
            binding.inner.bind_input(*name, &value).map_err(infer)?;
        }
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(infer)?;
        let mut output_types = Vec::with_capacity(wanted.len());
        for name in wanted {
            output_types.push(self.output_type(name)?);
            binding.inner.bind_output_to_device(*name, &host).map_err(infer)?;
        }
        let started = Instant::now();
        self.ensure_loaded()?;
        let outputs = live(&mut self.session, component)?.run_binding(&binding.inner).map_err(infer)?;
        self.run_time += started.elapsed();
        collect_outputs(component, &outputs, wanted, &output_types)
    }
}

/// The loaded session (callers load it first with `Graph::ensure_loaded`).
pub(super) fn live(session: &mut Option<Session>, component: Component) -> Result<&mut Session> {
    session.as_mut().ok_or_else(|| Error::internal(format!("{component}: the session is not loaded")))
}

/// The `wanted` outputs of a run, converted to `f32`.
fn collect_outputs(
    component: Component,
    outputs: &ort::session::SessionOutputs<'_>,
    wanted: &[&str],
    types: &[ElementType],
) -> Result<Vec<ArrayD<f32>>> {
    wanted
        .iter()
        .zip(types)
        .map(|(name, dtype)| {
            let value = outputs.get(*name).ok_or_else(|| {
                Error::internal(format!("{component}: output `{name}` was asked for and not produced"))
            })?;
            to_f32(value, *dtype).map_err(|e| Error::inference(component, e.to_string(), boxed(e)))
        })
        .collect()
}

/// Converts floats to a 16-bit type with `half`'s slice conversion (F16C where the CPU has it): this runs on
/// every denoising step's latents, where an element-by-element `mapv` cost milliseconds at 1024x1024.
fn halves<T: HalfFloat>(a: &ArrayViewD<'_, f32>) -> Vec<T> {
    let standard = a.as_standard_layout();
    let src: &[f32] = match standard.as_slice() {
        Some(s) => s,
        // as_standard_layout always yields a contiguous array; an empty fallback keeps this panic-free.
        None => &[],
    };
    let mut out = vec![T::ZERO; src.len()];
    T::from_f32_slice(&mut out, src);
    out
}

/// The 16-bit float types a graph may use, with their slice conversions.
trait HalfFloat: Copy + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static {
    const ZERO: Self;
    fn from_f32_slice(dst: &mut [Self], src: &[f32]);
    fn to_f32_vec(src: &[Self]) -> Vec<f32>;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
}

impl HalfFloat for f16 {
    const ZERO: Self = f16::ZERO;
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f32_vec(src: &[Self]) -> Vec<f32> {
        src.to_f32_vec()
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl HalfFloat for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f32_vec(src: &[Self]) -> Vec<f32> {
        src.to_f32_vec()
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

fn widen<T: HalfFloat>(value: &DynValue) -> ort::Result<ArrayD<f32>> {
    let (shape, data) = value.try_extract_tensor::<T>()?;
    let dims: Vec<usize> = shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect();
    ArrayD::from_shape_vec(IxDyn(&dims), T::to_f32_vec(data))
        .map_err(|e| ort::Error::new(format!("output shape {dims:?}: {e}")))
}

fn to_f32(value: &DynValue, dtype: ElementType) -> ort::Result<ArrayD<f32>> {
    Ok(match dtype {
        ElementType::Float16 => widen::<f16>(value)?,
        ElementType::BFloat16 => widen::<bf16>(value)?,
        ElementType::Float64 => value.try_extract_array::<f64>()?.mapv(|v| v as f32),
        _ => value.try_extract_array::<f32>()?.to_owned(),
    })
}

/// Writes an output into `dest` as float32 ([`to_f32`]'s conversions) when its shape is `dest`'s; else returns
/// the output's shape and writes nothing.
fn write_f32(
    value: &DynValue,
    dtype: ElementType,
    mut dest: ArrayViewMutD<'_, f32>,
) -> ort::Result<std::result::Result<(), Vec<usize>>> {
    fn dims(shape: &[i64]) -> Vec<usize> {
        shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect()
    }
    fn narrow<T: HalfFloat>(
        value: &DynValue,
        dest: &mut ArrayViewMutD<'_, f32>,
    ) -> ort::Result<std::result::Result<(), Vec<usize>>> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let shape = dims(shape);
        if shape != dest.shape() {
            return Ok(Err(shape));
        }
        match dest.as_slice_mut() {
            Some(d) => T::to_f32_slice(data, d),
            None => {
                let wide = T::to_f32_vec(data);
                dest.iter_mut().zip(wide).for_each(|(d, v)| *d = v);
            }
        }
        Ok(Ok(()))
    }
    match dtype {
        ElementType::Float16 => narrow::<f16>(value, &mut dest),
        ElementType::BFloat16 => narrow::<bf16>(value, &mut dest),
        ElementType::Float64 => {
            let a = value.try_extract_array::<f64>()?;
            if a.shape() != dest.shape() {
                return Ok(Err(a.shape().to_vec()));
            }
            dest.zip_mut_with(&a, |d, v| *d = *v as f32);
            Ok(Ok(()))
        }
        _ => {
            let a = value.try_extract_array::<f32>()?;
            if a.shape() != dest.shape() {
                return Ok(Err(a.shape().to_vec()));
            }
            dest.assign(&a);
            Ok(Ok(()))
        }
    }
}

#[cfg(all(test, feature = "load-dynamic"))]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3, ShapeBuilder};

    /// ONNX Runtime's API, for making values (ORT_DYLIB_PATH, as every test that runs a graph).
    fn ort_api() {
        super::super::environment(None).expect("ONNX Runtime (ORT_DYLIB_PATH)");
    }

    fn values() -> Vec<f32> {
        // exact in float16, bfloat16 and float64
        (0..24).map(|i| (i as f32 - 11.0) * 0.25).collect()
    }

    #[test]
    fn outputs_of_every_float_type_are_written_into_the_destination() {
        ort_api();
        let want = Array3::from_shape_vec((1, 4, 6), values()).unwrap();
        let halves: Vec<f16> = values().iter().map(|v| f16::from_f32(*v)).collect();
        let bhalves: Vec<bf16> = values().iter().map(|v| bf16::from_f32(*v)).collect();
        let doubles: Vec<f64> = values().iter().map(|v| f64::from(*v)).collect();
        let shape = [1usize, 4, 6];
        let cases: Vec<(ElementType, DynValue)> = vec![
            (ElementType::Float32, Tensor::from_array((shape, values())).unwrap().into_dyn()),
            (ElementType::Float16, Tensor::from_array((shape, halves)).unwrap().into_dyn()),
            (ElementType::BFloat16, Tensor::from_array((shape, bhalves)).unwrap().into_dyn()),
            (ElementType::Float64, Tensor::from_array((shape, doubles)).unwrap().into_dyn()),
        ];
        for (dtype, value) in &cases {
            // a contiguous destination (the T5 slot) and a column-major one (the element-by-element path)
            let mut dest = Array3::<f32>::from_elem((1, 4, 6), f32::NAN);
            assert_eq!(write_f32(value, *dtype, dest.view_mut().into_dyn()).unwrap(), Ok(()), "{dtype}");
            assert_eq!(dest, want, "{dtype}");
            let mut strided = Array3::<f32>::from_elem((1, 4, 6).f(), f32::NAN);
            assert_eq!(write_f32(value, *dtype, strided.view_mut().into_dyn()).unwrap(), Ok(()), "{dtype}");
            assert_eq!(strided, want, "{dtype} (column-major destination)");
            // another shape: reported, nothing written
            let mut other = Array2::<f32>::from_elem((4, 6), -1.0);
            assert_eq!(write_f32(value, *dtype, other.view_mut().into_dyn()).unwrap(), Err(vec![1, 4, 6]), "{dtype}");
            assert!(other.iter().all(|v| *v == -1.0), "{dtype}: written despite the wrong shape");
        }
    }
}
