#!/usr/bin/env python3
"""Checks a `--fused-kernels` transformer against the unfused float16 graph it was rewritten from, without the crate:
the fused graph runs in onnx's ReferenceEvaluator with numpy versions of the `sd3onnx` operators (float16 in and
out, float32 arithmetic, as src/runtime/kernels/cpu.rs) and com.microsoft::MultiHeadAttention; the unfused graph
runs in ONNX Runtime's CPU provider. Prints the max and mean absolute difference of the transformer outputs on one
random input (batch 2, 8x12 latent patches' worth of tokens, 29 context tokens). For checking a rewrite at real
widths (e.g. `export_sd3.py --random sd3.5-medium --layers 3`) on a machine without a GPU; slow on big graphs.

    python models/export/fused_reference.py UNFUSED/transformer/model.onnx FUSED/transformer/model.onnx

FP8 graphs (`fused_kernels.py --fp8`) run with torch emulations of LinearFp8 / LinearConcatFp8 / LinearSplitFp8
(float8_e4m3fn casts), so the same command measures what FP8 costs against the float16 graph.

Measured (issue 19): models/fixtures/export-tiny-dual-fp16{,-fused}: max 2.1e-3, mean 4.5e-4 (outputs of mean
magnitude 0.52); SD3.5-medium widths, 3 blocks (dual attention in 0-1): max 2.0e-3, mean 4.2e-4 (0.48).
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

F16, F32 = np.float16, np.float32


def _mm(x, w, b):
    return x.astype(F32) @ w.astype(F32) + b.astype(F32)


class Linear(OpRun):
    op_domain = "sd3onnx"

    def _run(self, x, w, b, activation=0):
        y = _mm(x, w, b)
        if activation == 1:  # tanh GELU
            y = 0.5 * y * (1 + np.tanh(0.7978846 * (y + 0.044715 * y ** 3)))
        return (y.astype(F16),)


class LinearConcat(OpRun):
    op_domain = "sd3onnx"

    def _run(self, xa, wa, ba, xb, wb, bb):
        return (np.concatenate([_mm(xa, wa, ba), _mm(xb, wb, bb)], 1).astype(F16),)


class LinearSplit(OpRun):
    op_domain = "sd3onnx"

    def _run(self, x, wa, ba, wb=None, bb=None, like_a=None):
        sa = like_a.shape[1]
        ya = _mm(x[:, :sa], wa, ba).astype(F16)
        return (ya,) if wb is None else (ya, _mm(x[:, sa:], wb, bb).astype(F16))


# FP8 operators (issue 19): torch's float8_e4m3fn cast does the E4M3 rounding (of values clamped to +-448: the
# kernels saturate, torch's cast would give NaN beyond 464). The arithmetic of src/runtime/kernels/cpu.rs and of
# cuBLASLt's FP8 matmul: q_x = e4m3(x / x_scale), x_scale = amax(|x|) / 448 (1 for all zeros) unless stored;
# y = (q_x @ q_w^T) * (x_scale * w_scale) + b in float32; GELU; float16.
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max; OCP OFP8 spec rev. 1.0


def e4m3(t):
    import torch
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def act_scale(x, stored=None):
    """float32 scale of activation x (a numpy float16 array): the stored one, or amax / 448."""
    import torch
    if stored is not None:
        return torch.tensor(np.float32(np.asarray(stored).reshape(-1)[0]))
    amax = torch.from_numpy(np.abs(x.astype(F32))).amax()
    return amax / E4M3_MAX if float(amax) > 0 else torch.tensor(1.0)


def _mm8(x, xs, w8, ws, b):
    """x float16 [.., K] (quantized with float32 scale xs), w8 uint8 [N, K], ws [1], b float16 [N]."""
    import torch
    qx = e4m3(torch.from_numpy(x.astype(F32)) / xs)
    qw = torch.from_numpy(np.array(w8, copy=True)).view(torch.float8_e4m3fn).float()
    alpha = xs * torch.tensor(np.float32(ws.reshape(-1)[0]))
    return ((qx @ qw.T) * alpha + torch.from_numpy(b.astype(F32))).numpy()


# The FP8 operators' `fast_accum` attribute (cuBLASLt's fast accumulation on CUDA) does not change the emulation:
# it accumulates exactly (float32 products of E4M3 values, summed in float32 by numpy) either way.
class LinearFp8(OpRun):
    op_domain = "sd3onnx"

    def _run(self, x, w, w_scale, b, x_scale=None, activation=0, fast_accum=0):
        y = _mm8(x, act_scale(x, x_scale), w, w_scale, b)
        if activation == 1:
            y = 0.5 * y * (1 + np.tanh(np.float32(0.7978846) * (y + np.float32(0.044715) * y ** 3)))
        return (y.astype(F16),)


class MlpFp8(OpRun):
    """The feed-forward's two FP8 products with stored scales: LinearFp8(LinearFp8(x, w1, .., x_scale, GELU), w2,
    .., h_scale), the tensor between them float16 as in the two-node graph."""
    op_domain = "sd3onnx"

    def _run(self, x, w1, w1_scale, b1, w2, w2_scale, b2, x_scale, h_scale, fast_accum=0):
        (h,) = LinearFp8._run(self, x, w1, w1_scale, b1, x_scale, activation=1)
        return LinearFp8._run(self, h, w2, w2_scale, b2, h_scale, activation=0)


class LinearConcatFp8(OpRun):
    op_domain = "sd3onnx"

    def _run(self, xa, wa, wa_scale, ba, xb, wb, wb_scale, bb, xa_scale=None, xb_scale=None, fast_accum=0):
        ya = _mm8(xa, act_scale(xa, xa_scale), wa, wa_scale, ba)
        yb = _mm8(xb, act_scale(xb, xb_scale), wb, wb_scale, bb)
        return (np.concatenate([ya, yb], 1).astype(F16),)


class LinearConcat3Fp8(OpRun):
    """Three LinearConcatFp8 products of the same xa, xb (quantized once: the same bytes as three times)."""
    op_domain = "sd3onnx"

    def _run(self, xa, xb, *rest, fast_accum=0):
        ws, (xa_scale, xb_scale) = rest[:18], (list(rest[18:]) + [None, None])[:2]
        sa, sb = act_scale(xa, xa_scale), act_scale(xb, xb_scale)
        outs = []
        for j in range(3):
            wa, wa_scale, ba, wb, wb_scale, bb = ws[6 * j:6 * j + 6]
            outs.append(np.concatenate([_mm8(xa, sa, wa, wa_scale, ba), _mm8(xb, sb, wb, wb_scale, bb)], 1)
                        .astype(F16))
        return tuple(outs)


class LinearSplitFp8(OpRun):
    op_domain = "sd3onnx"

    def _run(self, x, wa, wa_scale, ba, wb=None, wb_scale=None, bb=None, like_a=None, x_scale=None, fast_accum=0):
        sa = like_a.shape[1]
        xs = act_scale(x, x_scale)  # one scale for the whole x
        ya = _mm8(x[:, :sa], xs, wa, wa_scale, ba).astype(F16)
        return (ya,) if wb is None else (ya, _mm8(x[:, sa:], xs, wb, wb_scale, bb).astype(F16))


OPS = None  # set below: every operator of the sd3onnx domain, and com.microsoft::MultiHeadAttention


class ModNorm(OpRun):
    op_domain = "sd3onnx"

    def _run(self, h, y=None, gate_mod=None, norm_mod=None, gate_offset=0, shift_offset=0, scale_offset=0,
             epsilon=1e-6):
        d = h.shape[-1]
        hf = h.astype(F32)
        if y is not None:  # the residual stream is stored in float16 and the norm reads the stored value
            gate = gate_mod.astype(F32)[:, None, gate_offset:gate_offset + d]
            hf = (hf + gate * y.astype(F32)).astype(F16).astype(F32)
        m = norm_mod.astype(F32)
        shift, scale = m[:, None, shift_offset:shift_offset + d], m[:, None, scale_offset:scale_offset + d]
        mean = hf.mean(-1, keepdims=True)
        var = ((hf - mean) ** 2).mean(-1, keepdims=True)
        n = ((hf - mean) / np.sqrt(var + epsilon) * (1 + scale) + shift).astype(F16)
        return (n, hf.astype(F16)) if y is not None else (n,)


class HeadRmsNorm(OpRun):
    op_domain = "sd3onnx"

    def _run(self, x, w_a, w_b, like_a, epsilon=1e-6):
        b, s, d = x.shape
        hd = w_a.shape[0]
        xf = x.astype(F32).reshape(b, s, d // hd, hd)
        r = 1 / np.sqrt((xf ** 2).mean(-1, keepdims=True) + epsilon)
        w = np.where((np.arange(s) < like_a.shape[1])[None, :, None, None], w_a.astype(F32), w_b.astype(F32))
        return ((xf * r * w).reshape(b, s, d).astype(F16),)


class MultiHeadAttention(OpRun):
    op_domain = "com.microsoft"

    def _run(self, q, k, v, num_heads=1):
        b, s, d = q.shape
        hd = d // num_heads

        def heads(t):
            return t.astype(F32).reshape(b, -1, num_heads, hd).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        return ((a @ v).transpose(0, 2, 1, 3).reshape(b, s, d).astype(F16),)


OPS = [Linear, LinearConcat, LinearSplit, ModNorm, HeadRmsNorm, MultiHeadAttention, LinearFp8, LinearConcatFp8,
       LinearSplitFp8, LinearConcat3Fp8, MlpFp8]


def main(unfused: str, fused: str):
    sess = ort.InferenceSession(unfused, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    names = {i.name for i in sess.get_inputs()}
    for i in sess.get_inputs():
        last = i.shape[-1] if i.shape and isinstance(i.shape[-1], int) else None
        if i.name == "controlnet_block_index":  # residual transformer: block j adds residual j // 2 (interval 2)
            feeds[i.name] = np.arange(i.shape[0], dtype=np.int64) // 2
            continue
        channels = 16
        if i.name == "controlnet_residuals":  # [N, B, S, D]: 8x12 latents in 2x2 patches
            shape = (max(1, (i.shape[0] if isinstance(i.shape[0], int) else 2)), 2, 24, last)
        else:
            shape = {"hidden_states": (2, channels, 8, 12), "controlnet_cond": (2, channels, 8, 12),
                     "encoder_hidden_states": (2, 29, last or 32), "pooled_projections": (2, last or 20),
                     "timestep": (2,)}[i.name]
        a = np.array([981.5, 3.25], F32) if i.name == "timestep" else rng.standard_normal(shape).astype(F32)
        feeds[i.name] = a.astype(F16) if i.type == "tensor(float16)" else a
    if "controlnet_residuals" in names:
        n = int(feeds["controlnet_block_index"].max()) + 1
        feeds["controlnet_residuals"] = feeds["controlnet_residuals"][:1].repeat(n, 0) * np.arange(
            1, n + 1, dtype=np.float32).reshape(n, 1, 1, 1).astype(feeds["controlnet_residuals"].dtype)
    ref = sess.run(None, feeds)[0].astype(F32)
    ev = ReferenceEvaluator(onnx.load(fused), new_ops=OPS)
    got = ev.run(None, feeds)[0].astype(F32)
    d = np.abs(got - ref)
    print(f"fused (numpy operators) vs unfused (ONNX Runtime CPU): max {d.max():.3g}, mean {d.mean():.3g}; "
          f"output mean magnitude {np.abs(ref).mean():.3g}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
