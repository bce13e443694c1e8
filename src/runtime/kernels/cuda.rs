//! CUDA kernels of the fused operators, on the CUDA execution provider's stream.
//!
//! The products go through cuBLASLt with the bias (and tanh-GELU) in the epilogue; `ModNorm` and `HeadRmsNorm`
//! are our kernels (`mod_norm.cu`, embedded as PTX and compiled by the driver on first use). Both libraries are
//! opened at run time (`libcuda.so.1` from the driver, `libcublasLt.so.13`/`.12` from the CUDA runtime ONNX
//! Runtime itself loads), so building with the `cuda` feature needs no CUDA toolkit.
//!
//! Who owns what:
//!
//! - Per CUDA context, for the life of the process: our PTX module and its two functions (read-only).
//! - Per stream ([`Scratch`]): a cuBLASLt handle and the cuBLASLt workspace. ONNX Runtime runs each session
//!   (each concurrent `Run`) on a stream of its own, and the kernels of two sessions do run at the same time on
//!   one GPU; work on one stream runs in order. So every kernel on one stream may share one workspace, and
//!   kernels on two streams must not: a workspace shared by the whole context (before issue 15) let two sessions'
//!   matrix products write the same scratch memory at once. Kernels hold `Arc`s to the scratch of the streams
//!   they ran on and a registry holds `Weak`s, so the scratch is freed when the last kernel that used its stream is
//!   dropped (the session is closed).
//! - Per kernel (graph node): its cuBLASLt plans (layouts and the algorithm cuBLASLt's heuristic picks), made
//!   once per shape, pointer alignment and handle, and reused every step.
//!
//! Alignment: cuBLASLt is told the alignment of each matrix (it may then pick vectorised algorithms) only after
//! it was read off the actual pointers and batch strides; our kernels load `half2` and check 4-byte alignment.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use half::f16;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{DynTensorValueType, TensorElementType};

use super::cpu::{step_guidance, ModNormAttrs};
use super::shapes::{self, err};
use super::{fast_accum, guarded};

const PTX: &str = concat!(include_str!("mod_norm.ptx"), "\0");
/// The FP8 activation kernels (`fp8.cu`): loaded only by the FP8 operators, after the capability check.
const FP8_PTX: &str = concat!(include_str!("fp8.ptx"), "\0");
/// The device loop's Euler step (`step.cu`, `EulerStepF16` / `EulerStepF32`).
const STEP_PTX: &str = concat!(include_str!("step.ptx"), "\0");
const EP: &str = "CUDAExecutionProvider";
/// cuBLASLt workspace per stream (NVIDIA's cuBLASLt samples use 32 MiB on Hopper; ONNX Runtime's own cuBLAS
/// workspace is of the same order).
const WORKSPACE_BYTES: usize = 32 << 20;
/// The bias vector's alignment we require: cuBLASLt's documentation states none for `BIAS_POINTER`; ONNX Runtime
/// allocates initializers 256-byte aligned, so this only refuses what was never tested.
const BIAS_ALIGNMENT: usize = 16;

type CuResult = c_int;
type Handle = *mut c_void;

/// The few driver and cuBLASLt entry points we call.
struct Api {
    _cuda: libloading::Library,
    _lt: libloading::Library,
    cu_ctx_get_current: unsafe extern "C" fn(*mut Handle) -> CuResult,
    cu_module_load_data: unsafe extern "C" fn(*mut Handle, *const c_void) -> CuResult,
    cu_module_get_function: unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> CuResult,
    cu_launch_kernel: unsafe extern "C" fn(
        Handle,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        Handle,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    cu_mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> CuResult,
    cu_mem_free: unsafe extern "C" fn(u64) -> CuResult,
    cu_ctx_push_current: unsafe extern "C" fn(Handle) -> CuResult,
    cu_ctx_pop_current: unsafe extern "C" fn(*mut Handle) -> CuResult,
    cu_ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    cu_ctx_get_device: unsafe extern "C" fn(*mut c_int) -> CuResult,
    cu_device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    cu_memset_d32_async: unsafe extern "C" fn(u64, u32, usize, Handle) -> CuResult,
    cu_stream_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    lt_create: unsafe extern "C" fn(*mut Handle) -> c_int,
    lt_destroy: unsafe extern "C" fn(Handle) -> c_int,
    lt_desc_create: unsafe extern "C" fn(*mut Handle, c_int, c_int) -> c_int,
    lt_desc_set: unsafe extern "C" fn(Handle, c_int, *const c_void, usize) -> c_int,
    lt_desc_destroy: unsafe extern "C" fn(Handle) -> c_int,
    lt_layout_create: unsafe extern "C" fn(*mut Handle, c_int, u64, u64, i64) -> c_int,
    lt_layout_set: unsafe extern "C" fn(Handle, c_int, *const c_void, usize) -> c_int,
    lt_layout_destroy: unsafe extern "C" fn(Handle) -> c_int,
    lt_pref_create: unsafe extern "C" fn(*mut Handle) -> c_int,
    lt_pref_set: unsafe extern "C" fn(Handle, c_int, *const c_void, usize) -> c_int,
    lt_pref_destroy: unsafe extern "C" fn(Handle) -> c_int,
    lt_heuristic: unsafe extern "C" fn(
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        Handle,
        c_int,
        *mut HeuristicResult,
        *mut c_int,
    ) -> c_int,
    lt_matmul: unsafe extern "C" fn(
        Handle,
        Handle,
        *const c_void,
        *const c_void,
        Handle,
        *const c_void,
        Handle,
        *const c_void,
        *const c_void,
        Handle,
        *mut c_void,
        Handle,
        *const Algo,
        *mut c_void,
        usize,
        Handle,
    ) -> c_int,
}

// SAFETY: the fields are function pointers into, and handles of, libraries that stay loaded as long as `Api`
// lives (the `'static` in `API`); nothing in `Api` is ever written after `Api::load`.
unsafe impl Send for Api {}
// SAFETY: as for `Send`: `Api` is immutable, and the driver and cuBLASLt entry points may be called from any
// thread (each call passes its own handles, descriptors and stream; handles are never shared between streams).
unsafe impl Sync for Api {}

/// `cublasLtMatmulAlgo_t` (cublasLt.h: 8 x uint64).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Algo([u64; 8]);

/// `cublasLtMatmulHeuristicResult_t` (cublasLt.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HeuristicResult {
    algo: Algo,
    workspace_size: usize,
    state: c_int,
    waves_count: f32,
    reserved: [c_int; 4],
}

// Values from cublasLt.h / cublas_api.h / library_types.h (CUDA 12.8 headers; unchanged in 13).
const CUDA_R_16F: c_int = 2;
const CUDA_R_32F: c_int = 0;
const CUBLAS_COMPUTE_32F: c_int = 68;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const DESC_EPILOGUE: c_int = 7;
const DESC_BIAS_POINTER: c_int = 8;
const LAYOUT_BATCH_COUNT: c_int = 5;
const LAYOUT_STRIDED_BATCH_OFFSET: c_int = 6;
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;
const PREF_MIN_ALIGNMENT_A_BYTES: c_int = 5;
const PREF_MIN_ALIGNMENT_B_BYTES: c_int = 6;
const PREF_MIN_ALIGNMENT_C_BYTES: c_int = 7;
const PREF_MIN_ALIGNMENT_D_BYTES: c_int = 8;
const EPILOGUE_BIAS: u32 = 4;
const EPILOGUE_GELU_BIAS: u32 = 32 | 4;
// FP8 (issue 19). library_types.h (CUDA 12.8): CUDA_R_8F_E4M3 = 28. cublasLt.h (cuBLAS 12.8.4, the
// nvidia-cublas-cu12 wheel): CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18
// (device pointers to one value of the scale type, float32 here), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26;
// cublas_api.h: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1. cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
// CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76. CUBLASLT_MATMUL_DESC_FAST_ACCUM (25) stays at its default 0:
// cuBLASLt then promotes the FP8 tensor cores' partial sums to float32 periodically (more accurate, slower).
const CUDA_R_8F_E4M3: c_int = 28;
const DESC_A_SCALE_POINTER: c_int = 17;
const DESC_B_SCALE_POINTER: c_int = 18;
const DESC_BIAS_DATA_TYPE: c_int = 26;
/// `CUBLASLT_MATMUL_DESC_FAST_ACCUM` (int8): FP8 products accumulated in the tensor cores' fast mode.
const DESC_FAST_ACCUM: c_int = 25;
/// `CUBLASLT_MATMUL_DESC_D_SCALE_POINTER`: the device address of D's float32 scale (a multiplier applied to the
/// result before it is converted to an FP8 D).
const DESC_D_SCALE_POINTER: c_int = 20;
const OP_N: c_int = 0;
const OP_T: c_int = 1;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
/// Bytes before the quantized activations in a stream's FP8 buffer: two pairs of slots, (amax uint32 at 0, scale
/// float32 at 16) and (32, 48), every scale 16-byte aligned as cuBLASLt's scale pointers must be (a scale at 20
/// was refused with CUBLAS_STATUS_NOT_SUPPORTED on an H200); 256 keeps the E4M3 data as aligned as cuBLASLt likes.
const FP8_HEADER: usize = 256;

fn open(names: &[&str]) -> Result<libloading::Library, String> {
    let mut last = String::new();
    for n in names {
        // SAFETY: loading the CUDA driver / cuBLASLt runs their initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(*n) } {
            Ok(l) => return Ok(l),
            Err(e) => last = format!("{n}: {e}"),
        }
    }
    Err(last)
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: the type of the receiving field is the C declaration of `$name` in cuda.h / cublasLt.h, and the
        // pointer is only called while `Api` (which owns the library) lives.
        *unsafe { $lib.get($name) }.map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?
    };
}

impl Api {
    fn load() -> Result<Api, String> {
        let cuda = open(&["libcuda.so.1", "libcuda.so", "nvcuda.dll"])?;
        let lt = open(&[
            "libcublasLt.so.13",
            "libcublasLt.so.12",
            "libcublasLt.so",
            "cublasLt64_13.dll",
            "cublasLt64_12.dll",
        ])?;
        let cu_init: unsafe extern "C" fn(u32) -> CuResult = sym!(cuda, b"cuInit\0");
        // SAFETY: cuInit takes flags (must be 0) and may be called any number of times.
        let rc = unsafe { cu_init(0) };
        if rc != 0 {
            return Err(format!("cuInit failed: CUDA error {rc}"));
        }
        let api = Api {
            cu_ctx_get_current: sym!(cuda, b"cuCtxGetCurrent\0"),
            cu_module_load_data: sym!(cuda, b"cuModuleLoadData\0"),
            cu_module_get_function: sym!(cuda, b"cuModuleGetFunction\0"),
            cu_launch_kernel: sym!(cuda, b"cuLaunchKernel\0"),
            cu_mem_alloc: sym!(cuda, b"cuMemAlloc_v2\0"),
            cu_mem_free: sym!(cuda, b"cuMemFree_v2\0"),
            cu_ctx_push_current: sym!(cuda, b"cuCtxPushCurrent_v2\0"),
            cu_ctx_pop_current: sym!(cuda, b"cuCtxPopCurrent_v2\0"),
            cu_ctx_synchronize: sym!(cuda, b"cuCtxSynchronize\0"),
            cu_get_error_string: sym!(cuda, b"cuGetErrorString\0"),
            cu_ctx_get_device: sym!(cuda, b"cuCtxGetDevice\0"),
            cu_device_get_attribute: sym!(cuda, b"cuDeviceGetAttribute\0"),
            cu_memset_d32_async: sym!(cuda, b"cuMemsetD32Async\0"),
            cu_stream_synchronize: sym!(cuda, b"cuStreamSynchronize\0"),
            lt_create: sym!(lt, b"cublasLtCreate\0"),
            lt_destroy: sym!(lt, b"cublasLtDestroy\0"),
            lt_desc_create: sym!(lt, b"cublasLtMatmulDescCreate\0"),
            lt_desc_set: sym!(lt, b"cublasLtMatmulDescSetAttribute\0"),
            lt_desc_destroy: sym!(lt, b"cublasLtMatmulDescDestroy\0"),
            lt_layout_create: sym!(lt, b"cublasLtMatrixLayoutCreate\0"),
            lt_layout_set: sym!(lt, b"cublasLtMatrixLayoutSetAttribute\0"),
            lt_layout_destroy: sym!(lt, b"cublasLtMatrixLayoutDestroy\0"),
            lt_pref_create: sym!(lt, b"cublasLtMatmulPreferenceCreate\0"),
            lt_pref_set: sym!(lt, b"cublasLtMatmulPreferenceSetAttribute\0"),
            lt_pref_destroy: sym!(lt, b"cublasLtMatmulPreferenceDestroy\0"),
            lt_heuristic: sym!(lt, b"cublasLtMatmulAlgoGetHeuristic\0"),
            lt_matmul: sym!(lt, b"cublasLtMatmul\0"),
            _cuda: cuda,
            _lt: lt,
        };
        Ok(api)
    }

