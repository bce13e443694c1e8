//! Execution providers: one enum for the user, one place that registers each with ONNX Runtime.
//!
//! A provider that was asked for and cannot be registered is an error. ONNX Runtime's own default is to log
//! and fall back to the CPU; we always pass `error_on_failure`, and check availability first so the message
//! says what is missing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::session::builder::SessionBuilder;

use crate::error::{Component, Error, Result};

/// Options of the CUDA execution provider. `CudaOptions::new(1)` is GPU 1 with ONNX Runtime's defaults; more
/// options may be added (the struct is `#[non_exhaustive]`: build it with [`CudaOptions::new`] and the setters).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct CudaOptions {
    /// GPU ordinal.
    pub device_id: i32,
    /// The attention kernels ONNX Runtime may pick for fused attention operators (default: its own choice).
    pub attention: CudaAttention,
    /// Capture the transformer's run as a CUDA graph and replay it at later steps (ONNX Runtime's
    /// `enable_cuda_graph`); see [`CudaOptions::cuda_graph`]. Default `false`.
    pub cuda_graph: bool,
}

impl CudaOptions {
    /// GPU `device_id`, ONNX Runtime's defaults otherwise.
    pub fn new(device_id: i32) -> Self {
        CudaOptions { device_id, ..Default::default() }
    }
    /// Restricts the attention kernels (for measuring which is fastest on a card).
    #[must_use]
    pub fn attention(mut self, attention: CudaAttention) -> Self {
        self.attention = attention;
        self
    }
    /// Runs the transformer as a CUDA graph (ONNX Runtime's `enable_cuda_graph`): ONNX Runtime records the
    /// transformer's kernels once and replays the recording at later steps instead of launching each kernel from
    /// the host. Applies to the transformer only: the other components on this provider run as usual. Off by
    /// default; not measured on a GPU yet (docs/performance.md, "CUDA graphs").
    ///
    /// A replay reads and writes the device addresses it recorded, so the pipeline then keeps the transformer's
    /// inputs and output in buffers that live as long as the pipeline and copies each step's values into them.
    /// Requirements, each checked with a typed error:
    /// - [`Sd3PipelineBuilder::static_shape`](crate::Sd3PipelineBuilder::static_shape), which fixes every
    ///   dimension of the transformer (requests of another size, guidance or sequence length are then refused
    ///   with [`Error::InvalidRequest`](crate::Error::InvalidRequest));
    /// - the loop on the device ([`Sd3PipelineBuilder::device_loop`](crate::Sd3PipelineBuilder::device_loop)
    ///   not `false`);
    /// - no LoRAs and no ControlNets in requests (their weights and residuals would change what the recording
    ///   reads);
    /// - every node of the transformer on the CUDA provider: ONNX Runtime refuses to create the session
    ///   otherwise, reported as [`Error::CudaGraphUnsupported`](crate::Error::CudaGraphUnsupported), and so is
    ///   a transformer that fell back to the CPU ([`Sd3PipelineBuilder::cpu_fallback`](crate::Sd3PipelineBuilder::cpu_fallback)).
    #[must_use]
    pub fn cuda_graph(mut self, enable: bool) -> Self {
        self.cuda_graph = enable;
        self
    }
}

/// Options of the TensorRT execution provider.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct TensorRtOptions {
    /// GPU ordinal.
    pub device_id: i32,
    /// Build fp16 engines.
    pub fp16: bool,
    /// Where to keep built engines between runs (enables the engine cache).
    pub engine_cache_path: Option<PathBuf>,
    /// Where to keep the layer timing cache (enables the timing cache).
    pub timing_cache_path: Option<PathBuf>,
}

impl TensorRtOptions {
    /// Options for GPU `device_id`, fp32, no caches.
    pub fn new(device_id: i32) -> Self {
        TensorRtOptions { device_id, ..Default::default() }
    }
    /// Builds fp16 engines when `enable`.
    #[must_use]
    pub fn fp16(mut self, enable: bool) -> Self {
        self.fp16 = enable;
        self
    }
    /// Caches built engines in `path`.
    #[must_use]
    pub fn engine_cache(mut self, path: impl AsRef<Path>) -> Self {
        self.engine_cache_path = Some(path.as_ref().to_path_buf());
        self
    }
    /// Caches layer timings in `path`.
    #[must_use]
    pub fn timing_cache(mut self, path: impl AsRef<Path>) -> Self {
        self.timing_cache_path = Some(path.as_ref().to_path_buf());
        self
    }
}

