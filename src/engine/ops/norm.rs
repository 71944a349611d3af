//! Normalisations and reductions: BatchNormalization (inference statistics), LayerNormalization,
//! InstanceNormalization, GroupNormalization, LRN, LpNormalization, and the reductions
//! (ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceSumSquare, ReduceL1, ReduceL2,
//! ReduceLogSumExp).

use candle_core::Tensor;

use super::{axis, ints, opt, req};
use crate::engine::kernels::batchnorm::{self, Clamp};
use crate::engine::kernels::native;
use crate::engine::portable::{self, per_channel};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

pub fn register(r: &mut Registry) {
    r.insert("BatchNormalization", OpSpec::new(5, 5, build_batch_norm));
    r.insert("LayerNormalization", OpSpec::new(2, 3, build_layer_norm).since(17));
    r.insert("InstanceNormalization", OpSpec::new(3, 3, build_instance_norm).since(6));
    r.insert("GroupNormalization", OpSpec::new(3, 3, build_group_norm).since(18));
    r.insert("LRN", OpSpec::new(1, 1, build_lrn));
    r.insert("ReduceMean", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::Mean)));
    r.insert("ReduceSum", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::Sum)));
    r.insert("ReduceMax", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::Max)));
    r.insert("ReduceMin", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::Min)));
    r.insert("ReduceSumSquare", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::SumSquare)));
    r.insert("ReduceL1", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::L1)));
    r.insert("ReduceL2", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::L2)));
    r.insert("ReduceLogSumExp", OpSpec::new(1, 2, |n, c| build_reduce(n, c, Reduce::LogSumExp)));
    r.insert("LpNormalization", OpSpec::new(1, 1, build_lp_norm));
}

fn build_batch_norm(node: &NodeProto, ctx: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    build_batch_norm_clamped(node, ctx, None)
}

/// A BatchNormalization node's training behaviour: whether a pass normalises by the
/// batch's statistics, and the running averages it then returns.
#[derive(Clone)]
pub(crate) struct Training {
    pub eps: f64,
    /// ONNX's: running = running * momentum + batch * (1 - momentum).
    momentum: f64,
    /// Its running statistics are state the step updates (its scale trains).
    stateful: bool,
    training: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calibrating: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Training {
    pub fn of(node: &NodeProto, ctx: &BuildCtx) -> Result<Training, EngineError> {
        if attr::int_or(node, "training_mode", 0)? != 0 {
            return Err(EngineError::Invalid {
                node: attr::node_label(node),
                op: node.op_type().into(),
                problem: "training_mode=1 is not supported: mtpack trains with the recorded statistics".into(),
            });
        }
        Ok(Training {
            eps: attr::float_or(node, "epsilon", 1e-5)? as f64,
            // PyTorch's momentum 0.1 is 0.9 here.
            momentum: attr::float_or(node, "momentum", 0.9)? as f64,
            stateful: node.input.get(3).is_some_and(|m| ctx.stateful.contains(m))
                && node.input.get(4).is_some_and(|v| ctx.stateful.contains(v)),
            training: ctx.training.clone(),
            calibrating: ctx.calibrating.clone(),
        })
    }

    /// Whether this pass over `input` normalises by the batch's own statistics.
    pub fn batch_statistics(&self, input: &Tensor) -> bool {
        self.stateful && self.training.load(std::sync::atomic::Ordering::Relaxed) && input.rank() >= 2
    }

    /// The running mean and variance after a batch of `input` with statistics (`bm`, `bv`,
    /// the biased variance).
    pub fn running(
        &self,
        input: &Tensor,
        [mean, var]: [&Tensor; 2],
        [bm, bv]: [&Tensor; 2],
    ) -> candle_core::Result<[Tensor; 2]> {
        let momentum = if self.calibrating.load(std::sync::atomic::Ordering::Relaxed) { 0.0 } else { self.momentum };
        // Running variance takes the unbiased batch variance, as PyTorch does.
        let m = (input.elem_count() / bm.elem_count().max(1)) as f64;
        let unbiased = (bv * (m / (m - 1.0).max(1.0)))?;
        let new_mean = (mean.affine(momentum, 0.0)? + bm.affine(1.0 - momentum, 0.0)?)?;
        let new_var = (var.affine(momentum, 0.0)? + unbiased.affine(1.0 - momentum, 0.0)?)?;
        Ok([new_mean, new_var])
    }
}

/// BatchNormalization followed by `clamp` (a Clip or Relu the engine folded into it).
pub fn build_batch_norm_clamped(
    node: &NodeProto,
    ctx: &BuildCtx,
    clamp: Option<Clamp>,
) -> Result<Box<dyn Op>, EngineError> {
    let train = Training::of(node, ctx)?;
    let eps = train.eps;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (input, scale, bias, mean, var) = (req(x, 0)?, req(x, 1)?, req(x, 2)?, req(x, 3)?, req(x, 4)?);
        let r = input.rank();
        if train.batch_statistics(input) {
            let (y, bm, bv) = if native(input) {
                batchnorm::batch_norm_train(input, scale, bias, eps, clamp)?
            } else {
                portable::batch_norm_train(input, scale, bias, eps, clamp)?
            };
            let [new_mean, new_var] = train.running(input, [mean, var], [&bm, &bv])?;
            return Ok(vec![y, new_mean, new_var]);
        }
        if native(input) && r >= 2 {
            return Ok(vec![batchnorm::batch_norm(input, [scale, bias, mean, var], eps, clamp)?]);
        }
        // y = (x - mean) * scale / sqrt(var + eps) + bias; scale and bias may be trainable.
        let inv = (var + eps)?.sqrt()?.recip()?;
        let k = per_channel(&scale.mul(&inv)?, r)?;
        let mut y =
            input.broadcast_sub(&per_channel(mean, r)?)?.broadcast_mul(&k)?.broadcast_add(&per_channel(bias, r)?)?;
        if let Some(c) = clamp {
            y = portable::clamped(&y, c)?;
        }
        Ok(vec![y])
    })))
}