    fn check(&self, what: &str, rc: CuResult) -> ort::Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let mut s: *const c_char = ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string, or leaves `s` null for an unknown code.
        unsafe { (self.cu_get_error_string)(rc, &mut s) };
        let msg = if s.is_null() {
            String::from("unknown error")
        } else {
            // SAFETY: `s` points to one of the driver's static NUL-terminated strings (checked non-null above).
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(Error::cuda(format!("{what} failed: CUDA error {rc} ({msg})")))
    }

    fn lt(&self, what: &str, rc: c_int) -> ort::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::cuda(format!("{what} failed: cuBLAS status {rc}")))
        }
    }
}

struct Error;
impl Error {
    fn cuda(msg: String) -> ort::Error {
        ort::Error::new(format!("sd3onnx CUDA kernels: {msg}"))
    }
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> ort::Result<&'static Api> {
    API.get_or_init(Api::load)
        .as_ref()
        .map_err(|e| Error::cuda(format!("cannot load the CUDA driver or cuBLASLt: {e}")))
}

/// The CUDA context current on this thread (ONNX Runtime makes its device's primary context current before it
/// calls a kernel).
fn current_context(api: &Api) -> ort::Result<Handle> {
    let mut ctx: Handle = ptr::null_mut();
    // SAFETY: cuCtxGetCurrent writes one handle to the local out-pointer.
    api.check("cuCtxGetCurrent", unsafe { (api.cu_ctx_get_current)(&mut ctx) })?;
    if ctx.is_null() {
        return Err(Error::cuda("no current CUDA context on ONNX Runtime's thread".into()));
    }
    Ok(ctx)
}

/// One PTX module's two functions per CUDA context: (context, first, second), as addresses. Loaded once per context
/// and never unloaded (a few kilobytes; the functions are read-only, so every stream may use them at once).
type Modules = Mutex<Vec<(usize, usize, usize)>>;

/// The functions `names` of the PTX image `ptx` (`file` for errors) in the current context `ctx`, loaded on first
/// use and kept in `cache`.
fn module_functions(
    api: &Api,
    ctx: Handle,
    cache: &Modules,
    ptx: &'static str,
    file: &str,
    names: [&CStr; 2],
) -> ort::Result<(Handle, Handle)> {
    let mut modules = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, f, g)) = modules.iter().find(|m| m.0 == ctx as usize) {
        return Ok((f as Handle, g as Handle));
    }
    let mut module: Handle = ptr::null_mut();
    let (mut f, mut g): (Handle, Handle) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: `ptx` is one of this file's NUL-terminated PTX images (`concat!(include_str!(..), "\0")`), the names
    // are NUL-terminated C strings, the out-pointers are locals; `ctx` is current on this thread
    // (`current_context`), so the module is loaded into it.
    unsafe {
        api.check(&format!("cuModuleLoadData ({file})"), (api.cu_module_load_data)(&mut module, ptx.as_ptr().cast()))?;
        api.check("cuModuleGetFunction", (api.cu_module_get_function)(&mut f, module, names[0].as_ptr()))?;
        api.check("cuModuleGetFunction", (api.cu_module_get_function)(&mut g, module, names[1].as_ptr()))?;
    }
    modules.push((ctx as usize, f as usize, g as usize));
    Ok((f, g))
}

/// (`mod_norm_f16`, `head_rms_norm_f16`) in the current context `ctx`.
fn functions(api: &Api, ctx: Handle) -> ort::Result<(Handle, Handle)> {
    static MODULES: Modules = Mutex::new(Vec::new());
    module_functions(api, ctx, &MODULES, PTX, "mod_norm.ptx", [c"mod_norm_f16", c"head_rms_norm_f16"])
}

/// A stream's cuBLASLt handle and workspace. Only work on `stream` uses them, so it runs in stream order and no
/// two products write the workspace at once.
pub(crate) struct Scratch {
    ctx: usize,
    stream: usize,
    lt: usize,
    workspace: u64,
    /// The FP8 operators' buffer (device address, bytes): amax and scale slots, then the E4M3 activations. Grown on
    /// demand (`fp8_buffer`); 0 until an FP8 operator runs on the stream.
    fp8: Mutex<(u64, usize)>,
}

impl Scratch {
    /// A handle and a workspace for `stream`, allocated in `ctx` (current on this thread).
    fn new(api: &Api, ctx: Handle, stream: Handle) -> ort::Result<Scratch> {
        let mut lt: Handle = ptr::null_mut();
        let mut workspace: u64 = 0;
        // SAFETY: out-pointers to locals; cublasLtCreate needs a current context (ours, `ctx`).
        api.lt("cublasLtCreate", unsafe { (api.lt_create)(&mut lt) })?;
        // SAFETY: out-pointer to a local; the allocation is made in the current context `ctx`.
        let rc = unsafe { (api.cu_mem_alloc)(&mut workspace, WORKSPACE_BYTES) };
        if let Err(e) = api.check("cuMemAlloc (cuBLASLt workspace)", rc) {
            // SAFETY: `lt` was created just above and is used by nothing else.
            unsafe { (api.lt_destroy)(lt) };
            return Err(e);
        }
        Ok(Scratch { ctx: ctx as usize, stream: stream as usize, lt: lt as usize, workspace, fp8: Mutex::new((0, 0)) })
    }

    /// The stream's FP8 buffer, at least `bytes` long. Growing it waits for the stream (queued products may still
    /// read the old buffer) and frees the old one; that happens on the first steps only (shapes are fixed after).
    fn fp8_buffer(&self, api: &Api, bytes: usize) -> ort::Result<u64> {
        let mut b = self.fp8.lock().unwrap_or_else(|p| p.into_inner());
        if b.1 >= bytes {
            return Ok(b.0);
        }
        if b.0 != 0 {
            // SAFETY: `stream` is this scratch's stream, in the current context (the caller runs a kernel on it).
            api.check("cuStreamSynchronize", unsafe { (api.cu_stream_synchronize)(self.stream as Handle) })?;
            // SAFETY: the old buffer was allocated by cuMemAlloc below; the stream is idle, and only this stream's
            // work uses it, so nothing reads it any more.
            unsafe { (api.cu_mem_free)(b.0) };
            *b = (0, 0);
        }
        let size = bytes.next_multiple_of(1 << 20);
        let mut p: u64 = 0;
        // SAFETY: out-pointer to a local; allocated in the current context, the one of this scratch.
        api.check("cuMemAlloc (FP8 activations)", unsafe { (api.cu_mem_alloc)(&mut p, size) })?;
        *b = (p, size);
        Ok(p)
    }

    fn lt(&self) -> Handle {
        self.lt as Handle
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: `ctx` is the (primary) context the handle and workspace were made in; ONNX Runtime keeps it
        // alive while the process runs. The last `Arc` is gone, so no kernel will enqueue more work with them;
        // cuCtxSynchronize waits for what is still queued (on any stream: this one may already be destroyed)
        // before the workspace is freed. If the context cannot be made current, both are leaked rather than freed
        // under a running kernel.
        unsafe {
            if (api.cu_ctx_push_current)(self.ctx as Handle) != 0 {
                return;
            }
            if (api.cu_ctx_synchronize)() == 0 {
                (api.cu_mem_free)(self.workspace);
                let fp8 = self.fp8.lock().map(|b| b.0).unwrap_or_else(|p| p.into_inner().0);
                if fp8 != 0 {
                    (api.cu_mem_free)(fp8);
                }
                (api.lt_destroy)(self.lt as Handle);
            }
            let mut popped: Handle = ptr::null_mut();
            (api.cu_ctx_pop_current)(&mut popped);
        }
    }
}

/// Every live [`Scratch`]: (context, stream, scratch). `Weak`, so that a stream's scratch goes with the last
/// kernel that used it; a stream address reused by a new stream then gets a new scratch.
static SCRATCH: Mutex<Vec<(usize, usize, Weak<Scratch>)>> = Mutex::new(Vec::new());

/// The scratch of `stream` in context `ctx`, shared by every kernel that runs on that stream.
fn scratch_of(api: &Api, ctx: Handle, stream: Handle) -> ort::Result<Arc<Scratch>> {
    let mut all = SCRATCH.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|e| e.2.strong_count() > 0);
    if let Some(s) = all.iter().find(|e| e.0 == ctx as usize && e.1 == stream as usize).and_then(|e| e.2.upgrade()) {
        return Ok(s);
    }
    let s = Arc::new(Scratch::new(api, ctx, stream)?);
    all.push((ctx as usize, stream as usize, Arc::downgrade(&s)));
    Ok(s)
}

/// The scratches a kernel has used (normally one: its session's stream), kept alive by the kernel.
#[derive(Default)]
pub(crate) struct Streams(Vec<Arc<Scratch>>);

impl Streams {
    /// A kernel runs on few streams (one per concurrent `Run` of its session); beyond this many, the oldest is
    /// let go (other kernels of its session keep it, or it is freed).
    const MAX: usize = 8;

    fn get(&mut self, api: &Api, ctx: Handle, stream: Handle) -> ort::Result<Arc<Scratch>> {
        if let Some(s) = self.0.iter().find(|s| s.ctx == ctx as usize && s.stream == stream as usize) {
            return Ok(Arc::clone(s));
        }
        let s = scratch_of(api, ctx, stream)?;
        if self.0.len() >= Self::MAX {
            self.0.remove(0);
        }
        self.0.push(Arc::clone(&s));
        Ok(s)
    }
}

/// One product `D[b] = act(X[b] @ W + bias)` over `batch` row blocks (sizes and strides in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gemm {
    rows: usize,
    k: usize,
    n: usize,
    batch: usize,
    x_stride: usize,
    d_stride: usize,
}

/// The alignments (bytes) cuBLASLt may assume for W, X and D, read off the pointers and batch strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Align {
    w: u32,
    x: u32,
    d: u32,
}

/// The largest power of two, at most 256, dividing the address `addr` and (when `step` is non-zero) the byte step
/// `step` between batch blocks: the alignment of every block's start.
fn alignment(addr: usize, step: usize) -> u32 {
    let pow = |v: usize| if v == 0 { 256 } else { 1usize << v.trailing_zeros().min(8) };
    pow(addr).min(pow(step)) as u32
}

impl Align {
    /// Checked: every matrix at least float16-aligned (2 bytes) and the bias `BIAS_ALIGNMENT`-aligned.
    fn of(
        op: &str,
        g: Gemm,
        w: *const c_void,
        x: *const c_void,
        d: *const c_void,
        bias: *const c_void,
    ) -> ort::Result<Align> {
        let two = std::mem::size_of::<f16>();
        let steps = |s: usize| if g.batch > 1 { s * two } else { 0 };
        let a = Align {
            w: alignment(w as usize, 0),
            x: alignment(x as usize, steps(g.x_stride)),
            d: alignment(d as usize, steps(g.d_stride)),
        };
        if a.w < 2 || a.x < 2 || a.d < 2 || !(bias as usize).is_multiple_of(BIAS_ALIGNMENT) {
            return Err(err(
                op,
                format!(
                    "misaligned tensors (w {w:p}, x {x:p}, y {d:p}, bias {bias:p}): the CUDA kernel needs float16 \
                     alignment and a {BIAS_ALIGNMENT}-byte aligned bias"
                ),
            ));
        }
        Ok(a)
    }
}

