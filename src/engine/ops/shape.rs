//! Shape and data-movement ops: Flatten, Reshape, Transpose, Concat, Squeeze, Unsqueeze,
//! Shape, Slice, Gather, Constant, Identity, Dropout (inference), Cast.

use candle_core::{DType, Device, Tensor};

use super::{axis, ints, invalid, opt, req};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::{to_candle, EngineError};
use crate::onnx::pb::NodeProto;
use crate::onnx::{attr, tensor_proto};

type Res = Result<Box<dyn Op>, EngineError>;

pub fn register(r: &mut Registry) {
    r.insert("Flatten", OpSpec::new(1, 1, build_flatten));
    r.insert("Reshape", OpSpec::new(2, 2, build_reshape).since(5));
    r.insert("Transpose", OpSpec::new(1, 1, build_transpose));
    r.insert("SpaceToDepth", OpSpec::new(1, 1, |n, _| build_blocks(n, Blocks::SpaceToDepth)));
    r.insert("DepthToSpace", OpSpec::new(1, 1, |n, _| build_blocks(n, Blocks::DepthToSpace)));
    r.insert("Concat", OpSpec::new(1, usize::MAX, build_concat));
    r.insert("Squeeze", OpSpec::new(1, 2, |n, c| build_squeeze(n, c, true)));
    r.insert("Unsqueeze", OpSpec::new(1, 2, |n, c| build_squeeze(n, c, false)));
    r.insert("Shape", OpSpec::new(1, 1, build_shape));
    r.insert("Slice", OpSpec::new(3, 5, build_slice).since(10));
    r.insert("Gather", OpSpec::new(2, 2, build_gather));
    r.insert("Constant", OpSpec::new(0, 0, build_constant));
    r.insert("Identity", OpSpec::new(1, 1, |_, _| identity()));
    r.insert("Dropout", OpSpec::new(1, 3, build_dropout).outputs(2));
    r.insert("Cast", OpSpec::new(1, 1, build_cast));
}

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}

fn identity() -> Res {
    Ok(Box::new(FnOp(|x: &[Option<Tensor>]| Ok(vec![req(x, 0)?.clone()]))))
}

/// Inference semantics: the input passes unchanged, and the mask, where the node names one
/// (Caffe2 exports do, unread), keeps everything: booleans from opset 10, before it ones of
/// the input's type.
fn build_dropout(node: &NodeProto, ctx: &BuildCtx) -> Res {
    if node.output.get(1).is_none_or(|m| m.is_empty()) {
        return identity();
    }
    let boolean = ctx.opset >= 10;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let dtype = if boolean { DType::U8 } else { a.dtype() };
        Ok(vec![a.clone(), Tensor::ones(a.shape(), dtype, a.device())?])
    })))
}

fn build_flatten(node: &NodeProto, _: &BuildCtx) -> Res {
    let ax = attr::int_or(node, "axis", 1)?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let d = if ax == a.rank() as i64 { a.rank() } else { axis(ax, a.rank())? };
        let outer: usize = a.dims()[..d].iter().product();
        let inner: usize = a.dims()[d..].iter().product();
        Ok(vec![a.reshape((outer, inner))?])
    })))
}

/// Resolves an ONNX target shape: 0 copies the input dimension (unless allowzero), -1 infers.
fn target_shape(input: &[usize], spec: &[i64], allow_zero: bool) -> candle_core::Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => {
                out.push(*input.get(i).ok_or_else(|| msg(format!("shape {spec:?}: no dimension {i} to copy")))?)
            }
            s if s >= 0 => out.push(s as usize),
            _ => return Err(msg(format!("invalid target shape {spec:?}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(msg(format!("cannot reshape {input:?} to {spec:?}")));
        }
        out[i] = total / known;
    }
    Ok(out)
}

fn build_reshape(node: &NodeProto, _: &BuildCtx) -> Res {
    let allow_zero = attr::int_or(node, "allowzero", 0)? != 0;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let shape = target_shape(a.dims(), &ints(req(x, 1)?)?, allow_zero)?;
        Ok(vec![a.reshape(shape)?])
    })))
}

fn build_transpose(node: &NodeProto, _: &BuildCtx) -> Res {
    let perm = attr::ints(node, "perm")?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let perm: Vec<usize> = match &perm {
            Some(p) => p.iter().map(|&v| axis(v, a.rank())).collect::<candle_core::Result<_>>()?,
            None => (0..a.rank()).rev().collect(),
        };
        Ok(vec![a.permute(perm)?.contiguous()?])
    })))
}

#[derive(Clone, Copy)]
enum Blocks {
    SpaceToDepth,
    DepthToSpace,
}

