//! CPU kernels of the fused operators: float16 tensors, float32 arithmetic. They exist so a fused graph runs on
//! every execution provider and so that the tests can check the graph rewrite on this machine; the speed that
//! matters is the CUDA one (`cuda.rs`).

use half::f16;
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::{fast_accum, guarded, shapes};

const F16: TensorElementType = TensorElementType::Float16;

fn input(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<(Vec<i64>, Vec<f32>)>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let (shape, data) = v.try_extract_tensor::<f16>().map_err(|e| shapes::err(op, format!("input {i}: {e}")))?;
    Ok(Some((shape.to_vec(), data.iter().map(|x| x.to_f32()).collect())))
}

fn required(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<(Vec<i64>, Vec<f32>)> {
    input(ctx, op, i)?.ok_or_else(|| shapes::err(op, format!("input {i} is missing")))
}

fn write(ctx: &ComputeContext, op: &str, i: usize, shape: Vec<i64>, data: &[f32]) -> ort::Result<()> {
    let Some(mut out) = ctx.output(i, shape)? else { return Ok(()) };
    let (_, dst) = out.try_extract_tensor_mut::<f16>().map_err(|e| shapes::err(op, format!("output {i}: {e}")))?;
    for (d, s) in dst.iter_mut().zip(data) {
        *d = f16::from_f32(*s);
    }
    Ok(())
}

/// tanh-approximated GELU (`gelu(approximate="tanh")`, what SD3's feed-forward uses: diffusers
/// `FeedForward(activation_fn="gelu-approximate")`, attention.py).
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// `x` (`[rows, k]`) times `w` (`[k, n]`) plus `b`, appended to `out` (float32; rounded to float16 when written).
#[allow(clippy::too_many_arguments)]
fn matmul_rows(
    op: &str,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    k: usize,
    n: usize,
    act: i64,
    out: &mut Vec<f32>,
) -> ort::Result<()> {
    let rows = x.len().checked_div(k).unwrap_or(0);
    let start = out.len();
    for _ in 0..rows {
        out.extend_from_slice(b);
    }
    let bad = |e: ndarray::ShapeError| shapes::err(op, format!("tensor data does not match its shape: {e}"));
    let xv = ArrayView2::from_shape((rows, k), x).map_err(bad)?;
    let wv = ArrayView2::from_shape((k, n), w).map_err(bad)?;
    let mut yv = ArrayViewMut2::from_shape((rows, n), &mut out[start..]).map_err(bad)?;
    general_mat_mul(1.0, &xv, &wv, 1.0, &mut yv);
    if act == 1 {
        for a in out[start..].iter_mut() {
            *a = gelu_tanh(*a);
        }
    }
    Ok(())
}

macro_rules! cpu_op {
    ($ty:ident, $name:literal, [$($inp:expr),*], [$($out:expr),*], $kernel:ident) => {
        pub(crate) struct $ty;
        impl Operator for $ty {
            type Kernel<'a> = $kernel;
            fn name(&self) -> &str {
                $name
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
                // the process); it becomes this node's error. The CPU kernels keep only attributes.
                guarded($name, || self.run(ctx))
            }
        }
    };
}

const REQ: OperatorInput = OperatorInput::required(F16);
const OPT: OperatorInput = OperatorInput::optional(F16);
const OUT: OperatorOutput = OperatorOutput::required(F16);
const OUT_OPT: OperatorOutput = OperatorOutput::optional(F16);

cpu_op!(LinearOp, "Linear", [REQ, REQ, REQ], [OUT], LinearCpu);
cpu_op!(LinearConcatOp, "LinearConcat", [REQ, REQ, REQ, REQ, REQ, REQ], [OUT], LinearConcatCpu);
cpu_op!(LinearSplitOp, "LinearSplit", [REQ, REQ, REQ, OPT, OPT, REQ], [OUT, OUT_OPT], LinearSplitCpu);
cpu_op!(ModNormOp, "ModNorm", [REQ, OPT, OPT, REQ], [OUT, OUT_OPT], ModNormCpu);

/// Tests only: makes the CPU `Linear` kernel panic, to check that the panic comes back from ONNX Runtime as an
/// error (`kernels::tests`). No other test of the library runs a fused graph.
#[cfg(test)]
pub(crate) static PANIC_IN_LINEAR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) struct LinearCpu {
    activation: i64,
}
impl LinearCpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let activation = k.get::<i64>("activation").unwrap_or(0);
        if !(0..=1).contains(&activation) {
            return Err(shapes::err("Linear", format!("activation {activation} is not 0 (none) or 1 (tanh GELU)")));
        }
        Ok(Self { activation })
    }
}
impl LinearCpu {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "Linear";
        #[cfg(test)]
        if PANIC_IN_LINEAR.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("test panic inside the Linear kernel");
        }
        let (xs, x) = required(ctx, op, 0)?;
        let (ws, w) = required(ctx, op, 1)?;
        let (bs, b) = required(ctx, op, 2)?;
        let (rows, k, n) = shapes::linear(op, &xs, &ws, &bs)?;
        let mut y = Vec::with_capacity(rows * n);
        matmul_rows(op, &x, &w, &b, k, n, self.activation, &mut y)?;
        let mut shape = xs.clone();
        *shape.last_mut().unwrap_or(&mut 0) = n as i64;
        write(ctx, op, 0, shape, &y)
    }
}