impl Align {
    /// FP8 operands (1-byte E4M3 W and X, float16 D): cuBLASLt's FP8 matmuls want 16-byte aligned matrices
    /// (cuBLAS documentation, cublasLtMatmul, FP8 requirements), so less is refused here with a clear message.
    fn of_fp8(
        op: &str,
        g: Gemm,
        w: *const c_void,
        x: *const c_void,
        d: *const c_void,
        bias: *const c_void,
    ) -> ort::Result<Align> {
        let steps = |s: usize, size: usize| if g.batch > 1 { s * size } else { 0 };
        let a = Align {
            w: alignment(w as usize, 0),
            x: alignment(x as usize, steps(g.x_stride, 1)),
            d: alignment(d as usize, steps(g.d_stride, std::mem::size_of::<f16>())),
        };
        if a.w < 16 || a.x < 16 || a.d < 16 || !(bias as usize).is_multiple_of(BIAS_ALIGNMENT) {
            return Err(err(
                op,
                format!(
                    "misaligned tensors for the FP8 product (w {w:p}, x {x:p}, y {d:p}, bias {bias:p}; batch strides \
                     {} / {} values): cuBLASLt's FP8 matmul needs 16-byte alignment (K and N multiples of 16)",
                    g.x_stride, g.d_stride
                ),
            ));
        }
        Ok(a)
    }
}

/// A cuBLASLt plan for one [`Gemm`] at given alignments, made with one handle.
struct Plan {
    /// (product, alignments, cuBLASLt handle, what kind of product)
    key: (Gemm, Align, usize, Mode),
    desc: Handle,
    a: Handle,
    b: Handle,
    /// C's layout when it differs from D's (an E4M3 D: C is float16, the bias type, as cuBLASLt requires); null
    /// otherwise (C is D's layout).
    c: Handle,
    d: Handle,
    algo: Algo,
}

/// What kind of product a [`Plan`] is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Mode {
    /// tanh GELU after the bias (`EPILOGUE_GELU_BIAS`).
    gelu: bool,
    /// E4M3 `W` stored `[N, K]` and E4M3 `X` (the FP8 operators), else float16 `W` `[K, N]` and `X`.
    fp8: bool,
    /// With `fp8`: cuBLASLt's fast accumulation (the operators' `fast_accum` attribute).
    fast: bool,
    /// With `fp8`: D in E4M3 (scaled by the D scale given at run time) instead of float16 (`MlpFp8`'s first product).
    out8: bool,
}
// SAFETY: the descriptors are owned by the plan, and the plan by one kernel, which uses it from one compute call at
// a time (`&mut self`); cuBLASLt descriptors may be used from any thread.
unsafe impl Send for Plan {}

impl Plan {
    /// A plan for `g` at the alignments `al`, of the kind `mode` says ([`Mode`]).
    fn new(api: &Api, scratch: &Scratch, g: Gemm, al: Align, mode: Mode) -> ort::Result<Plan> {
        let Gemm { rows, k, n, batch, x_stride, d_stride } = g;
        let Mode { gelu, fp8, .. } = mode;
        let fast = fp8 && mode.fast;
        let out8 = fp8 && mode.out8;
        if out8 && batch > 1 {
            return Err(Error::cuda("an FP8 product with an E4M3 output is planned one batch entry at a time".into()));
        }
        let mut plan = Plan {
            key: (g, al, scratch.lt, Mode { gelu, fp8, fast, out8 }),
            desc: ptr::null_mut(),
            a: ptr::null_mut(),
            b: ptr::null_mut(),
            c: ptr::null_mut(),
            d: ptr::null_mut(),
            algo: Algo::default(),
        };
        // Row-major Y[rows, n] = X[rows, k] W[k, n] is column-major Y^T = W^T X^T: cuBLASLt's A is W (n x k,
        // ld n), B is X (k x rows, ld k), D is Y (n x rows, ld n); the bias runs along D's n rows.
        // SAFETY: descriptor calls with out-pointers into `plan` (destroyed by `Plan::drop`, also on the error
        // returns below, where the null ones are skipped) and attribute values read from live locals of the
        // sizes given; the handle is the scratch's, alive while `scratch` is borrowed.
        unsafe {
            api.lt("cublasLtMatmulDescCreate", (api.lt_desc_create)(&mut plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F))?;
            let desc = plan.desc;
            // FP8: cuBLASLt's FP8 matmuls take only the "TN" form (cuBLAS documentation, cublasLtMatmul: "A must be
            // transposed and B non-transposed"), both operands K-major: A is W stored row-major [N, K], i.e.
            // column-major k x n (ld k), used transposed; B is X as above. Scales: D = alpha * a_scale * b_scale *
            // op(A) op(B), then the bias (float16, set explicitly) and GELU epilogue; no D scale (D is float16).
            let op_a: c_int = if fp8 { OP_T } else { OP_N };
            let op_n: c_int = OP_N;
            api.lt("set TRANSA", (api.lt_desc_set)(desc, DESC_TRANSA, (&op_a as *const c_int).cast(), 4))?;
            api.lt("set TRANSB", (api.lt_desc_set)(desc, DESC_TRANSB, (&op_n as *const c_int).cast(), 4))?;
            let epi: u32 = if gelu { EPILOGUE_GELU_BIAS } else { EPILOGUE_BIAS };
            api.lt("set EPILOGUE", (api.lt_desc_set)(desc, DESC_EPILOGUE, (&epi as *const u32).cast(), 4))?;
            if fp8 {
                let bias_type: c_int = CUDA_R_16F;
                api.lt(
                    "set BIAS_DATA_TYPE",
                    (api.lt_desc_set)(desc, DESC_BIAS_DATA_TYPE, (&bias_type as *const c_int).cast(), 4),
                )?;
                if fast {
                    // int8_t 1 (cublasLt.h: CUBLASLT_MATMUL_DESC_FAST_ACCUM), what TransformerEngine sets for its
                    // forward products; 0 (the default) keeps the periodic float32 promotion.
                    let one: i8 = 1;
                    api.lt("set FAST_ACCUM", (api.lt_desc_set)(desc, DESC_FAST_ACCUM, (&one as *const i8).cast(), 1))?;
                }
                api.lt(
                    "layout W (E4M3)",
                    (api.lt_layout_create)(&mut plan.a, CUDA_R_8F_E4M3, k as u64, n as u64, k as i64),
                )?;
                api.lt(
                    "layout X (E4M3)",
                    (api.lt_layout_create)(&mut plan.b, CUDA_R_8F_E4M3, k as u64, rows as u64, k as i64),
                )?;
            } else {
                api.lt("layout W", (api.lt_layout_create)(&mut plan.a, CUDA_R_16F, n as u64, k as u64, n as i64))?;
                api.lt("layout X", (api.lt_layout_create)(&mut plan.b, CUDA_R_16F, k as u64, rows as u64, k as i64))?;
            }
            if out8 {
                // E4M3 Y; C (not read: beta 0, null pointer) in the bias type, as cuBLASLt wants for an FP8 D
                // (TransformerEngine's cublaslt_gemm.cu does the same)
                api.lt(
                    "layout Y (E4M3)",
                    (api.lt_layout_create)(&mut plan.d, CUDA_R_8F_E4M3, n as u64, rows as u64, n as i64),
                )?;
                api.lt("layout C", (api.lt_layout_create)(&mut plan.c, CUDA_R_16F, n as u64, rows as u64, n as i64))?;
            } else {
                api.lt("layout Y", (api.lt_layout_create)(&mut plan.d, CUDA_R_16F, n as u64, rows as u64, n as i64))?;
            }
            if batch > 1 {
                let count = batch as c_int;
                let zero: i64 = 0;
                let xs = x_stride as i64;
                let ds = d_stride as i64;
                for (l, stride) in [(plan.a, &zero), (plan.b, &xs), (plan.d, &ds)] {
                    api.lt(
                        "set BATCH_COUNT",
                        (api.lt_layout_set)(l, LAYOUT_BATCH_COUNT, (&count as *const c_int).cast(), 4),
                    )?;
                    api.lt(
                        "set STRIDED_BATCH_OFFSET",
                        (api.lt_layout_set)(l, LAYOUT_STRIDED_BATCH_OFFSET, (stride as *const i64).cast(), 8),
                    )?;
                }
            }
            let mut pref: Handle = ptr::null_mut();
            api.lt("cublasLtMatmulPreferenceCreate", (api.lt_pref_create)(&mut pref))?;
            let ws = WORKSPACE_BYTES as u64;
            let mut rc = (api.lt_pref_set)(pref, PREF_MAX_WORKSPACE_BYTES, (&ws as *const u64).cast(), 8);
            // The alignments were read off this call's pointers (`Align::of`); a later call with less aligned
            // pointers gets a new plan (they are part of the key).
            for (attr, v) in [
                (PREF_MIN_ALIGNMENT_A_BYTES, al.w),
                (PREF_MIN_ALIGNMENT_B_BYTES, al.x),
                (PREF_MIN_ALIGNMENT_C_BYTES, al.d),
                (PREF_MIN_ALIGNMENT_D_BYTES, al.d),
            ] {
                if rc == 0 {
                    rc = (api.lt_pref_set)(pref, attr, (&v as *const u32).cast(), 4);
                }
            }
            let mut result = HeuristicResult::default();
            let mut found: c_int = 0;
            if rc == 0 {
                let (a, b, d) = (plan.a, plan.b, plan.d);
                let c = if plan.c.is_null() { d } else { plan.c };
                rc = (api.lt_heuristic)(scratch.lt(), desc, a, b, c, d, pref, 1, &mut result, &mut found);
            }
            (api.lt_pref_destroy)(pref);
            if rc != 0 || found < 1 {
                return Err(Error::cuda(format!(
                    "cuBLASLt found no algorithm for {rows}x{k} @ {k}x{n} (batch {batch}, gelu {gelu}, fp8 {fp8}, \
                     fast accumulation {fast}, E4M3 output {out8}, alignment {}/{}/{} bytes): status {rc}",
                    al.w, al.x, al.d
                )));
            }
            plan.algo = result.algo;
        }
        Ok(plan)
    }

    /// Enqueues the product on `stream`.
    ///
    /// # Safety
    ///
    /// - `scratch` is the scratch of `stream` (its handle made this plan: `self.key`), and `stream` belongs to the
    ///   context current on this thread.
    /// - `w` points to `k * n` float16 values, `bias` to `n`, `x` to `batch` blocks of `rows * k` values
    ///   `x_stride` apart and `y` to `batch` blocks of `rows * n` values `d_stride` apart, all device memory of that
    ///   context that stays allocated until the work queued on `stream` is done, with at least the alignments of
    ///   the plan (`Align::of` on these pointers).
    /// - `y` overlaps none of the inputs, and nothing else writes it or reads it before the stream gets there.
    #[allow(clippy::too_many_arguments)]
    ///
    /// FP8 plans: `x` and `w` hold E4M3 bytes (`w` `[N, K]`), and `scales` gives the device addresses of W's and
    /// X's float32 scales, valid until the stream gets there. Plans with an E4M3 output (`Mode::out8`): `y` holds
    /// `rows * n` bytes and `d_scale` is the device address of the float32 multiplier applied before the
    /// conversion, valid until the stream gets there.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        api: &Api,
        scratch: &Scratch,
        stream: Handle,
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        y: *mut c_void,
        scales: Option<(*const c_void, *const c_void)>,
        d_scale: Option<*const c_void>,
    ) -> ort::Result<()> {
        let out8 = self.key.3.out8;
        if out8 != d_scale.is_some() {
            return Err(Error::cuda(
                "an FP8 product with an E4M3 output needs its D scale (and only it has one)".into(),
            ));
        }
        if let Some(d_scale) = d_scale {
            // SAFETY: as the A/B scale pointers below: the attribute takes the pointer's 8 bytes from a live local.
            api.lt("set D_SCALE_POINTER", unsafe {
                (api.lt_desc_set)(self.desc, DESC_D_SCALE_POINTER, (&d_scale as *const *const c_void).cast(), 8)
            })?;
        }
        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        if let Some((w_scale, x_scale)) = scales {
            // SAFETY: the scale pointer attributes take the pointers' 8 bytes, read from live locals (cuBLASLt reads
            // the scale values themselves on the device when the stream runs the product).
            unsafe {
                api.lt(
                    "set A_SCALE_POINTER",
                    (api.lt_desc_set)(self.desc, DESC_A_SCALE_POINTER, (&w_scale as *const *const c_void).cast(), 8),
                )?;
                api.lt(
                    "set B_SCALE_POINTER",
                    (api.lt_desc_set)(self.desc, DESC_B_SCALE_POINTER, (&x_scale as *const *const c_void).cast(), 8),
                )?;
            }
        }
        // SAFETY: BIAS_POINTER takes the pointer's 8 bytes, read from a live local. The plan is owned by the
        // calling kernel (`&mut self` in compute), so no other call changes the descriptor in between.
        api.lt("set BIAS_POINTER", unsafe {
            (api.lt_desc_set)(self.desc, DESC_BIAS_POINTER, (&bias as *const *const c_void).cast(), 8)
        })?;
        // An E4M3 D: C is not read (beta 0) and has its own float16 layout, so no pointer is given for it.
        let (c, c_layout) = if out8 { (ptr::null_mut(), self.c) } else { (y, self.d) };
        // SAFETY: the caller's contract: buffers, alignments and stream as planned. C aliases D or is null (beta is
        // 0, so C is not read). The workspace is this stream's own (`scratch`), so only this stream's earlier and
        // later work touches it, in order.
        api.lt("cublasLtMatmul", unsafe {
            (api.lt_matmul)(
                scratch.lt(),
                self.desc,
                (&alpha as *const f32).cast(),
                w,
                self.a,
                x,
                self.b,
                (&beta as *const f32).cast(),
                c,
                c_layout,
                y,
                self.d,
                &self.algo,
                scratch.workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )
        })
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: the plan owns these descriptors (made in `Plan::new`, null where creation did not get
            // there), and no queued work refers to them: cuBLASLt reads descriptors when `cublasLtMatmul` is
            // called, not when the stream runs.
            unsafe {
                for l in [self.a, self.b, self.c, self.d] {
                    if !l.is_null() {
                        (api.lt_layout_destroy)(l);
                    }
                }
                if !self.desc.is_null() {
                    (api.lt_desc_destroy)(self.desc);
                }
            }
        }
    }
}

