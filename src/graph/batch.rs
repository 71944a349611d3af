//! Backbones exported for a batch of one. Deploy exports (the Caffe2 and Caffe models of the
//! ONNX model zoo, many TensorFlow conversions) declare their image input as [1, C, H, W]
//! and write the batch into Reshape shapes (`Reshape(x, [1, 2048])` before the classifier),
//! so that neither ONNX Runtime nor a Reshape runs them on a batch. Training and the exported
//! artifact need batches: the input's batch axis becomes symbolic and each such Reshape shape
//! on the image's data path gets -1 (or 0, copying the input's, where -1 is taken) in place
//! of its 1. Whether that made the model batch-independent is for the caller to check by
//! running it (`adapt` compares a batch of two with each image alone).

use std::collections::HashSet;

use super::features::data_reach;
use super::{GraphError, Patch};
use crate::onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use crate::onnx::pb::type_proto::Value as TypeValue;
use crate::onnx::pb::ValueInfoProto;
use crate::onnx::{attr, tensor_proto, Model};
use crate::tensor::Tensor;

/// What [`free_batch`] changed: the input, and the Reshape nodes whose shapes it rewrote.
#[derive(Debug, Clone, PartialEq)]
pub struct FreedBatch {
    pub input: String,
    pub reshapes: Vec<String>,
}

/// The model with its single image input's batch of 1 made symbolic, or None where the
/// input's batch is not fixed at 1 (or there is not exactly one data input).
pub fn free_batch(model: &Model) -> Result<Option<(Model, FreedBatch)>, GraphError> {
    let g = model.graph();
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = g.input.iter().filter(|i| !inits.contains(i.name())).collect();
    let [input] = inputs.as_slice() else { return Ok(None) };
    match crate::onnx::tensor_type(input).and_then(|(_, s)| s).as_deref() {
        Some([crate::onnx::Dim::Fixed(1), _, ..]) => {}
        _ => return Ok(None),
    }
    let reached = data_reach(g, &[input.name()], "");
    let mut patch = Patch::new();
    let mut reshapes = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        let (Some(data), Some(shape)) = (n.input.first(), n.input.get(1)) else { continue };
        if n.op_type() != "Reshape" || !reached.contains(data) {
            continue;
        }
        let Some(t) = g.initializer.iter().find(|t| t.name() == shape) else { continue };
        let Ok(Tensor::I64(values)) = tensor_proto::to_tensor(t) else { continue };
        let Some(v) =
            batch_free_shape(&values.iter().copied().collect::<Vec<_>>(), attr::int_or(n, "allowzero", 0)? == 0)
        else {
            continue;
        };
        let name = format!("{shape}/batch/{i}");
        patch.add_initializer(tensor_proto::from_tensor(&name, &Tensor::I64(ndarray::Array1::from(v).into_dyn())));
        let mut edited = n.clone();
        if let Some(s) = edited.input.get_mut(1) {
            *s = name;
        }
        patch.remove_producer(n.output.first().map(String::as_str).unwrap_or_default());
        patch.add_node(edited);
        reshapes.push(attr::node_label(n));
    }
    let name = input.name().to_string();
    let mut out = patch.apply(model)?;
    let g = out.graph_mut();
    for v in g.input.iter_mut().filter(|v| v.name() == name).chain(g.output.iter_mut()) {
        symbolic_batch(v);
    }
    // Shapes recorded for a batch of one no longer hold.
    g.value_info.clear();
    Ok(Some((out, FreedBatch { input: name, reshapes })))
}

/// A Reshape shape whose leading 1 is the batch, with the batch taken from the input
/// instead: -1, or 0 (copy the input's first axis, where `copy_allowed`) when another axis
/// already holds the -1. None for a shape that does not start with 1 or cannot be freed.
fn batch_free_shape(shape: &[i64], copy_allowed: bool) -> Option<Vec<i64>> {
    let (&1, rest) = shape.split_first()? else { return None };
    let first = match rest.contains(&-1) {
        false => -1,
        true if copy_allowed => 0,
        true => return None,
    };
    Some(std::iter::once(first).chain(rest.iter().copied()).collect())
}

/// A value's first axis, where it is 1, named `batch`.
fn symbolic_batch(v: &mut ValueInfoProto) {
    let Some(TypeValue::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) else { return };
    let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) else { return };
    if first.value == Some(DimValue::DimValue(1)) {
        first.value = Some(DimValue::DimParam("batch".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::onnx::Dim;
    use crate::tensor::DType;

    fn shape(name: &str, v: &[i64]) -> crate::onnx::pb::TensorProto {
        tensor_proto::from_tensor(name, &Tensor::I64(ndarray::Array1::from(v.to_vec()).into_dyn()))
    }

    /// x [1, 4, 2, 2] -> Reshape [1, 16] -> Reshape [1, -1]; a weight Reshape [1, 3] off the
    /// data path stays.
    fn fixed_batch_model(input: Dim) -> Model {
        let graph = GraphProto {
            node: vec![
                node("Reshape", "flat", &["x", "s16"], &["a"], vec![]),
                node("Reshape", "again", &["a", "s_inferred"], &["b"], vec![]),
                node("Reshape", "weight", &["w", "s3"], &["w2"], vec![]),
                node("MatMul", "mm", &["b", "w3"], &["c"], vec![]),
                node("Add", "y", &["c", "w2"], &["y"], vec![]),
            ],
            input: vec![value_info("x", DType::F32, Some(&[input, Dim::Fixed(4), Dim::Fixed(2), Dim::Fixed(2)]))],
            output: vec![value_info("y", DType::F32, Some(&[Dim::Fixed(1), Dim::Fixed(3)]))],
            initializer: vec![
                shape("s16", &[1, 16]),
                shape("s_inferred", &[1, -1]),
                shape("s3", &[1, 3]),
                tensor_proto::from_tensor("w", &Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3])))),
                tensor_proto::from_tensor("w3", &Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[16, 3])))),
            ],
            ..Default::default()
        };
        model(graph, 13)
    }

    fn shape_of(m: &Model, node: &str) -> Vec<i64> {
        let g = m.graph();
        let n = g.node.iter().find(|n| n.name() == node).unwrap();
        let t = g.initializer.iter().find(|t| Some(t.name()) == n.input.get(1).map(String::as_str)).unwrap();
        tensor_proto::to_tensor(t).unwrap().to_f64_vec().iter().map(|&v| v as i64).collect()
    }

    #[test]
    fn a_batch_of_one_becomes_symbolic_and_reshapes_on_the_data_path_follow_it() {
        let (m, freed) = free_batch(&fixed_batch_model(Dim::Fixed(1))).unwrap().unwrap();
        assert_eq!(freed, FreedBatch { input: "x".into(), reshapes: vec!["flat".into(), "again".into()] });
        assert_eq!(shape_of(&m, "flat"), [-1, 16]);
        assert_eq!(shape_of(&m, "again"), [0, -1]);
        assert_eq!(shape_of(&m, "weight"), [1, 3], "off the data path");
        let g = m.graph();
        for v in [&g.input[0], &g.output[0]] {
            let dims = crate::onnx::tensor_type(v).and_then(|(_, s)| s).unwrap();
            assert_eq!(dims[0], Dim::Named("batch".into()), "{}", v.name());
        }
    }

    #[test]
    fn a_batch_that_is_not_fixed_at_one_is_left_alone() {
        for batch in [Dim::Named("n".into()), Dim::Fixed(4)] {
            assert!(free_batch(&fixed_batch_model(batch)).unwrap().is_none());
        }
    }
}