fn build_layer_norm(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let ax = attr::int_or(node, "axis", -1)?;
    let eps = attr::float_or(node, "epsilon", 1e-5)? as f64;
    Ok(layer_norm_op(ax, eps))
}

/// LayerNormalization from `axis` on, inputs (x, scale, optional bias); also the step a
/// written-out layer normalisation is fused into.
pub(crate) fn layer_norm_op(ax: i64, eps: f64) -> Box<dyn Op> {
    Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let first = axis(ax, input.rank())?;
        Ok(vec![layer_norm(input, req(x, 1)?, opt(x, 2), first, eps)?])
    }))
}

fn layer_norm(
    input: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    first: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let last = input.rank().saturating_sub(1);
    let d = input.dims().last().copied().unwrap_or(0);
    let fits = |t: &Tensor| t.elem_count() == d && t.dtype() == input.dtype();
    let float = matches!(input.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if first == last && crate::engine::kernels::native(input) && float && fits(scale) && bias.is_none_or(fits) {
        let zeros;
        let bias = match bias {
            Some(b) => b,
            None => {
                zeros = scale.zeros_like()?;
                &zeros
            }
        };
        return crate::engine::kernels::rows::layer_norm_last(input, scale, bias, eps);
    }
    let mut y = standardise(input, (first..input.rank()).collect(), eps)?.broadcast_mul(scale)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// (x - mean) / sqrt(var + eps) over `dims`, the biased variance, as every normalisation
/// of one sample computes it.
fn standardise(x: &Tensor, dims: Vec<usize>, eps: f64) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(dims.clone())?)?;
    let var = centred.sqr()?.mean_keepdim(dims)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Each sample's channels normalised over their spatial axes, then a per-channel scale and
/// bias (trainable, as BatchNormalization's). PyTorch exports GroupNorm before opset 18 as
/// Reshape, InstanceNormalization over the groups, Reshape, Mul, Add.
fn build_instance_norm(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let eps = attr::float_or(node, "epsilon", 1e-5)? as f64;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let r = input.rank();
        if r < 3 {
            return Err(candle_core::Error::Msg(format!(
                "input of rank {r}: InstanceNormalization needs [N, C, D1, ...]"
            )));
        }
        let y = standardise(input, (2..r).collect(), eps)?;
        Ok(vec![y.broadcast_mul(&per_channel(req(x, 1)?, r)?)?.broadcast_add(&per_channel(req(x, 2)?, r)?)?])
    })))
}

/// Channels in `num_groups` groups, each normalised over its channels and spatial axes. The
/// scale and bias are per group before opset 21 and per channel from it (the operator's two
/// versions), as tract reads them.
fn build_group_norm(node: &NodeProto, ctx: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let eps = attr::float_or(node, "epsilon", 1e-5)? as f64;
    let groups = attr::int_or(node, "num_groups", 0)?;
    if groups <= 0 {
        return Err(super::invalid(node, format!("num_groups {groups}: a positive number of groups is required")));
    }
    let groups = groups as usize;
    let per_channel_affine = ctx.opset >= 21;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (input, scale, bias) = (req(x, 0)?, req(x, 1)?, req(x, 2)?);
        let dims = input.dims().to_vec();
        let n = match dims.as_slice() {
            [n, c, ..] if c % groups == 0 => *n,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "input {dims:?}: GroupNormalization needs [N, C, ...] with C divisible by {groups} groups"
                )))
            }
        };
        let grouped = standardise(&input.reshape((n, groups, ()))?, vec![2], eps)?;
        let y = if per_channel_affine {
            let r = dims.len();
            grouped
                .reshape(dims.as_slice())?
                .broadcast_mul(&per_channel(scale, r)?)?
                .broadcast_add(&per_channel(bias, r)?)?
        } else {
            let y = grouped.broadcast_mul(&per_channel(scale, 3)?)?.broadcast_add(&per_channel(bias, 3)?)?;
            y.reshape(dims.as_slice())?
        };
        Ok(vec![y])
    })))
}

