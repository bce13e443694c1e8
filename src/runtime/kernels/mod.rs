//! Fused operators for the transformer graphs that `models/export/export_sd3.py --fused-kernels` writes (ONNX
//! domain `sd3onnx`, version 1).
//!
//! ONNX Runtime's stock CUDA operators leave the MMDiT's bias additions, gates, residual additions, adaLN
//! modulations and the joint-attention concatenations as separate passes over the activations (about a third of
//! a 1024x1024 step on an H200, `docs/performance.md`). These operators fold them into the matrix products
//! (cuBLASLt epilogues) and one normalisation kernel:
//!
//! | operator | computes |
//! |---|---|
//! | `Linear(x, w, b)`, attribute `activation` (0 none, 1 tanh-GELU) | `act(x @ w + b)` |
//! | `LinearConcat(xa, wa, ba, xb, wb, bb)` | per batch row `[xa @ wa + ba ; xb @ wb + bb]` (the joint attention's q, k, v) |
//! | `LinearSplit(x, wa, ba, wb?, bb?, like_a)` | `x[:, :Sa] @ wa + ba` and `x[:, Sa:] @ wb + bb`, `Sa = like_a.shape[1]` |
//! | `ModNorm(h, y?, gate_mod?, norm_mod)`, attributes `gate_offset`, `shift_offset`, `scale_offset`, `epsilon` | `h' = h + gate * y`; `LayerNorm(h') * (1 + scale) + shift` |
//!
//! | `HeadRmsNorm(x, w_a, w_b, like_a)`, attribute `epsilon` | SD3.5's q/k RMS-norm per head of the joint tensor: `w_a` on the first `like_a.shape[1]` rows of each batch (image), `w_b` on the rest (context) |
//!
//! FP8 (issue 19; `fused_kernels.py --fp8`, `fp8.rs`): E4M3 weights as UINT8 `[N, K]` bytes with a float32
//! per-tensor scale each; activations quantized to E4M3 per tensor with `amax / 448` computed on the fly, or with a
//! stored scale (the optional last inputs); `y = (q_x @ q_w^T) * (x_scale * w_scale) + b`:
//!
//! | operator | inputs |
//! |---|---|
//! | `LinearFp8`, attribute `activation` | `x, w, w_scale, b, x_scale?` |
//! | `LinearConcatFp8` | `xa, wa, wa_scale, ba, xb, wb, wb_scale, bb, xa_scale?, xb_scale?` |
//! | `LinearSplitFp8` | `x, wa, wa_scale, ba, wb?, wb_scale?, bb?, like_a, x_scale?` (one scale for all of `x`) |
//! | `LinearConcat3Fp8` | `xa, xb`, then three times `wa, wa_scale, ba, wb, wb_scale, bb`, then `xa_scale?, xb_scale?`: three `LinearConcatFp8` products of the same activations (the joint attention's q, k, v), which are quantized once; three outputs |
//! | `MlpFp8` | `x, w1, w1_scale, b1, w2, w2_scale, b2, x_scale, h_scale`: the feed-forward, `LinearFp8(LinearFp8(x, w1, .., x_scale, GELU), w2, .., h_scale)`, with stored scales only; on CUDA the first product writes E4M3 for the second (no float16 tensor between them, no quantization pass) |
//!
//! Every FP8 operator takes the attribute `fast_accum` (0, the default, or 1; [`fast_accum`]): with 1 the CUDA
//! kernels ask cuBLASLt for fast accumulation (`fused_kernels.py --fp8-fast-accum`); the CPU kernels check it and
//! compute as before.
//!
//! The device loop's Euler step (src/runtime/step.rs, `fused_step_graph`; issue 19: our time outside ONNX Runtime),
//! one node instead of the stock step graph's ten:
//!
//! | operator | computes |
//! |---|---|
//! | `EulerStepF16(x, v, s)` / `EulerStepF32(x, v, s)`, attribute `guidance` (0 or 1) | `guided = u + g * (c - u)` (`v` = `[u; c]`, `s` = `[g, dt]`) or `guided = v` (`s` = `[dt]`); `x_next = x + dt * guided` (float32); `hidden` = `x_next` as `v`'s type, twice along the batch with guidance |
//!
//! `x` and `x_next` are float32, `v` and `hidden` float16 (`F16`) or float32 (`F32`); `s` stays in host memory
//! (a CPU input, so no copy to the GPU per step). Every value is computed as the stock graph computes it, each
//! operation rounded on its own (no fused multiply-add), so the two give the same bits on the CPU.
//!
//! `gate`, `shift` and `scale` are slices `[offset, offset + D)` of the per-sample modulation vectors
//! (`[B, k * D]`, the outputs of the adaLN linear layers), so the graph needs no Slice or Unsqueeze for them.
//! Every operator has a CPU implementation (float16 in and out, float32 arithmetic) so that a fused graph runs,
//! and is tested, anywhere; with the `cuda` feature the CUDA versions run on the CUDA execution provider's
//! stream: cuBLASLt for the products (bias and GELU in the epilogue), one kernel of our own for `ModNorm`
//! (`mod_norm.cu`, shipped as PTX).
//!
//! Every kernel's `compute` runs its body through [`guarded`]: a panic in a kernel becomes the node's error (and so
//! `Sd3Pipeline::generate`'s), never an unwind into ONNX Runtime, which would abort the process.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod fp8;