pub(crate) struct LinearConcatCpu;
impl LinearConcatCpu {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self)
    }
}
impl LinearConcatCpu {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcat";
        let (xas, xa) = required(ctx, op, 0)?;
        let (was, wa) = required(ctx, op, 1)?;
        let (bas, ba) = required(ctx, op, 2)?;
        let (xbs, xb) = required(ctx, op, 3)?;
        let (wbs, wb) = required(ctx, op, 4)?;
        let (bbs, bb) = required(ctx, op, 5)?;
        let (batch, sa, sb, k, kb, n) = shapes::linear_concat(&xas, &was, &bas, &xbs, &wbs, &bbs)?;
        let mut y = Vec::with_capacity(batch * (sa + sb) * n);
        for bi in 0..batch {
            matmul_rows(op, &xa[bi * sa * k..(bi + 1) * sa * k], &wa, &ba, k, n, 0, &mut y)?;
            matmul_rows(op, &xb[bi * sb * kb..(bi + 1) * sb * kb], &wb, &bb, kb, n, 0, &mut y)?;
        }
        write(ctx, op, 0, vec![batch as i64, (sa + sb) as i64, n as i64], &y)
    }
}

pub(crate) struct LinearSplitCpu;
impl LinearSplitCpu {
    fn new(_: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self)
    }
}
impl LinearSplitCpu {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearSplit";
        let (xs, x) = required(ctx, op, 0)?;
        let (was, wa) = required(ctx, op, 1)?;
        let (bas, ba) = required(ctx, op, 2)?;
        let wb = input(ctx, op, 3)?;
        let bb = input(ctx, op, 4)?;
        let like = ctx.input(5)?.ok_or_else(|| shapes::err(op, "input 5 (like_a) is missing"))?;
        let like_shape = like.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        let (batch, s, sa, k, na) = shapes::linear_split(&xs, &was, &bas, &like_shape)?;
        let sb = s - sa;
        let mut ya = Vec::with_capacity(batch * sa * na);
        for bi in 0..batch {
            let base = bi * s * k;
            matmul_rows(op, &x[base..base + sa * k], &wa, &ba, k, na, 0, &mut ya)?;
        }
        write(ctx, op, 0, vec![batch as i64, sa as i64, na as i64], &ya)?;
        if let (Some((wbs, wb)), Some((bbs, bb))) = (wb, bb) {
            let (_, _, nb) = shapes::linear(op, &xs, &wbs, &bbs)?;
            let mut yb = Vec::with_capacity(batch * sb * nb);
            for bi in 0..batch {
                let base = bi * s * k + sa * k;
                matmul_rows(op, &x[base..base + sb * k], &wb, &bb, k, nb, 0, &mut yb)?;
            }
            write(ctx, op, 1, vec![batch as i64, sb as i64, nb as i64], &yb)?;
        }
        Ok(())
    }
}

/// Attributes of `ModNorm`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModNormAttrs {
    pub gate_offset: i64,
    pub shift_offset: i64,
    pub scale_offset: i64,
    pub epsilon: f32,
}
impl ModNormAttrs {
    pub fn read(k: &KernelContext<'_>) -> ort::Result<Self> {
        let need = |name: &str| {
            k.get::<i64>(name).ok_or_else(|| shapes::err("ModNorm", format!("attribute {name} is missing")))
        };
        Ok(Self {
            gate_offset: k.get::<i64>("gate_offset").unwrap_or(0),
            shift_offset: need("shift_offset")?,
            scale_offset: need("scale_offset")?,
            epsilon: k.get::<f32>("epsilon").unwrap_or(1e-6),
        })
    }

