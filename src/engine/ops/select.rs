//! Comparisons, logic and selection: Equal, Less, Greater, LessOrEqual, GreaterOrEqual, Not,
//! And, Or, Xor, Where, Min, Max, and the rounding ops Floor, Ceil, Sign. Exporters emit them
//! around shapes (PyTorch's `expand(-1, ...)` becomes Equal + Where) and in masks.

use candle_core::op::CmpOp;
use candle_core::{DType, Shape, Tensor};

use super::{req, unify};
use crate::engine::registry::{FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;

type Res = Result<Box<dyn Op>, EngineError>;

pub fn register(r: &mut Registry) {
    r.insert("Equal", OpSpec::new(2, 2, |_, _| compare(CmpOp::Eq)));
    r.insert("Less", OpSpec::new(2, 2, |_, _| compare(CmpOp::Lt)));
    r.insert("Greater", OpSpec::new(2, 2, |_, _| compare(CmpOp::Gt)));
    r.insert("LessOrEqual", OpSpec::new(2, 2, |_, _| compare(CmpOp::Le)).since(12));
    r.insert("GreaterOrEqual", OpSpec::new(2, 2, |_, _| compare(CmpOp::Ge)).since(12));
    r.insert("Not", OpSpec::new(1, 1, |_, _| Ok(Box::new(FnOp(|x: &[Option<Tensor>]| Ok(vec![req(x, 0)?.eq(0u8)?]))))));
    r.insert("And", OpSpec::new(2, 2, |_, _| logic(|a, b| a.broadcast_minimum(b))));
    r.insert("Or", OpSpec::new(2, 2, |_, _| logic(|a, b| a.broadcast_maximum(b))));
    r.insert("Xor", OpSpec::new(2, 2, |_, _| logic(|a, b| a.broadcast_ne(b))));
    r.insert("Where", OpSpec::new(3, 3, |_, _| Ok(Box::new(FnOp(where_op)))).since(9));
    r.insert("Min", OpSpec::new(1, usize::MAX, |_, _| fold(|a, b| a.broadcast_minimum(b))));
    r.insert("Max", OpSpec::new(1, usize::MAX, |_, _| fold(|a, b| a.broadcast_maximum(b))));
    r.insert("Floor", OpSpec::new(1, 1, |_, _| rounding(|a| a.floor())));
    r.insert("Ceil", OpSpec::new(1, 1, |_, _| rounding(|a| a.ceil())));
    r.insert("Sign", OpSpec::new(1, 1, |_, _| rounding(|a| a.sign())).since(9));
}

/// The shape `dims` broadcast together (numpy rules), or an error naming them.
pub(crate) fn broadcast_all(dims: &[&[usize]]) -> candle_core::Result<Vec<usize>> {
    let mut out: Shape = Shape::from(dims.first().map(|d| d.to_vec()).unwrap_or_default());
    for d in dims.iter().skip(1) {
        out = out.broadcast_shape_binary_op(&Shape::from(d.to_vec()), "broadcast")?;
    }
    Ok(out.dims().to_vec())
}

/// Booleans are uint8 0/1 in the engine.
fn compare(op: CmpOp) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (a, b) = unify(req(x, 0)?, req(x, 1)?)?;
        let shape = broadcast_all(&[a.dims(), b.dims()])?;
        Ok(vec![a.broadcast_as(shape.as_slice())?.cmp(&b.broadcast_as(shape.as_slice())?, op)?])
    })))
}

fn logic(f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (a, b) = (req(x, 0)?.ne(0u8)?, req(x, 1)?.ne(0u8)?);
        Ok(vec![f(&a, &b)?])
    })))
}

fn where_op(x: &[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>> {
    let (c, a, b) = (req(x, 0)?, req(x, 1)?, req(x, 2)?);
    let (a, b) = unify(a, b)?;
    let shape = broadcast_all(&[c.dims(), a.dims(), b.dims()])?;
    let s = shape.as_slice();
    let cond = c.ne(0u8)?.broadcast_as(s)?.contiguous()?;
    Ok(vec![cond.where_cond(&a.broadcast_as(s)?.contiguous()?, &b.broadcast_as(s)?.contiguous()?)?])
}

fn fold(f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let mut it = x.iter().flatten();
        let mut acc = it.next().ok_or_else(|| candle_core::Error::Msg("no inputs".into()))?.clone();
        for t in it {
            let (a, b) = unify(&acc, t)?;
            acc = f(&a, &b)?;
        }
        Ok(vec![acc])
    })))
}

/// Rounding ops are piecewise constant: no gradient flows through them.
fn rounding(f: fn(&Tensor) -> candle_core::Result<Tensor>) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        if a.dtype().is_float() {
            return Ok(vec![f(&a.detach())?]);
        }
        Ok(vec![f(&a.to_dtype(DType::F64)?)?.to_dtype(a.dtype())?])
    })))
}