/// A tensor on the GPU: its shape and device pointer.
struct Dev {
    shape: Vec<i64>,
    ptr: *const c_void,
}

fn dev(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<Dev>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let t = v.downcast::<DynTensorValueType>().map_err(|e| err(op, format!("input {i}: {e}")))?;
    if *t.data_type() != TensorElementType::Float16 {
        return Err(err(op, format!("input {i} is {:?}; the CUDA kernels take float16", t.data_type())));
    }
    Ok(Some(Dev { shape: t.shape().to_vec(), ptr: t.data_ptr() }))
}

fn need(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Dev> {
    dev(ctx, op, i)?.ok_or_else(|| err(op, format!("input {i} is missing")))
}

fn out(ctx: &ComputeContext, op: &str, i: usize, shape: Vec<i64>) -> ort::Result<Option<*mut c_void>> {
    let Some(v) = ctx.output(i, shape)? else { return Ok(None) };
    let t = v.downcast::<DynTensorValueType>().map_err(|e| err(op, format!("output {i}: {e}")))?;
    // GetTensorMutableData behind `data_ptr`: the output buffer ONNX Runtime just allocated for this kernel.
    Ok(Some(t.data_ptr().cast_mut()))
}

fn stream(ctx: &ComputeContext, op: &str) -> ort::Result<Handle> {
    ctx.stream()?
        .map(|s| s.as_ptr())
        .ok_or_else(|| err(op, "no CUDA stream (the node is not on the CUDA execution provider)"))
}

/// The stream, context and the stream's scratch of one compute call.
struct Launch {
    stream: Handle,
    scratch: Arc<Scratch>,
}

impl Launch {
    fn new(api: &Api, ctx: &ComputeContext, op: &str, streams: &mut Streams) -> ort::Result<Launch> {
        let stream = stream(ctx, op)?;
        let cu = current_context(api)?;
        Ok(Launch { stream, scratch: streams.get(api, cu, stream)? })
    }

    /// `y = act(x @ w + bias)` as `g` says, with the plan in `slot` (remade when shapes, alignments or the
    /// stream's handle change).
    ///
    /// # Safety
    ///
    /// As [`Plan::run`]: `x`, `w`, `bias` and `y` are device buffers of this call's context with the sizes `g`
    /// gives (see there), live until this stream's queued work is done, `y` overlapping no input.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        api: &Api,
        op: &str,
        slot: &mut Option<Plan>,
        g: Gemm,
        gelu: bool,
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        y: *mut c_void,
    ) -> ort::Result<()> {
        let al = Align::of(op, g, w, x, y, bias)?;
        let mode = Mode { gelu, fp8: false, fast: false, out8: false };
        let key = (g, al, self.scratch.lt, mode);
        let plan = match slot {
            Some(p) if p.key == key => p,
            _ => slot.insert(Plan::new(api, &self.scratch, g, al, mode)?),
        };
        // SAFETY: the plan was made with this stream's handle for `g` at the alignments of these very pointers;
        // the buffers are the caller's contract.
        unsafe { plan.run(api, &self.scratch, self.stream, x, w, bias, y, None, None) }
    }

    /// The FP8 product `y = act((x_scale * w_scale) * (q_x @ q_w^T) + bias)` as `g` says (`g.x_stride` in E4M3
    /// values, i.e. bytes), with the plan in `slot`.
    ///
    /// # Safety
    ///
    /// As [`Launch::gemm`], with `q_x` `batch` blocks of `rows * k` E4M3 bytes, `w` `n * k` E4M3 bytes (`[N, K]`)
    /// and `w_scale` / `x_scale` device addresses of one float32 each, all live until the stream gets there.
    /// `fast`: cuBLASLt's fast accumulation (`fast_accum`). With `d_scale` (the device address of a float32
    /// multiplier) `y` gets E4M3 bytes (`g.d_stride` then in bytes) instead of float16 values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_fp8(
        &self,
        api: &Api,
        op: &str,
        slot: &mut Option<Plan>,
        g: Gemm,
        gelu: bool,
        fast: bool,
        q_x: *const c_void,
        w: *const c_void,
        scales: (*const c_void, *const c_void),
        bias: *const c_void,
        y: *mut c_void,
        d_scale: Option<*const c_void>,
    ) -> ort::Result<()> {
        // One product per batch entry: cuBLASLt 13's FP8 matmul answered a strided batch (W's batch stride 0, the
        // bias epilogue) with CUBLAS_STATUS_NOT_SUPPORTED on an H200 (first GPU run, 2026-12-03), so the batch
        // (2 with guidance) becomes that many plain products on the same plan.
        let one = Gemm { batch: 1, x_stride: 0, d_stride: 0, ..g };
        for b in 0..g.batch.max(1) {
            // E4M3 X: x_stride bytes per entry; float16 Y: d_stride values of 2 bytes.
            let xb = q_x.cast::<u8>().wrapping_add(b * g.x_stride).cast::<c_void>();
            let size = if d_scale.is_some() { 1 } else { std::mem::size_of::<f16>() };
            let yb = y.cast::<u8>().wrapping_add(b * g.d_stride * size).cast::<c_void>();
            let al = Align::of_fp8(op, one, w, xb, yb, bias)?;
            let mode = Mode { gelu, fp8: true, fast, out8: d_scale.is_some() };
            let key = (one, al, self.scratch.lt, mode);
            let plan = match slot {
                Some(p) if p.key == key => p,
                _ => slot.insert(Plan::new(api, &self.scratch, one, al, mode)?),
            };
            // SAFETY: as in `gemm`: plan made for this handle, shapes and alignments; entry b of the caller's
            // buffers (x_stride / d_stride apart, the caller's contract), scales as given.
            unsafe { plan.run(api, &self.scratch, self.stream, xb, w, bias, yb, Some(scales), d_scale) }?;
        }
        Ok(())
    }
}

/// Launches one of our kernels on `stream`: `grid` blocks of `block` threads.
///
/// # Safety
///
/// `func` is a function of our module in the current context, `params` holds one pointer per parameter of its
/// signature in `mod_norm.cu`, each pointing to a live value of that parameter's type; every device pointer among
/// those values is a buffer of the current context, large enough for the launch and `half2`-aligned, and stays
/// allocated until `stream`'s queued work is done; `stream` belongs to the current context.
unsafe fn launch(
    api: &Api,
    what: &str,
    func: Handle,
    grid: u32,
    block: u32,
    stream: Handle,
    params: &mut [*mut c_void],
) -> ort::Result<()> {
    // SAFETY: the caller's contract; the driver copies the parameter values before returning.
    api.check(what, unsafe {
        (api.cu_launch_kernel)(func, grid, 1, 1, block, 1, 1, 0, stream, params.as_mut_ptr(), ptr::null_mut())
    })
}

/// Our kernels read and write `half2`: every tensor they touch must be 4-byte aligned.
fn half2_aligned(op: &str, ptrs: &[*const c_void]) -> ort::Result<()> {
    match ptrs.iter().find(|p| !(**p as usize).is_multiple_of(4)) {
        None => Ok(()),
        Some(p) => Err(err(op, format!("tensor at {p:p} is not 4-byte aligned; the CUDA kernel reads half2 pairs"))),
    }
}

const F16: TensorElementType = TensorElementType::Float16;
const REQ: OperatorInput = OperatorInput::required(F16);
const OPT: OperatorInput = OperatorInput::optional(F16);
const OUT: OperatorOutput = OperatorOutput::required(F16);
const OUT_OPT: OperatorOutput = OperatorOutput::optional(F16);

macro_rules! cuda_op {
    ($ty:ident, $name:literal, [$($inp:expr),*], [$($out:expr),*], $kernel:ident) => {
        pub(crate) struct $ty;
        impl Operator for $ty {
            type Kernel<'a> = $kernel;
            fn name(&self) -> &str {
                $name
            }
            fn execution_provider_type(&self) -> Option<&str> {
                Some(EP)
            }
            fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
                [$($inp),*]
            }
            fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
                [$($out),*]
            }
            fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<Self::Kernel<'a>> {
                $kernel::new(kctx)
            }
        }
        impl Kernel for $kernel {
            fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
                // A panic must not unwind into ONNX Runtime (the trampoline is `extern "system"`: it would abort
                // the process); it becomes this node's error. A kernel's state is plans and scratch handles,
                // each replaced whole, so a kernel stays usable after a panic.
                guarded($name, || self.run(ctx))
            }
        }
    };
}

cuda_op!(LinearOp, "Linear", [REQ, REQ, REQ], [OUT], LinearCuda);
cuda_op!(LinearConcatOp, "LinearConcat", [REQ, REQ, REQ, REQ, REQ, REQ], [OUT], LinearConcatCuda);
cuda_op!(LinearSplitOp, "LinearSplit", [REQ, REQ, REQ, OPT, OPT, REQ], [OUT, OUT_OPT], LinearSplitCuda);
cuda_op!(ModNormOp, "ModNorm", [REQ, OPT, OPT, REQ], [OUT, OUT_OPT], ModNormCuda);
cuda_op!(HeadRmsNormOp, "HeadRmsNorm", [REQ, REQ, REQ, REQ], [OUT], HeadRmsNormCuda);

pub(crate) struct LinearCuda {
    gelu: bool,
    plan: Option<Plan>,
    streams: Streams,
}
impl LinearCuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let activation = k.get::<i64>("activation").unwrap_or(0);
        if !(0..=1).contains(&activation) {
            return Err(err("Linear", format!("activation {activation} is not 0 (none) or 1 (tanh GELU)")));
        }
        Ok(Self { gelu: activation == 1, plan: None, streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "Linear";
        let api = api()?;
        let (x, w, b) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?);
        let (rows, k, n) = shapes::linear(op, &x.shape, &w.shape, &b.shape)?;
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n as i64;
        }
        let Some(y) = out(ctx, op, 0, shape)? else { return Ok(()) };
        if rows == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let g = Gemm { rows, k, n, batch: 1, x_stride: 0, d_stride: 0 };
        // SAFETY: ONNX Runtime's buffers on this node's device: x is [.., K] (rows * K values), w [K, N], b [N]
        // (`shapes::linear`), y the fresh [.., N] output, which aliases no input.
        unsafe { l.gemm(api, op, &mut self.plan, g, self.gelu, x.ptr, w.ptr, b.ptr, y) }
    }
}