/// SpaceToDepth and DepthToSpace (DCR, the default, and CRD): a reshape to six axes, a
/// permutation and a reshape back, as the operator defines them.
fn build_blocks(node: &NodeProto, kind: Blocks) -> Res {
    let b = attr::int(node, "blocksize")?
        .filter(|&b| b > 0)
        .ok_or_else(|| invalid(node, "blocksize must be positive"))? as usize;
    let crd = attr::string(node, "mode")?.is_some_and(|m| m == "CRD");
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let &[n, c, h, w] = a.dims() else {
            return Err(msg(format!("input {:?}: a block rearrangement needs [N, C, H, W]", a.dims())));
        };
        let y = match kind {
            Blocks::SpaceToDepth if h % b == 0 && w % b == 0 => a
                .reshape(vec![n, c, h / b, b, w / b, b])?
                .permute(vec![0, 3, 5, 1, 2, 4])?
                .reshape(vec![n, c * b * b, h / b, w / b])?,
            Blocks::DepthToSpace if c % (b * b) == 0 && crd => a
                .reshape(vec![n, c / (b * b), b, b, h, w])?
                .permute(vec![0, 1, 4, 2, 5, 3])?
                .reshape(vec![n, c / (b * b), h * b, w * b])?,
            Blocks::DepthToSpace if c % (b * b) == 0 => a
                .reshape(vec![n, b, b, c / (b * b), h, w])?
                .permute(vec![0, 3, 4, 1, 5, 2])?
                .reshape(vec![n, c / (b * b), h * b, w * b])?,
            _ => return Err(msg(format!("input {:?} does not divide into blocks of {b}", a.dims()))),
        };
        Ok(vec![y])
    })))
}

fn build_concat(node: &NodeProto, _: &BuildCtx) -> Res {
    let ax = attr::int(node, "axis")?.ok_or_else(|| invalid(node, "attribute axis is required"))?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let parts: Vec<&Tensor> = x.iter().flatten().filter(|t| t.elem_count() > 0 || x.len() == 1).collect();
        let first = parts.first().ok_or_else(|| msg("Concat of nothing".into()))?;
        let d = axis(ax, first.rank())?;
        Ok(vec![Tensor::cat(&parts, d)?])
    })))
}

fn build_squeeze(node: &NodeProto, ctx: &BuildCtx, squeeze: bool) -> Res {
    // Axes became an input in opset 13.
    let attr_axes = if ctx.opset < 13 { attr::ints(node, "axes")? } else { None };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let axes = match opt(x, 1) {
            Some(t) => Some(ints(t)?),
            None => attr_axes.clone(),
        };
        if squeeze {
            let mut dims: Vec<usize> = match axes {
                Some(v) => v.iter().map(|&v| axis(v, a.rank())).collect::<candle_core::Result<_>>()?,
                None => a.dims().iter().enumerate().filter(|(_, &d)| d == 1).map(|(i, _)| i).collect(),
            };
            dims.sort_unstable();
            let mut y = a.clone();
            for &d in dims.iter().rev() {
                y = y.squeeze(d)?;
            }
            Ok(vec![y])
        } else {
            let axes = axes.ok_or_else(|| msg("Unsqueeze needs axes".into()))?;
            let rank = a.rank() + axes.len();
            let mut dims: Vec<usize> = axes.iter().map(|&v| axis(v, rank)).collect::<candle_core::Result<_>>()?;
            dims.sort_unstable();
            let mut y = a.clone();
            for d in dims {
                y = y.unsqueeze(d)?;
            }
            Ok(vec![y])
        }
    })))
}

fn build_shape(node: &NodeProto, _: &BuildCtx) -> Res {
    let start = attr::int_or(node, "start", 0)?;
    let end = attr::int(node, "end")?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let dims: Vec<i64> = req(x, 0)?.dims().iter().map(|&d| d as i64).collect();
        let r = dims.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (s, e) = (clamp(start), clamp(end.unwrap_or(r)));
        let v = dims.get(s..e.max(s)).unwrap_or_default().to_vec();
        Ok(vec![Tensor::new(v, &Device::Cpu)?])
    })))
}

fn build_slice(_: &NodeProto, _: &BuildCtx) -> Res {
    Ok(Box::new(FnOp(|x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let (starts, ends) = (ints(req(x, 1)?)?, ints(req(x, 2)?)?);
        let axes = match opt(x, 3) {
            Some(t) => ints(t)?,
            None => (0..starts.len() as i64).collect(),
        };
        let steps = match opt(x, 4) {
            Some(t) => ints(t)?,
            None => vec![1; starts.len()],
        };
        if starts.len() != ends.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Err(msg("Slice: starts, ends, axes and steps differ in length".into()));
        }
        let mut y = a.clone();
        for i in 0..starts.len() {
            if steps[i] != 1 {
                return Err(msg(format!("Slice: step {} is not supported (only 1)", steps[i])));
            }
            let d = axis(axes[i], a.rank())?;
            let n = y.dims()[d] as i64;
            let fix = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n);
            let (s, e) = (fix(starts[i]), fix(ends[i]));
            y = y.narrow(d, s as usize, (e - s).max(0) as usize)?;
        }
        Ok(vec![y])
    })))
}