/// Options of the DirectML execution provider (Windows).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct DirectMlOptions {
    /// Adapter index.
    pub device_id: i32,
}

impl DirectMlOptions {
    /// Adapter `device_id`.
    pub fn new(device_id: i32) -> Self {
        DirectMlOptions { device_id }
    }
}

/// Where a graph runs. Each GPU provider carries its options struct, so new options are not breaking changes:
/// `ExecutionProvider::Cuda(CudaOptions::new(0))`, or the shorthands [`ExecutionProvider::cuda`],
/// [`ExecutionProvider::tensorrt`], [`ExecutionProvider::directml`]; also parsed from `cpu`, `cuda:1`, ...
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU provider (always available).
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs the `cuda` feature and an ONNX Runtime GPU build).
    Cuda(CudaOptions),
    /// NVIDIA TensorRT (needs the `tensorrt` feature and the TensorRT libraries).
    TensorRt(TensorRtOptions),
    /// DirectML on Windows (needs the `directml` feature and a DirectML build of ONNX Runtime).
    DirectMl(DirectMlOptions),
}

impl ExecutionProvider {
    /// CUDA on GPU `device_id` with default options.
    pub fn cuda(device_id: i32) -> Self {
        ExecutionProvider::Cuda(CudaOptions::new(device_id))
    }

    /// TensorRT on GPU `device_id` with default options.
    pub fn tensorrt(device_id: i32) -> Self {
        ExecutionProvider::TensorRt(TensorRtOptions::new(device_id))
    }

    /// DirectML on adapter `device_id`.
    pub fn directml(device_id: i32) -> Self {
        ExecutionProvider::DirectMl(DirectMlOptions::new(device_id))
    }

    /// The GPU ordinal (adapter index for DirectML), `None` for the CPU.
    pub fn device_id(&self) -> Option<i32> {
        match self {
            ExecutionProvider::Cpu => None,
            ExecutionProvider::Cuda(o) => Some(o.device_id),
            ExecutionProvider::TensorRt(o) => Some(o.device_id),
            ExecutionProvider::DirectMl(o) => Some(o.device_id),
        }
    }

    /// Whether these are CUDA options asking for a CUDA graph ([`CudaOptions::cuda_graph`]).
    pub(crate) fn cuda_graph(&self) -> bool {
        matches!(self, ExecutionProvider::Cuda(o) if o.cuda_graph)
    }

    /// The same provider without a CUDA graph: the small sessions that run beside the transformer (step graphs,
    /// LoRA merges) and the transformer's first load before its dimensions are fixed.
    pub(crate) fn without_cuda_graph(&self) -> ExecutionProvider {
        match self {
            ExecutionProvider::Cuda(o) => ExecutionProvider::Cuda(CudaOptions { cuda_graph: false, ..o.clone() }),
            other => other.clone(),
        }
    }

    /// ONNX Runtime's name for the provider.
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "CPUExecutionProvider",
            ExecutionProvider::Cuda(_) => "CUDAExecutionProvider",
            ExecutionProvider::TensorRt(_) => "TensorrtExecutionProvider",
            ExecutionProvider::DirectMl(_) => "DmlExecutionProvider",
        }
    }

    /// Registers the provider on a session builder, or explains why it cannot be.
    pub(crate) fn register(&self, builder: SessionBuilder, component: Component) -> Result<SessionBuilder> {
        let unavailable = |u: Unavailable| Error::ExecutionProviderUnavailable {
            provider: self.to_string(),
            component,
            reason: u.reason,
            source: u.source,
        };
        match self {
            ExecutionProvider::Cpu => Ok(builder),
            // CUDA graphs for the transformer only (CudaOptions::cuda_graph).
            ExecutionProvider::Cuda(options) => {
                register_cuda(builder, options, component == Component::Transformer).map_err(unavailable)
            }
            ExecutionProvider::TensorRt(options) => register_tensorrt(builder, options).map_err(unavailable),
            ExecutionProvider::DirectMl(options) => register_directml(builder, options).map_err(unavailable),
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecutionProvider::Cpu => f.write_str("CPU"),
            ExecutionProvider::Cuda(o) => write!(f, "CUDA (device {})", o.device_id),
            ExecutionProvider::TensorRt(o) => write!(f, "TensorRT (device {})", o.device_id),
            ExecutionProvider::DirectMl(o) => write!(f, "DirectML (device {})", o.device_id),
        }
    }
}