pub(crate) struct LinearConcatCuda {
    plans: [Option<Plan>; 2],
    streams: Streams,
}
impl LinearConcatCuda {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { plans: [None, None], streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcat";
        let api = api()?;
        let (xa, wa, ba) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?);
        let (xb, wb, bb) = (need(ctx, op, 3)?, need(ctx, op, 4)?, need(ctx, op, 5)?);
        let (batch, sa, sb, ka, kb, n) =
            shapes::linear_concat(&xa.shape, &wa.shape, &ba.shape, &xb.shape, &wb.shape, &bb.shape)?;
        let st = sa + sb;
        let Some(y) = out(ctx, op, 0, vec![batch as i64, st as i64, n as i64])? else { return Ok(()) };
        if batch == 0 || st == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let [pa, pb] = &mut self.plans;
        if sa > 0 {
            let g = Gemm { rows: sa, k: ka, n, batch, x_stride: sa * ka, d_stride: st * n };
            // SAFETY: xa is [B, Sa, Ka], wa [Ka, N], ba [N] (`shapes::linear_concat`); y, the fresh [B, Sa + Sb, N]
            // output, gets rows 0..Sa of each batch (blocks of Sa * N values, St * N apart).
            unsafe { l.gemm(api, op, pa, g, false, xa.ptr, wa.ptr, ba.ptr, y) }?;
        }
        if sb > 0 {
            // SAFETY: y holds batch * st * n halves; the second block starts sa rows into each batch.
            let yb = unsafe { y.cast::<f16>().add(sa * n) }.cast();
            let g = Gemm { rows: sb, k: kb, n, batch, x_stride: sb * kb, d_stride: st * n };
            // SAFETY: xb is [B, Sb, Kb], wb [Kb, N], bb [N]; yb + b * St * N + Sb * N ends at the end of batch b's
            // rows in y, so every block stays inside y, disjoint from the first range's.
            unsafe { l.gemm(api, op, pb, g, false, xb.ptr, wb.ptr, bb.ptr, yb) }?;
        }
        Ok(())
    }
}

pub(crate) struct LinearSplitCuda {
    plans: [Option<Plan>; 2],
    streams: Streams,
}
impl LinearSplitCuda {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { plans: [None, None], streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearSplit";
        let api = api()?;
        let (x, wa, ba) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?);
        let (wb, bb) = (dev(ctx, op, 3)?, dev(ctx, op, 4)?);
        let like = need(ctx, op, 5)?;
        let (batch, st, sa, k, na) = shapes::linear_split(&x.shape, &wa.shape, &ba.shape, &like.shape)?;
        let sb = st - sa;
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let [pa, pb] = &mut self.plans;
        if let Some(ya) = out(ctx, op, 0, vec![batch as i64, sa as i64, na as i64])? {
            if sa > 0 && batch > 0 {
                let g = Gemm { rows: sa, k, n: na, batch, x_stride: st * k, d_stride: sa * na };
                // SAFETY: x is [B, St, K] (rows 0..Sa of each batch are read: blocks of Sa * K values, St * K
                // apart), wa [K, Na], ba [Na] (`shapes::linear_split`); ya is the fresh [B, Sa, Na] output.
                unsafe { l.gemm(api, op, pa, g, false, x.ptr, wa.ptr, ba.ptr, ya) }?;
            }
        }
        if let (Some(wb), Some(bb)) = (wb, bb) {
            let (_, _, nb) = shapes::linear(op, &x.shape, &wb.shape, &bb.shape)?;
            if let Some(yb) = out(ctx, op, 1, vec![batch as i64, sb as i64, nb as i64])? {
                if sb > 0 && batch > 0 {
                    // SAFETY: x holds batch * st * k halves; the second block starts sa rows into each batch.
                    let xb = unsafe { x.ptr.cast::<f16>().add(sa * k) }.cast();
                    let g = Gemm { rows: sb, k, n: nb, batch, x_stride: st * k, d_stride: sb * nb };
                    // SAFETY: rows Sa..St of each batch of x (ending at the batch's end), wb [K, Nb], bb [Nb]
                    // (`shapes::linear`); yb is the fresh [B, Sb, Nb] output.
                    unsafe { l.gemm(api, op, pb, g, false, xb, wb.ptr, bb.ptr, yb) }?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) struct ModNormCuda {
    a: ModNormAttrs,
}
impl ModNormCuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { a: ModNormAttrs::read(k)? })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "ModNorm";
        let api = api()?;
        let h = need(ctx, op, 0)?;
        let y = dev(ctx, op, 1)?;
        let g = dev(ctx, op, 2)?;
        let m = need(ctx, op, 3)?;
        let dims =
            self.a.dims(&h.shape, y.as_ref().map(|v| &v.shape[..]), g.as_ref().map(|v| &v.shape[..]), &m.shape)?;
        let (batch, rows, d, mw) = (dims.batch, dims.rows, dims.d, dims.norm_width);
        let gw = dims.gate_width.unwrap_or(0);
        let odd = |v: i64| v % 2 != 0;
        if d % 2 != 0
            || odd(self.a.shift_offset)
            || odd(self.a.scale_offset)
            || odd(self.a.gate_offset)
            || mw % 2 != 0
            || gw % 2 != 0
        {
            return Err(err(op, "the CUDA kernel needs even widths and even offsets"));
        }
        let (yp, gp) = match (&y, &g, dims.gate_width) {
            (Some(y), Some(g), Some(_)) => (y.ptr, g.ptr),
            _ => (ptr::null(), ptr::null()),
        };
        let n = out(ctx, op, 0, h.shape.clone())?.unwrap_or(ptr::null_mut());
        let hout =
            if y.is_some() { out(ctx, op, 1, h.shape.clone())?.unwrap_or(ptr::null_mut()) } else { ptr::null_mut() };
        if y.is_some() && hout.is_null() {
            return Err(err(op, "the residual output h' is needed when y is given"));
        }
        if n.is_null() || batch * rows == 0 {
            return Ok(());
        }
        let total = batch * rows;
        if total > u32::MAX as usize || d / 2 > i32::MAX as usize || mw / 2 > i32::MAX as usize {
            return Err(err(op, "tensor too large for the kernel's 32-bit indices"));
        }
        // Null pointers (no residual) are aligned too.
        half2_aligned(op, &[h.ptr, yp, gp, m.ptr, hout.cast_const(), n.cast_const()])?;
        let s = stream(ctx, op)?;
        let (func, _) = functions(api, current_context(api)?)?;
        let (mut hp, mut yv, mut gv, mut mp, mut hop, mut np) = (h.ptr, yp, gp, m.ptr, hout, n);
        let mut rows_i = rows as c_int;
        let mut d2 = (d / 2) as c_int;
        let mut gs2 = (gw / 2) as c_int;
        let mut ms2 = (mw / 2) as c_int;
        let mut go2 = (self.a.gate_offset / 2) as c_int;
        let mut so2 = (self.a.shift_offset / 2) as c_int;
        let mut co2 = (self.a.scale_offset / 2) as c_int;
        let mut eps = self.a.epsilon;
        let mut params: [*mut c_void; 14] = [
            (&mut hp as *mut *const c_void).cast(),
            (&mut yv as *mut *const c_void).cast(),
            (&mut gv as *mut *const c_void).cast(),
            (&mut mp as *mut *const c_void).cast(),
            (&mut hop as *mut *mut c_void).cast(),
            (&mut np as *mut *mut c_void).cast(),
            (&mut rows_i as *mut c_int).cast(),
            (&mut d2 as *mut c_int).cast(),
            (&mut gs2 as *mut c_int).cast(),
            (&mut ms2 as *mut c_int).cast(),
            (&mut go2 as *mut c_int).cast(),
            (&mut so2 as *mut c_int).cast(),
            (&mut co2 as *mut c_int).cast(),
            (&mut eps as *mut f32).cast(),
        ];
        let threads: u32 = if d / 2 >= 512 { 256 } else { 128 };
        // SAFETY: params follow mod_norm_f16's signature in mod_norm.cu, each pointing to a live local of that
        // type. h, y (when given) and both outputs are [B, S, D] buffers ONNX Runtime holds for this call, gate_mod
        // and norm_mod [B, M] with the offsets + D inside M (`ModNormAttrs::dims`); one block per row (total
        // blocks); all 4-byte aligned (checked above); the outputs are fresh, aliasing no input.
        unsafe { launch(api, "cuLaunchKernel (mod_norm_f16)", func, total as u32, threads, s, &mut params) }
    }
}

pub(crate) struct HeadRmsNormCuda {
    eps: f32,
}
impl HeadRmsNormCuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { eps: super::cpu::head_rms_epsilon(k) })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "HeadRmsNorm";
        let api = api()?;
        let (x, wa, wb, like) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?, need(ctx, op, 3)?);
        let (batch, rows, d) = shapes::bsk(op, "x", &x.shape)?;
        let (_, rows_a, _) = shapes::bsk(op, "like_a", &like.shape)?;
        let h = shapes::head_norm(op, d, &wa.shape, &wb.shape)?;
        if h % 2 != 0 {
            return Err(err(op, "the CUDA kernel needs an even head size"));
        }
        let Some(y) = out(ctx, op, 0, x.shape.clone())? else { return Ok(()) };
        let segments = batch * rows * (d / h);
        if segments == 0 {
            return Ok(());
        }
        let warps_per_block = 8usize;
        let blocks = segments.div_ceil(warps_per_block);
        if blocks > u32::MAX as usize || rows > i32::MAX as usize || d / h > i32::MAX as usize {
            return Err(err(op, "tensor too large for the kernel's launch grid"));
        }
        half2_aligned(op, &[x.ptr, wa.ptr, wb.ptr, y.cast_const()])?;
        let s = stream(ctx, op)?;
        let (_, func) = functions(api, current_context(api)?)?;
        let (mut xp, mut ap, mut bp, mut yp) = (x.ptr, wa.ptr, wb.ptr, y);
        let mut segs = segments as i64;
        let mut heads = (d / h) as c_int;
        let mut rows_i = rows as c_int;
        let mut rows_a_i = rows_a.min(rows) as c_int;
        let mut h2 = (h / 2) as c_int;
        let mut eps = self.eps;
        let mut params: [*mut c_void; 10] = [
            (&mut xp as *mut *const c_void).cast(),
            (&mut ap as *mut *const c_void).cast(),
            (&mut bp as *mut *const c_void).cast(),
            (&mut yp as *mut *mut c_void).cast(),
            (&mut segs as *mut i64).cast(),
            (&mut heads as *mut c_int).cast(),
            (&mut rows_i as *mut c_int).cast(),
            (&mut rows_a_i as *mut c_int).cast(),
            (&mut h2 as *mut c_int).cast(),
            (&mut eps as *mut f32).cast(),
        ];
        let threads = (warps_per_block * 32) as u32;
        // SAFETY: params follow head_rms_norm_f16's signature in mod_norm.cu, each pointing to a live local of that
        // type; x and y hold batch * rows * d halves, the weights h (`shapes::head_norm`); the kernel returns early
        // for warps past `segments`; all 4-byte aligned (checked above); y is fresh, aliasing no input.
        unsafe { launch(api, "cuLaunchKernel (head_rms_norm_f16)", func, blocks as u32, threads, s, &mut params) }
    }
}

// ---- FP8 operators (issue 19) ------------------------------------------------------------------------------------
//
// LinearFp8 / LinearConcatFp8 / LinearSplitFp8: the CPU kernels' arithmetic (cpu.rs, fp8.rs) on the GPU. Per call:
// (1) with no stored activation scale, zero the amax slot and reduce max |x| into it (`fp8_amax_f16`); (2) quantize
// x to E4M3 into the stream's FP8 buffer (`fp8_quantize_f16`, which also writes the scale amax / 448 for
// cuBLASLt); (3) the cuBLASLt FP8 matmul with W's and x's scale pointers, bias (+ GELU) epilogue, float16 out.
// Everything is queued on ONNX Runtime's stream: no host synchronisation.

/// (`fp8_amax_f16`, `fp8_quantize_f16`) in the current context `ctx`.
fn fp8_functions(api: &Api, ctx: Handle) -> ort::Result<(Handle, Handle)> {
    static MODULES: Modules = Mutex::new(Vec::new());
    module_functions(api, ctx, &MODULES, FP8_PTX, "fp8.ptx", [c"fp8_amax_f16", c"fp8_quantize_f16"])
}