    /// The shape rules of `ModNorm`, shared by the CPU and CUDA kernels: `h` is `[B, S, D]`; the norm's shift and
    /// scale fit in `norm_mod` (`[B, M]`); with `y` (same shape as `h`), the gate fits in `gate_mod`.
    pub fn dims(
        &self,
        h: &[i64],
        y: Option<&[i64]>,
        gate_mod: Option<&[i64]>,
        norm_mod: &[i64],
    ) -> ort::Result<ModNormDims> {
        let op = "ModNorm";
        let (batch, rows, d) = shapes::bsk(op, "h", h)?;
        let norm_width =
            shapes::modulation(op, "norm_mod", norm_mod, batch, d, &[self.shift_offset, self.scale_offset])?;
        let gate_width = match (y, gate_mod) {
            (None, _) => None,
            (Some(_), None) => return Err(shapes::err(op, "y needs gate_mod")),
            (Some(y), Some(g)) => {
                if y != h {
                    return Err(shapes::err(op, format!("y {y:?} and h {h:?} differ")));
                }
                Some(shapes::modulation(op, "gate_mod", g, batch, d, &[self.gate_offset])?)
            }
        };
        Ok(ModNormDims { batch, rows, d, norm_width, gate_width })
    }
}

/// Sizes of a `ModNorm` call (`ModNormAttrs::dims`).
pub(crate) struct ModNormDims {
    pub batch: usize,
    pub rows: usize,
    pub d: usize,
    pub norm_width: usize,
    /// The width of `gate_mod` when a residual `y` is given.
    pub gate_width: Option<usize>,
}

pub(crate) struct ModNormCpu {
    a: ModNormAttrs,
}
impl ModNormCpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { a: ModNormAttrs::read(k)? })
    }
}
impl ModNormCpu {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "ModNorm";
        let (hs, h) = required(ctx, op, 0)?;
        let y = input(ctx, op, 1)?;
        let g = input(ctx, op, 2)?;
        let (ms, m) = required(ctx, op, 3)?;
        let dims = self.a.dims(&hs, y.as_ref().map(|v| &v.0[..]), g.as_ref().map(|v| &v.0[..]), &ms)?;
        let (s, d, mw) = (dims.rows, dims.d, dims.norm_width);
        if d == 0 || s == 0 || dims.batch == 0 {
            write(ctx, op, 0, hs.clone(), &[])?;
            return if y.is_some() { write(ctx, op, 1, hs, &[]) } else { Ok(()) };
        }
        let mut hout = h.clone();
        if let (Some((_, y)), Some((_, g)), Some(gw)) = (&y, &g, dims.gate_width) {
            for (r, (ho, yr)) in hout.chunks_exact_mut(d).zip(y.chunks_exact(d)).enumerate() {
                let gate = &g[(r / s) * gw + self.a.gate_offset as usize..][..d];
                for ((hv, yv), gv) in ho.iter_mut().zip(yr).zip(gate) {
                    // The residual stream is stored in float16, and the norm reads the stored value.
                    *hv = f16::from_f32(*hv + gv * yv).to_f32();
                }
            }
        }
        let mut n = Vec::with_capacity(hout.len());
        for (r, row) in hout.chunks_exact(d).enumerate() {
            let base = (r / s) * mw;
            let shift = &m[base + self.a.shift_offset as usize..][..d];
            let scale = &m[base + self.a.scale_offset as usize..][..d];
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let rstd = 1.0 / (var + self.a.epsilon).sqrt();
            n.extend(row.iter().zip(scale).zip(shift).map(|((v, sc), sh)| (v - mean) * rstd * (1.0 + sc) + sh));
        }
        write(ctx, op, 0, hs.clone(), &n)?;
        if y.is_some() {
            write(ctx, op, 1, hs, &hout)?;
        }
        Ok(())
    }
}

cpu_op!(HeadRmsNormOp, "HeadRmsNorm", [REQ, REQ, REQ, REQ], [OUT], HeadRmsNormCpu);

/// `HeadRmsNorm`'s attribute and the rows it normalises with each weight.
pub(crate) fn head_rms_epsilon(k: &KernelContext<'_>) -> f32 {
    k.get::<f32>("epsilon").unwrap_or(1e-6)
}

