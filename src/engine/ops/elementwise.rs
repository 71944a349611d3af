//! Element-wise ops: arithmetic with numpy broadcasting (two operands, and Sum and Mean of
//! any number), activations, softmax.

use candle_core::{DType, Tensor};

use super::{axis, opt, req, scalar, unify};
use crate::engine::kernels::rows::{row_broadcast, RowOp};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

type Res = Result<Box<dyn Op>, EngineError>;

pub fn register(r: &mut Registry) {
    r.insert("Add", OpSpec::new(2, 2, |_, _| binary(|a, b| row_or_broadcast(a, b, RowOp::Add))));
    r.insert("Sub", OpSpec::new(2, 2, |_, _| binary(|a, b| a.broadcast_sub(b))));
    r.insert("Mul", OpSpec::new(2, 2, |_, _| binary(|a, b| row_or_broadcast(a, b, RowOp::Mul))));
    r.insert("Div", OpSpec::new(2, 2, |_, _| binary(|a, b| a.broadcast_div(b))));
    // Caffe2's ResNet and ShuffleNet exports join a block's branches with Sum.
    r.insert("Sum", OpSpec::new(1, usize::MAX, |_, _| nary(false)));
    r.insert("Mean", OpSpec::new(1, usize::MAX, |_, _| nary(true)));
    r.insert("Relu", OpSpec::new(1, 1, |_, _| unary(|a| a.relu())));
    r.insert("Sigmoid", OpSpec::new(1, 1, |_, _| unary(sigmoid)));
    r.insert("Tanh", OpSpec::new(1, 1, |_, _| unary(|a| a.tanh())));
    r.insert("Exp", OpSpec::new(1, 1, |_, _| unary(|a| a.exp())));
    r.insert("Log", OpSpec::new(1, 1, |_, _| unary(|a| a.log())));
    r.insert("Sqrt", OpSpec::new(1, 1, |_, _| unary(|a| a.sqrt())));
    r.insert("Neg", OpSpec::new(1, 1, |_, _| unary(|a| a.neg())));
    r.insert("Abs", OpSpec::new(1, 1, |_, _| unary(|a| a.abs())));
    r.insert("Reciprocal", OpSpec::new(1, 1, |_, _| unary(|a| a.recip())));
    r.insert("Erf", OpSpec::new(1, 1, |_, _| unary(|a| a.erf())));
    // Sinusoidal position embeddings computed in the graph.
    r.insert("Sin", OpSpec::new(1, 1, |_, _| unary(|a| a.sin())).since(7));
    r.insert("Cos", OpSpec::new(1, 1, |_, _| unary(|a| a.cos())).since(7));
    r.insert("Clip", OpSpec::new(1, 3, build_clip));
    r.insert("LeakyRelu", OpSpec::new(1, 1, build_leaky_relu));
    r.insert("HardSigmoid", OpSpec::new(1, 1, build_hard_sigmoid));
    r.insert("HardSwish", OpSpec::new(1, 1, |_, _| unary(|a| a.mul(&hard_sigmoid(a, 1.0 / 6.0, 0.5)?))).since(14));
    r.insert("Gelu", OpSpec::new(1, 1, build_gelu).since(20));
    r.insert("PRelu", OpSpec::new(2, 2, |_, _| binary(prelu)));
    r.insert("Elu", OpSpec::new(1, 1, |n, _| exponential_unit(n, 1.0, None)));
    r.insert("Selu", OpSpec::new(1, 1, |n, _| exponential_unit(n, SELU_ALPHA, Some(SELU_GAMMA))));
    r.insert("Celu", OpSpec::new(1, 1, build_celu).since(12));
    r.insert("ThresholdedRelu", OpSpec::new(1, 1, build_thresholded_relu).since(10));
    r.insert("Softplus", OpSpec::new(1, 1, |_, _| unary(softplus)));
    r.insert("Softsign", OpSpec::new(1, 1, |_, _| unary(|a| a.div(&(a.abs()? + 1.0)?))));
    r.insert("Mish", OpSpec::new(1, 1, |_, _| unary(|a| a.mul(&softplus(a)?.tanh()?))).since(18));
    r.insert("Pow", OpSpec::new(2, 2, |_, _| binary(pow)));
    r.insert("Softmax", OpSpec::new(1, 1, |n, c| build_softmax(n, c, false)));
    r.insert("LogSoftmax", OpSpec::new(1, 1, |n, c| build_softmax(n, c, true)));
}

fn binary(f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (a, b) = unify(req(x, 0)?, req(x, 1)?)?;
        Ok(vec![f(&a, &b)?])
    })))
}

