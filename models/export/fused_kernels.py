"""Rewrites an exported SD3 MMDiT graph (TorchScript names, float16) to the crate's fused operators (ONNX domain
`sd3onnx`, src/runtime/kernels/mod.rs):

- `LinearConcat` computes the joint attention's q, k and v for both streams straight into the concatenated
  [B, S_img + S_ctx, D] tensors (bias in the cuBLASLt epilogue): no bias Add, Reshape, Transpose or Concat passes.
- `com.microsoft::MultiHeadAttention` takes those three [B, S, D] tensors as they are.
- `LinearSplit` applies to_out / to_add_out to the two row ranges of the attention output: no Slice copies.
- `ModNorm` does gate * y + residual and the next adaLN-modulated LayerNorm in one pass, reading gate, shift and
  scale at offsets of the adaLN linear outputs: no Mul/Add/Slice/Unsqueeze for the modulation.
- `Linear` (activation 1) is the feed-forward's first layer with bias and tanh-GELU in the epilogue.
- `--fp8` (issue 19, `to_fp8`): those three become LinearFp8 / LinearConcatFp8 / LinearSplitFp8 with E4M3 weights
  ([N, K] bytes, one float32 scale each) and activations quantized per tensor on the fly; each block's q, k and v
  LinearConcatFp8 nodes then become one LinearConcat3Fp8 (`share_qkv_fp8`: the activations quantized once).
  `--fp8-fast-accum` (`set_fast_accum`) sets `fast_accum=1` on the FP8 nodes: cuBLASLt's fast accumulation on
  CUDA; alone, on an FP8 folder, it rewrites only that attribute. `--fp8-merge-mlp` (`merge_mlp_fp8`, stored
  scales only) makes each feed-forward's two FP8 products one `MlpFp8`; alone, on an FP8 folder, graph only too.

SD3 numerics the rewrite relies on (diffusers 0.35.2):
- AdaLayerNormZero.forward (models/normalization.py): emb.chunk(6) = shift_msa, scale_msa, gate_msa, shift_mlp,
  scale_mlp, gate_mlp; norm(x) * (1 + scale) + shift; LayerNorm eps 1e-6 without affine (read from the graph).
- AdaLayerNormContinuous.forward (norm_out and the last block's norm1_context): chunk(2) = scale, shift.
- JointTransformerBlock.forward (models/attention.py): h += gate_msa * attn; norm2 + (scale_mlp, shift_mlp);
  h += gate_mlp * ff(...); the same for the context stream unless context_pre_only.
- JointAttnProcessor2_0 (models/attention_processor.py): q/k/v = cat([image, context], dim=seq); the output splits
  at the image length, image first.

- SD3.5's q/k RMS-norm (Attention(qk_norm="rms_norm", eps=1e-6), RMSNorm in models/normalization.py) becomes one
  `HeadRmsNorm` on each joint q / k tensor: norm_q / norm_k weights on the image rows, norm_added_q / norm_added_k
  on the context rows.

- SD3.5-medium's MMDiT-X blocks (`use_dual_attention`, diffusers 0.42.1): SD35AdaLayerNormZeroX.forward
  (models/normalization.py) chunks the adaLN output in 9 = shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
  gate_mlp, shift_msa2, scale_msa2, gate_msa2 and modulates ONE LayerNorm(h) twice (offsets 0/D and 6D/7D);
  JointTransformerBlock.forward: h += gate_msa * attn; h += gate_msa2 * attn2(norm_hidden_states2); then norm2 as
  above. attn2 is self-attention on the image rows only (JointAttnProcessor2_0 without encoder_hidden_states), with
  its own q/k RMS-norms and to_out. The rewrite, with the existing operators:
    * a second `ModNorm` without residual on the block's input h (shift 6D, scale 7D) for attn2's input (the
      unfused graph has a second folded LayerNormalization there too);
    * `Linear` for attn2's to_q, to_k, to_v (bias in the epilogue), `HeadRmsNorm` on q and k with like_a = the
      image stream itself (every row is an image row, so only w_a is used; w_b is the same weight),
      `com.microsoft::MultiHeadAttention`, `Linear` for to_out.0;
    * the two gated residuals as two `ModNorm`s: h1 = h + gate_msa * attn (offset 2D; its LayerNorm output is
      not used), then h1 + gate_msa2 * attn2 (offset 8D) with norm2's modulation (3D / 4D). Each sum is rounded
      to float16 like the unfused graph's two Adds.
  No new operator: what a dual-residual / two-modulation ModNorm would save is a few [B, S, D] passes per dual
  block (about 0.1 GB per block at 1024x1024 with CFG; docs/performance.md)."""
from __future__ import annotations

import onnx
from onnx import helper

DOMAIN = "sd3onnx"


class FusedKernelsError(ValueError):
    pass


def _index(model: onnx.ModelProto):
    g = model.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    return nodes, inits


