//! Small constructors for ONNX protos, used by graph surgery and by tests that build tiny
//! models in code.

use super::pb::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
use super::pb::type_proto::{Tensor as TensorTypeProto, Value as TypeValue};
use super::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::{tensor_proto, Dim, Model};
use crate::tensor::DType;

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.to_string()),
        name: Some(name.to_string()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A tensor value declaration; `shape: None` leaves the shape undeclared.
pub fn value_info(name: &str, dtype: DType, shape: Option<&[Dim]>) -> ValueInfoProto {
    let shape = shape.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: match d {
                    Dim::Fixed(n) => Some(DimValue::DimValue(*n)),
                    Dim::Named(s) => Some(DimValue::DimParam(s.clone())),
                    Dim::Unknown => None,
                },
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorTypeProto {
                elem_type: Some(tensor_proto::onnx_code(dtype)),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A model importing the default domain at `opset`, IR version 8 (read by every runtime
/// mtpack targets).
/// y = x @ W, with `w` as the initializer W and x of any shape: the smallest trainable
/// model, for tests.
pub fn matmul(w: &crate::tensor::Tensor) -> Model {
    let graph = GraphProto {
        node: vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        input: vec![value_info("x", DType::F32, None)],
        output: vec![value_info("y", DType::F32, None)],
        initializer: vec![tensor_proto::from_tensor("W", w)],
        ..Default::default()
    };
    model(graph, 13)
}

pub fn model(graph: GraphProto, opset: i64) -> Model {
    let proto = ModelProto {
        ir_version: Some(8),
        producer_name: Some("mtpack".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(graph),
        ..Default::default()
    };
    Model::from_proto(proto, "<built in code>")
}
