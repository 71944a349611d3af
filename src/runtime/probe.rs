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
    let mut m = model.clone();
    let g = m.graph_mut();
    g.output = tensors.iter().map(|t| ValueInfoProto { name: Some(t.clone()), ..Default::default() }).collect();
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
    let mut s = OrtSession::from_bytes(&m.to_bytes(), "a shape probe")?;
    Ok(s.run(&feeds)?.into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect())
}