def fuse_mmdit(model: onnx.ModelProto, num_layers: int, heads: int, hidden: int, controlnet: bool = False) -> dict:
    """Rewrites `model` in place; returns counts for the export manifest.

    Also takes the transformer that adds ControlNet residuals (export_sd3.py --controlnet-graph): a residual added to
    a block's output between the block and the next block's norm1 (diffusers SD3Transformer2DModel.forward:
    `hidden_states = hidden_states + block_controlnet_hidden_states[...]` after the block) becomes that block's
    last ModNorm without its norm output read, the graph's own float16 Add, and a ModNorm without residual for the
    next block's norm1 (one LayerNorm pass more than without residuals, the same roundings as the unfused graph).
    controlnet=True: an InstantX-style SD3ControlNetModel (joint blocks, none context_pre_only, no norm_out or
    proj_out; each block's image output read by its controlnet_blocks.i linear layer)."""
    g = model.graph
    nodes, inits = _index(model)

    def node(name: str) -> onnx.NodeProto:
        n = nodes.get(name)
        if n is None:
            raise FusedKernelsError(f"--fused-kernels: node {name} not found; the rewrite needs a TorchScript export "
                                    "of diffusers' SD3Transformer2DModel")
        return n

    def weight(prefix: str, module: str) -> tuple[str, str]:
        """(MatMul weight, bias) of submodule `module` ("ff", "net.0.proj") under `prefix`: TorchScript names
        nodes by module path with list indices attached to their list ("/ff/net.0/proj/MatMul")."""
        parts: list[str] = []
        for s in module.split("."):
            if s.isdigit() and parts:
                parts[-1] += "." + s
            else:
                parts.append(s)
        mm = node(f"{prefix}/{'/'.join(parts)}/MatMul")
        bias = f"{prefix.strip('/').replace('/', '.')}.{module}.bias"
        if bias not in inits:
            # the export wrapper's attribute ("m.", "cn.") may prefix parameter names but not node names
            found = [n for n in inits if n.endswith("." + bias)]
            if len(found) != 1:
                raise FusedKernelsError(f"--fused-kernels: bias {bias} not found")
            bias = found[0]
        return mm.input[1], bias

    eps = {a.f for n in g.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"}
    if len(eps) > 1:
        raise FusedKernelsError(f"--fused-kernels: LayerNorms with different epsilons {sorted(eps)}")
    epsilon = eps.pop() if eps else 1e-6  # diffusers AdaLayerNormZero / norm2: eps=1e-6 (models/attention.py)

    # The exporter wraps the model (export_sd3.py: self.m), so names start with a root like "/m".
    roots = [n.name[: -len("/transformer_blocks.0/norm1/linear/Gemm")] for n in g.node
             if n.name.endswith("/transformer_blocks.0/norm1/linear/Gemm")]
    if len(roots) != 1:
        raise FusedKernelsError("--fused-kernels: cannot find block 0's adaLN linear layer; the rewrite needs a "
                                "TorchScript export of diffusers' SD3Transformer2DModel")
    R = roots[0]
    new: list = []
    D = hidden
    from onnx import TensorProto, numpy_helper

    producers = {o: n for n in g.node for o in n.output}

    def norm_weight(p: str, module: str, attn: str = "attn") -> str | None:
        """The weight initializer of RMSNorm `module` of block `p`'s attention `attn` ("attn" or "attn2"), found
        through the node that produces its output (the export names it "<p>/<attn>/<module>/Mul_1_output_0", fused
        or not, with "_BSNH" appended where ORT's attention fusion reshapes it; the exporter may share one
        initializer between equal weights, so the weight's own name may be gone), or None without q/k norm."""
        out = f"{p}/{attn}/{module}/Mul_1_output_0"
        node = producers.get(out, producers.get(out + "_BSNH"))
        if node is None:
            return None
        def resolve(name: str) -> str:  # the exporter shares equal weights through Identity nodes
            seen = 0
            while name not in inits and name in producers and producers[name].op_type == "Identity" and seen < 8:
                name, seen = producers[name].input[0], seen + 1
            return name

        ws = [w for w in (resolve(i) for i in node.input) if w in inits]
        if len(ws) != 1:
            raise FusedKernelsError(f"--fused-kernels: cannot find the weight of {p}/{attn}/{module}")
        return ws[0]

    def fp16_weight(name: str) -> str:
        """A float16 initializer with `name`'s values (q/k norm weights may have stayed float32)."""
        t = inits.get(name)
        if t is None:
            raise FusedKernelsError(f"--fused-kernels: weight {name} not found")
        if t.data_type == TensorProto.FLOAT16:
            return name
        if t.data_location == TensorProto.EXTERNAL:
            raise FusedKernelsError(f"--fused-kernels: {name} is float32 in external data")
        if name + "_fp16" in inits:
            return name + "_fp16"
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype("float16"), name + "_fp16")
        g.initializer.append(half)
        inits[half.name] = half
        return half.name

    def mk(op, inputs, outputs, name, domain=DOMAIN, **attrs):
        new.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def pre_only(i: int) -> bool:
        return f"{R}/transformer_blocks.{i}/attn/to_add_out/MatMul" not in nodes

    def dual(i: int) -> bool:
        """SD3.5-medium's MMDiT-X block: a second attention (attn2) on the image stream."""
        return f"{R}/transformer_blocks.{i}/attn2/to_q/MatMul" in nodes

    def residual_input(add_name: str, mul_name: str) -> str:
        add = node(add_name)
        mul_out = node(mul_name).output[0]
        others = [x for x in add.input if x != mul_out]
        if len(others) != 1:
            raise FusedKernelsError(f"--fused-kernels: unexpected inputs of {add_name}")
        return others[0]

    if (num_layers < 2 and not controlnet) or pre_only(0):
        raise FusedKernelsError("--fused-kernels: needs at least two joint blocks")
    h = residual_input(f"{R}/transformer_blocks.0/Add", f"{R}/transformer_blocks.0/Mul")
    if dual(0):
        # the dual block's second gated residual (Mul_1 / Add_1) shifts the context stream's names by one
        c_mul = node(f"{R}/transformer_blocks.0/Mul_4")
        if f"{R}/transformer_blocks.0/attn/to_add_out/Add_output_0" not in c_mul.input:
            raise FusedKernelsError("--fused-kernels: block 0's context gate is not where the dual-attention "
                                    "rewrite expects it")
        c = residual_input(f"{R}/transformer_blocks.0/Add_5", f"{R}/transformer_blocks.0/Mul_4")
    else:
        c = residual_input(f"{R}/transformer_blocks.0/Add_4", f"{R}/transformer_blocks.0/Mul_3")
    mods = [node(f"{R}/transformer_blocks.{i}/norm1/linear/Gemm").output[0] for i in range(num_layers)]
    cmods = [node(f"{R}/transformer_blocks.{i}/norm1_context/linear/Gemm").output[0] for i in range(num_layers)]
    out_mod = None if controlnet else node(f"{R}/norm_out/linear/Gemm").output[0]

    consumers: dict[str, list] = {}
    for n_ in g.node:
        for x in n_.input:
            consumers.setdefault(x, []).append(n_)

    def block_output(i: int) -> str:
        """The unfused graph's image-stream output of block i: the Add after the gate of ff's output
        (h + gate_mlp * ff(...), diffusers JointTransformerBlock.forward)."""
        p = f"{R}/transformer_blocks.{i}"
        ff = node(f"{p}/ff/net.2/MatMul").output[0]
        for _ in range(3):  # MatMul -> bias Add -> gate Mul -> residual Add
            nxt = [c for c in consumers.get(ff, []) if c.name.startswith(p + "/")]
            if len(nxt) != 1:
                break
            ff = nxt[0].output[0]
            if nxt[0].op_type == "Add" and nxt[0].name != f"{p}/ff/net.2/Add":
                return ff
        raise FusedKernelsError(f"--fused-kernels: cannot find the output of {p}")

    def outside(n_) -> bool:
        return not n_.name.startswith(f"{R}/transformer_blocks.")

    def residual_of(i: int):
        """(Add node, residual tensor) where the graph adds a ControlNet residual to block i's output, else None."""
        t = block_output(i)
        adds = [c for c in consumers.get(t, []) if outside(c) and c.op_type == "Add"]
        if not adds:
            return None
        if len(adds) > 1:
            raise FusedKernelsError(f"--fused-kernels: block {i}'s output has {len(adds)} residual additions")
        other = [x for x in adds[0].input if x != t]
        if len(other) != 1:
            raise FusedKernelsError(f"--fused-kernels: unexpected inputs of {adds[0].name}")
        return adds[0], other[0]

    rewired: dict[str, str] = {}  # unfused block outputs read outside the blocks -> their fused tensors

    # norm1 of block 0 (later blocks get theirs from the previous block's last ModNorm)
    n_img = mk("ModNorm", [h, "", "", mods[0]], ["/fk/0/n_img"], "/fk/0/norm1",
               shift_offset=0, scale_offset=D, epsilon=epsilon)[0]
    n_ctx = mk("ModNorm", [c, "", "", cmods[0]], ["/fk/0/n_ctx"], "/fk/0/norm1_context",
               shift_offset=0, scale_offset=D, epsilon=epsilon)[0]
    counts = {"blocks": num_layers}
    for i in range(num_layers):
        p = f"{R}/transformer_blocks.{i}"
        f = f"/fk/{i}"
        last = i == num_layers - 1
        ctx_out = not pre_only(i)
        qkv = []
        pdot = p.strip("/").replace("/", ".")
        for a, b, norm in (("to_q", "add_q_proj", "q"), ("to_k", "add_k_proj", "k"), ("to_v", "add_v_proj", None)):
            wa, ba = weight(f"{p}/attn", a)
            wb, bb = weight(f"{p}/attn", b)
            t = mk("LinearConcat", [n_img, wa, ba, n_ctx, wb, bb], [f"{f}/{a}"], f"{f}/attn/{a}")[0]
            if norm and norm_weight(p, f"norm_{norm}") is not None:
                # SD3.5: RMSNorm per head on q and k (norm_q / norm_k on the image rows, norm_added_q / norm_added_k
                # on the context rows), eps 1e-6 (diffusers JointTransformerBlock: Attention(..., eps=1e-6))
                w_img = fp16_weight(norm_weight(p, f"norm_{norm}"))
                w_ctx = norm_weight(p, f"norm_added_{norm}")
                if w_ctx is None:
                    raise FusedKernelsError(f"--fused-kernels: {p} has norm_{norm} but no norm_added_{norm}")
                w_ctx = fp16_weight(w_ctx)
                t = mk("HeadRmsNorm", [t, w_img, w_ctx, h], [f"{f}/{a}_normed"], f"{f}/attn/norm_{norm}",
                       epsilon=1e-6)[0]
                counts["qk_norms"] = counts.get("qk_norms", 0) + 1
            qkv.append(t)
        attn = mk("MultiHeadAttention", qkv, [f"{f}/attn"], f"{f}/attn/mha", domain="com.microsoft",
                  num_heads=heads)[0]
        wo, bo = weight(f"{p}/attn", "to_out.0")
        if ctx_out:
            wao, bao = weight(f"{p}/attn", "to_add_out")
            o_img, o_ctx = mk("LinearSplit", [attn, wo, bo, wao, bao, h], [f"{f}/o_img", f"{f}/o_ctx"], f"{f}/attn/out")
        else:
            o_img = mk("LinearSplit", [attn, wo, bo, "", "", h], [f"{f}/o_img"], f"{f}/attn/out")[0]
        # image stream: h += gate_msa * attn; norm2 with (shift_mlp, scale_mlp); ff; h += gate_mlp * ff
        if dual(i):
            # MMDiT-X: attn2 on norm1's second modulation of the block input h (shift_msa2 6D, scale_msa2 7D)
            n_img2 = mk("ModNorm", [h, "", "", mods[i]], [f"{f}/n_img2"], f"{f}/norm1_msa2",
                        shift_offset=6 * D, scale_offset=7 * D, epsilon=epsilon)[0]
            qkv2 = []
            for a, norm in (("to_q", "q"), ("to_k", "k"), ("to_v", None)):
                w, b = weight(f"{p}/attn2", a)
                t = mk("Linear", [n_img2, w, b], [f"{f}/attn2_{a}"], f"{f}/attn2/{a}", activation=0)[0]
                if norm:
                    wn = norm_weight(p, f"norm_{norm}", "attn2")
                    if wn is None:
                        # no q/k norm, unless the export has the norm under names the lookup missed: never leave
                        # one out silently
                        if (norm_weight(p, f"norm_{'k' if norm == 'q' else 'q'}", "attn2") is not None
                                or any(o.startswith(f"{p}/attn2/norm_{norm}/") for o in producers)):
                            raise FusedKernelsError(f"--fused-kernels: cannot find the weight of {p}/attn2/norm_{norm}")
                    else:
                        # every row is an image row (like_a = the image stream): only w_a is read
                        wn = fp16_weight(wn)
                        t = mk("HeadRmsNorm", [t, wn, wn, h], [f"{f}/attn2_{a}_normed"], f"{f}/attn2/norm_{norm}",
                               epsilon=1e-6)[0]
                        counts["qk_norms"] = counts.get("qk_norms", 0) + 1
                qkv2.append(t)
            attn2 = mk("MultiHeadAttention", qkv2, [f"{f}/attn2"], f"{f}/attn2/mha", domain="com.microsoft",
                       num_heads=heads)[0]
            w, b = weight(f"{p}/attn2", "to_out.0")
            o_img2 = mk("Linear", [attn2, w, b], [f"{f}/o_img2"], f"{f}/attn2/out", activation=0)[0]
            # h += gate_msa * attn (this ModNorm's LayerNorm output is not read, but keeps a name: the CUDA kernel
            # does nothing when output 0 is absent), then h += gate_msa2 * attn2 with norm2; each sum rounded to
            # float16 as the unfused graph's Adds
            h = mk("ModNorm", [h, o_img, mods[i], mods[i]], [f"{f}/n_unused", f"{f}/h1a_img"], f"{f}/attn_residual",
                   gate_offset=2 * D, shift_offset=3 * D, scale_offset=4 * D, epsilon=epsilon)[1]
            o_img, gate = o_img2, 8 * D
            counts["dual_attention_blocks"] = counts.get("dual_attention_blocks", 0) + 1
        else:
            gate = 2 * D
        n2, h1 = mk("ModNorm", [h, o_img, mods[i], mods[i]], [f"{f}/n2_img", f"{f}/h1_img"], f"{f}/norm2",
                    gate_offset=gate, shift_offset=3 * D, scale_offset=4 * D, epsilon=epsilon)
        w1, b1 = weight(f"{p}/ff", "net.0.proj")
        w2, b2 = weight(f"{p}/ff", "net.2")
        ff1 = mk("Linear", [n2, w1, b1], [f"{f}/ff1_img"], f"{f}/ff/net.0", activation=1)[0]
        ff2 = mk("Linear", [ff1, w2, b2], [f"{f}/ff2_img"], f"{f}/ff/net.2", activation=0)[0]
        if last and controlnet:  # nothing normalises the last block's output: the norm output is not read
            nmod, so, co = mods[i], 0, D
        elif last:  # norm_out: AdaLayerNormContinuous, chunk(2) = scale, shift
            nmod, so, co = out_mod, D, 0
        else:  # next block's norm1: AdaLayerNormZero, shift_msa 0, scale_msa D
            nmod, so, co = mods[i + 1], 0, D
        res = residual_of(i)
        if res is None:
            n_img, h = mk("ModNorm", [h1, ff2, mods[i], nmod], [f"{f}/n_next_img", f"{f}/h2_img"],
                          f"{f}/ff_residual", gate_offset=5 * D, shift_offset=so, scale_offset=co, epsilon=epsilon)
            out_t = h
        else:
            # h + gate_mlp * ff rounded to float16, + the ControlNet residual (float16 Add, as unfused), then
            # the next norm on the sum
            add, r = res
            h_raw = mk("ModNorm", [h1, ff2, mods[i], nmod], [f"{f}/n_unused_img", f"{f}/h2_img"],
                       f"{f}/ff_residual", gate_offset=5 * D, shift_offset=so, scale_offset=co, epsilon=epsilon)[1]
            out_t = h_raw
            h = mk("Add", [h_raw, r], [f"{f}/h2_img_residual"], f"{f}/controlnet_residual", domain="")[0]
            n_img = mk("ModNorm", [h, "", "", nmod], [f"{f}/n_next_img"], f"{f}/norm_next",
                       shift_offset=so, scale_offset=co, epsilon=epsilon)[0]
            rewired[add.output[0]] = h
            counts["controlnet_residuals"] = counts.get("controlnet_residuals", 0) + 1
        rewired[block_output(i)] = out_t
        if last and controlnet:
            break  # the last block's context output is not used (SD3ControlNetModel.forward)
        if ctx_out:
            n2c, c1 = mk("ModNorm", [c, o_ctx, cmods[i], cmods[i]], [f"{f}/n2_ctx", f"{f}/h1_ctx"],
                         f"{f}/norm2_context", gate_offset=2 * D, shift_offset=3 * D, scale_offset=4 * D,
                         epsilon=epsilon)
            w1, b1 = weight(f"{p}/ff_context", "net.0.proj")
            w2, b2 = weight(f"{p}/ff_context", "net.2")
            ff1 = mk("Linear", [n2c, w1, b1], [f"{f}/ff1_ctx"], f"{f}/ff_context/net.0", activation=1)[0]
            ff2 = mk("Linear", [ff1, w2, b2], [f"{f}/ff2_ctx"], f"{f}/ff_context/net.2", activation=0)[0]
            if last:
                raise FusedKernelsError("--fused-kernels: the last block must be context_pre_only (SD3)")
            # next block's norm1_context: AdaLayerNormContinuous if that block is context_pre_only
            so, co = (D, 0) if pre_only(i + 1) else (0, D)
            n_ctx, c = mk("ModNorm", [c1, ff2, cmods[i], cmods[i + 1]], [f"{f}/n_next_ctx", f"{f}/h2_ctx"],
                          f"{f}/ff_context_residual", gate_offset=5 * D, shift_offset=so, scale_offset=co,
                          epsilon=epsilon)
    if not controlnet:
        proj = node(f"{R}/proj_out/MatMul")
        proj.input[0] = n_img
    # what reads a block's output outside the blocks (a ControlNet's controlnet_blocks.i, a residual Add's
    # consumers) now reads the fused tensors
    for n_ in g.node:
        if outside(n_) and not any(o in rewired for o in n_.output):
            for k, x in enumerate(n_.input):
                if x in rewired:
                    n_.input[k] = rewired[x]
    g.node.extend(new)
    removed = dead_code_elimination(model)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    counts.update(nodes_added=len(new), nodes_removed=removed)
    return counts