impl FromStr for ExecutionProvider {
    type Err = Error;

    /// Parses `cpu`, `cuda`, `cuda:1`, `tensorrt`, `tensorrt:0`, `directml`, `directml:1`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, id) = match s.split_once(':') {
            Some((n, id)) => {
                let id = id.parse::<i32>().ok().filter(|v| *v >= 0).ok_or_else(|| {
                    Error::request("execution_provider", s, "the device id after ':' must be a non-negative integer")
                })?;
                (n, id)
            }
            None => (s, 0),
        };
        match name.to_ascii_lowercase().as_str() {
            "cpu" => Ok(ExecutionProvider::Cpu),
            "cuda" => Ok(ExecutionProvider::cuda(id)),
            "tensorrt" | "trt" => Ok(ExecutionProvider::tensorrt(id)),
            "directml" | "dml" => Ok(ExecutionProvider::directml(id)),
            _ => Err(Error::request("execution_provider", s, "expected one of cpu, cuda, tensorrt, directml")),
        }
    }
}

/// Turns ONNX Runtime's answer to "is this provider in the build?" into a message that says what to install.
#[allow(dead_code)] // unused when no provider feature is enabled
fn ensure_in_build(available: ort::Result<bool>, name: &str, hint: &str) -> std::result::Result<(), Unavailable> {
    match available {
        Ok(true) => Ok(()),
        Ok(false) => Err(Unavailable::from(format!(
            "the loaded ONNX Runtime ({}) was not built with {name}. {hint}",
            super::loaded_library().map(|p| p.display().to_string()).unwrap_or_else(|| "unknown".into()),
        ))),
        Err(e) => Err(Unavailable {
            reason: format!("could not ask ONNX Runtime for its providers: {e}"),
            source: Some(Box::new(e)),
        }),
    }
}

/// The attention kernels ONNX Runtime's CUDA provider may pick for fused attention operators (its `sdpa_kernel`
/// option). `Auto` (default) leaves the choice to ONNX Runtime; the others restrict it, for measuring which is
/// fastest on a card. Set it with [`CudaOptions::attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CudaAttention {
    /// ONNX Runtime's own choice (flash attention where it applies).
    #[default]
    Auto,
    /// Flash attention (ONNX Runtime's FlashAttention-2 kernels).
    Flash,
    /// Memory-efficient attention (CUTLASS).
    MemoryEfficient,
    /// cuDNN's fused flash attention (cuDNN 9).
    CudnnFlash,
    /// Unfused matrix products and softmax.
    Math,
}

impl FromStr for CudaAttention {
    type Err = Error;

    /// Parses `auto`, `flash`, `efficient`, `cudnn`, `math`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => CudaAttention::Auto,
            "flash" => CudaAttention::Flash,
            "efficient" | "memory-efficient" => CudaAttention::MemoryEfficient,
            "cudnn" | "cudnn-flash" => CudaAttention::CudnnFlash,
            "math" => CudaAttention::Math,
            _ => return Err(Error::request("cuda_attention", s, "expected auto, flash, efficient, cudnn or math")),
        })
    }
}

#[cfg(feature = "cuda")]
fn register_cuda(
    builder: SessionBuilder,
    options: &CudaOptions,
    transformer: bool,
) -> std::result::Result<SessionBuilder, Unavailable> {
    use ort::ep::ExecutionProvider as _;
    ensure_in_build(
        ort::ep::CUDA::is_available(),
        "CUDAExecutionProvider",
        "Install the onnxruntime-gpu build (CUDA 13) and point ORT_DYLIB_PATH at its libonnxruntime.",
    )?;
    use ort::ep::cuda::AttentionBackend as B;
    let mut cuda = ort::ep::CUDA::default().with_device_id(options.device_id);
    let backend = match options.attention {
        CudaAttention::Auto => None,
        CudaAttention::Flash => Some(B::FLASH_ATTENTION),
        CudaAttention::MemoryEfficient => Some(B::EFFICIENT_ATTENTION),
        CudaAttention::CudnnFlash => Some(B::CUDNN_FLASH_ATTENTION),
        CudaAttention::Math => Some(B::MATH),
    };
    if let Some(b) = backend {
        cuda = cuda.with_attention_backend(b);
    }
    if options.cuda_graph && transformer {
        cuda = cuda.with_cuda_graph(true);
    }
    let ep = cuda.build().error_on_failure();
    builder.with_execution_providers([ep]).map_err(Unavailable::ort)
}