pub(crate) struct HeadRmsNormCpu {
    eps: f32,
}
impl HeadRmsNormCpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        Ok(Self { eps: head_rms_epsilon(k) })
    }
}
impl HeadRmsNormCpu {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "HeadRmsNorm";
        let (xs, x) = required(ctx, op, 0)?;
        let (was, wa) = required(ctx, op, 1)?;
        let (wbs, wb) = required(ctx, op, 2)?;
        let like = ctx.input(3)?.ok_or_else(|| shapes::err(op, "input 3 (like_a) is missing"))?;
        let like_shape = like.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        let (_, s, d) = shapes::bsk(op, "x", &xs)?;
        let (_, sa, _) = shapes::bsk(op, "like_a", &like_shape)?;
        let h = shapes::head_norm(op, d, &was, &wbs)?;
        let mut y = Vec::with_capacity(x.len());
        for (r, row) in x.chunks_exact(d.max(1)).enumerate() {
            let w = if r % s.max(1) < sa { &wa } else { &wb };
            for seg in row.chunks_exact(h) {
                let ms = seg.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let rs = 1.0 / (ms + self.eps).sqrt();
                y.extend(seg.iter().zip(w.iter()).map(|(v, g)| v * rs * g));
            }
        }
        write(ctx, op, 0, xs, &y)
    }
}

// FP8 operators (issue 19; `fp8.rs`, `mod.rs`): E4M3 weights as UINT8 bytes `[N, K]` with a float32 per-tensor
// scale, float16 activations quantized to E4M3 with a per-tensor scale (computed from the activation's amax, or a
// stored one given as the optional last input(s)). The arithmetic the GPU does, up to the order of the float32
// accumulation: y = sum(q_x * q_w) * (x_scale * w_scale) + bias, GELU where asked, rounded to float16.

const W8: OperatorInput = OperatorInput::required(TensorElementType::Uint8);
const W8_OPT: OperatorInput = OperatorInput::optional(TensorElementType::Uint8);
const SCALE: OperatorInput = OperatorInput::required(TensorElementType::Float32);
const SCALE_OPT: OperatorInput = OperatorInput::optional(TensorElementType::Float32);

cpu_op!(LinearFp8Op, "LinearFp8", [REQ, W8, SCALE, REQ, SCALE_OPT], [OUT], LinearFp8Cpu);
cpu_op!(
    LinearConcatFp8Op,
    "LinearConcatFp8",
    [REQ, W8, SCALE, REQ, REQ, W8, SCALE, REQ, SCALE_OPT, SCALE_OPT],
    [OUT],
    LinearConcatFp8Cpu
);
cpu_op!(
    LinearSplitFp8Op,
    "LinearSplitFp8",
    [REQ, W8, SCALE, REQ, W8_OPT, SCALE_OPT, OPT, REQ, SCALE_OPT],
    [OUT, OUT_OPT],
    LinearSplitFp8Cpu
);

cpu_op!(
    LinearConcat3Fp8Op,
    "LinearConcat3Fp8",
    [
        REQ, REQ, W8, SCALE, REQ, W8, SCALE, REQ, W8, SCALE, REQ, W8, SCALE, REQ, W8, SCALE, REQ, W8, SCALE, REQ,
        SCALE_OPT, SCALE_OPT
    ],
    [OUT, OUT, OUT],
    LinearConcat3Fp8Cpu
);

cpu_op!(MlpFp8Op, "MlpFp8", [REQ, W8, SCALE, REQ, W8, SCALE, REQ, SCALE, SCALE], [OUT], MlpFp8Cpu);

/// An E4M3 weight (`[N, K]` bytes) decoded to float32, with its shape.
fn weight8(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<(Vec<i64>, Vec<f32>)>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let (shape, data) = v.try_extract_tensor::<u8>().map_err(|e| shapes::err(op, format!("input {i}: {e}")))?;
    Ok(Some((shape.to_vec(), data.iter().map(|c| super::fp8::TABLE[*c as usize]).collect())))
}

/// A per-tensor scale: one positive, finite float32.
fn scale(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<Option<f32>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let (_, data) = v.try_extract_tensor::<f32>().map_err(|e| shapes::err(op, format!("input {i}: {e}")))?;
    shapes::fp8_scale(op, i, data).map(Some)
}