/// (`fp8_reciprocal`, `fp8_quantize_f16`) in the current context `ctx` (a second load of fp8.ptx: the loader
/// takes two functions a module).
fn fp8_mlp_functions(api: &Api, ctx: Handle) -> ort::Result<(Handle, Handle)> {
    static MODULES: Modules = Mutex::new(Vec::new());
    module_functions(api, ctx, &MODULES, FP8_PTX, "fp8.ptx", [c"fp8_reciprocal", c"fp8_quantize_f16"])
}

/// The compute capability of the current context's device.
fn capability(api: &Api) -> ort::Result<(i32, i32)> {
    let mut dev: c_int = 0;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: out-pointers to locals; a context is current (the callers checked it or run inside a kernel call).
    unsafe {
        api.check("cuCtxGetDevice", (api.cu_ctx_get_device)(&mut dev))?;
        api.check(
            "cuDeviceGetAttribute",
            (api.cu_device_get_attribute)(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        )?;
        api.check(
            "cuDeviceGetAttribute",
            (api.cu_device_get_attribute)(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        )?;
    }
    Ok((major, minor))
}

/// Refuses GPUs without FP8 matrix products (`fp8::check_capability`), naming the operator.
fn require_fp8(api: &Api, op: &str) -> ort::Result<()> {
    let (major, minor) = capability(api)?;
    super::fp8::check_capability(major, minor).map_err(|e| err(op, e))
}

/// The check when the kernel is created: done when ONNX Runtime has a context current on this thread (it then
/// fails the session's creation with the message); otherwise the first `compute` does it.
fn fp8_checked_at_creation(op: &str) -> ort::Result<bool> {
    let Ok(api) = api() else { return Ok(false) };
    let mut ctx: Handle = ptr::null_mut();
    // SAFETY: cuCtxGetCurrent writes one handle to the local out-pointer.
    if unsafe { (api.cu_ctx_get_current)(&mut ctx) } != 0 || ctx.is_null() {
        return Ok(false);
    }
    require_fp8(api, op)?;
    Ok(true)
}

/// A float32 scale tensor on the device: one value.
fn scale_dev(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<*const c_void>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let t = v.downcast::<DynTensorValueType>().map_err(|e| err(op, format!("input {i}: {e}")))?;
    if *t.data_type() != TensorElementType::Float32 || t.shape().iter().product::<i64>() != 1 {
        return Err(err(op, format!("input {i} must be one float32 scale, got {:?} {:?}", t.data_type(), t.shape())));
    }
    Ok(Some(t.data_ptr()))
}

fn scale_need(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<*const c_void> {
    scale_dev(ctx, op, i)?.ok_or_else(|| err(op, format!("input {i} (weight scale) is missing")))
}

/// An E4M3 weight (UINT8 `[N, K]`) on the device.
fn weight8_dev(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<Dev>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let t = v.downcast::<DynTensorValueType>().map_err(|e| err(op, format!("input {i}: {e}")))?;
    if *t.data_type() != TensorElementType::Uint8 {
        return Err(err(op, format!("input {i} is {:?}; FP8 weights are E4M3 bytes (uint8)", t.data_type())));
    }
    Ok(Some(Dev { shape: t.shape().to_vec(), ptr: t.data_ptr() }))
}

fn weight8_need(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Dev> {
    weight8_dev(ctx, op, i)?.ok_or_else(|| err(op, format!("input {i} (E4M3 weight) is missing")))
}

/// K and N multiples of 16: cuBLASLt's FP8 matmuls need 16-byte aligned pointers and leading dimensions (cuBLAS
/// documentation, cublasLtMatmul, FP8 requirements), and its heuristic refuses an FP8 problem whose `m` (our N,
/// the output features) is not a multiple of 16 ("Unsupported M dimension for FP8 matrix multiplication. M must be
/// divisible by 16", CUBLASLT_LOG_LEVEL=5, as reported in vllm-project/vllm#4691). The rows (tokens: cuBLASLt's
/// `n`, e.g. SD3's 333 context rows) have no such rule.
fn fp8_dims(op: &str, k: usize, n: usize) -> ort::Result<()> {
    if !k.is_multiple_of(16) || !n.is_multiple_of(16) {
        return Err(err(op, format!("the CUDA FP8 product needs K and N multiples of 16, got K {k}, N {n}")));
    }
    Ok(())
}

/// Quantizes `n` float16 values at `x` to E4M3 at `q` on `stream`, with the stored scale or `amax / 448`
/// computed into `slot` (the amax at `slot`, the scale at `slot + 16`); returns the device address of the scale
/// used, for cuBLASLt.
///
/// # Safety
///
/// `x` holds `n` float16 values and `q` room for `n` bytes, `slot` 20 bytes, `stored` (when given) one float32,
/// all device memory of the current context live until `stream`'s queued work is done; `stream` belongs to it.
unsafe fn quantize(
    api: &Api,
    stream: Handle,
    x: *const c_void,
    n: usize,
    stored: Option<*const c_void>,
    slot: u64,
    q: u64,
) -> ort::Result<*const c_void> {
    let (amax_fn, quant_fn) = fp8_functions(api, current_context(api)?)?;
    const THREADS: u32 = 256;
    // One thread per 8 values (fp8.cu reads 16-byte vectors); grid-stride loops cover the rest of a capped grid
    // and the scalar path of an unaligned tensor.
    let blocks = |cap: usize| n.div_ceil(8 * THREADS as usize).clamp(1, cap) as u32;
    let mut xp = x;
    let mut count = n as i64;
    let mut amax = slot as usize as *mut c_void;
    let scale_slot = (slot + 16) as usize as *mut c_void;
    if stored.is_none() {
        // SAFETY: `slot` is 4 bytes of device memory (the caller's contract); queued on `stream`.
        api.check("cuMemsetD32Async (FP8 amax)", unsafe { (api.cu_memset_d32_async)(slot, 0, 1, stream) })?;
        let mut params: [*mut c_void; 3] = [
            (&mut xp as *mut *const c_void).cast(),
            (&mut count as *mut i64).cast(),
            (&mut amax as *mut *mut c_void).cast(),
        ];
        // SAFETY: params follow fp8_amax_f16's signature in fp8.cu, each pointing to a live local; grid-stride loop
        // over n values of x; the amax slot was zeroed above on the same stream.
        unsafe { launch(api, "cuLaunchKernel (fp8_amax_f16)", amax_fn, blocks(1024), THREADS, stream, &mut params) }?;
    }
    let mut st = stored.unwrap_or(ptr::null());
    let mut so = scale_slot;
    let mut qp = q as usize as *mut c_void;
    let mut params: [*mut c_void; 6] = [
        (&mut xp as *mut *const c_void).cast(),
        (&mut count as *mut i64).cast(),
        (&mut st as *mut *const c_void).cast(),
        (&mut amax as *mut *mut c_void).cast(),
        (&mut so as *mut *mut c_void).cast(),
        (&mut qp as *mut *mut c_void).cast(),
    ];
    // SAFETY: params follow fp8_quantize_f16's signature; x has n values, q room for n bytes; grid-stride loop.
    unsafe {
        launch(api, "cuLaunchKernel (fp8_quantize_f16)", quant_fn, blocks(65_535), THREADS, stream, &mut params)
    }?;
    Ok(stored.unwrap_or(scale_slot.cast_const()))
}

const U8_IN: OperatorInput = OperatorInput::required(TensorElementType::Uint8);
const U8_OPT: OperatorInput = OperatorInput::optional(TensorElementType::Uint8);
const F32_IN: OperatorInput = OperatorInput::required(TensorElementType::Float32);
const F32_OPT: OperatorInput = OperatorInput::optional(TensorElementType::Float32);

cuda_op!(LinearFp8Op, "LinearFp8", [REQ, U8_IN, F32_IN, REQ, F32_OPT], [OUT], LinearFp8Cuda);
cuda_op!(
    LinearConcatFp8Op,
    "LinearConcatFp8",
    [REQ, U8_IN, F32_IN, REQ, REQ, U8_IN, F32_IN, REQ, F32_OPT, F32_OPT],
    [OUT],
    LinearConcatFp8Cuda
);
cuda_op!(
    LinearSplitFp8Op,
    "LinearSplitFp8",
    [REQ, U8_IN, F32_IN, REQ, U8_OPT, F32_OPT, OPT, REQ, F32_OPT],
    [OUT, OUT_OPT],
    LinearSplitFp8Cuda
);

cuda_op!(
    LinearConcat3Fp8Op,
    "LinearConcat3Fp8",
    [
        REQ, REQ, U8_IN, F32_IN, REQ, U8_IN, F32_IN, REQ, U8_IN, F32_IN, REQ, U8_IN, F32_IN, REQ, U8_IN, F32_IN, REQ,
        U8_IN, F32_IN, REQ, F32_OPT, F32_OPT
    ],
    [OUT, OUT, OUT],
    LinearConcat3Fp8Cuda
);

cuda_op!(MlpFp8Op, "MlpFp8", [REQ, U8_IN, F32_IN, REQ, U8_IN, F32_IN, REQ, F32_IN, F32_IN], [OUT], MlpFp8Cuda);

/// Bytes of the FP8 buffer for activations of `a` and `b` values: header, then each 256-aligned.
fn fp8_bytes(a: usize, b: usize) -> usize {
    FP8_HEADER + a.next_multiple_of(256) + b.next_multiple_of(256)
}

pub(crate) struct LinearFp8Cuda {
    gelu: bool,
    fast: bool,
    checked: bool,
    plan: Option<Plan>,
    streams: Streams,
}
impl LinearFp8Cuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let op = "LinearFp8";
        let activation = k.get::<i64>("activation").unwrap_or(0);
        if !(0..=1).contains(&activation) {
            return Err(err(op, format!("activation {activation} is not 0 (none) or 1 (tanh GELU)")));
        }
        let fast = fast_accum(op, k)?;
        let checked = fp8_checked_at_creation(op)?;
        Ok(Self { gelu: activation == 1, fast, checked, plan: None, streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearFp8";
        let api = api()?;
        if !self.checked {
            require_fp8(api, op)?;
            self.checked = true;
        }
        let (x, w, w_scale, b) =
            (need(ctx, op, 0)?, weight8_need(ctx, op, 1)?, scale_need(ctx, op, 2)?, need(ctx, op, 3)?);
        let stored = scale_dev(ctx, op, 4)?;
        let (rows, k, n) = shapes::linear_nk(op, &x.shape, &w.shape, &b.shape)?;
        fp8_dims(op, k, n)?;
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n as i64;
        }
        let Some(y) = out(ctx, op, 0, shape)? else { return Ok(()) };
        if rows == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let buf = l.scratch.fp8_buffer(api, fp8_bytes(rows * k, 0))?;
        let q = buf + FP8_HEADER as u64;
        // SAFETY: x holds rows * K float16 values (`shapes::linear_nk`); the buffer has the header slots and room
        // for rows * K bytes at q; the stored scale (if any) is one float32 (`scale_dev`); all on this call's stream.
        let x_scale = unsafe { quantize(api, l.stream, x.ptr, rows * k, stored, buf, q) }?;
        let g = Gemm { rows, k, n, batch: 1, x_stride: 0, d_stride: 0 };
        // SAFETY: q holds rows * K E4M3 bytes (queued before on the same stream), w N * K bytes, b N float16 values,
        // the scales one float32 each; y is the fresh [.., N] output.
        unsafe {
            l.gemm_fp8(
                api,
                op,
                &mut self.plan,
                g,
                self.gelu,
                self.fast,
                q as usize as *const c_void,
                w.ptr,
                (w_scale, x_scale),
                b.ptr,
                y,
                None,
            )
        }
    }
}

/// `MlpFp8` (cpu.rs): x quantized with its stored scale; the first product (GELU) writes E4M3 straight from
/// cuBLASLt with D scale `1 / h_scale` (`fp8_reciprocal` into the buffer's header), the second reads those bytes
/// with B scale `h_scale`. No float16 tensor between the products and no quantization pass over it. Should
/// cuBLASLt have no algorithm for that E4M3 output (asked once per product shape), the first product writes
/// float16 into the buffer and `fp8_quantize_f16` makes the bytes, as the two-node graph does.
/// Buffer: header (x's slots at 0 and 16, unused with a stored scale; `1 / h_scale` at 48, 16-byte aligned as
/// cuBLASLt wants), then x's E4M3 bytes, the product's E4M3 bytes, and (fallback only) its float16 values.
pub(crate) struct MlpFp8Cuda {
    fast: bool,
    checked: bool,
    /// Whether the first product writes E4M3 itself, for the product it was decided for.
    direct: Option<(Gemm, bool)>,
    plans: [Option<Plan>; 2],
    streams: Streams,
}
impl MlpFp8Cuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let fast = fast_accum("MlpFp8", k)?;
        let checked = fp8_checked_at_creation("MlpFp8")?;
        Ok(Self { fast, checked, direct: None, plans: [None, None], streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "MlpFp8";
        let api = api()?;
        if !self.checked {
            require_fp8(api, op)?;
            self.checked = true;
        }
        let (x, w1, ws1, b1) =
            (need(ctx, op, 0)?, weight8_need(ctx, op, 1)?, scale_need(ctx, op, 2)?, need(ctx, op, 3)?);
        let (w2, ws2, b2) = (weight8_need(ctx, op, 4)?, scale_need(ctx, op, 5)?, need(ctx, op, 6)?);
        let stored = |i: usize, what: &str| {
            scale_dev(ctx, op, i)?
                .ok_or_else(|| err(op, format!("input {i} ({what}) is missing: MlpFp8 needs stored activation scales")))
        };
        let (x_scale, h_scale) = (stored(7, "x_scale")?, stored(8, "h_scale")?);
        let (rows, k, n1) = shapes::linear_nk(op, &x.shape, &w1.shape, &b1.shape)?;
        let mut hs = x.shape.clone();
        if let Some(last) = hs.last_mut() {
            *last = n1 as i64;
        }
        let (_, _, n2) = shapes::linear_nk(op, &hs, &w2.shape, &b2.shape)?;
        fp8_dims(op, k, n1)?;
        fp8_dims(op, n1, n2)?;
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n2 as i64;
        }
        let Some(y) = out(ctx, op, 0, shape)? else { return Ok(()) };
        if rows == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let g1 = Gemm { rows, k, n: n1, batch: 1, x_stride: 0, d_stride: 0 };
        let g2 = Gemm { rows, k: n1, n: n2, batch: 1, x_stride: 0, d_stride: 0 };
        let [p1, p2] = &mut self.plans;
        // The buffer's layout is fixed before anything is queued, so cuBLASLt is asked first whether it has an
        // algorithm for the E4M3 output, at the alignments the buffer gives (its regions start 256 bytes apart
        // from a cuMemAlloc base: 256, `alignment`'s cap); the answer is kept for this product shape, and a plan
        // found is kept in the first product's slot, where `gemm_fp8` finds it (same key).
        let direct = match self.direct {
            Some((g, d)) if g == g1 => d,
            _ => {
                let al = Align { w: alignment(w1.ptr as usize, 0), x: 256, d: 256 };
                let mode = Mode { gelu: true, fp8: true, fast: self.fast, out8: true };
                let d = match Plan::new(api, &l.scratch, g1, al, mode) {
                    Ok(plan) => {
                        *p1 = Some(plan);
                        true
                    }
                    Err(_) => false,
                };
                self.direct = Some((g1, d));
                d
            }
        };
        let (nx, nh) = (rows * k, rows * n1);
        let half_bytes = if direct { 0 } else { 2 * nh };
        let buf = l.scratch.fp8_buffer(api, fp8_bytes(nx, nh) + half_bytes)?;
        let qx = buf + FP8_HEADER as u64;
        let qh = qx + nx.next_multiple_of(256) as u64;
        // SAFETY: x holds rows * K float16 values; the buffer has the header slots and room for rows * K bytes at
        // qx; x_scale is one float32 (`scale_dev`); queued on this call's stream.
        let xs = unsafe { quantize(api, l.stream, x.ptr, nx, Some(x_scale), buf, qx) }?;
        let qxp = qx as usize as *const c_void;
        if direct {
            let (recip_fn, _) = fp8_mlp_functions(api, current_context(api)?)?;
            let inv = (buf + 48) as usize as *mut c_void;
            let (mut sp, mut ip) = (h_scale, inv);
            let mut params: [*mut c_void; 2] =
                [(&mut sp as *mut *const c_void).cast(), (&mut ip as *mut *mut c_void).cast()];
            // SAFETY: params follow fp8_reciprocal's signature (two float pointers), each pointing to a live local;
            // h_scale is one float32 on the device, inv 4 bytes of the buffer's header; one thread.
            unsafe { launch(api, "cuLaunchKernel (fp8_reciprocal)", recip_fn, 1, 1, l.stream, &mut params) }?;
            let d_scale = Some(inv.cast_const());
            // SAFETY: qx holds rows * K E4M3 bytes (queued before on this stream), w1 N1 * K bytes, b1 N1 float16
            // values, the scales one float32 each; qh has room for rows * N1 bytes, the D scale is written above
            // on the same stream.
            unsafe {
                l.gemm_fp8(
                    api,
                    op,
                    p1,
                    g1,
                    true,
                    self.fast,
                    qxp,
                    w1.ptr,
                    (ws1, xs),
                    b1.ptr,
                    qh as usize as *mut c_void,
                    d_scale,
                )
            }?;
        } else {
            let h16 = qh + nh.next_multiple_of(256) as u64;
            // SAFETY: as above, with a float16 output of rows * N1 values at h16 (the buffer's room for them).
            unsafe {
                l.gemm_fp8(
                    api,
                    op,
                    p1,
                    g1,
                    true,
                    self.fast,
                    qxp,
                    w1.ptr,
                    (ws1, xs),
                    b1.ptr,
                    h16 as usize as *mut c_void,
                    None,
                )
            }?;
            // SAFETY: h16 holds rows * N1 float16 values (queued above), qh room for as many bytes; the second slot
            // pair at buf + 32 (unused with the stored scale).
            unsafe { quantize(api, l.stream, h16 as usize as *const c_void, nh, Some(h_scale), buf + 32, qh) }?;
        }
        // SAFETY: qh holds rows * N1 E4M3 bytes (queued before on this stream), w2 N2 * N1 bytes, b2 N2 float16
        // values, the scales one float32 each; y is the fresh [.., N2] output.
        unsafe {
            l.gemm_fp8(
                api,
                op,
                p2,
                g2,
                false,
                self.fast,
                qh as usize as *const c_void,
                w2.ptr,
                (ws2, h_scale),
                b2.ptr,
                y,
                None,
            )
        }
    }
}

pub(crate) struct LinearConcatFp8Cuda {
    fast: bool,
    checked: bool,
    plans: [Option<Plan>; 2],
    streams: Streams,
}
impl LinearConcatFp8Cuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let fast = fast_accum("LinearConcatFp8", k)?;
        let checked = fp8_checked_at_creation("LinearConcatFp8")?;
        Ok(Self { fast, checked, plans: [None, None], streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcatFp8";
        let api = api()?;
        if !self.checked {
            require_fp8(api, op)?;
            self.checked = true;
        }
        let (xa, wa, wsa, ba) =
            (need(ctx, op, 0)?, weight8_need(ctx, op, 1)?, scale_need(ctx, op, 2)?, need(ctx, op, 3)?);
        let (xb, wb, wsb, bb) =
            (need(ctx, op, 4)?, weight8_need(ctx, op, 5)?, scale_need(ctx, op, 6)?, need(ctx, op, 7)?);
        let (stored_a, stored_b) = (scale_dev(ctx, op, 8)?, scale_dev(ctx, op, 9)?);
        let (batch, sa, sb, ka, kb, n) = shapes::linear_concat(
            &xa.shape,
            &shapes::nk_to_kn(&wa.shape),
            &ba.shape,
            &xb.shape,
            &shapes::nk_to_kn(&wb.shape),
            &bb.shape,
        )?;
        fp8_dims(op, ka, n)?;
        fp8_dims(op, kb, n)?;
        let st = sa + sb;
        let Some(y) = out(ctx, op, 0, vec![batch as i64, st as i64, n as i64])? else { return Ok(()) };
        if batch == 0 || st == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let (na, nb) = (batch * sa * ka, batch * sb * kb);
        let buf = l.scratch.fp8_buffer(api, fp8_bytes(na, nb))?;
        let (qa, qb) = (buf + FP8_HEADER as u64, buf + (FP8_HEADER + na.next_multiple_of(256)) as u64);
        let [pa, pb] = &mut self.plans;
        if sa > 0 {
            // SAFETY: xa holds B * Sa * Ka float16 values; slots at buf (amax, scale at +16), qa has room for them.
            let xs = unsafe { quantize(api, l.stream, xa.ptr, na, stored_a, buf, qa) }?;
            let g = Gemm { rows: sa, k: ka, n, batch, x_stride: sa * ka, d_stride: st * n };
            let q = qa as usize as *const c_void;
            // SAFETY: as LinearConcat's float16 product, with E4M3 qa ([B, Sa, Ka] bytes) and wa ([N, Ka] bytes).
            unsafe { l.gemm_fp8(api, op, pa, g, false, self.fast, q, wa.ptr, (wsa, xs), ba.ptr, y, None) }?;
        }
        if sb > 0 {
            // SAFETY: the second pair of slots (amax at buf + 32, scale at buf + 48: cuBLASLt refuses a scale pointer
            // that is not 16-byte aligned, CUBLAS_STATUS_NOT_SUPPORTED on an H200), so xa's scale stays valid for
            // the product queued above; qb has room for B * Sb * Kb bytes.
            let xs = unsafe { quantize(api, l.stream, xb.ptr, nb, stored_b, buf + 32, qb) }?;
            // SAFETY: y holds batch * st * n halves; the second block starts sa rows into each batch.
            let yb = unsafe { y.cast::<f16>().add(sa * n) }.cast();
            let g = Gemm { rows: sb, k: kb, n, batch, x_stride: sb * kb, d_stride: st * n };
            let q = qb as usize as *const c_void;
            // SAFETY: as LinearConcat's second float16 product, with E4M3 qb and wb.
            unsafe { l.gemm_fp8(api, op, pb, g, false, self.fast, q, wb.ptr, (wsb, xs), bb.ptr, yb, None) }?;
        }
        Ok(())
    }
}

/// `LinearConcat3Fp8` (cpu.rs): xa and xb are quantized once each into this stream's FP8 buffer (the layout of
/// `LinearConcatFp8`: xa's amax/scale slots at the buffer's start, xb's 32 bytes on, then the E4M3 values), then
/// the three products' two halves each read them, in stream order.
pub(crate) struct LinearConcat3Fp8Cuda {
    fast: bool,
    checked: bool,
    plans: [[Option<Plan>; 2]; 3],
    streams: Streams,
}
impl LinearConcat3Fp8Cuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let fast = fast_accum("LinearConcat3Fp8", k)?;
        let checked = fp8_checked_at_creation("LinearConcat3Fp8")?;
        Ok(Self { fast, checked, plans: Default::default(), streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcat3Fp8";
        let api = api()?;
        if !self.checked {
            require_fp8(api, op)?;
            self.checked = true;
        }
        let (xa, xb) = (need(ctx, op, 0)?, need(ctx, op, 1)?);
        let (stored_a, stored_b) = (scale_dev(ctx, op, 20)?, scale_dev(ctx, op, 21)?);
        // Every product's shapes first: nothing is queued for a node with a bad input.
        let mut products = Vec::with_capacity(3);
        for j in 0..3 {
            let i = 2 + 6 * j;
            let (wa, wsa, ba) = (weight8_need(ctx, op, i)?, scale_need(ctx, op, i + 1)?, need(ctx, op, i + 2)?);
            let (wb, wsb, bb) = (weight8_need(ctx, op, i + 3)?, scale_need(ctx, op, i + 4)?, need(ctx, op, i + 5)?);
            let dims = shapes::linear_concat(
                &xa.shape,
                &shapes::nk_to_kn(&wa.shape),
                &ba.shape,
                &xb.shape,
                &shapes::nk_to_kn(&wb.shape),
                &bb.shape,
            )?;
            let (_, _, _, ka, kb, n) = dims;
            fp8_dims(op, ka, n)?;
            fp8_dims(op, kb, n)?;
            products.push((dims, wa, wsa, ba, wb, wsb, bb));
        }
        let (batch, sa, sb, ka, kb, _) = products[0].0;
        let st = sa + sb;
        let mut outs = Vec::with_capacity(3);
        for (j, p) in products.iter().enumerate() {
            let n = p.0 .5;
            outs.push(out(ctx, op, j, vec![batch as i64, st as i64, n as i64])?);
        }
        if batch == 0 || st == 0 {
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let (na, nb) = (batch * sa * ka, batch * sb * kb);
        let buf = l.scratch.fp8_buffer(api, fp8_bytes(na, nb))?;
        let (qa, qb) = (buf + FP8_HEADER as u64, buf + (FP8_HEADER + na.next_multiple_of(256)) as u64);
        let xs_a = match sa {
            0 => None,
            // SAFETY: as LinearConcatFp8: xa holds B * Sa * Ka float16 values; its slots at buf (scale at +16), qa
            // has room for the E4M3 bytes; on this call's stream.
            _ => Some(unsafe { quantize(api, l.stream, xa.ptr, na, stored_a, buf, qa) }?),
        };
        let xs_b = match sb {
            0 => None,
            // SAFETY: xb holds B * Sb * Kb float16 values; the second slot pair at buf + 32 (16-byte aligned scale
            // at + 48), qb has room for the E4M3 bytes; on this call's stream, after xa's.
            _ => Some(unsafe { quantize(api, l.stream, xb.ptr, nb, stored_b, buf + 32, qb) }?),
        };
        for (j, ((dims, wa, wsa, ba, wb, wsb, bb), y)) in products.iter().zip(outs).enumerate() {
            let Some(y) = y else { continue };
            let n = dims.5;
            let [pa, pb] = &mut self.plans[j];
            if let Some(xs) = xs_a {
                let g = Gemm { rows: sa, k: ka, n, batch, x_stride: sa * ka, d_stride: st * n };
                // SAFETY: as LinearConcatFp8's first product: E4M3 qa (queued before on this stream), wa [N, Ka]
                // bytes, y the fresh [B, Sa + Sb, N] output.
                unsafe {
                    l.gemm_fp8(
                        api,
                        op,
                        pa,
                        g,
                        false,
                        self.fast,
                        qa as usize as *const c_void,
                        wa.ptr,
                        (*wsa, xs),
                        ba.ptr,
                        y,
                        None,
                    )
                }?;
            }
            if let Some(xs) = xs_b {
                // SAFETY: y holds batch * st * n halves; the second block starts sa rows into each batch.
                let yb = unsafe { y.cast::<f16>().add(sa * n) }.cast();
                let g = Gemm { rows: sb, k: kb, n, batch, x_stride: sb * kb, d_stride: st * n };
                // SAFETY: as LinearConcatFp8's second product, with E4M3 qb and wb.
                unsafe {
                    l.gemm_fp8(
                        api,
                        op,
                        pb,
                        g,
                        false,
                        self.fast,
                        qb as usize as *const c_void,
                        wb.ptr,
                        (*wsb, xs),
                        bb.ptr,
                        yb,
                        None,
                    )
                }?;
            }
        }
        Ok(())
    }
}

pub(crate) struct LinearSplitFp8Cuda {
    fast: bool,
    checked: bool,
    plans: [Option<Plan>; 2],
    streams: Streams,
}
impl LinearSplitFp8Cuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let fast = fast_accum("LinearSplitFp8", k)?;
        let checked = fp8_checked_at_creation("LinearSplitFp8")?;
        Ok(Self { fast, checked, plans: [None, None], streams: Streams::default() })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearSplitFp8";
        let api = api()?;
        if !self.checked {
            require_fp8(api, op)?;
            self.checked = true;
        }
        let (x, wa, wsa, ba) =
            (need(ctx, op, 0)?, weight8_need(ctx, op, 1)?, scale_need(ctx, op, 2)?, need(ctx, op, 3)?);
        let (wb, wsb, bb) = (weight8_dev(ctx, op, 4)?, scale_dev(ctx, op, 5)?, dev(ctx, op, 6)?);
        let like = need(ctx, op, 7)?;
        let stored = scale_dev(ctx, op, 8)?;
        let (batch, st, sa, k, na) =
            shapes::linear_split(&x.shape, &shapes::nk_to_kn(&wa.shape), &ba.shape, &like.shape)?;
        fp8_dims(op, k, na)?;
        let sb = st - sa;
        let total = batch * st * k;
        if total == 0 {
            // empty outputs: nothing to compute, but ONNX Runtime still wants them allocated
            out(ctx, op, 0, vec![batch as i64, sa as i64, na as i64])?;
            return Ok(());
        }
        let l = Launch::new(api, ctx, op, &mut self.streams)?;
        let buf = l.scratch.fp8_buffer(api, fp8_bytes(total, 0))?;
        let q = buf + FP8_HEADER as u64;
        // SAFETY: x holds B * St * K float16 values; one scale for all of x (both row ranges), as the CPU kernel.
        let xs = unsafe { quantize(api, l.stream, x.ptr, total, stored, buf, q) }?;
        let [pa, pb] = &mut self.plans;
        if let Some(ya) = out(ctx, op, 0, vec![batch as i64, sa as i64, na as i64])? {
            if sa > 0 && batch > 0 {
                let g = Gemm { rows: sa, k, n: na, batch, x_stride: st * k, d_stride: sa * na };
                // SAFETY: rows 0..Sa of each batch of q ([B, St, K] E4M3 bytes), wa [Na, K] bytes, ba [Na]; ya fresh.
                unsafe {
                    l.gemm_fp8(
                        api,
                        op,
                        pa,
                        g,
                        false,
                        self.fast,
                        q as usize as *const c_void,
                        wa.ptr,
                        (wsa, xs),
                        ba.ptr,
                        ya,
                        None,
                    )
                }?;
            }
        }
        match (wb, wsb, bb) {
            (Some(wb), Some(wsb), Some(bb)) => {
                let (_, _, nb) = shapes::linear_nk(op, &x.shape, &wb.shape, &bb.shape)?;
                fp8_dims(op, k, nb)?;
                if let Some(yb) = out(ctx, op, 1, vec![batch as i64, sb as i64, nb as i64])? {
                    if sb > 0 && batch > 0 {
                        let qb = (q + (sa * k) as u64) as usize as *const c_void;
                        let g = Gemm { rows: sb, k, n: nb, batch, x_stride: st * k, d_stride: sb * nb };
                        // SAFETY: rows Sa..St of each batch of q (ending at the batch's end), wb [Nb, K] bytes, bb
                        // [Nb]; yb is the fresh [B, Sb, Nb] output.
                        unsafe {
                            l.gemm_fp8(api, op, pb, g, false, self.fast, qb, wb.ptr, (wsb, xs), bb.ptr, yb, None)
                        }?;
                    }
                }
                Ok(())
            }
            (None, None, None) => Ok(()),
            _ => Err(err(op, "wb, wb_scale and bb (inputs 4-6) go together: give all three or none")),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The device loop's Euler step (`EulerStepF16` / `EulerStepF32`, step.cu): one kernel instead of the stock step
// graph's ten, queued on ONNX Runtime's stream like the other operators. `s` (guidance scale and dt) is a CPU
// input: ONNX Runtime hands the kernel host memory, whose values become the launch's parameters, so there is no
// copy to the GPU per step for them.

/// (`euler_step_f16`, `euler_step_f32`) in the current context `ctx`.
fn step_functions(api: &Api, ctx: Handle) -> ort::Result<(Handle, Handle)> {
    static MODULES: Modules = Mutex::new(Vec::new());
    module_functions(api, ctx, &MODULES, STEP_PTX, "step.ptx", [c"euler_step_f16", c"euler_step_f32"])
}

/// A device tensor input of element type `ty`: its shape and device pointer.
fn typed(ctx: &ComputeContext, op: &str, i: usize, ty: TensorElementType) -> ort::Result<Dev> {
    let v = ctx.input(i)?.ok_or_else(|| err(op, format!("input {i} is missing")))?;
    let t = v.downcast::<DynTensorValueType>().map_err(|e| err(op, format!("input {i}: {e}")))?;
    if *t.data_type() != ty {
        return Err(err(op, format!("input {i} is {:?}, expected {ty:?}", t.data_type())));
    }
    Ok(Dev { shape: t.shape().to_vec(), ptr: t.data_ptr() })
}

fn euler_step_cuda(op: &str, guidance: bool, half: bool, ctx: &ComputeContext) -> ort::Result<()> {
    let api = api()?;
    let vt = if half { TensorElementType::Float16 } else { TensorElementType::Float32 };
    let x = typed(ctx, op, 0, TensorElementType::Float32)?;
    let v = typed(ctx, op, 1, vt)?;
    // `s` is declared a CPU input (host memory, also on the CUDA provider).
    let s_in = ctx.input(2)?.ok_or_else(|| err(op, "input 2 is missing"))?;
    let (_, s) = s_in.try_extract_tensor::<f32>().map_err(|e| err(op, format!("s (host memory): {e}")))?;
    let total = shapes::euler_step(op, &x.shape, &v.shape, s, guidance)?;
    let (g, dt) = if guidance { (s[0], s[1]) } else { (0.0, s[0]) };
    let xn = out(ctx, op, 0, x.shape.clone())?.unwrap_or(ptr::null_mut());
    let hidden = out(ctx, op, 1, v.shape.clone())?.unwrap_or(ptr::null_mut());
    if xn.is_null() || hidden.is_null() {
        return Err(err(op, "both outputs (x_next, hidden) are needed"));
    }
    if total == 0 {
        return Ok(());
    }
    // v and hidden hold 2 * total values with guidance: every index stays below 2^32.
    if total > (u32::MAX / 2) as usize {
        return Err(err(op, "tensor too large for the kernel's 32-bit indices"));
    }
    let stream = stream(ctx, op)?;
    let (f16_fn, f32_fn) = step_functions(api, current_context(api)?)?;
    let func = if half { f16_fn } else { f32_fn };
    let (mut xp, mut vp, mut xnp, mut hp) = (x.ptr, v.ptr, xn, hidden);
    let mut total_u = total as u32;
    let mut guidance_i: c_int = c_int::from(guidance);
    let (mut gv, mut dtv) = (g, dt);
    let mut params: [*mut c_void; 8] = [
        (&mut xp as *mut *const c_void).cast(),
        (&mut vp as *mut *const c_void).cast(),
        (&mut xnp as *mut *mut c_void).cast(),
        (&mut hp as *mut *mut c_void).cast(),
        (&mut total_u as *mut u32).cast(),
        (&mut guidance_i as *mut c_int).cast(),
        (&mut gv as *mut f32).cast(),
        (&mut dtv as *mut f32).cast(),
    ];
    const THREADS: u32 = 256;
    // A grid-stride loop: at most 4096 blocks of 256 threads (1M threads; a 2048x2048 image's latents are 1M
    // values of 16 x 256 x 256).
    let blocks = total.div_ceil(THREADS as usize).min(4096) as u32;
    // SAFETY: params follow euler_step_f16 / euler_step_f32's signature in step.cu, each pointing to a live local
    // of that type. x and x_next hold `total` float32 values, v and hidden `total` (without guidance) or `2 *
    // total` (with) values of v's type (shapes checked by `shapes::euler_step`; the outputs have x's and v's
    // shapes); the outputs are fresh buffers ONNX Runtime allocated for this call, aliasing no input. Float32 and
    // float16 tensors from ONNX Runtime are at least 4-byte aligned (the kernel reads single values anyway).
    unsafe { launch(api, "cuLaunchKernel (euler_step)", func, blocks, THREADS, stream, &mut params) }
}

macro_rules! step_cuda_op {
    ($ty:ident, $name:literal, $elem:expr, $half:expr, $kernel:ident) => {
        pub(crate) struct $kernel {
            guidance: bool,
        }
        impl $kernel {
            fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
                Ok(Self { guidance: step_guidance($name, k)? })
            }
            fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
                euler_step_cuda($name, self.guidance, $half, ctx)
            }
        }
        cuda_op!(
            $ty,
            $name,
            [
                OperatorInput::required(TensorElementType::Float32),
                OperatorInput::required($elem),
                OperatorInput::required(TensorElementType::Float32).memory_type(ort::memory::MemoryType::CPUInput)
            ],
            [OperatorOutput::required(TensorElementType::Float32), OperatorOutput::required($elem)],
            $kernel
        );
    };
}

step_cuda_op!(EulerStepF16Op, "EulerStepF16", TensorElementType::Float16, true, EulerStepF16Cuda);
step_cuda_op!(EulerStepF32Op, "EulerStepF32", TensorElementType::Float32, false, EulerStepF32Cuda);