E4M3_MAX = 448.0  # largest finite float8_e4m3fn: OCP OFP8 spec rev. 1.0 table 1; torch.finfo(torch.float8_e4m3fn).max

# Which products become FP8 (`--fp8`, issue 19): exactly the ones the rewrite above turns into Linear / LinearConcat /
# LinearSplit, i.e. the transformer blocks' attention projections (q, k, v of both streams and of attn2; to_out,
# to_add_out) and feed-forwards: nearly all of the MMDiT's matrix-product FLOPs. What stays float16, and why:
# - the adaLN linear layers (norm1 / norm1_context / norm_out Gemms): one row per sample, so FP8 saves nothing, and
#   their outputs scale and shift every normalised activation of the block (an error there is applied everywhere);
# - the timestep / pooled-text embedders and the context embedder: few rows (or one pass per image, not per
#   block), and T5's hidden states have large outlier features that a per-tensor scale would crush;
# - the patch embedding (Conv) and the final proj_out: the first and the last layer, which quantization studies
#   keep in higher precision as a rule; proj_out writes the velocity itself;
# - attention (MultiHeadAttention) stays float16: FP8 attention is another kernel, not part of this change.
FP8_OPS = {"Linear": ("LinearFp8", [(1, 2)]), "LinearConcat": ("LinearConcatFp8", [(1, 2), (4, 5)]),
           "LinearSplit": ("LinearSplitFp8", [(1, 2), (3, 4)])}