use std::panic::{catch_unwind, AssertUnwindSafe};

use ort::operator::OperatorDomain;

/// The ONNX domain of our fused operators.
pub const DOMAIN: &str = "sd3onnx";

/// The operator domain to register on every session: CPU kernels always, CUDA kernels with the `cuda` feature.
pub(crate) fn domain() -> ort::Result<OperatorDomain> {
    let d = OperatorDomain::new(DOMAIN)?
        .add(cpu::LinearOp)?
        .add(cpu::LinearConcatOp)?
        .add(cpu::LinearSplitOp)?
        .add(cpu::ModNormOp)?
        .add(cpu::HeadRmsNormOp)?
        .add(cpu::LinearFp8Op)?
        .add(cpu::LinearConcatFp8Op)?
        .add(cpu::LinearSplitFp8Op)?
        .add(cpu::LinearConcat3Fp8Op)?
        .add(cpu::MlpFp8Op)?
        .add(cpu::EulerStepF16Op)?
        .add(cpu::EulerStepF32Op)?;
    #[cfg(feature = "cuda")]
    let d = d
        .add(cuda::LinearOp)?
        .add(cuda::LinearConcatOp)?
        .add(cuda::LinearSplitOp)?
        .add(cuda::ModNormOp)?
        .add(cuda::HeadRmsNormOp)?
        .add(cuda::LinearFp8Op)?
        .add(cuda::LinearConcatFp8Op)?
        .add(cuda::LinearSplitFp8Op)?
        .add(cuda::LinearConcat3Fp8Op)?
        .add(cuda::MlpFp8Op)?
        .add(cuda::EulerStepF16Op)?
        .add(cuda::EulerStepF32Op)?;
    Ok(d)
}

/// Runs a kernel body, turning a panic into an error that names the operator.
///
/// ONNX Runtime calls kernels through `extern "system"` trampolines (ort's `compute_kernel`); a panic unwinding
/// out of one aborts the whole process. Here it stops at the kernel boundary and ONNX Runtime gets a failed status
/// instead, which `Session::run` returns as an error. `AssertUnwindSafe`: the kernels' state (attributes, plans and
/// scratch handles, each replaced whole) is consistent at every point a panic can happen.
pub(crate) fn guarded(op: &str, body: impl FnOnce() -> ort::Result<()>) -> ort::Result<()> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_string());
        Err(shapes::err(op, format!("the kernel panicked ({msg}); this is a bug in sd3-onnx, please report it")))
    })
}

/// The FP8 operators' `fast_accum` attribute (0, the default, or 1): whether cuBLASLt may accumulate the FP8
/// products in the tensor cores' faster, less precise mode (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`) instead of
/// promoting partial sums to float32 as it goes. Written by `fused_kernels.py --fp8-fast-accum`; the CUDA kernels
/// honour it, the CPU kernels (which accumulate in float32 either way) only check it.
pub(crate) fn fast_accum(op: &str, k: &ort::operator::KernelContext<'_>) -> ort::Result<bool> {
    match k.get::<i64>("fast_accum").unwrap_or(0) {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(shapes::err(op, format!("fast_accum {v} is not 0 (float32 accumulation) or 1 (fast accumulation)"))),
    }
}

/// Shape checks shared by the CPU and CUDA kernels; errors name the operator and what is wrong.
pub(crate) mod shapes {
    use ort::Error;

    pub fn err(op: &str, msg: impl std::fmt::Display) -> Error {
        Error::new(format!("sd3onnx::{op}: {msg}"))
    }

    /// `[.., K] x [K, N]`: returns (rows, K, N).
    pub fn linear(op: &str, x: &[i64], w: &[i64], b: &[i64]) -> ort::Result<(usize, usize, usize)> {
        if x.is_empty() || w.len() != 2 {
            return Err(err(op, format!("expects x [.., K] and w [K, N], got {x:?} and {w:?}")));
        }
        let k = *x.last().unwrap_or(&0);
        if w[0] != k || b != [w[1]] {
            return Err(err(op, format!("x {x:?}, w {w:?} and bias {b:?} do not agree (x[-1] = w[0], bias = [w[1]])")));
        }
        let rows: i64 = x[..x.len() - 1].iter().product();
        Ok((rows as usize, k as usize, w[1] as usize))
    }

    /// `[.., K] x [N, K]^T` (the FP8 operators' weights are stored `[N, K]`, K-major): returns (rows, K, N).
    pub fn linear_nk(op: &str, x: &[i64], w: &[i64], b: &[i64]) -> ort::Result<(usize, usize, usize)> {
        if w.len() != 2 {
            return Err(err(op, format!("expects the E4M3 weight as [N, K], got {w:?}")));
        }
        linear(op, x, &nk_to_kn(w), b).map_err(|_| {
            err(op, format!("x {x:?}, w {w:?} and bias {b:?} do not agree (x[-1] = K, w = [N, K], bias = [N])"))
        })
    }

