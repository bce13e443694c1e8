//! Weight merges on a graph's own execution provider: `Y = W + L @ R`, for LoRAs (src/lora).
//!
//! The merge is a three-node ONNX graph (`MatMul`, `Add`, and `Cast`s around the add for float16 / bfloat16
//! weights), built here as protobuf bytes and run by ONNX Runtime on the same provider as the graph whose weights
//! it changes. On CUDA the base weights, the low-rank factors' product and the merged weights stay in device
//! memory, so switching LoRAs costs a few small kernel launches per layer instead of a host-side merge and an
//! upload of every merged weight (docs/lora.md has the measurements). The arithmetic is float32 (`W` widened,
//! `L @ R` accumulated in float32 — on CUDA by cuBLAS, which may use TF32 inputs, as ONNX Runtime's CUDA provider
//! does by default — then rounded once to the weight's type).

use ort::session::Session;

use super::ElementType;

/// ONNX `TensorProto.DataType` codes (onnx/onnx.proto).
pub(super) fn onnx_type(t: ElementType) -> Option<i64> {
    match t {
        ElementType::Float32 => Some(1),
        ElementType::Float16 => Some(10),
        ElementType::BFloat16 => Some(16),
        _ => None,
    }
}

/// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/): the few field kinds ONNX's
/// `ModelProto` needs here.
pub(super) struct Message(pub(super) Vec<u8>);

impl Message {
    pub(super) fn new() -> Self {
        Message(Vec::new())
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub(super) fn int(mut self, field: u64, v: i64) -> Self {
        self.varint(field << 3);
        self.varint(v as u64);
        self
    }

    pub(super) fn bytes(mut self, field: u64, b: &[u8]) -> Self {
        self.varint((field << 3) | 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    pub(super) fn str(self, field: u64, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    pub(super) fn msg(self, field: u64, m: Message) -> Self {
        self.bytes(field, &m.0)
    }
}

/// `ValueInfoProto` of a rank-2 tensor with symbolic dimensions.
fn tensor_info(name: &str, elem_type: i64, dims: [&str; 2]) -> Message {
    let mut shape = Message::new();
    for d in dims {
        shape = shape.msg(1, Message::new().str(2, d)); // TensorShapeProto.dim { dim_param }
    }
    let tensor = Message::new().int(1, elem_type).msg(2, shape); // TypeProto.Tensor
    Message::new().str(1, name).msg(2, Message::new().msg(1, tensor)) // ValueInfoProto { name, type }
}

/// `NodeProto`, with an optional `to` attribute (Cast).
fn node(op: &str, inputs: &[&str], output: &str, to: Option<i64>) -> Message {
    let mut n = Message::new();
    for i in inputs {
        n = n.str(1, i);
    }
    n = n.str(2, output).str(3, output).str(4, op);
    if let Some(to) = to {
        // AttributeProto { name, i, type = INT (2) }
        n = n.msg(5, Message::new().str(1, "to").int(3, to).int(20, 2));
    }
    n
}

/// The merge graph for weights of element type `dtype`: inputs `W` (`dtype`, `[p, q]`), `L` (float32, `[p, r]`),
/// `R` (float32, `[r, q]`); output `Y = W + L @ R` (`dtype`, `[p, q]`). `None` for types we do not merge.
pub(crate) fn merge_graph(dtype: ElementType) -> Option<Vec<u8>> {
    let t = onnx_type(dtype)?;
    let mut graph = Message::new();
    graph = graph.msg(1, node("MatMul", &["L", "R"], "D", None));
    if t == 1 {
        graph = graph.msg(1, node("Add", &["W", "D"], "Y", None));
    } else {
        graph = graph
            .msg(1, node("Cast", &["W"], "W32", Some(1)))
            .msg(1, node("Add", &["W32", "D"], "Y32", None))
            .msg(1, node("Cast", &["Y32"], "Y", Some(t)));
    }
    graph = graph
        .str(2, "lora_merge")
        .msg(11, tensor_info("W", t, ["p", "q"]))
        .msg(11, tensor_info("L", 1, ["p", "r"]))
        .msg(11, tensor_info("R", 1, ["r", "q"]))
        .msg(12, tensor_info("Y", t, ["p", "q"]));
    let opset = Message::new().str(1, "").int(2, 17);
    // ModelProto { ir_version = 8, producer_name, graph, opset_import }
    let model = Message::new().int(1, 8).str(2, "sd3-onnx").msg(7, graph).msg(8, opset);
    Some(model.0)
}

/// The merge sessions of one graph, one per weight element type, created on first use.
#[derive(Default)]
pub(crate) struct Mergers {
    pub sessions: Vec<(ElementType, Session)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_follow_the_wire_format() {
        let mut m = Message::new();
        m.varint(1);
        m.varint(300);
        assert_eq!(m.0, [0x01, 0xac, 0x02]);
        assert_eq!(Message::new().int(1, 150).0, [0x08, 0x96, 0x01]);
        assert_eq!(Message::new().str(2, "testing").0[..2], [0x12, 0x07]);
    }

    #[test]
    fn only_float_weights_have_a_merge_graph() {
        assert!(merge_graph(ElementType::Float32).is_some());
        assert!(merge_graph(ElementType::Float16).is_some());
        assert!(merge_graph(ElementType::Int64).is_none());
    }
}