def e4m3_weight(w16, name: str):
    """(E4M3 bytes [N, K] as a uint8 TensorProto `name`, float32 scale TensorProto `name_scale`) for a float16 MatMul
    weight `w16` ([K, N]): scale = amax / 448 (1 for an all-zero weight), q = e4m3(W^T / scale), saturating, ties
    to even (torch's float8_e4m3fn cast of the clamped values; src/runtime/kernels/fp8.rs does the same)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    w = torch.from_numpy(np.array(w16, copy=True)).float().t().contiguous()  # [N, K]: K-major, cuBLASLt's "TN"
    amax = w.abs().amax()
    scale = amax / E4M3_MAX if float(amax) > 0 else torch.tensor(1.0)
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return (numpy_helper.from_array(q, name),
            numpy_helper.from_array(np.array([float(scale)], np.float32), name + "_scale"))


def tensor_array(t: onnx.TensorProto, base_dir: str | None = None):
    """numpy_helper.to_array, reading external data ourselves: onnx 1.23 refuses a data file with more than one hard
    link ("potential hardlink attack"), and this tool hard-links the weights of the folders it writes on purpose
    (first seen on the H200 on 2026-12-03: every --fp8 rewrite of a rewritten folder failed). The location must be
    a plain relative path inside `base_dir`, as onnx itself requires."""
    import os

    import numpy as np
    from onnx import TensorProto, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    root = os.path.realpath(base_dir or ".")
    path = os.path.realpath(os.path.join(root, location))
    if not location or os.path.isabs(location) or os.path.commonpath([root, path]) != root:
        raise FusedKernelsError(f"external data of {t.name}: location {location!r} is not a file inside {root}")
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    offset = int(info.get("offset", 0))
    length = int(info.get("length", count * np.dtype(dtype).itemsize))
    if length != count * np.dtype(dtype).itemsize:
        raise FusedKernelsError(f"external data of {t.name}: {length} bytes for {count} values of {dtype}")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise FusedKernelsError(f"external data of {t.name}: {path} ends before offset {offset} + {length}")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(t.dims)).copy()


def to_fp8(model: onnx.ModelProto, base_dir: str | None = None, act_scales: dict | None = None,
           external: str | None = None) -> dict:
    """Rewrites the fused graph's Linear / LinearConcat / LinearSplit nodes in place to LinearFp8 /
    LinearConcatFp8 / LinearSplitFp8 (src/runtime/kernels/mod.rs): each float16 weight becomes E4M3 bytes [N, K]
    (UINT8: ONNX Runtime's ort crate has no Rust element type for FLOAT8E4M3FN, so kernels could not read such a
    tensor; the bytes are the same) and a float32 scale. Activations are scaled on the fly (amax / 448 per tensor)
    unless `act_scales` maps a node name to its stored activation scale(s) (one per activation input: two for
    LinearConcat). `base_dir`: where external weight data lives; `external`: a file name in the model's folder for
    the new weights (for graphs whose weights are external): their bytes are then returned in the counts under
    "_external" as (offset, bytes) pairs for `write_external`. Returns counts for the manifest."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done: dict[str, str] = {}
    counts = {"fp8_nodes": 0, "fp8_weights": 0, "fp8_weight_bytes": 0}
    new_inits = []
    for n in g.node:
        if n.domain != DOMAIN or n.op_type not in FP8_OPS:
            continue
        op, pairs = FP8_OPS[n.op_type]
        ins = list(n.input) + [""] * (6 - len(n.input)) if n.op_type == "LinearSplit" else list(n.input)
        for wi, _ in pairs:
            w = ins[wi]
            if not w or w in done:
                continue
            t = inits.get(w)
            if t is None:
                raise FusedKernelsError(f"--fp8: weight {w} of {n.name} is not an initializer")
            arr = tensor_array(t, base_dir)
            if arr.dtype != np.float16 or arr.ndim != 2:
                raise FusedKernelsError(f"--fp8: weight {w} of {n.name} is {arr.dtype} {arr.shape}, not float16 [K, N]")
            q, sc = e4m3_weight(arr, w + "_e4m3")
            new_inits += [q, sc]
            done[w] = q.name
            counts["fp8_weights"] += 1
            counts["fp8_weight_bytes"] += int(np.prod(arr.shape))
        def fp8(wi, bi):
            w = ins[wi]
            return [done[w], done[w] + "_scale", ins[bi]] if w else ["", "", ""]
        scales = (act_scales or {}).get(n.name, [])
        want = 2 if n.op_type == "LinearConcat" else 1
        if act_scales is not None and len(scales) != want:
            raise FusedKernelsError(f"--fp8-scales: {n.name} ({n.op_type}) needs {want} scale(s), the file has "
                                    f"{len(scales)}; calibrate this very graph (models/export/fp8_calibrate.py)")
        if act_scales is not None:
            counts["fp8_static_scales"] = counts.get("fp8_static_scales", 0) + len(scales)
        names = []
        for j, s in enumerate(scales):
            sname = f"{n.name}/x_scale_{j}"
            new_inits.append(numpy_helper.from_array(np.array([s], np.float32), sname))
            names.append(sname)
        if n.op_type == "Linear":
            new_in = [ins[0], *fp8(1, 2), *(names[:1] or [""])]
        elif n.op_type == "LinearConcat":
            new_in = [ins[0], *fp8(1, 2), ins[3], *fp8(4, 5), *(names[:2] or ["", ""])]
        else:
            new_in = [ins[0], *fp8(1, 2), *fp8(3, 4), ins[5], *(names[:1] or [""])]
        del n.input[:]
        n.input.extend(new_in)
        n.op_type = op
        counts["fp8_nodes"] += 1
    if external:
        # big graphs: the E4M3 weights go to one new external data file beside model.onnx (the float16 ones they
        # replace stay in the source's data file, hard-linked, unread)
        offset = 0
        blobs = []
        for t in new_inits:
            if t.data_type != onnx.TensorProto.UINT8:
                continue
            raw = t.raw_data
            offset = (offset + 4095) // 4096 * 4096
            blobs.append((offset, raw))
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", external), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
        counts["_external"] = blobs
    g.initializer.extend(new_inits)
    dead_code_elimination(model)
    return counts