    /// The shape `[K, N]` of a weight stored `[N, K]` (other ranks unchanged, for the checks to refuse).
    pub fn nk_to_kn(w: &[i64]) -> Vec<i64> {
        match w {
            [n, k] => vec![*k, *n],
            _ => w.to_vec(),
        }
    }

    /// `EulerStep*`'s shapes: `x` `[n, ..]`, `v` `[b, ..]` with the same trailing dimensions and `b = 2n` with
    /// guidance (`[uncond..., cond...]`) or `b = n` without, and `s` holding `[g, dt]` or `[dt]`. Returns the
    /// number of values of `x`.
    pub fn euler_step(op: &str, x: &[i64], v: &[i64], s: &[f32], guidance: bool) -> ort::Result<usize> {
        let want = if guidance { 2 } else { 1 };
        if s.len() != want || s.iter().any(|v| !v.is_finite()) {
            return Err(err(op, format!("s must hold {want} finite float32 scalars, got {s:?}")));
        }
        let ok = !x.is_empty()
            && x.len() == v.len()
            && x[1..] == v[1..]
            && x.iter().all(|d| *d >= 0)
            && v[0] == x[0] * want as i64;
        if !ok {
            let b = if guidance { "2n" } else { "n" };
            return Err(err(
                op,
                format!("x {x:?} and v {v:?} must be [n, ..] and [{b}, ..] with the same trailing dims"),
            ));
        }
        let total: i64 = x.iter().product();
        Ok(total as usize)
    }

    /// A per-tensor FP8 scale (input `i`): one positive finite float32.
    pub fn fp8_scale(op: &str, i: usize, data: &[f32]) -> ort::Result<f32> {
        match data {
            [s] if s.is_finite() && *s > 0.0 => Ok(*s),
            _ => Err(err(op, format!("input {i} must be one positive finite float32 scale, got {data:?}"))),
        }
    }

    /// The head size of a `HeadRmsNorm`: both weights `[H]` with `H` dividing the width `d`.
    pub fn head_norm(op: &str, d: usize, wa: &[i64], wb: &[i64]) -> ort::Result<usize> {
        match (wa, wb) {
            ([h], [hb]) if *h > 0 && h == hb && d.is_multiple_of(*h as usize) => Ok(*h as usize),
            _ => Err(err(op, format!("weights {wa:?} and {wb:?} must both be [H] with H dividing the width {d}"))),
        }
    }

    /// A `[B, S, K]` activation.
    pub fn bsk(op: &str, name: &str, x: &[i64]) -> ort::Result<(usize, usize, usize)> {
        match x {
            [b, s, k] if *b >= 0 && *s >= 0 && *k >= 0 => Ok((*b as usize, *s as usize, *k as usize)),
            _ => Err(err(op, format!("{name} must be [batch, rows, features], got {x:?}"))),
        }
    }

    /// `LinearConcat`'s shapes: (batch, rows of xa, rows of xb, K of xa, K of xb, N).
    pub fn linear_concat(
        xa: &[i64],
        wa: &[i64],
        ba: &[i64],
        xb: &[i64],
        wb: &[i64],
        bb: &[i64],
    ) -> ort::Result<(usize, usize, usize, usize, usize, usize)> {
        let op = "LinearConcat";
        let (batch, sa, ka) = bsk(op, "xa", xa)?;
        let (batch_b, sb, kb) = bsk(op, "xb", xb)?;
        let (_, _, n) = linear(op, xa, wa, ba)?;
        let (_, _, nb) = linear(op, xb, wb, bb)?;
        if batch_b != batch || nb != n {
            return Err(err(op, format!("xa {xa:?} / wa {wa:?} and xb {xb:?} / wb {wb:?} do not concatenate")));
        }
        Ok((batch, sa, sb, ka, kb, n))
    }

    /// `LinearSplit`'s shapes: (batch, rows of x, rows of the first range, K, N of the first range).
    pub fn linear_split(
        x: &[i64],
        wa: &[i64],
        ba: &[i64],
        like_a: &[i64],
    ) -> ort::Result<(usize, usize, usize, usize, usize)> {
        let op = "LinearSplit";
        let (batch, s, k) = bsk(op, "x", x)?;
        let (_, sa, _) = bsk(op, "like_a", like_a)?;
        if sa > s {
            return Err(err(op, format!("like_a has {sa} rows, x only {s}")));
        }
        let (_, _, na) = linear(op, x, wa, ba)?;
        Ok((batch, s, sa, k, na))
    }

    /// Offsets into a `[B, M]` modulation vector for a `[B, S, D]` stream.
    pub fn modulation(op: &str, name: &str, m: &[i64], batch: usize, d: usize, offsets: &[i64]) -> ort::Result<usize> {
        let (mb, mm) = match m {
            [mb, mm] => (*mb as usize, *mm as usize),
            _ => return Err(err(op, format!("{name} must be [batch, k * D], got {m:?}"))),
        };
        if mb != batch {
            return Err(err(op, format!("{name} has batch {mb}, the stream has {batch}")));
        }
        for &o in offsets {
            if o < 0 || o as usize + d > mm {
                return Err(err(op, format!("offset {o} + D {d} is outside {name} of width {mm}")));
            }
        }
        Ok(mm)
    }
}