#[cfg(not(feature = "cuda"))]
fn register_cuda(
    _builder: SessionBuilder,
    _options: &CudaOptions,
    _transformer: bool,
) -> std::result::Result<SessionBuilder, Unavailable> {
    Err("sd3-onnx was compiled without the `cuda` feature; rebuild with `--features cuda`".into())
}

#[cfg(feature = "tensorrt")]
fn register_tensorrt(
    builder: SessionBuilder,
    options: &TensorRtOptions,
) -> std::result::Result<SessionBuilder, Unavailable> {
    use ort::ep::ExecutionProvider as _;
    ensure_in_build(
        ort::ep::TensorRT::is_available(),
        "TensorrtExecutionProvider",
        "Use an ONNX Runtime build with TensorRT and make the TensorRT libraries (libnvinfer) loadable.",
    )?;
    let mut ep = ort::ep::TensorRT::default().with_device_id(options.device_id).with_fp16(options.fp16);
    if let Some(p) = &options.engine_cache_path {
        ep = ep.with_engine_cache(true).with_engine_cache_path(p.display());
    }
    if let Some(p) = &options.timing_cache_path {
        ep = ep.with_timing_cache(true).with_timing_cache_path(p.display());
    }
    builder.with_execution_providers([ep.build().error_on_failure()]).map_err(Unavailable::ort)
}

#[cfg(not(feature = "tensorrt"))]
fn register_tensorrt(
    _builder: SessionBuilder,
    _options: &TensorRtOptions,
) -> std::result::Result<SessionBuilder, Unavailable> {
    Err("sd3-onnx was compiled without the `tensorrt` feature; rebuild with `--features tensorrt`".into())
}

#[cfg(feature = "directml")]
fn register_directml(
    builder: SessionBuilder,
    options: &DirectMlOptions,
) -> std::result::Result<SessionBuilder, Unavailable> {
    if !cfg!(windows) {
        return Err("DirectML exists only on Windows".into());
    }
    use ort::ep::ExecutionProvider as _;
    ensure_in_build(
        ort::ep::DirectML::is_available(),
        "DmlExecutionProvider",
        "Use the onnxruntime-directml build of ONNX Runtime.",
    )?;
    let ep = ort::ep::DirectML::default().with_device_id(options.device_id).build().error_on_failure();
    // DirectML requires sequential execution and no memory pattern (ONNX Runtime's documented constraints).
    let builder = builder.with_parallel_execution(false).map_err(Unavailable::ort)?;
    let builder = builder.with_memory_pattern(false).map_err(Unavailable::ort)?;
    builder.with_execution_providers([ep]).map_err(Unavailable::ort)
}

#[cfg(not(feature = "directml"))]
fn register_directml(
    _builder: SessionBuilder,
    _options: &DirectMlOptions,
) -> std::result::Result<SessionBuilder, Unavailable> {
    Err("sd3-onnx was compiled without the `directml` feature (DirectML is Windows-only)".into())
}

/// Why a provider could not be registered, with ONNX Runtime's error when registration failed there.
struct Unavailable {
    reason: String,
    source: Option<crate::error::BoxError>,
}

impl Unavailable {
    /// ONNX Runtime refused the registration: its message is the reason and its error the source.
    #[allow(dead_code)] // unused when no provider feature is enabled
    fn ort<R>(e: ort::Error<R>) -> Self
    where
        ort::Error: From<ort::Error<R>>,
    {
        let e = ort::Error::from(e);
        Unavailable { reason: e.to_string(), source: Some(Box::new(e)) }
    }
}

impl From<String> for Unavailable {
    fn from(reason: String) -> Self {
        Unavailable { reason, source: None }
    }
}

impl From<&str> for Unavailable {
    fn from(reason: &str) -> Self {
        Unavailable { reason: reason.to_string(), source: None }
    }
}

#[cfg(test)]
mod tests;
