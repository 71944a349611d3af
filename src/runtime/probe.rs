//! Shapes of intermediate tensors, found by running the model once in ONNX Runtime on a zero
//! image of the declared input size (batch 1). Exported models rarely declare them, and the
//! shape of a feature tensor decides its pooling and the width of the heads.

use std::collections::HashMap;

use super::ort_rt::OrtSession;
use super::{Backend, RuntimeError};
use crate::onnx::pb::ValueInfoProto;
use crate::onnx::{tensor_proto, tensor_type, Dim, Model};
use crate::tensor::{DType, Tensor};

/// The shapes of `tensors` (batch 1). Every graph input must declare its element type; a
/// dimension that is not fixed is taken as 1.
pub fn shapes(model: &Model, tensors: &[String]) -> Result<HashMap<String, Vec<usize>>, RuntimeError> {
    let g = model.graph();
    let inits: std::collections::HashSet<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    let mut feeds = Vec::new();
    for i in g.input.iter().filter(|i| !inits.contains(i.name())) {
        let Some((code, Some(dims))) = tensor_type(i) else {
            return Err(RuntimeError::Input { input: i.name().into(), problem: "declares no tensor shape".into() });
        };
        let shape: Vec<usize> =
            dims.iter().map(|d| if let Dim::Fixed(n) = d { (*n).max(1) as usize } else { 1 }).collect();
        let dtype = tensor_proto::dtype_of(code).unwrap_or(DType::F32);
        feeds.push((i.name().to_string(), Tensor::zeros(dtype, &shape)));
    }
    shapes_with(model, tensors, &feeds)
}

/// The shapes of `tensors` when the model runs on `feeds`.
pub fn shapes_with(
    model: &Model,
    tensors: &[String],
    feeds: &[(String, Tensor)],
) -> Result<HashMap<String, Vec<usize>>, RuntimeError> {
    let mut m = model.clone();
    m.graph_mut().output =
        tensors.iter().map(|t| ValueInfoProto { name: Some(t.clone()), ..Default::default() }).collect();
    let mut s = OrtSession::from_bytes(&m.to_bytes(), "a shape probe")?;
    Ok(s.run(feeds)?.into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect())
}

/// Floating-point operations (a multiply-add counting two) of the Conv, ConvTranspose,
/// MatMul and Gemm nodes in one forward pass on `feeds`: the arithmetic that bounds a
/// network's speed, for comparing a measured rate with the CPU's peak. Element-wise ops,
/// normalisations and pooling are not counted.
pub fn forward_flops(model: &Model, feeds: &[(String, Tensor)]) -> Result<f64, RuntimeError> {
    let g = model.graph();
    let counted = |n: &&crate::onnx::pb::NodeProto| matches!(n.op_type(), "Conv" | "ConvTranspose" | "MatMul" | "Gemm");
    let init_dims: HashMap<&str, Vec<usize>> =
        g.initializer.iter().map(|t| (t.name(), t.dims.iter().map(|&d| d.max(0) as usize).collect())).collect();
    let mut wanted: Vec<String> = g
        .node
        .iter()
        .filter(counted)
        .flat_map(|n| n.input.iter().take(2).chain(n.output.first()))
        .filter(|t| !t.is_empty() && !init_dims.contains_key(t.as_str()))
        .cloned()
        .collect();
    wanted.sort();
    wanted.dedup();
    let probed = shapes_with(model, &wanted, feeds)?;
    let dims = |t: &str| -> Vec<usize> { init_dims.get(t).or_else(|| probed.get(t)).cloned().unwrap_or_default() };
    let input = |n: &crate::onnx::pb::NodeProto, i: usize| n.input.get(i).map(|t| dims(t)).unwrap_or_default();
    let count = |v: &[usize]| v.iter().product::<usize>() as f64;
    let mut total = 0.0;
    for n in g.node.iter().filter(counted) {
        let out = n.output.first().map(|t| dims(t)).unwrap_or_default();
        let (x, w) = (input(n, 0), input(n, 1));
        total += 2.0
            * match n.op_type() {
                "Conv" => count(&out) * count(w.get(1..).unwrap_or_default()),
                "ConvTranspose" => count(&x) * count(w.get(1..).unwrap_or_default()),
                "Gemm" if crate::onnx::attr::int_or(n, "transA", 0).unwrap_or(0) != 0 => {
                    count(&out) * x.first().copied().unwrap_or(0) as f64
                }
                _ => count(&out) * x.last().copied().unwrap_or(0) as f64,
            };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{make_int, make_ints};
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;

    fn weights(name: &str, shape: &[usize]) -> crate::onnx::pb::TensorProto {
        let n = shape.iter().product();
        let t = Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), vec![0.5f32; n]).unwrap());
        tensor_proto::from_tensor(name, &t)
    }

    #[test]
    fn counts_convolution_and_matmul_flops_at_the_fed_batch() {
        // Conv 2->3 channels, 3x3, same padding, on 4x4; flattened; MatMul [48] x [48, 5].
        let graph = GraphProto {
            node: vec![
                node("Conv", "conv", &["x", "w"], &["c"], vec![make_ints("pads", &[1, 1, 1, 1])]),
                node("Flatten", "flat", &["c"], &["f"], vec![make_int("axis", 1)]),
                node("MatMul", "fc", &["f", "w2"], &["y"], vec![]),
            ],
            input: vec![value_info("x", DType::F32, None)],
            initializer: vec![weights("w", &[3, 2, 3, 3]), weights("w2", &[48, 5])],
            output: vec![value_info("y", DType::F32, None)],
            ..Default::default()
        };
        let m = model(graph, 13);
        let feeds = |n: usize| vec![("x".to_string(), Tensor::zeros(DType::F32, &[n, 2, 4, 4]))];
        let per_image = 2.0 * (3.0 * 16.0) * (2.0 * 9.0) + 2.0 * 5.0 * 48.0;
        assert_eq!(forward_flops(&m, &feeds(1)).unwrap(), per_image);
        assert_eq!(forward_flops(&m, &feeds(2)).unwrap(), 2.0 * per_image);
    }
}
