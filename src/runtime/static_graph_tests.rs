//! What ONNX Runtime's optimiser leaves of a transformer's shape arithmetic with and without the static shape's
//! dimension overrides (`SessionConfig::dimension_overrides`, `Sd3PipelineBuilder::static_shape`): the optimised
//! graph, written with the session option for an optimised model path, counted node type by node type. A CUDA
//! graph needs every node on the CUDA provider; shape nodes (`Shape` and what computes on its output) run on the
//! CPU, so the overrides must leave none.

use std::collections::BTreeMap;
use std::path::Path;

use ort::session::Session;

/// Reads a protobuf varint at `*at`.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The fields of one protobuf message: (field number, length-delimited payload); other wire types skipped.
fn fields(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(key) = varint(bytes, &mut at) else { break };
        match key & 7 {
            0 => {
                let _ = varint(bytes, &mut at);
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let Some(len) = varint(bytes, &mut at) else { break };
                let end = at + len as usize;
                let Some(payload) = bytes.get(at..end) else { break };
                out.push((key >> 3, payload));
                at = end;
            }
            _ => break,
        }
    }
    out
}

/// Node counts by op type of an ONNX model's main graph (ModelProto.graph = 7, GraphProto.node = 1,
/// NodeProto.op_type = 4).
fn op_types(model: &[u8]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, graph) in fields(model).into_iter().filter(|(f, _)| *f == 7) {
        for (_, node) in fields(graph).into_iter().filter(|(f, _)| *f == 1) {
            for (_, op) in fields(node).into_iter().filter(|(f, _)| *f == 4) {
                *counts.entry(String::from_utf8_lossy(op).to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// The optimised graph of `model` on the CPU provider with `overrides`, counted.
fn optimised(model: &Path, overrides: &[(&str, i64)], out: &Path) -> BTreeMap<String, usize> {
    let env = super::environment(None).expect("ONNX Runtime (scripts/setup-ort.sh)");
    let mut builder = Session::builder(&env).expect("session builder");
    builder = builder.with_operators(super::kernels::domain().expect("sd3onnx operators")).expect("operators");
    for (name, size) in overrides {
        builder = builder.with_dimension_override(*name, *size).expect("override");
    }
    builder = builder.with_optimized_model_path(out).expect("optimized model path");
    let session = builder.commit_from_file(model).expect("session");
    drop(session);
    op_types(&std::fs::read(out).expect("the optimised model was written"))
}

/// Nodes that compute on shapes: `Shape` itself and the dynamic-shape operators fed by it.
const SHAPE_OPS: &[&str] = &["Shape", "ConstantOfShape", "Range", "Size", "NonZero"];

#[test]
fn the_static_shapes_overrides_leave_no_shape_nodes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures");
    let dir = std::env::temp_dir().join(format!("sd3onnx-static-graph-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The dimension names of our exports (models/export/export_sd3.py's dynamic axes) and of the tiny fixtures:
    // batch 2 (guidance), 8x8 latents (64x64 pixels), 77 CLIP + 256 T5 tokens.
    let overrides = [("batch_size", 2), ("height", 8), ("width", 8), ("sequence_length", 333)];
    for name in ["tiny-sd3/transformer", "export-tiny/transformer", "export-tiny-fp16-fused/transformer"] {
        let model = root.join(name).join("model.onnx");
        let tag = name.replace('/', "-");
        let dynamic = optimised(&model, &[], &dir.join(format!("{tag}-dynamic.onnx")));
        let fixed = optimised(&model, &overrides, &dir.join(format!("{tag}-static.onnx")));
        let total = |c: &BTreeMap<String, usize>| c.values().sum::<usize>();
        let shape = |c: &BTreeMap<String, usize>| SHAPE_OPS.iter().map(|op| c.get(*op).copied().unwrap_or(0)).sum();
        let (d, f): (usize, usize) = (shape(&dynamic), shape(&fixed));
        eprintln!("{name}: without overrides {} nodes, {d} shape nodes: {dynamic:?}", total(&dynamic));
        eprintln!("{name}: with overrides {} nodes, {f} shape nodes: {fixed:?}", total(&fixed));
        assert!(d > 0, "{name}: the dynamic graph has no shape nodes to fold (the count would prove nothing)");
        assert_eq!(f, 0, "{name}: shape nodes left with every dimension fixed: {fixed:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