fn scale_req(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<f32> {
    scale(ctx, op, i)?.ok_or_else(|| shapes::err(op, format!("input {i} (weight scale) is missing")))
}

fn weight8_req(ctx: &ComputeContext, op: &str, i: usize) -> ort::Result<(Vec<i64>, Vec<f32>)> {
    weight8(ctx, op, i)?.ok_or_else(|| shapes::err(op, format!("input {i} (E4M3 weight) is missing")))
}

/// The activation `x` quantized to E4M3 values (unscaled) with the stored scale, or with `amax(x) / 448`.
fn quantize_x(x: &[f32], stored: Option<f32>) -> (Vec<f32>, f32) {
    let s = stored.unwrap_or_else(|| super::fp8::scale_of(super::fp8::amax(x)));
    (super::fp8::quantize(x, s), s)
}

/// `xq` (`[rows, k]`, E4M3 values) times `w` (`[n, k]`, E4M3 values) transposed, times `alpha`, plus `b`, appended
/// to `out`.
#[allow(clippy::too_many_arguments)]
fn matmul_fp8_rows(
    op: &str,
    xq: &[f32],
    w: &[f32],
    alpha: f32,
    b: &[f32],
    k: usize,
    n: usize,
    act: i64,
    out: &mut Vec<f32>,
) -> ort::Result<()> {
    let rows = xq.len().checked_div(k).unwrap_or(0);
    let start = out.len();
    out.resize(start + rows * n, 0.0);
    let bad = |e: ndarray::ShapeError| shapes::err(op, format!("tensor data does not match its shape: {e}"));
    let xv = ArrayView2::from_shape((rows, k), xq).map_err(bad)?;
    let wv = ArrayView2::from_shape((n, k), w).map_err(bad)?;
    let mut yv = ArrayViewMut2::from_shape((rows, n), &mut out[start..]).map_err(bad)?;
    general_mat_mul(1.0, &xv, &wv.t(), 0.0, &mut yv);
    for row in out[start..].chunks_exact_mut(n.max(1)) {
        for (y, bias) in row.iter_mut().zip(b) {
            let v = *y * alpha + bias;
            *y = if act == 1 { gelu_tanh(v) } else { v };
        }
    }
    Ok(())
}

pub(crate) struct LinearFp8Cpu {
    activation: i64,
}
impl LinearFp8Cpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        let activation = k.get::<i64>("activation").unwrap_or(0);
        if !(0..=1).contains(&activation) {
            return Err(shapes::err("LinearFp8", format!("activation {activation} is not 0 (none) or 1 (tanh GELU)")));
        }
        // float32 accumulation either way here: the attribute only changes the CUDA kernels' products
        fast_accum("LinearFp8", k)?;
        Ok(Self { activation })
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearFp8";
        let (xs, x) = required(ctx, op, 0)?;
        let (ws, w) = weight8_req(ctx, op, 1)?;
        let w_scale = scale_req(ctx, op, 2)?;
        let (bs, b) = required(ctx, op, 3)?;
        let (rows, k, n) = shapes::linear_nk(op, &xs, &ws, &bs)?;
        let (xq, x_scale) = quantize_x(&x, scale(ctx, op, 4)?);
        let mut y = Vec::with_capacity(rows * n);
        matmul_fp8_rows(op, &xq, &w, x_scale * w_scale, &b, k, n, self.activation, &mut y)?;
        let mut shape = xs.clone();
        *shape.last_mut().unwrap_or(&mut 0) = n as i64;
        write(ctx, op, 0, shape, &y)
    }
}

/// The feed-forward's two FP8 products with stored activation scales: `x, w1, w1_scale, b1, w2, w2_scale, b2,
/// x_scale, h_scale`; `y = LinearFp8(LinearFp8(x, w1, .., x_scale, GELU), w2, .., h_scale)`. What
/// `fused_kernels.py --fp8-merge-mlp` writes for a GELU `LinearFp8` whose only reader is a second `LinearFp8`. The
/// values of the two nodes to the bit (the GELU output rounded to float16, as the graph's tensor between them was,
/// then quantized with `h_scale`); the CUDA kernel writes that product in E4M3 straight from cuBLASLt instead.
pub(crate) struct MlpFp8Cpu;
impl MlpFp8Cpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        fast_accum("MlpFp8", k)?;
        Ok(Self)
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "MlpFp8";
        let (xs, x) = required(ctx, op, 0)?;
        let (w1s, w1) = weight8_req(ctx, op, 1)?;
        let w1_scale = scale_req(ctx, op, 2)?;
        let (b1s, b1) = required(ctx, op, 3)?;
        let (w2s, w2) = weight8_req(ctx, op, 4)?;
        let w2_scale = scale_req(ctx, op, 5)?;
        let (b2s, b2) = required(ctx, op, 6)?;
        let stored = |i: usize, what: &str| {
            scale(ctx, op, i)?.ok_or_else(|| {
                shapes::err(op, format!("input {i} ({what}) is missing: MlpFp8 needs stored activation scales"))
            })
        };
        let (x_scale, h_scale) = (stored(7, "x_scale")?, stored(8, "h_scale")?);
        let (rows, k, n1) = shapes::linear_nk(op, &xs, &w1s, &b1s)?;
        let mut hs = xs.clone();
        *hs.last_mut().unwrap_or(&mut 0) = n1 as i64;
        let (_, _, n2) = shapes::linear_nk(op, &hs, &w2s, &b2s)?;
        let (xq, _) = quantize_x(&x, Some(x_scale));
        let mut h = Vec::with_capacity(rows * n1);
        matmul_fp8_rows(op, &xq, &w1, x_scale * w1_scale, &b1, k, n1, 1, &mut h)?;
        // the two-node graph's float16 tensor between the products
        for v in h.iter_mut() {
            *v = f16::from_f32(*v).to_f32();
        }
        let (hq, _) = quantize_x(&h, Some(h_scale));
        let mut y = Vec::with_capacity(rows * n2);
        matmul_fp8_rows(op, &hq, &w2, h_scale * w2_scale, &b2, n1, n2, 0, &mut y)?;
        let mut shape = xs;
        *shape.last_mut().unwrap_or(&mut 0) = n2 as i64;
        write(ctx, op, 0, shape, &y)
    }
}

