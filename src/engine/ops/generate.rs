//! Ops that make or rearrange tensors from shapes: ConstantOfShape, Range, Expand, Tile,
//! Split and Pad. Exporters emit the first three in shape subgraphs (class tokens expanded to
//! the batch, position ids); Pad and Split appear in converted convolutional and attention code.

use candle_core::{DType, Device, Tensor};

use super::select::broadcast_all;
use super::{axis, ints, invalid, opt, req, scalar};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::{to_candle, EngineError};
use crate::onnx::pb::NodeProto;
use crate::onnx::{attr, tensor_proto};

type Res = Result<Box<dyn Op>, EngineError>;

pub fn register(r: &mut Registry) {
    r.insert("ConstantOfShape", OpSpec::new(1, 1, build_constant_of_shape).since(9));
    r.insert("Range", OpSpec::new(3, 3, |_, c| build_range(c)).since(11));
    r.insert("Expand", OpSpec::new(2, 2, |_, _| Ok(Box::new(FnOp(expand)))).since(8));
    r.insert("Tile", OpSpec::new(2, 2, |_, _| Ok(Box::new(FnOp(tile)))).since(6));
    r.insert("Split", OpSpec::new(1, 2, build_split).outputs(usize::MAX));
    r.insert("Pad", OpSpec::new(1, 4, build_pad).since(11));
}

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}

fn dims_of(t: &Tensor) -> candle_core::Result<Vec<usize>> {
    ints(t)?
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| msg(format!("negative dimension {d} in a shape"))))
        .collect()
}

fn build_constant_of_shape(node: &NodeProto, ctx: &BuildCtx) -> Res {
    let value = match attr::tensor(node, "value")? {
        Some(t) => tensor_proto::to_tensor(t)?,
        None => crate::tensor::Tensor::F32(ndarray::arr0(0.0f32).into_dyn()),
    };
    if value.len() != 1 {
        return Err(invalid(node, format!("value must hold one element, it holds {}", value.len())));
    }
    let one =
        to_candle(&value, ctx.float).and_then(|t| t.flatten_all()).map_err(|e| invalid(node, format!("value: {e}")))?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let shape = dims_of(req(x, 0)?)?;
        let dev = req(x, 0)?.device().clone();
        Ok(vec![one.to_device(&dev)?.reshape(())?.broadcast_as(shape)?.contiguous()?])
    })))
}

fn build_range(ctx: &BuildCtx) -> Res {
    let float = ctx.float;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (start, limit, delta) = (req(x, 0)?, req(x, 1)?, req(x, 2)?);
        let (s, l, d) = (scalar(start)?, scalar(limit)?, scalar(delta)?);
        if d == 0.0 {
            return Err(msg("Range: delta is 0".into()));
        }
        let n = ((l - s) / d).ceil().max(0.0) as usize;
        let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
        let t = Tensor::new(v, &Device::Cpu)?;
        Ok(vec![if start.dtype().is_float() { t.to_dtype(float)? } else { t.to_dtype(DType::I64)? }])
    })))
}