/// Local response normalisation across channels (AlexNet, GoogLeNet, ZFNet):
/// y = x / (bias + alpha / size * sum of x^2 over the `size` channels around each)^beta,
/// the window running floor((size - 1) / 2) channels below and ceil((size - 1) / 2) above.
fn build_lrn(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let size = attr::int_or(node, "size", 0)?;
    if size <= 0 {
        return Err(super::invalid(node, format!("size {size}: a positive window size is required")));
    }
    let size = size as usize;
    let alpha = attr::float_or(node, "alpha", 1e-4)? as f64;
    let beta = attr::float_or(node, "beta", 0.75)? as f64;
    let bias = attr::float_or(node, "bias", 1.0)? as f64;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let c = match input.dims() {
            [_, c, ..] => *c,
            d => return Err(candle_core::Error::Msg(format!("input {d:?}: LRN needs [N, C, ...]"))),
        };
        let below = (size - 1) / 2;
        let padded = input.sqr()?.pad_with_zeros(1, below, size - 1 - below)?;
        let mut window = padded.narrow(1, 0, c)?;
        for j in 1..size {
            window = (window + padded.narrow(1, j, c)?)?;
        }
        let denominator = window.affine(alpha / size as f64, bias)?.powf(beta)?;
        Ok(vec![input.div(&denominator)?])
    })))
}

#[derive(Clone, Copy)]
enum Reduce {
    Mean,
    Sum,
    Max,
    Min,
    SumSquare,
    L1,
    L2,
    LogSumExp,
}

/// `y` reduced over `dims` (sorted, distinct) by `kind`, each kept as size 1: the element map
/// (square, absolute value) once, then one axis after another (every sum, extremum and
/// log-sum-exp over several axes is the same reduction repeated), then L2's square root.
fn reduce(y: &Tensor, dims: &[usize], kind: Reduce) -> candle_core::Result<Tensor> {
    let mut y = match kind {
        Reduce::SumSquare | Reduce::L2 => y.sqr()?,
        Reduce::L1 => y.abs()?,
        _ => y.clone(),
    };
    for &d in dims.iter().rev() {
        y = match kind {
            Reduce::Mean => y.mean_keepdim(d)?,
            Reduce::Sum | Reduce::SumSquare | Reduce::L1 | Reduce::L2 => y.sum_keepdim(d)?,
            Reduce::Max => y.max_keepdim(d)?,
            Reduce::Min => y.min_keepdim(d)?,
            Reduce::LogSumExp => {
                let top = y.max_keepdim(d)?.detach();
                (y.broadcast_sub(&top)?.exp()?.sum_keepdim(d)?.log()? + top)?
            }
        };
    }
    match kind {
        Reduce::L2 => y.sqrt(),
        _ => Ok(y),
    }
}

/// x divided by its L1 or L2 norm along `axis` (embedding models end in it).
fn build_lp_norm(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let ax = attr::int_or(node, "axis", -1)?;
    let kind = match attr::int_or(node, "p", 2)? {
        1 => Reduce::L1,
        2 => Reduce::L2,
        p => return Err(super::invalid(node, format!("p {p}: LpNormalization takes 1 or 2"))),
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let d = axis(ax, input.rank())?;
        Ok(vec![input.broadcast_div(&reduce(input, &[d], kind)?)?])
    })))
}

fn build_reduce(node: &NodeProto, ctx: &BuildCtx, kind: Reduce) -> Result<Box<dyn Op>, EngineError> {
    let keep = attr::int_or(node, "keepdims", 1)? != 0;
    let noop_empty = attr::int_or(node, "noop_with_empty_axes", 0)? != 0;
    // Axes moved from an attribute to an input (ReduceSum at 13, the others at 18).
    let attr_axes = attr::ints(node, "axes")?;
    let from_input = match kind {
        Reduce::Sum => ctx.opset >= 13,
        _ => ctx.opset >= 18,
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let axes = match (from_input, opt(x, 1)) {
            (true, Some(t)) => Some(ints(t)?),
            (true, None) => None,
            (false, _) => attr_axes.clone(),
        };
        let mut dims: Vec<usize> = match axes {
            Some(a) if !a.is_empty() => a.iter().map(|&a| axis(a, input.rank())).collect::<candle_core::Result<_>>()?,
            _ if noop_empty => return Ok(vec![input.clone()]),
            _ => (0..input.rank()).collect(),
        };
        dims.sort_unstable();
        dims.dedup();
        let mut y = reduce(input, &dims, kind)?;
        if !keep {
            for &d in dims.iter().rev() {
                y = y.squeeze(d)?;
            }
        }
        Ok(vec![y])
    })))
}
