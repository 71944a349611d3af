//! ONNX ops on candle, one file per family. Each family's `register` adds its ops to the
//! table with their arity and opset range.

mod conv;
mod elementwise;
mod fused;
mod generate;
mod linear;
mod norm;
mod resize;
mod select;
mod shape;

pub(crate) use elementwise::gelu_op;
pub(crate) use fused::build_batch_norm_depthwise;
pub(crate) use norm::{build_batch_norm_clamped, layer_norm_op};

use candle_core::{DType, Tensor};

use super::registry::Registry;

pub fn register_all(r: &mut Registry) {
    conv::register(r);
    elementwise::register(r);
    generate::register(r);
    linear::register(r);
    norm::register(r);
    resize::register(r);
    select::register(r);
    shape::register(r);
}

/// The i-th input, which the op requires.
/// The error of a node the engine cannot build or run as written, naming it and its op.
pub(crate) fn invalid(node: &crate::onnx::pb::NodeProto, problem: impl Into<String>) -> super::EngineError {
    super::EngineError::Invalid {
        node: crate::onnx::attr::node_label(node),
        op: node.op_type().into(),
        problem: problem.into(),
    }
}

pub(crate) fn req(x: &[Option<Tensor>], i: usize) -> candle_core::Result<&Tensor> {
    x.get(i).and_then(Option::as_ref).ok_or_else(|| candle_core::Error::Msg(format!("input {i} is required")))
}

/// The i-th input if given (ONNX marks omitted optional inputs with an empty name).
pub(crate) fn opt(x: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    x.get(i).and_then(Option::as_ref)
}

/// The values of a small integer tensor (shapes, axes, indices).
pub(crate) fn ints(t: &Tensor) -> candle_core::Result<Vec<i64>> {
    t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()
}

/// A scalar float from a tensor (Clip bounds, Pow exponents).
pub(crate) fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    match v.as_slice() {
        [one] => Ok(*one),
        _ => Err(candle_core::Error::Msg(format!("expected a scalar, got {} values", v.len()))),
    }
}

/// Resolves a possibly negative axis against a rank.
pub(crate) fn axis(a: i64, rank: usize) -> candle_core::Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r.max(1)).contains(&v) {
        Ok(v as usize)
    } else {
        Err(candle_core::Error::Msg(format!("axis {a} out of range for rank {rank}")))
    }
}

/// Brings two operands to one dtype: integers meet floats as floats.
pub(crate) fn unify(a: &Tensor, b: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    match (a.dtype(), b.dtype()) {
        (x, y) if x == y => Ok((a.clone(), b.clone())),
        (x, _) if x.is_float() => Ok((a.clone(), b.to_dtype(x)?)),
        (_, y) => Ok((a.to_dtype(y)?, b.clone())),
    }
}

#[cfg(test)]
mod parity;
#[cfg(test)]
mod tests;