/// A vector along the other operand's last axis (either side: exporters write both
/// `Add(bias, MatMul)` and `Add(MatMul, bias)`) through the row kernel, else broadcasting.
fn row_or_broadcast(a: &Tensor, b: &Tensor, op: RowOp) -> candle_core::Result<Tensor> {
    if let Some(y) = row_broadcast(a, b, op)? {
        return Ok(y);
    }
    if let Some(y) = row_broadcast(b, a, op)? {
        return Ok(y);
    }
    match op {
        RowOp::Add => a.broadcast_add(b),
        RowOp::Mul => a.broadcast_mul(b),
    }
}

/// Sum (or `mean`) of any number of operands, broadcast together.
fn nary(mean: bool) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let mut it = x.iter().flatten();
        let first = it.next().ok_or_else(|| candle_core::Error::Msg("no inputs".into()))?;
        let mut acc = first.clone();
        let mut count = 1usize;
        for t in it {
            let (a, b) = unify(&acc, t)?;
            acc = row_or_broadcast(&a, &b, RowOp::Add)?;
            count += 1;
        }
        if mean && count > 1 {
            acc = acc.affine(1.0 / count as f64, 0.0)?;
        }
        Ok(vec![acc])
    })))
}

fn unary(f: fn(&Tensor) -> candle_core::Result<Tensor>) -> Res {
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| Ok(vec![f(req(x, 0)?)?]))))
}

fn sigmoid(a: &Tensor) -> candle_core::Result<Tensor> {
    // 1 / (1 + exp(-x)), differentiable through candle's primitives.
    (a.neg()?.exp()? + 1.0)?.recip()
}

fn hard_sigmoid(a: &Tensor, alpha: f64, beta: f64) -> candle_core::Result<Tensor> {
    clamp(&a.affine(alpha, beta)?, Some(0.0), Some(1.0))
}

/// Clamp with optional bounds; the fused kernel on the CPU.
fn clamp(a: &Tensor, lo: Option<f64>, hi: Option<f64>) -> candle_core::Result<Tensor> {
    if crate::engine::kernels::native(a) && a.dtype().is_float() {
        return crate::engine::kernels::pointwise::clamp(
            a,
            lo.unwrap_or(f64::NEG_INFINITY),
            hi.unwrap_or(f64::INFINITY),
        );
    }
    let mut y = a.clone();
    if let Some(lo) = lo {
        y = y.maximum(lo)?;
    }
    if let Some(hi) = hi {
        y = y.minimum(hi)?;
    }
    Ok(y)
}

fn pow(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // Only a scalar exponent is needed by real models (x^2 in normalisations, x^0.5).
    let e = scalar(b).map_err(|_| candle_core::Error::Msg("Pow: only a scalar exponent is supported".into()))?;
    if e == 2.0 {
        a.sqr()
    } else if e == 1.0 {
        Ok(a.clone())
    } else {
        a.powf(e)
    }
}

fn build_clip(node: &NodeProto, ctx: &BuildCtx) -> Res {
    // Before opset 11 the bounds are attributes; from 11 they are optional inputs.
    let (amin, amax) = if ctx.opset < 11 {
        (Some(attr::float_or(node, "min", f32::MIN)? as f64), Some(attr::float_or(node, "max", f32::MAX)? as f64))
    } else {
        (None, None)
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let lo = match opt(x, 1) {
            Some(t) => Some(scalar(t)?),
            None => amin,
        };
        let hi = match opt(x, 2) {
            Some(t) => Some(scalar(t)?),
            None => amax,
        };
        Ok(vec![clamp(a, lo, hi)?])
    })))
}

fn build_leaky_relu(node: &NodeProto, _: &BuildCtx) -> Res {
    let alpha = attr::float_or(node, "alpha", 0.01)? as f64;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        Ok(vec![(a.relu()? - a.neg()?.relu()?.affine(alpha, 0.0)?)?])
    })))
}

/// max(0, x) + slope * min(0, x), the slope broadcast to x (one per channel as [C, 1, 1]
/// in converted models) and trainable.
fn prelu(x: &Tensor, slope: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? - x.neg()?.relu()?.broadcast_mul(slope)?
}

/// ONNX's Selu defaults (the self-normalising constants, as float32 values).
const SELU_ALPHA: f64 = 1.673_263_192_176_818_8;
const SELU_GAMMA: f64 = 1.050_701_022_148_132_3;