pub(crate) struct LinearConcatFp8Cpu;
impl LinearConcatFp8Cpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        fast_accum("LinearConcatFp8", k)?;
        Ok(Self)
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcatFp8";
        let (xas, xa) = required(ctx, op, 0)?;
        let (was, wa) = weight8_req(ctx, op, 1)?;
        let wa_scale = scale_req(ctx, op, 2)?;
        let (bas, ba) = required(ctx, op, 3)?;
        let (xbs, xb) = required(ctx, op, 4)?;
        let (wbs, wb) = weight8_req(ctx, op, 5)?;
        let wb_scale = scale_req(ctx, op, 6)?;
        let (bbs, bb) = required(ctx, op, 7)?;
        let (t_wa, t_wb) = (shapes::nk_to_kn(&was), shapes::nk_to_kn(&wbs));
        let (batch, sa, sb, k, kb, n) = shapes::linear_concat(&xas, &t_wa, &bas, &xbs, &t_wb, &bbs)?;
        let (xaq, xa_scale) = quantize_x(&xa, scale(ctx, op, 8)?);
        let (xbq, xb_scale) = quantize_x(&xb, scale(ctx, op, 9)?);
        let mut y = Vec::with_capacity(batch * (sa + sb) * n);
        for bi in 0..batch {
            let (ra, rb) = (&xaq[bi * sa * k..(bi + 1) * sa * k], &xbq[bi * sb * kb..(bi + 1) * sb * kb]);
            matmul_fp8_rows(op, ra, &wa, xa_scale * wa_scale, &ba, k, n, 0, &mut y)?;
            matmul_fp8_rows(op, rb, &wb, xb_scale * wb_scale, &bb, kb, n, 0, &mut y)?;
        }
        write(ctx, op, 0, vec![batch as i64, (sa + sb) as i64, n as i64], &y)
    }
}

/// Three `LinearConcatFp8` products of the same two activations (the joint attention's q, k and v), which are
/// quantized once: inputs `xa, xb`, then for each product `wa, wa_scale, ba, wb, wb_scale, bb`, then the stored
/// scales `xa_scale?, xb_scale?`; outputs the three products. The values of three `LinearConcatFp8` nodes, which
/// quantize the same activation to the same bytes three times.
pub(crate) struct LinearConcat3Fp8Cpu;
impl LinearConcat3Fp8Cpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        fast_accum("LinearConcat3Fp8", k)?;
        Ok(Self)
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearConcat3Fp8";
        let (xas, xa) = required(ctx, op, 0)?;
        let (xbs, xb) = required(ctx, op, 1)?;
        let (xaq, xa_scale) = quantize_x(&xa, scale(ctx, op, 20)?);
        let (xbq, xb_scale) = quantize_x(&xb, scale(ctx, op, 21)?);
        for j in 0..3 {
            let i = 2 + 6 * j;
            let (was, wa) = weight8_req(ctx, op, i)?;
            let wa_scale = scale_req(ctx, op, i + 1)?;
            let (bas, ba) = required(ctx, op, i + 2)?;
            let (wbs, wb) = weight8_req(ctx, op, i + 3)?;
            let wb_scale = scale_req(ctx, op, i + 4)?;
            let (bbs, bb) = required(ctx, op, i + 5)?;
            let (t_wa, t_wb) = (shapes::nk_to_kn(&was), shapes::nk_to_kn(&wbs));
            let (batch, sa, sb, k, kb, n) = shapes::linear_concat(&xas, &t_wa, &bas, &xbs, &t_wb, &bbs)?;
            let mut y = Vec::with_capacity(batch * (sa + sb) * n);
            for bi in 0..batch {
                let (ra, rb) = (&xaq[bi * sa * k..(bi + 1) * sa * k], &xbq[bi * sb * kb..(bi + 1) * sb * kb]);
                matmul_fp8_rows(op, ra, &wa, xa_scale * wa_scale, &ba, k, n, 0, &mut y)?;
                matmul_fp8_rows(op, rb, &wb, xb_scale * wb_scale, &bb, kb, n, 0, &mut y)?;
            }
            write(ctx, op, j, vec![batch as i64, (sa + sb) as i64, n as i64], &y)?;
        }
        Ok(())
    }
}

