//! Weights made by nodes become initializers. Exporters write some weights as `Constant`
//! nodes, as `ConstantOfShape` of a constant shape (zero-initialised tokens and biases) or as
//! an `Identity` of an initializer (tied weights); ONNX Runtime folds them at load. mtpack
//! folds them once, before analysis, so that they are found, trained and masked like stored
//! weights, and a tied weight stays one tensor.

use super::{GraphError, Patch};
use crate::onnx::pb::{GraphProto, NodeProto, TensorProto};
use crate::onnx::{attr, tensor_proto, Model};
use crate::tensor::Tensor;

/// What was folded: one line per tensor, for logs and `inspect`.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Folded {
    pub constants: usize,
    pub constant_of_shape: usize,
    pub identities: usize,
}

impl Folded {
    pub fn total(&self) -> usize {
        self.constants + self.constant_of_shape + self.identities
    }
}

/// The model with Constant, constant-shaped ConstantOfShape and Identity-of-initializer nodes
/// replaced by initializers (repeated until nothing more folds).
pub fn weights_from_nodes(model: &Model) -> Result<(Model, Folded), GraphError> {
    let mut out = model.clone();
    let mut folded = Folded::default();
    loop {
        let g = out.graph();
        let outputs: std::collections::HashSet<&str> = g.output.iter().map(|o| o.name()).collect();
        let mut patch = Patch::new();
        let mut changed = false;
        for n in &g.node {
            let Some(name) = n.output.first().filter(|o| !o.is_empty() && !outputs.contains(o.as_str())) else {
                continue;
            };
            match n.op_type() {
                "Constant" => {
                    let Some(value) = constant_value(n, name)? else { continue };
                    patch.remove_producer(name).add_initializer(value);
                    folded.constants += 1;
                }
                "ConstantOfShape" => {
                    let Some(value) = constant_of_shape(g, n, name)? else { continue };
                    patch.remove_producer(name).add_initializer(value);
                    folded.constant_of_shape += 1;
                }
                "Identity" => {
                    let Some(src) = n.input.first().filter(|i| g.initializer.iter().any(|t| t.name() == *i)) else {
                        continue;
                    };
                    patch.remove_producer(name).rename_tensor(name, src);
                    folded.identities += 1;
                }
                _ => continue,
            }
            changed = true;
        }
        if !changed {
            return Ok((out, folded));
        }
        out = patch.apply(&out)?;
    }
}

/// A Constant node's value as an initializer named `name` (None for sparse values).
fn constant_value(n: &NodeProto, name: &str) -> Result<Option<TensorProto>, GraphError> {
    let host = if let Some(t) = attr::tensor(n, "value")? {
        let mut t = t.clone();
        t.name = Some(name.to_string());
        return Ok(Some(t));
    } else if let Some(f) = attr::find(n, "value_float").and_then(|a| a.f) {
        Tensor::F32(ndarray::arr0(f).into_dyn())
    } else if let Some(a) = attr::find(n, "value_floats") {
        Tensor::F32(ndarray::Array1::from(a.floats.clone()).into_dyn())
    } else if let Some(i) = attr::find(n, "value_int").and_then(|a| a.i) {
        Tensor::I64(ndarray::arr0(i).into_dyn())
    } else if let Some(a) = attr::find(n, "value_ints") {
        Tensor::I64(ndarray::Array1::from(a.ints.clone()).into_dyn())
    } else {
        return Ok(None);
    };
    Ok(Some(tensor_proto::from_tensor(name, &host)))
}

/// ConstantOfShape whose shape is an initializer: its value filled to that shape.
fn constant_of_shape(g: &GraphProto, n: &NodeProto, name: &str) -> Result<Option<TensorProto>, GraphError> {
    let Some(shape_t) = n.input.first().and_then(|s| g.initializer.iter().find(|t| t.name() == s)) else {
        return Ok(None);
    };
    let dims: Vec<usize> = match tensor_proto::to_tensor(shape_t)? {
        Tensor::I64(a) => a.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>().map_err(|_| {
            GraphError::Shape { tensor: shape_t.name().into(), problem: "a negative dimension in a shape".into() }
        })?,
        _ => return Ok(None),
    };
    let value = match attr::tensor(n, "value")? {
        Some(t) => tensor_proto::to_tensor(t)?,
        None => Tensor::F32(ndarray::arr0(0.0f32).into_dyn()),
    };
    let shape = ndarray::IxDyn(&dims);
    let filled = match value {
        Tensor::F32(a) => Tensor::F32(ndarray::ArrayD::from_elem(shape, a.iter().copied().next().unwrap_or(0.0))),
        Tensor::F64(a) => Tensor::F64(ndarray::ArrayD::from_elem(shape, a.iter().copied().next().unwrap_or(0.0))),
        Tensor::I64(a) => Tensor::I64(ndarray::ArrayD::from_elem(shape, a.iter().copied().next().unwrap_or(0))),
        Tensor::I32(a) => Tensor::I32(ndarray::ArrayD::from_elem(shape, a.iter().copied().next().unwrap_or(0))),
        _ => return Ok(None),
    };
    Ok(Some(tensor_proto::from_tensor(name, &filled)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::make_tensor;
    use crate::onnx::build::{model, node, value_info};
    use crate::tensor::DType;

    #[test]
    fn constant_made_weights_become_initializers_and_ties_stay_tied() {
        let w = Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4, 3]), 0.5));
        let shape = Tensor::I64(ndarray::Array1::from(vec![3]).into_dyn());
        let graph = GraphProto {
            node: vec![
                node("Constant", "w", &[], &["W"], vec![make_tensor("value", tensor_proto::from_tensor("", &w))]),
                node("ConstantOfShape", "b", &["S"], &["B"], vec![]),
                node("Identity", "tie", &["V"], &["V2"], vec![]),
                node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
                node("Add", "add", &["h", "B"], &["h2"], vec![]),
                node("MatMul", "mm2", &["h2", "V2"], &["y"], vec![]),
            ],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![
                tensor_proto::from_tensor("S", &shape),
                tensor_proto::from_tensor("V", &Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[3, 2]), 1.0))),
            ],
            ..Default::default()
        };
        let (m, f) = weights_from_nodes(&model(graph, 17)).unwrap();
        assert_eq!(f, Folded { constants: 1, constant_of_shape: 1, identities: 1 });
        let g = m.graph();
        assert_eq!(g.node.iter().map(|n| n.op_type()).collect::<Vec<_>>(), ["MatMul", "Add", "MatMul"]);
        assert!(g.node[2].input.contains(&"V".to_string()), "the tied weight is read directly");
        let b = g.initializer.iter().find(|t| t.name() == "B").unwrap();
        assert_eq!(tensor_proto::shape_of(b).unwrap(), [3]);
        let names = crate::graph::analysis::trainable_names(g);
        assert!(names.contains("W") && names.contains("B") && names.contains("V"), "{names:?}");
    }
}