#[cfg(test)]
mod tests {
    use super::shapes;

    /// `ort::Error` values are ONNX Runtime statuses: the library must be loaded to make one.
    fn ort() {
        crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
    }

    #[test]
    fn linear_shapes_are_checked() {
        ort();
        assert_eq!(shapes::linear("Linear", &[2, 5, 8], &[8, 3], &[3]).unwrap(), (10, 8, 3));
        for (x, w, b) in [
            (vec![2, 5, 8], vec![7, 3], vec![3]), // K mismatch
            (vec![2, 5, 8], vec![8, 3], vec![4]), // bias length
            (vec![2, 5, 8], vec![8], vec![8]),    // weight rank
            (vec![], vec![8, 3], vec![3]),        // scalar x
        ] {
            let e = shapes::linear("Linear", &x, &w, &b).unwrap_err().to_string();
            assert!(e.contains("sd3onnx::Linear"), "{e}");
        }
    }

    #[test]
    fn concat_and_split_shapes_are_checked() {
        ort();
        let (xa, xb, w, b) = ([2, 5, 8], [2, 3, 8], [8, 4], [4]);
        assert_eq!(shapes::linear_concat(&xa, &w, &b, &xb, &w, &b).unwrap(), (2, 5, 3, 8, 8, 4));
        assert!(shapes::linear_concat(&xa, &w, &b, &[1, 3, 8], &w, &b).is_err()); // batch differs
        assert!(shapes::linear_concat(&xa, &w, &b, &xb, &[8, 5], &[5]).is_err()); // widths differ
        assert_eq!(shapes::linear_split(&[2, 8, 8], &w, &b, &[2, 5, 16]).unwrap(), (2, 8, 5, 8, 4));
        assert!(shapes::linear_split(&[2, 8, 8], &w, &b, &[2, 9, 16]).is_err());
        // more rows than x
    }

    #[test]
    fn modulation_offsets_must_fit() {
        ort();
        assert_eq!(shapes::modulation("ModNorm", "norm_mod", &[2, 96], 2, 16, &[0, 80]).unwrap(), 96);
        assert!(shapes::modulation("ModNorm", "norm_mod", &[2, 96], 2, 16, &[81]).is_err());
        assert!(shapes::modulation("ModNorm", "norm_mod", &[2, 96], 2, 16, &[-2]).is_err());
        assert!(shapes::modulation("ModNorm", "norm_mod", &[1, 96], 2, 16, &[0]).is_err());
        assert!(shapes::modulation("ModNorm", "norm_mod", &[2, 96, 1], 2, 16, &[0]).is_err());
    }

    #[test]
    fn head_norm_weights_must_divide_the_width() {
        ort();
        assert_eq!(shapes::head_norm("HeadRmsNorm", 128, &[64], &[64]).unwrap(), 64);
        assert!(shapes::head_norm("HeadRmsNorm", 128, &[64], &[32]).is_err());
        assert!(shapes::head_norm("HeadRmsNorm", 100, &[64], &[64]).is_err());
        assert!(shapes::head_norm("HeadRmsNorm", 128, &[0], &[0]).is_err());
    }

    #[test]
    fn a_panicking_kernel_body_becomes_an_error() {
        ort();
        let e = super::guarded("Linear", || panic!("index out of bounds: the len is 3 but the index is 7"));
        let msg = e.expect_err("a panic must become an error").to_string();
        assert!(msg.contains("sd3onnx::Linear"), "{msg}");
        assert!(msg.contains("the kernel panicked (index out of bounds: the len is 3 but the index is 7)"), "{msg}");
        // Formatted panic messages (String payloads) too; bodies that return normally are passed through.
        let n = 7;
        let e = super::guarded("ModNorm", || panic!("row {n}")).unwrap_err().to_string();
        assert!(e.contains("sd3onnx::ModNorm") && e.contains("(row 7)"), "{e}");
        assert!(super::guarded("ModNorm", || Ok(())).is_ok());
        let e = super::guarded("ModNorm", || Err(shapes::err("ModNorm", "bad shape"))).unwrap_err().to_string();
        assert!(e.contains("bad shape") && !e.contains("panicked"), "{e}");
    }

