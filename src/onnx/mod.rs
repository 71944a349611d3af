//! ONNX I/O: our own prost types generated from `schemas/onnx.proto`, lossless load/save,
//! tensor conversion and attribute getters.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    include!("pb/onnx.rs");
}

pub mod attr;
pub mod build;
mod error;
mod model;
pub mod standard_ops;
pub mod tensor_proto;

pub use error::OnnxError;
pub use model::{for_each_tensor_mut, Model, MAX_MODEL_BYTES};

use pb::type_proto::Value as TypeValue;
use pb::{tensor_shape_proto::dimension::Value as DimValue, ValueInfoProto};

/// One dimension of a declared shape: a number, a symbolic name, or unknown.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Named(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Element type code and shape of a tensor-typed value, when declared.
pub fn tensor_type(v: &ValueInfoProto) -> Option<(i32, Option<Vec<Dim>>)> {
    let ty = v.r#type.as_ref()?;
    match ty.value.as_ref()? {
        TypeValue::TensorType(t) => {
            let shape = t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(n)) => Dim::Fixed(*n),
                        Some(DimValue::DimParam(p)) => Dim::Named(p.clone()),
                        None => Dim::Unknown,
                    })
                    .collect()
            });
            Some((t.elem_type(), shape))
        }
        _ => None,
    }
}

/// The constant value of a tensor name: an initializer or the output of a `Constant` node.
pub fn constant<'a>(graph: &'a pb::GraphProto, name: &str) -> Option<&'a pb::TensorProto> {
    if let Some(t) = graph.initializer.iter().find(|t| t.name() == name) {
        return Some(t);
    }
    graph
        .node
        .iter()
        .find(|n| n.op_type() == "Constant" && n.output.first().is_some_and(|o| o == name))
        .and_then(|n| attr::find(n, "value"))
        .and_then(|a| a.t.as_ref())
}