pub(crate) struct LinearSplitFp8Cpu;
impl LinearSplitFp8Cpu {
    fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
        fast_accum("LinearSplitFp8", k)?;
        Ok(Self)
    }

    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = "LinearSplitFp8";
        let (xs, x) = required(ctx, op, 0)?;
        let (was, wa) = weight8_req(ctx, op, 1)?;
        let wa_scale = scale_req(ctx, op, 2)?;
        let (bas, ba) = required(ctx, op, 3)?;
        let wb = weight8(ctx, op, 4)?;
        let wb_scale = scale(ctx, op, 5)?;
        let bb = input(ctx, op, 6)?;
        let like = ctx.input(7)?.ok_or_else(|| shapes::err(op, "input 7 (like_a) is missing"))?;
        let like_shape = like.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        let (batch, s, sa, k, na) = shapes::linear_split(&xs, &shapes::nk_to_kn(&was), &bas, &like_shape)?;
        let sb = s - sa;
        // one scale for the whole x (both row ranges): one amax pass
        let (xq, x_scale) = quantize_x(&x, scale(ctx, op, 8)?);
        let mut ya = Vec::with_capacity(batch * sa * na);
        for bi in 0..batch {
            let base = bi * s * k;
            matmul_fp8_rows(op, &xq[base..base + sa * k], &wa, x_scale * wa_scale, &ba, k, na, 0, &mut ya)?;
        }
        write(ctx, op, 0, vec![batch as i64, sa as i64, na as i64], &ya)?;
        match (wb, wb_scale, bb) {
            (Some((wbs, wb)), Some(wb_scale), Some((bbs, bb))) => {
                let (_, _, nb) = shapes::linear_nk(op, &xs, &wbs, &bbs)?;
                let mut yb = Vec::with_capacity(batch * sb * nb);
                for bi in 0..batch {
                    let base = bi * s * k + sa * k;
                    matmul_fp8_rows(op, &xq[base..base + sb * k], &wb, x_scale * wb_scale, &bb, k, nb, 0, &mut yb)?;
                }
                write(ctx, op, 1, vec![batch as i64, sb as i64, nb as i64], &yb)
            }
            (None, None, None) => Ok(()),
            _ => Err(shapes::err(op, "wb, wb_scale and bb (inputs 4-6) go together: give all three or none")),
        }
    }
}