    /// Through ONNX Runtime's real trampoline: a kernel that panics in a running session fails the generation with
    /// an error naming the operator (before issue 15 the process aborted), and the pipeline works afterwards.
    #[test]
    fn a_kernel_panic_inside_a_session_fails_the_run_not_the_process() {
        use std::sync::atomic::Ordering::SeqCst;
        ort();
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures");
        let dir = std::env::temp_dir().join(format!("sd3onnx-kernel-panic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&fixtures.join("tiny-sd3"), &dir);
        std::fs::copy(
            fixtures.join("export-tiny-fp16-fused/transformer/model.onnx"),
            dir.join("transformer/model.onnx"),
        )
        .unwrap();
        let mut pipe = crate::Sd3Pipeline::builder(&dir).build().unwrap();
        let req = crate::GenerationRequest::new("a red circle").size(64, 64).steps(2).seed(3);
        let good = pipe.generate(&req).unwrap().images;
        super::cpu::PANIC_IN_LINEAR.store(true, SeqCst);
        let e = pipe.generate(&req);
        super::cpu::PANIC_IN_LINEAR.store(false, SeqCst);
        let msg = e.expect_err("the run must fail").to_string();
        assert!(msg.contains("sd3onnx::Linear") && msg.contains("test panic inside the Linear kernel"), "{msg}");
        assert_eq!(pipe.generate(&req).unwrap().images, good, "the pipeline must work after a kernel panic");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// `models/fixtures` of this repository: `SD3ONNX_REPO/models/fixtures` when that variable is set (a test binary
    /// carried to another machine, scripts/gpu/fp8.sh), else the source folder it was built from.
    fn fixtures() -> std::path::PathBuf {
        std::env::var_os("SD3ONNX_REPO")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("models/fixtures")
    }

    /// `models/fixtures/fp8/<stem>.txt/.bin` (models/export/make_fp8_fixtures.py): named float32 tensors.
    fn fp8_tensors(stem: &str) -> Vec<(String, ndarray::ArrayD<f32>)> {
        let dir = fixtures().join("fp8");
        let index = std::fs::read_to_string(dir.join(format!("{stem}.txt"))).unwrap();
        let bin = std::fs::read(dir.join(format!("{stem}.bin"))).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        // "#f16" on the first line: float16 values (make_fp8_fixtures.py's node fixtures), else float32
        let half = index.starts_with("#f16");
        let size = if half { 2 } else { 4 };
        for line in index.lines().filter(|l| !l.starts_with('#')) {
            let mut f = line.split(' ');
            let name = f.next().unwrap().to_string();
            let shape: Vec<usize> = f.filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = bin[at..at + size * n]
                .chunks_exact(size)
                .map(|c| match c {
                    [a, b] => half::f16::from_le_bytes([*a, *b]).to_f32(),
                    [a, b, c, d] => f32::from_le_bytes([*a, *b, *c, *d]),
                    _ => unreachable!(),
                })
                .collect();
            at += size * n;
            out.push((name, ndarray::ArrayD::from_shape_vec(shape, v).unwrap()));
        }
        assert_eq!(at, bin.len(), "{stem}.bin has more data than {stem}.txt lists");
        out
    }

    /// Runs `graph` (relative to models/fixtures) on the CPU with the fixture's first `inputs` tensors and returns
    /// (name, ours, the Python emulation's) for each output.
    fn run_fp8_fixture(
        graph: &str,
        stem: &str,
        inputs: usize,
    ) -> Vec<(String, ndarray::ArrayD<f32>, ndarray::ArrayD<f32>)> {
        run_fp8_fixture_on(graph, stem, inputs, &crate::ExecutionProvider::Cpu)
    }

    fn run_fp8_fixture_on(
        graph: &str,
        stem: &str,
        inputs: usize,
        provider: &crate::ExecutionProvider,
    ) -> Vec<(String, ndarray::ArrayD<f32>, ndarray::ArrayD<f32>)> {
        use crate::runtime::graph::{Graph, Input, SessionConfig};
        let env = crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let path = fixtures().join(graph);
        let mut g = Graph::load(&env, crate::Component::Transformer, &path, provider, &SessionConfig::default())
            .unwrap_or_else(|e| panic!("{graph}: {e}"));
        let tensors = fp8_tensors(stem);
        let feeds: Vec<(&str, Input<'_>)> =
            tensors[..inputs].iter().map(|(n, a)| (n.as_str(), Input::Float(a.view()))).collect();
        let wanted: Vec<&str> = tensors[inputs..].iter().map(|(n, _)| n.as_str()).collect();
        let got = g.run(&feeds, &wanted).unwrap_or_else(|e| panic!("{graph}: {e}"));
        tensors[inputs..].iter().zip(got).map(|((n, want), got)| (n.clone(), got, want.clone())).collect()
    }

    /// (max |a - b|, max |a - b| / (|b| + 1), mean |a - b|); a value of `a` that is not finite (a NaN from an FP8
    /// conversion that does not saturate, say) counts as an infinite difference, so no bound passes it.
    fn diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> (f32, f32, f32) {
        assert_eq!(a.shape(), b.shape());
        let gap = |x: f32, y: f32| if x.is_finite() { (x - y).abs() } else { f32::INFINITY };
        let d: Vec<(f32, f32)> = a.iter().zip(b).map(|(x, y)| (gap(*x, *y), y.abs())).collect();
        let max = d.iter().fold(0.0f32, |m, (v, _)| m.max(*v));
        let rel = d.iter().fold(0.0f32, |m, (v, y)| m.max(v / (y + 1.0)));
        (max, rel, d.iter().map(|(v, _)| v).sum::<f32>() / d.len().max(1) as f32)
    }

    /// The FP8 operators' CPU kernels in a real ONNX Runtime session equal the Python emulation with torch's
    /// float8_e4m3fn casts (models/export/fused_reference.py) on one node of each (models/fixtures/fp8/ops.onnx:
    /// K = 64, activations with outliers, dynamic scales, and a stored scale small enough that values saturate).
    /// Only the float32 accumulation order differs, so the float16 outputs may differ by one float16 rounding step:
    /// measured max |diff| FP8_OPS_MEASURED; allowed 2^-9 * (|y| + 1) (two float16 steps at |y| < 1).
    #[test]
    fn fp8_operators_match_the_python_emulation() {
        ort();
        for (name, got, want) in run_fp8_fixture("fp8/ops.onnx", "ops", 2) {
            let (max, rel, mean) = diff(&got, &want);
            eprintln!("fp8/ops.onnx {name}: max {max:e}, max relative {rel:e}, mean {mean:e}");
            assert!(rel <= 1.0 / 512.0, "{name}: CPU kernels differ from the Python emulation by {max} (mean {mean})");
        }
    }

    /// `fast_accum` (`fused_kernels.py --fp8-fast-accum`: cuBLASLt's fast accumulation on CUDA) leaves the CPU
    /// kernels' values as they are: fp8/ops_fast.onnx (ops.onnx with fast_accum=1 on its four FP8 nodes) gives
    /// ops.onnx's outputs to the bit; fast_accum=2 (fp8/ops_bad_accum.onnx) is refused when the session is made,
    /// with an error that names the attribute.
    #[test]
    fn fp8_fast_accumulation_keeps_the_cpu_values_and_bad_values_are_refused() {
        ort();
        let plain = run_fp8_fixture("fp8/ops.onnx", "ops", 2);
        let fast = run_fp8_fixture("fp8/ops_fast.onnx", "ops", 2);
        for ((name, a, _), (_, b, _)) in plain.iter().zip(&fast) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}: fast_accum=1 changed the CPU kernels' output");
        }
        use crate::runtime::graph::{Graph, SessionConfig};
        let env = crate::runtime::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
        let path = fixtures().join("fp8/ops_bad_accum.onnx");
        let cpu = crate::ExecutionProvider::Cpu;
        let e = Graph::load(&env, crate::Component::Transformer, &path, &cpu, &SessionConfig::default())
            .expect_err("fast_accum=2 must be refused");
        let msg = e.to_string();
        assert!(msg.contains("fast_accum 2 is not 0"), "{msg}");
    }

    /// `MlpFp8` (`fused_kernels.py --fp8-merge-mlp`: a feed-forward's two FP8 products with stored scales as one
    /// node) gives the two `LinearFp8` nodes' output to the bit through the CPU kernels (fp8/mlp.onnx and
    /// fp8/mlp_merged.onnx, made by make_fp8_fixtures.py; 28 of the GELU output's values saturate at the second
    /// product's stored scale), and both equal the Python emulation within the operator test's bound.
    #[test]
    fn fp8_merged_feed_forward_equals_the_two_nodes_to_the_bit() {
        ort();
        let nodes = run_fp8_fixture("fp8/mlp.onnx", "mlp", 1);
        let merged = run_fp8_fixture("fp8/mlp_merged.onnx", "mlp", 1);
        for ((name, a, want), (_, b, _)) in nodes.iter().zip(&merged) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let (max, rel, mean) = diff(b, want);
            eprintln!("fp8/mlp_merged.onnx {name}: equal to the two nodes' {same}; vs the emulation max {max:e}, relative {rel:e}, mean {mean:e}");
            assert!(same, "{name}: MlpFp8 differs from the two LinearFp8 nodes");
            assert!(rel <= 1.0 / 512.0, "{name}: differs from the Python emulation by {max} (relative {rel})");
        }
    }

    /// Node by node on the transformer's real activations: every FP8 node of export-tiny-fp16-fused-fp8 alone
    /// (models/fixtures/fp8/export-tiny-fp16-fused-fp8-nodes.onnx: 6 LinearConcatFp8, 6 LinearFp8 (3 with GELU), 2
    /// LinearSplitFp8, one of them without the context range), fed the activations each read in the Python
    /// emulation's run of the whole graph, against the outputs the emulation gave. Free of the graph's other
    /// operators, so as strict as the operator test: measured 0 difference on 14 of the 15 outputs and one float16
    /// step (1.2e-4) on one element of the context feed-forward's GELU output; allowed 2^-9 relative. E4M3 ties
    /// rounded away from zero instead of to even (sabotage) fail it (ff2_ctx 7.3e-3, relative 5.9e-3), which the
    /// whole-transformer comparison below cannot see.
    #[test]
    fn fp8_kernels_match_the_emulation_node_by_node_on_real_activations() {
        ort();
        let stem = "export-tiny-fp16-fused-fp8-nodes";
        let results = run_fp8_fixture(&format!("fp8/{stem}.onnx"), stem, 14);
        assert_eq!(results.len(), 15);
        for (name, got, want) in results {
            let (max, rel, mean) = diff(&got, &want);
            eprintln!("{stem} {name}: max {max:e}, max relative {rel:e}, mean {mean:e}");
            assert!(rel <= 1.0 / 512.0, "{name}: CPU kernels differ from the Python emulation by {max} (mean {mean})");
        }
    }

    /// Whole FP8 transformers (`fused_kernels.py --fp8` of the tiny fused fixtures) through the CPU kernels against
    /// the Python emulation of the same graph on the same inputs (models/fixtures/fp8/<fixture>.bin; the FP8
    /// operators as in `fp8_operators_match_the_python_emulation`, the graph's other operators from ONNX's numpy
    /// reference implementations). Those other operators already differ from ONNX Runtime's by float16 rounding
    /// steps: the float16 fused graphs, same inputs, differ from their numpy runs by max 7.8e-3 / mean 1.1e-3
    /// (export-tiny-fp16-fused) and 2.0e-3 / 2.9e-4 (dual). In the FP8 graphs such a step now and then moves an
    /// activation across an E4M3 rounding boundary (a 1/16 step), so the same sources differ more: measured max
    /// 8.2e-2 / mean 7.0e-3 (outputs of mean magnitude 2.2) and 8.8e-3 / 1.4e-3 (0.52). Checked: the mean stays
    /// below 0.6 times what FP8 itself moves the output (the emulated FP8 graph against the emulated float16 graph:
    /// mean 1.8e-2 and 3.8e-3), and max / mean within 1.5 times the measured values. The arithmetic itself is
    /// checked exactly by `fp8_operators_match_the_python_emulation`.
    #[test]
    fn fp8_transformers_match_the_python_emulation() {
        ort();
        // (fixture, FP8's own effect on the emulated output (mean), allowed max, allowed mean)
        for (fixture, fp8_effect, max_ok, mean_ok) in [
            ("export-tiny-fp16-fused", 1.83e-2, 0.12, 1.05e-2),
            ("export-tiny-dual-fp16-fused", 3.81e-3, 1.3e-2, 2.1e-3),
        ] {
            let stem = format!("{fixture}-numpy");
            for (name, got, want) in run_fp8_fixture(&format!("{fixture}/transformer/model.onnx"), &stem, 4) {
                let (max, _, mean) = diff(&got, &want);
                eprintln!("{fixture} (float16, no FP8) {name} vs numpy: max {max:e}, mean {mean:e}");
            }
            let fp8 = format!("{fixture}-fp8");
            for (name, got, want) in run_fp8_fixture(&format!("{fp8}/transformer/model.onnx"), &fp8, 4) {
                let (max, _, mean) = diff(&got, &want);
                eprintln!("{fp8} {name} vs the Python emulation: max {max:e}, mean {mean:e}");
                assert!(
                    max <= max_ok && mean <= mean_ok && mean < 0.6 * fp8_effect,
                    "{fp8}: the CPU kernels differ from the Python emulation by {max} (mean {mean}); allowed \
                     {max_ok} (mean {mean_ok} and below 0.6 x FP8's own effect {fp8_effect})"
                );
            }
        }
    }

    /// `LinearConcat3Fp8` (each block's q, k and v in one node, the activations quantized once; what
    /// `fused_kernels.py --fp8` writes since `share_qkv_fp8`) gives the three `LinearConcatFp8` nodes' output to
    /// the bit through the CPU kernels: the two tiny FP8 transformers and their merged copies
    /// (models/fixtures/*-fp8-qkv, made by make_fp8_fixtures.py) on the same inputs.
    #[test]
    fn fp8_merged_qkv_equals_three_separate_nodes_to_the_bit() {
        ort();
        for fixture in ["export-tiny-fp16-fused-fp8", "export-tiny-dual-fp16-fused-fp8"] {
            let merged = format!("{fixture}-qkv/transformer/model.onnx");
            let graph = std::fs::read_to_string(fixtures().join(format!("{fixture}-qkv/manifest.json")))
                .expect("the merged fixture's manifest");
            assert!(graph.contains("\"fp8_qkv_merged\""), "{fixture}-qkv: not made by share_qkv_fp8");
            let separate = run_fp8_fixture(&format!("{fixture}/transformer/model.onnx"), fixture, 4);
            let joined = run_fp8_fixture(&merged, fixture, 4);
            for ((name, a, _), (_, b, want)) in separate.iter().zip(&joined) {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                let (max, _, mean) = diff(b, want);
                eprintln!("{fixture}-qkv {name}: equal to the separate nodes' {same}; vs the emulation max {max:e}, mean {mean:e}");
                assert!(same, "{fixture}: the merged q/k/v graph's output differs from the separate nodes'");
            }
        }
    }

    /// On a GPU (compute capability 8.9+; scripts/gpu/fp8.sh runs it from a test binary built with
    /// `--features cuda`): the CUDA FP8 kernels (amax, quantization, cuBLASLt FP8 matmul) against the same Python
    /// emulation, on the operator graph and both FP8 transformers. Not run yet (no such GPU here): the bounds are
    /// the CPU kernels' (an accumulation-order difference may flip a float16 rounding step, and in the whole
    /// graphs an E4M3 rounding); the numbers are printed either way. `cargo test --features cuda --lib -- --ignored
    /// fp8_cuda`.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU of compute capability 8.9 or newer and ONNX Runtime's CUDA provider"]
    fn fp8_cuda_kernels_match_the_python_emulation() {
        ort();
        let cuda = crate::ExecutionProvider::Cuda(Default::default());
        let mut failed = Vec::new();
        // ops_fast.onnx: the same nodes with fast_accum=1 (cuBLASLt's fast accumulation); at K = 64 its sums
        // should stay within the same bound (printed either way).
        for graph in ["ops", "ops_fast"] {
            for (name, got, want) in run_fp8_fixture_on(&format!("fp8/{graph}.onnx"), "ops", 2, &cuda) {
                let (max, rel, mean) = diff(&got, &want);
                eprintln!("CUDA fp8/{graph}.onnx {name}: max {max:e}, max relative {rel:e}, mean {mean:e}");
                if rel > 1.0 / 512.0 {
                    failed.push(format!("{graph} {name}: max {max}, relative {rel}"));
                }
            }
        }
        // MlpFp8 (fp8/mlp_merged.onnx): on CUDA its first product writes E4M3 straight from cuBLASLt, without the
        // two-node graph's float16 rounding in between (and with 1 / h_scale as a multiplier), so it is not the
        // emulation to the bit. What leaving that rounding out alone does, on the CPU (a sabotage of the CPU
        // kernel, 2026-12-05): max 4.6e-3, relative 4.6e-3, mean 1.2e-4 against the emulation. Allowed here: 1/64
        // relative and mean 1e-3, for that plus cuBLASLt's own GELU and summation order. The two-node graph on
        // CUDA must stay within the operator bound (2^-9), as ops.onnx.
        for (graph, rel_ok, mean_ok) in [("mlp", 1.0 / 512.0, f32::INFINITY), ("mlp_merged", 1.0 / 64.0, 1e-3)] {
            for (name, got, want) in run_fp8_fixture_on(&format!("fp8/{graph}.onnx"), "mlp", 1, &cuda) {
                let (max, rel, mean) = diff(&got, &want);
                eprintln!("CUDA fp8/{graph}.onnx {name}: max {max:e}, max relative {rel:e}, mean {mean:e}");
                if rel > rel_ok || mean > mean_ok {
                    failed.push(format!("{graph} {name}: max {max}, relative {rel}, mean {mean}"));
                }
            }
        }
        let stem = "export-tiny-fp16-fused-fp8-nodes";
        for (name, got, want) in run_fp8_fixture_on(&format!("fp8/{stem}.onnx"), stem, 14, &cuda) {
            let (max, rel, mean) = diff(&got, &want);
            eprintln!("CUDA {stem} {name}: max {max:e}, max relative {rel:e}, mean {mean:e}");
            if rel > 1.0 / 512.0 {
                failed.push(format!("{stem} {name}: max {max}, relative {rel}"));
            }
        }
        for (fixture, max_ok, mean_ok) in
            [("export-tiny-fp16-fused-fp8", 0.12, 1.05e-2), ("export-tiny-dual-fp16-fused-fp8", 1.3e-2, 2.1e-3)]
        {
            let graph = format!("{fixture}/transformer/model.onnx");
            let separate = run_fp8_fixture_on(&graph, fixture, 4, &cuda);
            for (name, got, want) in &separate {
                let (max, _, mean) = diff(got, want);
                eprintln!("CUDA {fixture} {name} vs the Python emulation: max {max:e}, mean {mean:e}");
                if max > max_ok || mean > mean_ok {
                    failed.push(format!("{fixture}: max {max}, mean {mean}"));
                }
            }
            // The merged q/k/v graph (LinearConcat3Fp8): the same cuBLASLt products on the same quantized bytes.
            let merged = format!("{fixture}-qkv/transformer/model.onnx");
            for ((name, a, _), (_, b, _)) in separate.iter().zip(run_fp8_fixture_on(&merged, fixture, 4, &cuda)) {
                let (max, _, mean) = diff(&b, a);
                eprintln!("CUDA {fixture}-qkv {name} vs the separate nodes on CUDA: max {max:e}, mean {mean:e}");
                if max > 0.0 {
                    failed.push(format!("{fixture}-qkv: differs from the separate nodes by max {max}, mean {mean}"));
                }
            }
        }
        assert!(failed.is_empty(), "CUDA FP8 kernels differ from the Python emulation: {failed:?}");
    }

    #[test]
    fn gelu_is_the_tanh_approximation() {
        // torch.nn.functional.gelu(x, approximate="tanh") at 1.0 and -2.0 (torch 2.8.0, float64)
        assert!((super::cpu::gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((super::cpu::gelu_tanh(-2.0) - -0.045_402_3).abs() < 1e-5);
    }
}