/// x for x > 0, alpha * (exp(x / scale) - 1) below, times `gamma`: written as
/// relu(x) + alpha * (exp(-relu(-x) / scale) - 1), which is 0 past 0 on the exponential side,
/// so both pieces differentiate through candle's primitives without a select.
fn exponential(x: &Tensor, alpha: f64, scale: f64, gamma: Option<f64>) -> candle_core::Result<Tensor> {
    let negative = x.neg()?.relu()?.affine(-1.0 / scale, 0.0)?.exp()?.affine(alpha, -alpha)?;
    let y = (x.relu()? + negative)?;
    match gamma {
        Some(g) => y.affine(g, 0.0),
        None => Ok(y),
    }
}

/// Elu (alpha default 1) and Selu (alpha and gamma default to the self-normalising values).
fn exponential_unit(node: &NodeProto, alpha: f64, gamma: Option<f64>) -> Res {
    let alpha = attr::float_or(node, "alpha", alpha as f32)? as f64;
    let gamma = match gamma {
        Some(g) => Some(attr::float_or(node, "gamma", g as f32)? as f64),
        None => None,
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| Ok(vec![exponential(req(x, 0)?, alpha, 1.0, gamma)?]))))
}

fn build_celu(node: &NodeProto, _: &BuildCtx) -> Res {
    let alpha = attr::float_or(node, "alpha", 1.0)? as f64;
    if alpha == 0.0 {
        return Err(super::invalid(node, "Celu's alpha must not be 0"));
    }
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| Ok(vec![exponential(req(x, 0)?, alpha, alpha, None)?]))))
}

/// x where x > alpha, else 0; the comparison carries no gradient.
fn build_thresholded_relu(node: &NodeProto, _: &BuildCtx) -> Res {
    let alpha = attr::float_or(node, "alpha", 1.0)? as f64;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let keep = a.detach().gt(alpha)?.to_dtype(a.dtype())?;
        Ok(vec![a.mul(&keep)?])
    })))
}

/// log(1 + exp(x)) as relu(x) + log(1 + exp(-|x|)), which does not overflow for large x.
fn softplus(a: &Tensor) -> candle_core::Result<Tensor> {
    a.relu()? + (a.abs()?.neg()?.exp()? + 1.0)?.log()?
}

fn build_hard_sigmoid(node: &NodeProto, _: &BuildCtx) -> Res {
    let alpha = attr::float_or(node, "alpha", 0.2)? as f64;
    let beta = attr::float_or(node, "beta", 0.5)? as f64;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| Ok(vec![hard_sigmoid(req(x, 0)?, alpha, beta)?]))))
}

fn build_gelu(node: &NodeProto, _: &BuildCtx) -> Res {
    let tanh = attr::string(node, "approximate")?.is_some_and(|s| s == "tanh");
    Ok(gelu_op(tanh))
}

/// GELU on its one input; also the step a written-out GELU is fused into.
pub(crate) fn gelu_op(tanh: bool) -> Box<dyn Op> {
    Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let y = if crate::engine::kernels::native(a) && matches!(a.dtype(), DType::F32 | DType::F64) {
            crate::engine::kernels::pointwise::gelu(a, tanh)?
        } else if tanh {
            a.gelu()?
        } else {
            // x * 0.5 * (1 + erf(x / sqrt(2)))
            a.mul(&(a.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)?.affine(0.5, 0.0)?)?
        };
        Ok(vec![y])
    }))
}

fn build_softmax(node: &NodeProto, ctx: &BuildCtx, log: bool) -> Res {
    // Opset 13 made softmax act on one axis (default -1); before, it flattened from `axis`
    // (default 1), which equals the last axis for the 2-D inputs classifiers produce.
    let default = if ctx.opset >= 13 { -1 } else { 1 };
    let ax = attr::int_or(node, "axis", default)?;
    let legacy = ctx.opset < 13;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let d = axis(ax, a.rank())?;
        if legacy && d + 1 != a.rank() {
            return Err(candle_core::Error::Msg("Softmax before opset 13 is supported on the last axis only".into()));
        }
        let a = if a.dtype() == DType::F16 { a.to_dtype(DType::F32)? } else { a.clone() };
        if !log
            && d + 1 == a.rank()
            && crate::engine::kernels::native(&a)
            && matches!(a.dtype(), DType::F32 | DType::F64)
        {
            return Ok(vec![crate::engine::kernels::rows::softmax_last(&a)?]);
        }
        let shifted = a.broadcast_sub(&a.max_keepdim(d)?.detach())?;
        let y = if log {
            shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(d)?.log()?)?
        } else {
            let e = shifted.exp()?;
            e.broadcast_div(&e.sum_keepdim(d)?)?
        };
        Ok(vec![y])
    })))
}
