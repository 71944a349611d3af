//! Typed attribute getters for ONNX nodes; errors name the node and attribute.

use super::pb::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};
use super::OnnxError;

/// A short label for a node in messages: its name, or its first output when unnamed.
pub fn node_label(node: &NodeProto) -> String {
    match node.name() {
        "" => format!("<output {}>", node.output.first().map(String::as_str).unwrap_or("?")),
        name => name.to_string(),
    }
}

pub fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

fn err(node: &NodeProto, attribute: &str, problem: impl Into<String>) -> OnnxError {
    OnnxError::Attribute {
        node: node_label(node),
        op: node.op_type().to_string(),
        attribute: attribute.to_string(),
        problem: problem.into(),
    }
}

fn typed<'a>(node: &'a NodeProto, name: &str, want: AttributeType) -> Result<Option<&'a AttributeProto>, OnnxError> {
    match find(node, name) {
        None => Ok(None),
        Some(a) if !a.ref_attr_name().is_empty() => {
            Err(err(node, name, "refers to a function attribute, which mtpack does not resolve"))
        }
        Some(a) => {
            // Old models leave `type` unset; accept them when the matching field is filled.
            let declared = a.r#type();
            if declared == want || declared == AttributeType::Undefined {
                Ok(Some(a))
            } else {
                Err(err(node, name, format!("has type {declared:?}, expected {want:?}")))
            }
        }
    }
}

pub fn int(node: &NodeProto, name: &str) -> Result<Option<i64>, OnnxError> {
    Ok(typed(node, name, AttributeType::Int)?.and_then(|a| a.i))
}

pub fn int_or(node: &NodeProto, name: &str, default: i64) -> Result<i64, OnnxError> {
    Ok(int(node, name)?.unwrap_or(default))
}

pub fn float_or(node: &NodeProto, name: &str, default: f32) -> Result<f32, OnnxError> {
    Ok(typed(node, name, AttributeType::Float)?.and_then(|a| a.f).unwrap_or(default))
}

pub fn ints(node: &NodeProto, name: &str) -> Result<Option<Vec<i64>>, OnnxError> {
    Ok(typed(node, name, AttributeType::Ints)?.map(|a| a.ints.clone()))
}

pub fn string(node: &NodeProto, name: &str) -> Result<Option<String>, OnnxError> {
    typed(node, name, AttributeType::String)?
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8(s.clone()).map_err(|_| err(node, name, "is not valid UTF-8")))
        .transpose()
}

pub fn tensor<'a>(node: &'a NodeProto, name: &str) -> Result<Option<&'a TensorProto>, OnnxError> {
    Ok(typed(node, name, AttributeType::Tensor)?.and_then(|a| a.t.as_ref()))
}

pub fn make_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub fn make_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn make_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(value),
        ..Default::default()
    }
}

pub fn make_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::String as i32),
        s: Some(value.as_bytes().to_vec()),
        ..Default::default()
    }
}

pub fn make_tensor(name: &str, value: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(value),
        ..Default::default()
    }
}