/// numpy broadcasting of the input against the given shape (either may be the larger).
fn expand(x: &[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>> {
    let a = req(x, 0)?;
    let want = dims_of(req(x, 1)?)?;
    let shape = broadcast_all(&[a.dims(), &want])?;
    Ok(vec![a.broadcast_as(shape)?.contiguous()?])
}

fn tile(x: &[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>> {
    let a = req(x, 0)?;
    let reps = dims_of(req(x, 1)?)?;
    if reps.len() != a.rank() {
        return Err(msg(format!("Tile: {} repeats for rank {}", reps.len(), a.rank())));
    }
    Ok(vec![a.repeat(reps)?])
}

fn build_split(node: &NodeProto, ctx: &BuildCtx) -> Res {
    let ax = attr::int_or(node, "axis", 0)?;
    let outputs = node.output.len();
    // Sizes moved from an attribute to an input in opset 13; opset 18 adds num_outputs.
    let attr_split = if ctx.opset < 13 { attr::ints(node, "split")? } else { None };
    let num = attr::int(node, "num_outputs")?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let d = axis(ax, a.rank())?;
        let n = a.dims()[d];
        let sizes: Vec<usize> = match (opt(x, 1).map(ints).transpose()?.or(attr_split.clone()), num) {
            (Some(s), _) => s.into_iter().map(|v| v.max(0) as usize).collect(),
            (None, k) => {
                // Equal parts; the last is smaller when the axis does not divide (opset 18).
                let k = k.map(|k| k.max(1) as usize).unwrap_or(outputs.max(1));
                let part = n.div_ceil(k);
                (0..k).map(|i| part.min(n.saturating_sub(i * part))).collect()
            }
        };
        if sizes.iter().sum::<usize>() != n {
            return Err(msg(format!("Split: sizes {sizes:?} do not add up to dimension {n}")));
        }
        let mut at = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for s in sizes {
            out.push(a.narrow(d, at, s)?);
            at += s;
        }
        Ok(out)
    })))
}

#[derive(Clone, Copy, PartialEq)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
}

fn build_pad(node: &NodeProto, _: &BuildCtx) -> Res {
    let mode = match attr::string(node, "mode")?.as_deref().unwrap_or("constant") {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        other => return Err(invalid(node, format!("mode '{other}' is not supported (constant, reflect, edge)"))),
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let pads = ints(req(x, 1)?)?;
        let value = opt(x, 2).map(scalar).transpose()?.unwrap_or(0.0);
        let axes: Vec<usize> = match opt(x, 3) {
            Some(t) => ints(t)?.into_iter().map(|v| axis(v, a.rank())).collect::<candle_core::Result<_>>()?,
            None => (0..a.rank()).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return Err(msg(format!("Pad: {} pads for {} axes", pads.len(), axes.len())));
        }
        let mut y = a.clone();
        for (i, &d) in axes.iter().enumerate() {
            y = pad_axis(&y, d, pads[i], pads[i + axes.len()], mode, value)?;
        }
        Ok(vec![y])
    })))
}

/// Pads (or, with negative amounts, crops) one axis.
fn pad_axis(a: &Tensor, d: usize, before: i64, after: i64, mode: PadMode, value: f64) -> candle_core::Result<Tensor> {
    let n = a.dims()[d] as i64;
    let (crop_b, crop_a) = ((-before).max(0), (-after).max(0));
    let a = if crop_b + crop_a > 0 {
        a.narrow(d, crop_b as usize, (n - crop_b - crop_a).max(0) as usize)?
    } else {
        a.clone()
    };
    let (b, e) = (before.max(0) as usize, after.max(0) as usize);
    if b + e == 0 {
        return Ok(a);
    }
    let n = a.dims()[d];
    match mode {
        PadMode::Constant if value == 0.0 || !a.dtype().is_float() => a.pad_with_zeros(d, b, e),
        // pad(x - v) + v: v outside, x inside, and the gradient is still the identity inside.
        PadMode::Constant => a.affine(1.0, -value)?.pad_with_zeros(d, b, e)?.affine(1.0, value),
        PadMode::Edge | PadMode::Reflect => {
            if n == 0 || (mode == PadMode::Reflect && (n < 2 || b >= n || e >= n)) {
                return Err(msg(format!("Pad: cannot {} pad a dimension of {n} by {b}/{e}", "reflect")));
            }
            let src = |i: i64| -> u32 {
                let last = n as i64 - 1;
                let j = match mode {
                    PadMode::Edge => i.clamp(0, last),
                    _ if i < 0 => -i,
                    _ if i > last => 2 * last - i,
                    _ => i,
                };
                j as u32
            };
            let idx: Vec<u32> = (-(b as i64)..(n + e) as i64).map(src).collect();
            a.index_select(&Tensor::new(idx, a.device())?, d)
        }
    }
}
