//! Raising an old model's default-domain opset where no node's meaning changes. The masks an
//! export embeds need opset 12 (`Max` of integer tensors), and the Caffe and Caffe2 models of
//! the ONNX model zoo import 7 to 9. Between 7 and 12 most ops only gained things (negative
//! axes, an optional Gemm bias, more types, MaxPool's ceil_mode that defaults off); Dropout's
//! ratio became an input at 12 (inference ignores it, so the attribute is dropped). The ops
//! whose attributes became inputs or whose meaning changed (Clip, Pad, Slice, Upsample,
//! Resize, TopK, ...) are not in [`UNCHANGED_7_TO_12`], and a model using them is refused with
//! their names: re-exporting it at opset 12 or later is the way.

use std::borrow::Cow;

use super::GraphError;
use crate::onnx::{attr, Model};

/// Ops that read a node written for any opset from 7 to 11 the same way at opset 12 (Dropout
/// once its ratio attribute is dropped).
const UNCHANGED_7_TO_12: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "DepthToSpace",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "Identity",
    "InstanceNormalization",
    "LRN",
    "LeakyRelu",
    "Less",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pow",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Softmax",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "Transpose",
    "Unsqueeze",
    "Where",
    "Xor",
];

/// `model` importing the default domain at opset `to` (at most 12), where it imports 7 or
/// later and every node reads the same there; the model itself where it already imports `to`
/// or later.
pub fn raise(model: &Model, to: i64) -> Result<Cow<'_, Model>, GraphError> {
    let from = model.opset("").unwrap_or(0);
    if from >= to {
        return Ok(Cow::Borrowed(model));
    }
    let refuse = |why: String| GraphError::Opset { from, to, why };
    if from < 7 || to > 12 {
        return Err(refuse("raising is known to keep every node's meaning only from 7 to 12".into()));
    }
    let mut changed: Vec<String> = model
        .graph()
        .node
        .iter()
        .filter(|n| n.domain().is_empty() || n.domain() == "ai.onnx")
        .filter(|n| !UNCHANGED_7_TO_12.contains(&n.op_type()))
        .map(|n| format!("'{}' ({})", attr::node_label(n), n.op_type()))
        .collect();
    if !changed.is_empty() {
        let more = changed.len().saturating_sub(3);
        changed.truncate(3);
        let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
        return Err(refuse(format!("nodes {}{tail} read differently at opset {to}", changed.join(", "))));
    }
    let mut out = model.clone();
    if to >= 12 {
        for n in out.graph_mut().node.iter_mut().filter(|n| n.op_type() == "Dropout") {
            n.attribute.retain(|a| a.name() != "ratio");
        }
    }
    for o in out.proto.opset_import.iter_mut().filter(|o| o.domain().is_empty() || o.domain() == "ai.onnx") {
        o.version = Some(to);
    }
    // Opset 12 came with IR version 7.
    if out.proto.ir_version() < 7 {
        out.proto.ir_version = Some(7);
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::tensor::DType;

    fn with(op: &str, opset: i64) -> Model {
        let graph = GraphProto {
            node: vec![node("Relu", "a", &["x"], &["h"], vec![]), node(op, "b", &["h"], &["y"], vec![])],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            ..Default::default()
        };
        model(graph, opset)
    }

    #[test]
    fn an_opset_9_model_of_unchanged_ops_is_raised_to_12() {
        let softmax = with("Softmax", 9);
        let m = raise(&softmax, 12).unwrap();
        assert_eq!(m.opset(""), Some(12));
        assert!(m.proto.ir_version() >= 7);
        assert_eq!(raise(&with("Clip", 13), 12).unwrap().opset(""), Some(13), "already later: unchanged");
        let mut dropout = with("Dropout", 9);
        dropout.graph_mut().node[1].attribute.push(crate::onnx::attr::make_float("ratio", 0.4));
        let raised = raise(&dropout, 12).unwrap();
        assert!(raised.graph().node[1].attribute.is_empty(), "ratio is an input from opset 12");
    }

    #[test]
    fn ops_that_changed_are_refused_by_name() {
        let e = raise(&with("Clip", 9), 12).unwrap_err().to_string();
        assert!(e.contains("'b' (Clip)") && e.contains("opset 9"), "{e}");
        assert!(raise(&with("Relu", 6), 12).is_err(), "before 7: not known to be safe");
    }
}