def share_qkv_fp8(model: onnx.ModelProto) -> int:
    """Merges each block's three `LinearConcatFp8` nodes that read the same two activations (the joint attention's q,
    k and v) into one `LinearConcat3Fp8` (src/runtime/kernels/mod.rs), which quantizes the activations once instead
    of three times (issue 19: per block two amax passes and two quantization passes of the image stream's
    activations fewer, out of eleven of each). Same values: the three nodes quantized the same tensor to the same
    bytes with the same scale. With stored (static) scales the three nodes' scales must be equal to be merged
    (calibration of one activation gives one scale); nodes whose scales differ stay as they are. Returns the number
    of merged nodes."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def stored(name: str):
        if not name:
            return None
        t = inits.get(name)
        return None if t is None else float(numpy_helper.to_array(t).reshape(-1)[0])

    groups: dict[tuple, list] = {}
    for n in g.node:
        if n.domain != DOMAIN or n.op_type != "LinearConcatFp8":
            continue
        ins = list(n.input) + [""] * (10 - len(n.input))
        key = (ins[0], ins[4], stored(ins[8]), stored(ins[9]))
        groups.setdefault(key, []).append(n)
    merged = 0
    for (xa, xb, _, _), nodes in groups.items():
        if len(nodes) != 3:
            continue
        first = nodes[0]
        ins0 = list(first.input) + [""] * (10 - len(first.input))
        inputs = [xa, xb]
        for n in nodes:
            ins = list(n.input)
            inputs += ins[1:4] + ins[5:8]
        inputs += [ins0[8], ins0[9]]
        while inputs and not inputs[-1]:
            inputs.pop()
        node = helper.make_node("LinearConcat3Fp8", inputs, [n.output[0] for n in nodes],
                                name=first.name + "/qkv", domain=DOMAIN)
        index = list(g.node).index(first)
        for n in nodes:
            g.node.remove(n)
        g.node.insert(index, node)
        merged += 1
    dead_code_elimination(model)
    return merged


FP8_NODE_TYPES = ("LinearFp8", "LinearConcatFp8", "LinearConcat3Fp8", "LinearSplitFp8", "MlpFp8")


def merge_mlp_fp8(model: onnx.ModelProto) -> int:
    """Merges each feed-forward's two FP8 products with stored activation scales (a GELU `LinearFp8` whose output
    only the next `LinearFp8`, no activation, reads) into one `MlpFp8` (src/runtime/kernels/mod.rs): on CUDA the
    first product then writes E4M3 bytes for the second (cuBLASLt's FP8 output with the second's stored scale)
    instead of a float16 tensor that a quantization pass reads again: at SD3-medium's 1024x1024 with CFG that
    tensor is 8,192 x 6,144 float16 values (100 MB) per block. Dynamic scales cannot be merged (the second scale
    comes from that tensor's amax), nor nodes whose `fast_accum` differs. Same values on the CPU (lib test); graph
    only: the node reads the two nodes' own initializers. Returns the number of merged feed-forwards."""
    g = model.graph
    attrs = lambda n: {a.name: a.i for a in n.attribute}  # noqa: E731
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            if i:
                readers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    merged = 0
    for n in list(g.node):
        if n.domain != DOMAIN or n.op_type != "LinearFp8" or attrs(n).get("activation", 0) != 1:
            continue
        ins, h = list(n.input), n.output[0]
        users = readers.get(h, [])
        if len(ins) < 5 or not ins[4] or h in graph_outputs or len(users) != 1:
            continue
        m = users[0]
        mins = list(m.input)
        if (m.domain != DOMAIN or m.op_type != "LinearFp8" or attrs(m).get("activation", 0) != 0 or mins[0] != h
                or len(mins) < 5 or not mins[4]):
            continue
        fast = attrs(n).get("fast_accum", 0)
        if fast != attrs(m).get("fast_accum", 0):
            continue
        node = helper.make_node("MlpFp8", [ins[0], *ins[1:4], *mins[1:4], ins[4], mins[4]], [m.output[0]],
                                name=n.name + "/mlp", domain=DOMAIN)
        if fast:
            node.attribute.append(helper.make_attribute("fast_accum", fast))
        index = list(g.node).index(n)
        g.node.remove(n)
        g.node.remove(m)
        g.node.insert(index, node)
        for vi in [v for v in g.value_info if v.name == h]:
            g.value_info.remove(vi)
        merged += 1
    return merged


def set_fast_accum(model: onnx.ModelProto, on: bool = True) -> int:
    """Sets the `fast_accum` attribute (1, or 0 with `on=False`) on every FP8 node: on CUDA the crate then asks
    cuBLASLt for fast accumulation in those products (`CUBLASLT_MATMUL_DESC_FAST_ACCUM`: the tensor cores sum the
    FP8 products without promoting partial sums to float32 along K, which TransformerEngine does for its forward
    products); the CPU kernels and the emulation accumulate in float32 either way. Graph only: no weight is read
    or written. Returns the number of nodes set."""
    count = 0
    for n in model.graph.node:
        if n.domain != DOMAIN or n.op_type not in FP8_NODE_TYPES:
            continue
        for a in list(n.attribute):
            if a.name == "fast_accum":
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute("fast_accum", 1 if on else 0))
        count += 1
    return count