/// The element types `EulerStep*` reads `v` in and writes `hidden` in, converted a slice at a time (`half`'s slice
/// conversions use the CPU's F16C instructions where it has them: one value at a time they were 5x slower than
/// ONNX Runtime's stock graph at SD3's 1024x1024 latents).
trait StepElem: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static {
    const TYPE: TensorElementType;
    /// The values themselves when they are float32 (no conversion to make).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]>;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
}
impl StepElem for f16 {
    const TYPE: TensorElementType = TensorElementType::Float16;
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst); // exact
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src); // round to nearest even, as ONNX Runtime's Cast
    }
}
impl StepElem for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]> {
        Some(dst)
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

/// The `guidance` attribute of `EulerStep*`: 0 or 1.
pub(crate) fn step_guidance(op: &str, k: &KernelContext<'_>) -> ort::Result<bool> {
    match k.get::<i64>("guidance").unwrap_or(0) {
        0 => Ok(false),
        1 => Ok(true),
        g => Err(shapes::err(op, format!("guidance {g} is not 0 (none) or 1 (classifier-free guidance)"))),
    }
}

/// The device loop's Euler step on the CPU (see `mod.rs`): every value as the stock step graph computes it, in
/// the same order, each operation rounded on its own (Rust never contracts `a + b * c` into a fused multiply-add).
fn euler_step<T: StepElem>(op: &str, guidance: bool, ctx: &ComputeContext) -> ort::Result<()> {
    let input = |i: usize| ctx.input(i)?.ok_or_else(|| shapes::err(op, format!("input {i} is missing")));
    let (x_in, v_in, s_in) = (input(0)?, input(1)?, input(2)?);
    let (xs, x) = x_in.try_extract_tensor::<f32>().map_err(|e| shapes::err(op, format!("x: {e}")))?;
    let (vs, v) = v_in.try_extract_tensor::<T>().map_err(|e| shapes::err(op, format!("v: {e}")))?;
    let (_, s) = s_in.try_extract_tensor::<f32>().map_err(|e| shapes::err(op, format!("s: {e}")))?;
    let total = shapes::euler_step(op, xs, vs, s, guidance)?;
    let (g, dt) = if guidance { (s[0], s[1]) } else { (0.0, s[0]) };
    if x.len() != total || v.len() != total * if guidance { 2 } else { 1 } {
        return Err(shapes::err(op, "tensor data does not match its shape"));
    }
    // Both outputs are written in the one pass (x_next, then hidden's first half, copied to the second half with
    // guidance).
    let (Some(mut xo), Some(mut ho)) = (ctx.output(0, xs.to_vec())?, ctx.output(1, vs.to_vec())?) else {
        return Err(shapes::err(op, "both outputs (x_next, hidden) are needed"));
    };
    let (_, x_next) = xo.try_extract_tensor_mut::<f32>().map_err(|e| shapes::err(op, format!("x_next: {e}")))?;
    let (_, hidden) = ho.try_extract_tensor_mut::<T>().map_err(|e| shapes::err(op, format!("hidden: {e}")))?;
    if x_next.len() != total || hidden.len() != v.len() {
        return Err(shapes::err(op, "output buffers do not match the inputs' shapes"));
    }
    let (first, second) = hidden.split_at_mut(total);
    if let (Some(vf), Some(hf)) = (T::as_f32(v), T::as_f32_mut(&mut *first)) {
        // float32: no conversions, one pass
        for e in 0..total {
            let guided = if guidance { vf[e] + g * (vf[e + total] - vf[e]) } else { vf[e] };
            let xn = x[e] + dt * guided;
            x_next[e] = xn;
            hf[e] = xn;
        }
        if guidance {
            second.copy_from_slice(first);
        }
        return Ok(());
    }
    // In chunks: v's two halves widened to float32, the step, x_next narrowed into hidden.
    const CHUNK: usize = 4096;
    let (mut u, mut c) = (vec![0f32; CHUNK.min(total)], vec![0f32; CHUNK.min(total)]);
    let mut start = 0;
    while start < total {
        let len = CHUNK.min(total - start);
        let (u, c) = (&mut u[..len], &mut c[..len]);
        T::to_f32_slice(&v[start..start + len], u);
        if guidance {
            T::to_f32_slice(&v[total + start..total + start + len], c);
            for (u, c) in u.iter_mut().zip(c.iter()) {
                *u += g * (c - *u); // guided = u + g * (c - u)
            }
        }
        let xn = &mut x_next[start..start + len];
        for ((xn, x), guided) in xn.iter_mut().zip(&x[start..start + len]).zip(u.iter()) {
            *xn = x + dt * guided;
        }
        T::from_f32_slice(xn, &mut first[start..start + len]);
        start += len;
    }
    if guidance {
        second.copy_from_slice(first);
    }
    Ok(())
}

const F32: TensorElementType = TensorElementType::Float32;

macro_rules! step_op {
    ($ty:ident, $name:literal, $elem:ty, $kernel:ident) => {
        pub(crate) struct $kernel {
            guidance: bool,
        }
        impl $kernel {
            fn new(k: &KernelContext<'_>) -> ort::Result<Self> {
                Ok(Self { guidance: step_guidance($name, k)? })
            }
            fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
                euler_step::<$elem>($name, self.guidance, ctx)
            }
        }
        cpu_op!(
            $ty,
            $name,
            [
                OperatorInput::required(F32),
                OperatorInput::required(<$elem as StepElem>::TYPE),
                OperatorInput::required(F32)
            ],
            [OperatorOutput::required(F32), OperatorOutput::required(<$elem as StepElem>::TYPE)],
            $kernel
        );
    };
}

step_op!(EulerStepF16Op, "EulerStepF16", f16, EulerStepF16Cpu);
step_op!(EulerStepF32Op, "EulerStepF32", f32, EulerStepF32Cpu);