fn build_gather(node: &NodeProto, _: &BuildCtx) -> Res {
    let ax = attr::int_or(node, "axis", 0)?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (data, idx) = (req(x, 0)?, req(x, 1)?);
        let d = axis(ax, data.rank())?;
        let n = data.dims()[d] as i64;
        let flat: Vec<i64> = ints(idx)?.into_iter().map(|i| if i < 0 { i + n } else { i }).collect();
        if let Some(bad) = flat.iter().find(|&&i| i < 0 || i >= n) {
            return Err(msg(format!("Gather: index {bad} out of range for dimension {n}")));
        }
        let ids = Tensor::new(flat.iter().map(|&i| i as u32).collect::<Vec<u32>>(), data.device())?;
        let picked = data.index_select(&ids, d)?;
        let mut shape: Vec<usize> = data.dims()[..d].to_vec();
        shape.extend(idx.dims());
        shape.extend(&data.dims()[d + 1..]);
        Ok(vec![picked.reshape(shape)?])
    })))
}

fn build_constant(node: &NodeProto, ctx: &BuildCtx) -> Res {
    let value = if let Some(t) = attr::tensor(node, "value")? {
        tensor_proto::to_tensor(t)?
    } else if let Some(f) = attr::find(node, "value_float").and_then(|a| a.f) {
        crate::tensor::Tensor::F32(ndarray::arr0(f).into_dyn())
    } else if let Some(v) = attr::find(node, "value_floats").map(|a| a.floats.clone()) {
        crate::tensor::Tensor::F32(ndarray::Array1::from(v).into_dyn())
    } else if let Some(i) = attr::find(node, "value_int").and_then(|a| a.i) {
        crate::tensor::Tensor::I64(ndarray::arr0(i).into_dyn())
    } else if let Some(v) = attr::find(node, "value_ints").map(|a| a.ints.clone()) {
        crate::tensor::Tensor::I64(ndarray::Array1::from(v).into_dyn())
    } else {
        return Err(invalid(node, "no supported value attribute (value, value_float(s), value_int(s))"));
    };
    let t = to_candle(&value, ctx.float).map_err(|source| EngineError::Exec {
        node: attr::node_label(node),
        op: "Constant".into(),
        source: Box::new(source),
    })?;
    Ok(Box::new(FnOp(move |_: &[Option<Tensor>]| Ok(vec![t.clone()]))))
}

fn build_cast(node: &NodeProto, ctx: &BuildCtx) -> Res {
    let to = attr::int(node, "to")?.ok_or_else(|| invalid(node, "attribute 'to' is required"))?;
    let target = match tensor_proto::dtype_of(to as i32) {
        Some(crate::tensor::DType::F32 | crate::tensor::DType::F64) => ctx.float,
        Some(crate::tensor::DType::I64 | crate::tensor::DType::I32 | crate::tensor::DType::I8) => DType::I64,
        Some(crate::tensor::DType::U8 | crate::tensor::DType::Bool) => DType::U8,
        None => {
            return Err(invalid(node, format!("cast to {} is not supported", tensor_proto::data_type_name(to as i32))))
        }
    };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| Ok(vec![req(x, 0)?.to_dtype(target)?]))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_targets() {
        assert_eq!(target_shape(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(target_shape(&[2, 3, 4], &[-1], false).unwrap(), vec![24]);
        assert_eq!(target_shape(&[2, 3, 4], &[4, 0, 2], false).unwrap(), vec![4, 3, 2]);
        assert!(target_shape(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(target_shape(&[2, 3], &[-2], false).is_err());
    }

    /// Transposes as large as attention's heads are copied in slices on separate threads
    /// (the vendored candle's strided copy); every element must land where the permutation
    /// puts it, for blocks of 64 contiguous elements and of one.
    #[test]
    fn large_transposes_put_every_element_in_place() -> candle_core::Result<()> {
        let dims = [8usize, 97, 6, 64];
        let n: usize = dims.iter().product();
        assert!(n >= 1 << 18, "large enough for the split copy");
        let x = Tensor::arange(0f32, n as f32, &candle_core::Device::Cpu)?.reshape(&dims[..])?;
        for perm in [[0, 2, 1, 3], [0, 2, 3, 1]] {
            let y = x.permute(perm)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            let mut idx = [0usize; 4];
            for (at, v) in y.into_iter().enumerate() {
                // The element's index in x: out index i along axis k is x's index along perm[k].
                let mut src = [0usize; 4];
                for k in 0..4 {
                    src[perm[k]] = idx[k];
                }
                let want = ((src[0] * dims[1] + src[1]) * dims[2] + src[2]) * dims[3] + src[3];
                assert_eq!(v, want as f32, "perm {perm:?} element {at}");
                for k in (0..4).rev() {
                    idx[k] += 1;
                    if idx[k] < out_dims[k] {
                        break;
                    }
                    idx[k] = 0;
                }
            }
        }
        Ok(())
    }
}
