//! CUDA kernels of the fused operators, on the CUDA execution provider's stream.
//!
//! The products go through cuBLASLt with the bias (and tanh-GELU) in the epilogue; `ModNorm` is our kernel
//! (`mod_norm.cu`, embedded as PTX and compiled by the driver on first use). Both libraries are opened at run
//! time (`libcuda.so.1` from the driver, `libcublasLt.so.13`/`.12` from the CUDA runtime ONNX Runtime itself
//! loads), so building with the `cuda` feature needs no CUDA toolkit. Plans (matrix layouts and the algorithm
//! cuBLASLt's heuristic picks) are made once per node and shape and reused every step.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use half::f16;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{DynTensorValueType, TensorElementType};

use super::cpu::ModNormAttrs;
use super::shapes::{self, err};

const PTX: &str = concat!(include_str!("mod_norm.ptx"), "\0");
const EP: &str = "CUDAExecutionProvider";
const WORKSPACE_BYTES: usize = 32 << 20;

type CuResult = c_int;
type Handle = *mut c_void;

/// The few driver and cuBLASLt entry points we call.
struct Api {
    _cuda: libloading::Library,
    _lt: libloading::Library,
    cu_init: unsafe extern "C" fn(u32) -> CuResult,
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
    cu_get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    lt_create: unsafe extern "C" fn(*mut Handle) -> c_int,
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

// SAFETY: the function pointers and library handles are immutable after loading and the libraries are
// thread-safe for these calls (each call passes its own descriptors and stream).
unsafe impl Send for Api {}
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
        // SAFETY: the signature on the receiving field matches the C declaration in cuda.h / cublasLt.h.
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
        let api = Api {
            cu_init: sym!(cuda, b"cuInit\0"),
            cu_ctx_get_current: sym!(cuda, b"cuCtxGetCurrent\0"),
            cu_module_load_data: sym!(cuda, b"cuModuleLoadData\0"),
            cu_module_get_function: sym!(cuda, b"cuModuleGetFunction\0"),
            cu_launch_kernel: sym!(cuda, b"cuLaunchKernel\0"),
            cu_mem_alloc: sym!(cuda, b"cuMemAlloc_v2\0"),
            cu_get_error_string: sym!(cuda, b"cuGetErrorString\0"),
            lt_create: sym!(lt, b"cublasLtCreate\0"),
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
        // SAFETY: cuGetErrorString writes a pointer to a static string or leaves it null.
        unsafe { (self.cu_get_error_string)(rc, &mut s) };
        let msg = if s.is_null() {
            String::from("unknown error")
        } else {
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

/// Per CUDA context: our module, the ModNorm function, a cuBLASLt handle and a shared workspace (every kernel
/// of a session runs on the same stream, one at a time).
struct Device {
    ctx: usize,
    mod_norm: usize,
    head_rms_norm: usize,
    lt: usize,
    workspace: u64,
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();
static DEVICES: Mutex<Vec<Device>> = Mutex::new(Vec::new());

fn api() -> ort::Result<&'static Api> {
    API.get_or_init(Api::load)
        .as_ref()
        .map_err(|e| Error::cuda(format!("cannot load the CUDA driver or cuBLASLt: {e}")))
}

/// (ModNorm function, HeadRmsNorm function, cuBLASLt handle, workspace) of the current context.
fn device(api: &Api) -> ort::Result<(Handle, Handle, Handle, u64)> {
    let mut ctx: Handle = ptr::null_mut();
    // SAFETY: plain driver calls with out-pointers to locals.
    api.check("cuInit", unsafe { (api.cu_init)(0) })?;
    api.check("cuCtxGetCurrent", unsafe { (api.cu_ctx_get_current)(&mut ctx) })?;
    if ctx.is_null() {
        return Err(Error::cuda("no current CUDA context on ONNX Runtime's thread".into()));
    }
    let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = devices.iter().find(|d| d.ctx == ctx as usize) {
        return Ok((d.mod_norm as Handle, d.head_rms_norm as Handle, d.lt as Handle, d.workspace));
    }
    let mut module: Handle = ptr::null_mut();
    let mut func: Handle = ptr::null_mut();
    let mut func2: Handle = ptr::null_mut();
    let mut lt: Handle = ptr::null_mut();
    let mut ws: u64 = 0;
    // SAFETY: PTX is a NUL-terminated PTX image; names are NUL-terminated; out-pointers are locals.
    unsafe {
        api.check("cuModuleLoadData (mod_norm.ptx)", (api.cu_module_load_data)(&mut module, PTX.as_ptr().cast()))?;
        api.check("cuModuleGetFunction", (api.cu_module_get_function)(&mut func, module, c"mod_norm_f16".as_ptr()))?;
        api.check(
            "cuModuleGetFunction",
            (api.cu_module_get_function)(&mut func2, module, c"head_rms_norm_f16".as_ptr()),
        )?;
        api.lt("cublasLtCreate", (api.lt_create)(&mut lt))?;
        api.check("cuMemAlloc (cuBLASLt workspace)", (api.cu_mem_alloc)(&mut ws, WORKSPACE_BYTES))?;
    }
    devices.push(Device {
        ctx: ctx as usize,
        mod_norm: func as usize,
        head_rms_norm: func2 as usize,
        lt: lt as usize,
        workspace: ws,
    });
    Ok((func, func2, lt, ws))
}

/// rows, k, n, batch, X block stride, D block stride, X offset, D offset (elements; the offsets only decide the
/// alignment cuBLASLt may assume).
type Dims = (usize, usize, usize, usize, usize, usize, usize, usize);

/// The alignment in bytes (a power of two, at most 256) of float16 element `offset` and of every `stride` after it,
/// in a buffer ONNX Runtime allocated (256-byte aligned).
fn alignment(offset: usize, stride: usize) -> u32 {
    let bytes = |e: usize| if e == 0 { 256 } else { (1usize << (e * 2).trailing_zeros()).min(256) };
    bytes(offset).min(if stride == 0 { 256 } else { bytes(stride) }) as u32
}

/// One cuBLASLt product `D[b] = act(X[b] @ W + bias)` over `batch` strided row blocks, planned once.
struct Plan {
    key: [i64; 9],
    desc: Handle,
    a: Handle,
    b: Handle,
    d: Handle,
    algo: Algo,
}
// SAFETY: descriptors are only used by the kernel that owns the plan, one compute call at a time.
unsafe impl Send for Plan {}

impl Plan {
    /// rows x k @ k x n over `batch` blocks of X and D.
    fn new(api: &Api, lt: Handle, dims: Dims, gelu: bool) -> ort::Result<Plan> {
        let (rows, k, n, batch, x_stride, d_stride, x_off, d_off) = dims;
        let key = plan_key(dims, gelu);
        let mut desc: Handle = ptr::null_mut();
        let (mut a, mut b, mut d): (Handle, Handle, Handle) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
        // Row-major Y[rows, n] = X[rows, k] W[k, n] is column-major Y^T = W^T X^T: cuBLASLt's A is W (n x k,
        // ld n), B is X (k x rows, ld k), D is Y (n x rows, ld n); the bias runs along D's n rows.
        unsafe {
            api.lt("cublasLtMatmulDescCreate", (api.lt_desc_create)(&mut desc, CUBLAS_COMPUTE_32F, CUDA_R_32F))?;
            let op_n: c_int = 0;
            api.lt("set TRANSA", (api.lt_desc_set)(desc, DESC_TRANSA, (&op_n as *const c_int).cast(), 4))?;
            api.lt("set TRANSB", (api.lt_desc_set)(desc, DESC_TRANSB, (&op_n as *const c_int).cast(), 4))?;
            let epi: u32 = if gelu { EPILOGUE_GELU_BIAS } else { EPILOGUE_BIAS };
            api.lt("set EPILOGUE", (api.lt_desc_set)(desc, DESC_EPILOGUE, (&epi as *const u32).cast(), 4))?;
            api.lt("layout W", (api.lt_layout_create)(&mut a, CUDA_R_16F, n as u64, k as u64, n as i64))?;
            api.lt("layout X", (api.lt_layout_create)(&mut b, CUDA_R_16F, k as u64, rows as u64, k as i64))?;
            api.lt("layout Y", (api.lt_layout_create)(&mut d, CUDA_R_16F, n as u64, rows as u64, n as i64))?;
            if batch > 1 {
                let count = batch as c_int;
                let zero: i64 = 0;
                let xs = x_stride as i64;
                let ds = d_stride as i64;
                for (l, stride) in [(a, &zero), (b, &xs), (d, &ds)] {
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
            api.lt(
                "set MAX_WORKSPACE_BYTES",
                (api.lt_pref_set)(pref, PREF_MAX_WORKSPACE_BYTES, (&ws as *const u64).cast(), 8),
            )?;
            // X and Y may start inside a buffer (the second row range of LinearConcat / LinearSplit).
            let ax = alignment(x_off, if batch > 1 { x_stride } else { 0 });
            let ad = alignment(d_off, if batch > 1 { d_stride } else { 0 });
            for (attr, v) in [
                (PREF_MIN_ALIGNMENT_A_BYTES, 256u32),
                (PREF_MIN_ALIGNMENT_B_BYTES, ax),
                (PREF_MIN_ALIGNMENT_C_BYTES, ad),
                (PREF_MIN_ALIGNMENT_D_BYTES, ad),
            ] {
                api.lt("set MIN_ALIGNMENT", (api.lt_pref_set)(pref, attr, (&v as *const u32).cast(), 4))?;
            }
            let mut result = HeuristicResult::default();
            let mut found: c_int = 0;
            let rc = (api.lt_heuristic)(lt, desc, a, b, d, d, pref, 1, &mut result, &mut found);
            (api.lt_pref_destroy)(pref);
            if rc != 0 || found < 1 {
                return Err(Error::cuda(format!(
                    "cuBLASLt found no algorithm for {rows}x{k} @ {k}x{n} (batch {batch}, gelu {gelu}, alignment \
                     {ax}/{ad} bytes): status {rc}"
                )));
            }
            Ok(Plan { key, desc, a, b, d, algo: result.algo })
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        api: &Api,
        lt: Handle,
        ws: u64,
        stream: Handle,
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        y: *mut c_void,
    ) -> ort::Result<()> {
        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        unsafe {
            api.lt(
                "set BIAS_POINTER",
                (api.lt_desc_set)(self.desc, DESC_BIAS_POINTER, (&bias as *const *const c_void).cast(), 8),
            )?;
            api.lt(
                "cublasLtMatmul",
                (api.lt_matmul)(
                    lt,
                    self.desc,
                    (&alpha as *const f32).cast(),
                    w,
                    self.a,
                    x,
                    self.b,
                    (&beta as *const f32).cast(),
                    y,
                    self.d,
                    y,
                    self.d,
                    &self.algo,
                    ws as *mut c_void,
                    WORKSPACE_BYTES,
                    stream,
                ),
            )
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            unsafe {
                (api.lt_layout_destroy)(self.a);
                (api.lt_layout_destroy)(self.b);
                (api.lt_layout_destroy)(self.d);
                (api.lt_desc_destroy)(self.desc);
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

fn plan_key(d: Dims, gelu: bool) -> [i64; 9] {
    [d.0 as i64, d.1 as i64, d.2 as i64, d.3 as i64, d.4 as i64, d.5 as i64, d.6 as i64, d.7 as i64, gelu as i64]
}

fn plan<'p>(slot: &'p mut Option<Plan>, api: &Api, lt: Handle, dims: Dims, gelu: bool) -> ort::Result<&'p Plan> {
    let key = plan_key(dims, gelu);
    if slot.as_ref().map(|p| p.key) != Some(key) {
        *slot = Some(Plan::new(api, lt, dims, gelu)?);
    }
    slot.as_ref().ok_or_else(|| Error::cuda("plan missing".into()))
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
}
impl LinearCuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let activation = k.get::<i64>("activation").unwrap_or(0);
        if !(0..=1).contains(&activation) {
            return Err(err("Linear", format!("activation {activation} is not 0 (none) or 1 (tanh GELU)")));
        }
        Ok(Self { gelu: activation == 1, plan: None })
    }
}
impl Kernel for LinearCuda {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "Linear";
        let api = api()?;
        let (_, _, lt, ws) = device(api)?;
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
        let s = stream(ctx, op)?;
        let p = plan(&mut self.plan, api, lt, (rows, k, n, 1, 0, 0, 0, 0), self.gelu)?;
        p.run(api, lt, ws, s, x.ptr, w.ptr, b.ptr, y)
    }
}

pub(crate) struct LinearConcatCuda {
    plans: [Option<Plan>; 2],
}
impl LinearConcatCuda {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { plans: [None, None] })
    }
}
impl Kernel for LinearConcatCuda {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcat";
        let api = api()?;
        let (_, _, lt, ws) = device(api)?;
        let (xa, wa, ba) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?);
        let (xb, wb, bb) = (need(ctx, op, 3)?, need(ctx, op, 4)?, need(ctx, op, 5)?);
        let (batch, sa, sb, ka, kb, n) =
            shapes::linear_concat(&xa.shape, &wa.shape, &ba.shape, &xb.shape, &wb.shape, &bb.shape)?;
        let st = sa + sb;
        let Some(y) = out(ctx, op, 0, vec![batch as i64, st as i64, n as i64])? else { return Ok(()) };
        let s = stream(ctx, op)?;
        let [pa, pb] = &mut self.plans;
        if sa > 0 && batch > 0 {
            let p = plan(pa, api, lt, (sa, ka, n, batch, sa * ka, st * n, 0, 0), false)?;
            p.run(api, lt, ws, s, xa.ptr, wa.ptr, ba.ptr, y)?;
        }
        if sb > 0 && batch > 0 {
            let p = plan(pb, api, lt, (sb, kb, n, batch, sb * kb, st * n, 0, sa * n), false)?;
            // SAFETY: y holds batch * st * n halves; the second block starts sa rows into each batch.
            let yb = unsafe { y.cast::<f16>().add(sa * n) }.cast();
            p.run(api, lt, ws, s, xb.ptr, wb.ptr, bb.ptr, yb)?;
        }
        Ok(())
    }
}

pub(crate) struct LinearSplitCuda {
    plans: [Option<Plan>; 2],
}
impl LinearSplitCuda {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { plans: [None, None] })
    }
}
impl Kernel for LinearSplitCuda {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearSplit";
        let api = api()?;
        let (_, _, lt, ws) = device(api)?;
        let (x, wa, ba) = (need(ctx, op, 0)?, need(ctx, op, 1)?, need(ctx, op, 2)?);
        let (wb, bb) = (dev(ctx, op, 3)?, dev(ctx, op, 4)?);
        let like = need(ctx, op, 5)?;
        let (batch, st, sa, k, na) = shapes::linear_split(&x.shape, &wa.shape, &ba.shape, &like.shape)?;
        let sb = st - sa;
        let s = stream(ctx, op)?;
        let [pa, pb] = &mut self.plans;
        if let Some(ya) = out(ctx, op, 0, vec![batch as i64, sa as i64, na as i64])? {
            if sa > 0 && batch > 0 {
                let p = plan(pa, api, lt, (sa, k, na, batch, st * k, sa * na, 0, 0), false)?;
                p.run(api, lt, ws, s, x.ptr, wa.ptr, ba.ptr, ya)?;
            }
        }
        if let (Some(wb), Some(bb)) = (wb, bb) {
            let (_, _, nb) = shapes::linear(op, &x.shape, &wb.shape, &bb.shape)?;
            if let Some(yb) = out(ctx, op, 1, vec![batch as i64, sb as i64, nb as i64])? {
                if sb > 0 && batch > 0 {
                    let p = plan(pb, api, lt, (sb, k, nb, batch, st * k, sb * nb, sa * k, 0), false)?;
                    // SAFETY: x holds batch * st * k halves; the second block starts sa rows into each batch.
                    let xb = unsafe { x.ptr.cast::<f16>().add(sa * k) }.cast();
                    p.run(api, lt, ws, s, xb, wb.ptr, bb.ptr, yb)?;
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
}
impl Kernel for ModNormCuda {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "ModNorm";
        let api = api()?;
        let (func, _, _, _) = device(api)?;
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
        let s = stream(ctx, op)?;
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
        // SAFETY: params match mod_norm_f16's signature in mod_norm.cu; every pointer is a live device buffer of
        // the sizes checked above (or null where the kernel does not read it).
        api.check("cuLaunchKernel (mod_norm_f16)", unsafe {
            (api.cu_launch_kernel)(func, total as u32, 1, 1, threads, 1, 1, 0, s, params.as_mut_ptr(), ptr::null_mut())
        })
    }
}

pub(crate) struct HeadRmsNormCuda {
    eps: f32,
}
impl HeadRmsNormCuda {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { eps: super::cpu::head_rms_epsilon(k) })
    }
}
impl Kernel for HeadRmsNormCuda {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "HeadRmsNorm";
        let api = api()?;
        let (_, func, _, _) = device(api)?;
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
        let s = stream(ctx, op)?;
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
        // SAFETY: params match head_rms_norm_f16's signature in mod_norm.cu; x and y hold batch * rows * d halves,
        // the weights h halves (checked above).
        api.check("cuLaunchKernel (head_rms_norm_f16)", unsafe {
            (api.cu_launch_kernel)(
                func,
                blocks as u32,
                1,
                1,
                (warps_per_block * 32) as u32,
                1,
                1,
                0,
                s,
                params.as_mut_ptr(),
                ptr::null_mut(),
            )
        })
    }
}