def write_external(path, blobs) -> None:
    """Writes `to_fp8(..., external=...)`'s blobs at their offsets."""
    with open(path, "wb") as f:
        for off, raw in blobs:
            f.seek(off)
            f.write(raw)


def dead_code_elimination(model: onnx.ModelProto) -> int:
    """Drops nodes whose outputs reach no graph output, and initializers nothing reads; returns the node count."""
    g = model.graph
    producer = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n
    live, stack = set(), [o.name for o in g.output]
    seen = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(i for i in n.input if i)
    keep = [n for n in g.node if id(n) in live]
    removed = len(g.node) - len(keep)
    used = {i for n in keep for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    nodes = [onnx.NodeProto() for _ in keep]
    for dst, src in zip(nodes, keep):
        dst.CopyFrom(src)
    del g.node[:]
    g.node.extend(nodes)
    if len(inits) != len(g.initializer):
        kept = [onnx.TensorProto() for _ in inits]
        for dst, src in zip(kept, inits):
            dst.CopyFrom(src)
        del g.initializer[:]
        g.initializer.extend(kept)
    names = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    vis = [v for v in g.value_info if v.name in names]
    del g.value_info[:]
    g.value_info.extend(vis)
    return removed


def main(argv=None):
    """Rewrites an exported model folder's float16 transformer without exporting again (seconds, any size: the
    weights stay in the source folder's external data file, hard-linked). The other components are hard-linked too."""
    import argparse
    import json
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("src", type=Path, help="model folder from export_sd3.py --dtype fp16 (TorchScript, fused attention)")
    ap.add_argument("dst", type=Path, help="new model folder (components linked to src, transformer rewritten)")
    ap.add_argument("--controlnet", action="store_true",
                    help="src and dst are ControlNet folders (export_controlnet.py --optimize --dtype fp16, the "
                         "InstantX kind) instead of model folders")
    ap.add_argument("--fp8", action="store_true",
                    help="also store the blocks' matrix-product weights as E4M3 with per-tensor scales (LinearFp8, "
                         "LinearConcatFp8, LinearSplitFp8; activations scaled on the fly): needs a GPU of compute "
                         "capability 8.9 or newer (Ada/Hopper) on CUDA; the CPU kernels emulate it (issue 19). "
                         "transformer/model.onnx only (not the ControlNet graphs)")
    ap.add_argument("--fp8-scales", type=Path,
                    help="with --fp8: static activation scales ({node: [scale, ...]}, models/export/fp8_calibrate.py) "
                         "stored in the graph instead of dynamic per-tensor scaling")
    ap.add_argument("--fp8-separate-qkv", action="store_true",
                    help="with --fp8: keep q, k and v as three LinearConcatFp8 nodes (each quantizing the same "
                         "activations) instead of one LinearConcat3Fp8; the same values, for timing the two")
    ap.add_argument("--fp8-fast-accum", action="store_true",
                    help="with --fp8: the FP8 nodes get fast_accum=1 (cuBLASLt's fast accumulation on CUDA: faster, "
                         "less precise sums along K; the CPU kernels are unchanged). Without --fp8, on a folder whose "
                         "transformer is FP8 already (e.g. written by --fp8 --fp8-scales): only the attribute is set, "
                         "the graph copied and every weight file hard-linked (seconds)")
    ap.add_argument("--fp8-merge-mlp", action="store_true",
                    help="with --fp8 --fp8-scales: each feed-forward's two FP8 products become one MlpFp8 (on CUDA "
                         "the first writes E4M3 for the second: no float16 tensor and no quantization pass between "
                         "them). Without --fp8, on a folder whose transformer is FP8 with stored scales already: "
                         "graph only, as --fp8-fast-accum")
    ap.add_argument("--from-fused", action="store_true",
                    help="src's transformer is already rewritten (--fused-kernels); only --fp8 is applied")
    args = ap.parse_args(argv)
    src, dst = args.src.resolve(), args.dst.resolve()
    if args.fp8_separate_qkv and not args.fp8:
        raise SystemExit("--fp8-separate-qkv needs --fp8")
    if args.fp8_scales and not args.fp8:
        raise SystemExit("--fp8-scales needs --fp8")
    if args.from_fused and not args.fp8:
        raise SystemExit("--from-fused only makes sense with --fp8")
    if args.controlnet and (args.fp8 or args.from_fused or args.fp8_fast_accum):
        raise SystemExit("--controlnet does not take --fp8, --fp8-fast-accum or --from-fused")
    from export_sd3 import topological_sort

    def rewrite(cfg_path: Path, graph: Path, controlnet: bool):
        cfg = json.loads(cfg_path.read_text())
        if controlnet and cfg.get("joint_attention_dim") is None:
            raise FusedKernelsError("--fused-kernels: this ControlNet is of the SD3.5 kind (SD3SingleTransformerBlocks, "
                                    "no text input), which the rewrite does not cover: use it unfused")
        model = onnx.load(str(graph), load_external_data=False)
        heads = cfg["num_attention_heads"]
        counts = fuse_mmdit(model, cfg["num_layers"], heads, heads * cfg["attention_head_dim"], controlnet)
        topological_sort(model)
        return model, counts

    import shutil

    # Hard links (the crate refuses symlinks that resolve outside the model folder): no copy of the weights.
    def link(a: Path, b: Path):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if args.controlnet:
        model, counts = rewrite(src / "config.json", src / "model.onnx", True)
        dst.mkdir(parents=True, exist_ok=True)
        for entry in src.iterdir():
            if entry.name != "model.onnx" and not (dst / entry.name).exists():
                link(entry, dst / entry.name)
        onnx.save(model, str(dst / "model.onnx"))
        print(f"wrote {dst}/model.onnx: {counts}, {len(model.graph.node)} nodes")
        return
    if args.fp8_merge_mlp and args.fp8 and not args.fp8_scales:
        raise SystemExit("--fp8-merge-mlp needs stored activation scales (--fp8-scales): with dynamic scales the "
                         "second product's scale comes from the first one's output")
    if (args.fp8_fast_accum or args.fp8_merge_mlp) and not args.fp8:
        # graph only: the FP8 transformer as it is, rewritten as asked; everything else hard-linked
        model = onnx.load(str(src / "transformer" / "model.onnx"), load_external_data=False)
        fp8_nodes = sum(n.domain == DOMAIN and n.op_type in FP8_NODE_TYPES for n in model.graph.node)
        if fp8_nodes == 0:
            raise SystemExit(f"{src}/transformer/model.onnx has no FP8 node: give --fp8 to write one")
        done = []
        if args.fp8_merge_mlp:
            merged = merge_mlp_fp8(model)
            if merged == 0:
                raise SystemExit(f"{src}/transformer/model.onnx has no FP8 feed-forward with stored activation "
                                 "scales to merge (write it with --fp8 --fp8-scales)")
            done.append(f"{merged} feed-forwards merged into MlpFp8")
        if args.fp8_fast_accum:
            done.append(f"fast_accum on {set_fast_accum(model)} FP8 nodes")
        n = ", ".join(done)
        (dst / "transformer").mkdir(parents=True, exist_ok=True)
        for entry in src.iterdir():
            if entry.name != "transformer" and not (dst / entry.name).exists():
                if entry.is_dir():
                    shutil.copytree(entry, dst / entry.name, copy_function=link)
                else:
                    link(entry, dst / entry.name)
        for entry in (src / "transformer").iterdir():
            if entry.name != "model.onnx" and not (dst / "transformer" / entry.name).exists():
                link(entry, dst / "transformer" / entry.name)
        onnx.save(model, str(dst / "transformer" / "model.onnx"))
        print(f"wrote {dst}/transformer/model.onnx: {n}, {len(model.graph.node)} nodes")
        return
    if args.from_fused:
        model, counts = onnx.load(str(src / "transformer" / "model.onnx"), load_external_data=False), {}
    else:
        model, counts = rewrite(src / "transformer" / "config.json", src / "transformer" / "model.onnx", False)
    blobs = None
    if args.fp8:
        ext = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        scales = json.loads(args.fp8_scales.read_text()) if args.fp8_scales else None
        counts.update(to_fp8(model, base_dir=str(src / "transformer"), act_scales=scales,
                             external="model_fp8.onnx_data" if ext else None))
        blobs = counts.pop("_external", None)
        if not args.fp8_separate_qkv:
            counts["fp8_qkv_merged"] = share_qkv_fp8(model)
        if args.fp8_merge_mlp:
            counts["fp8_mlp_merged"] = merge_mlp_fp8(model)
        if args.fp8_fast_accum:
            counts["fp8_fast_accum"] = set_fast_accum(model)
        topological_sort(model)
    # the residual transformer of ControlNet runs (export_sd3.py --controlnet-graph), when there is one
    residual = src / "transformer" / "model_controlnet.onnx"
    cn = rewrite(src / "transformer" / "config.json", residual, False) if residual.is_file() else None
    (dst / "transformer").mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name != "transformer" and not (dst / entry.name).exists():
            if entry.is_dir():
                shutil.copytree(entry, dst / entry.name, copy_function=link)
            else:
                link(entry, dst / entry.name)
    for entry in (src / "transformer").iterdir():
        if entry.name not in ("model.onnx", "model_controlnet.onnx") and not (dst / "transformer" / entry.name).exists():
            link(entry, dst / "transformer" / entry.name)
    if blobs is not None:
        write_external(dst / "transformer" / "model_fp8.onnx_data", blobs)
    onnx.save(model, str(dst / "transformer" / "model.onnx"))
    print(f"wrote {dst}/transformer/model.onnx: {counts}, {len(model.graph.node)} nodes")
    if cn is not None:
        onnx.save(cn[0], str(dst / "transformer" / "model_controlnet.onnx"))
        print(f"wrote {dst}/transformer/model_controlnet.onnx: {cn[1]}, {len(cn[0].graph.node)} nodes")


if __name__ == "__main__":
    main()
