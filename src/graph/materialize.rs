//! Weights made by nodes become initializers. Exporters write some weights as `Constant`
//! nodes, as `ConstantOfShape` of a constant shape (zero-initialised tokens and biases), as
//! an `Identity` of an initializer (tied weights) or as a `Reshape` of one (Caffe2's
//! classifiers, stored 4-D); ONNX Runtime folds them at load. mtpack
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
    /// Float initializers read only by a Reshape of a constant shape.
    pub reshapes: usize,
}

impl Folded {
    pub fn total(&self) -> usize {
        self.constants + self.constant_of_shape + self.identities + self.reshapes
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
                "Reshape" => {
                    let Some((source, value)) = reshaped_weight(g, n, name)? else { continue };
                    patch.remove_producer(name).remove_initializer(&source).add_initializer(value);
                    folded.reshapes += 1;
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

/// A Reshape of a float initializer that nothing else reads, by a constant shape: the source's
/// name and the reshaped values as an initializer named `name` (a source read elsewhere too
/// stays, so that a weight is never split in two).
fn reshaped_weight(g: &GraphProto, n: &NodeProto, name: &str) -> Result<Option<(String, TensorProto)>, GraphError> {
    let init = |i: usize| n.input.get(i).and_then(|s| g.initializer.iter().find(|t| t.name() == s));
    let (Some(source), Some(shape_t)) = (init(0), init(1)) else { return Ok(None) };
    let readers = g.node.iter().filter(|m| m.input.iter().any(|i| i == source.name())).count();
    let is_output = g.output.iter().any(|o| o.name() == source.name());
    if readers != 1 || is_output || attr::int_or(n, "allowzero", 0)? != 0 {
        return Ok(None);
    }
    let (Tensor::F32(data), Tensor::I64(shape)) = (tensor_proto::to_tensor(source)?, tensor_proto::to_tensor(shape_t)?)
    else {
        return Ok(None);
    };
    let Some(dims) = resolve_shape(data.shape(), &shape.iter().copied().collect::<Vec<_>>()) else { return Ok(None) };
    let Ok(reshaped) = data.into_shape_with_order(ndarray::IxDyn(&dims)) else { return Ok(None) };
    Ok(Some((source.name().to_string(), tensor_proto::from_tensor(name, &Tensor::F32(reshaped)))))
}

/// ONNX Reshape's target dims for an input of `from`: 0 copies the input's dim, one -1 takes
/// what is left; None where they do not fit.
fn resolve_shape(from: &[usize], shape: &[i64]) -> Option<Vec<usize>> {
    let total: usize = from.iter().product();
    let mut dims: Vec<Option<usize>> = Vec::with_capacity(shape.len());
    for (i, &d) in shape.iter().enumerate() {
        dims.push(match d {
            0 => Some(*from.get(i)?),
            -1 => None,
            d => Some(usize::try_from(d).ok()?),
        });
    }
    let known: usize = dims.iter().flatten().product();
    match dims.iter().filter(|d| d.is_none()).count() {
        0 if known == total => Some(dims.into_iter().flatten().collect()),
        1 if known > 0 && total.is_multiple_of(known) => {
            Some(dims.into_iter().map(|d| d.unwrap_or(total / known)).collect())
        }
        _ => None,
    }
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
        assert_eq!(f, Folded { constants: 1, constant_of_shape: 1, identities: 1, reshapes: 0 });
        let g = m.graph();
        assert_eq!(g.node.iter().map(|n| n.op_type()).collect::<Vec<_>>(), ["MatMul", "Add", "MatMul"]);
        assert!(g.node[2].input.contains(&"V".to_string()), "the tied weight is read directly");
        let b = g.initializer.iter().find(|t| t.name() == "B").unwrap();
        assert_eq!(tensor_proto::shape_of(b).unwrap(), [3]);
        let names = crate::graph::analysis::trainable_names(g);
        assert!(names.contains("W") && names.contains("B") && names.contains("V"), "{names:?}");
    }

    /// Caffe2's classifier weight stored 4-D and reshaped for its Gemm folds to a 2-D weight;
    /// a source also read elsewhere, or a shape that does not fit, stays a node.
    #[test]
    fn reshaped_weights_fold_unless_shared() {
        let f32s = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::F32(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), (0..n).map(|v| v as f32).collect()).unwrap(),
            )
        };
        let i64s = |v: &[i64]| Tensor::I64(ndarray::Array1::from(v.to_vec()).into_dyn());
        let graph = GraphProto {
            node: vec![
                node("Reshape", "r", &["W4", "S"], &["W"], vec![]),
                node("Gemm", "fc", &["x", "W"], &["h"], vec![crate::onnx::attr::make_int("transB", 1)]),
                node("Reshape", "shared", &["V", "S"], &["V2"], vec![]),
                node("Add", "add", &["V", "V"], &["v"], vec![]),
                node("Reshape", "misfit", &["U", "S5"], &["U2"], vec![]),
                node("Concat", "out", &["h", "V2", "v", "U2"], &["y"], vec![crate::onnx::attr::make_int("axis", 0)]),
            ],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![
                tensor_proto::from_tensor("W4", &f32s(&[2, 3, 1, 1])),
                tensor_proto::from_tensor("S", &i64s(&[0, -1])),
                tensor_proto::from_tensor("S5", &i64s(&[5, -1])),
                tensor_proto::from_tensor("V", &f32s(&[2, 3, 1, 1])),
                tensor_proto::from_tensor("U", &f32s(&[2, 3, 1, 1])),
            ],
            ..Default::default()
        };
        let (m, f) = weights_from_nodes(&model(graph, 9)).unwrap();
        assert_eq!(f.reshapes, 1);
        let g = m.graph();
        let w = g.initializer.iter().find(|t| t.name() == "W").unwrap();
        assert_eq!(tensor_proto::shape_of(w).unwrap(), [2, 3]);
        assert_eq!(tensor_proto::to_tensor(w).unwrap().to_f64_vec(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(!g.initializer.iter().any(|t| t.name() == "W4"), "the source is gone");
        let left: Vec<&str> = g.node.iter().filter(|n| n.op_type() == "Reshape").map(|n| n.name()).collect();
        assert_eq!(left, ["shared", "misfit"]);
    }
}
