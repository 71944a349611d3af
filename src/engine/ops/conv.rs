//! Conv, ConvTranspose (2-D, one group, equal pads and strides), MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool (1-D and 2-D).

use candle_core::Tensor;

use super::{invalid, opt, req};
use crate::engine::kernels::conv2d::{conv2d, ConvParams};
use crate::engine::kernels::native;
use crate::engine::kernels::pool2d::{pool2d, PoolKind, PoolParams};
use crate::engine::portable;
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

pub fn register(r: &mut Registry) {
    r.insert("Conv", OpSpec::new(2, 3, build_conv));
    r.insert("ConvTranspose", OpSpec::new(2, 3, build_conv_transpose));
    r.insert("MaxPool", OpSpec::new(1, 1, build_max_pool).outputs(1));
    r.insert("AveragePool", OpSpec::new(1, 1, build_avg_pool));
    r.insert("GlobalAveragePool", OpSpec::new(1, 1, build_global_avg));
    r.insert("GlobalMaxPool", OpSpec::new(1, 1, build_global_max));
}

/// Spatial window attributes shared by Conv and the pools.
#[derive(Clone, Debug)]
struct Window {
    kernel: Option<Vec<usize>>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// begin..., end... as in ONNX
    pads: Vec<usize>,
    auto_pad: String,
}

fn usizes(node: &NodeProto, name: &str) -> Result<Option<Vec<usize>>, EngineError> {
    attr::ints(node, name)?
        .map(|v| {
            v.iter()
                .map(|&i| {
                    usize::try_from(i).map_err(|_| invalid(node, format!("attribute {name} has negative value {i}")))
                })
                .collect()
        })
        .transpose()
}

fn window(node: &NodeProto) -> Result<Window, EngineError> {
    let kernel = usizes(node, "kernel_shape")?;
    let auto_pad = attr::string(node, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
    if !["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"].contains(&auto_pad.as_str()) {
        return Err(invalid(node, format!("auto_pad '{auto_pad}' is not NOTSET, SAME_UPPER, SAME_LOWER or VALID")));
    }
    Ok(Window {
        kernel,
        strides: usizes(node, "strides")?.unwrap_or_default(),
        dilations: usizes(node, "dilations")?.unwrap_or_default(),
        pads: usizes(node, "pads")?.unwrap_or_default(),
        auto_pad,
    })
}

/// 2-D parameters for an input of spatial size `hw` (1-D ops are run as height 1).
struct Resolved {
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pads: [usize; 4],
}

impl Window {
    fn resolve(&self, spatial: &[usize], kernel: &[usize]) -> candle_core::Result<Resolved> {
        let n = spatial.len();
        if !(1..=2).contains(&n) {
            return Err(candle_core::Error::Msg(format!("only 1-D and 2-D spatial inputs are supported, got {n}-D")));
        }
        let pick = |v: &[usize], i: usize| v.get(i).copied().unwrap_or(1);
        let two = |v: &[usize]| if n == 1 { [1, pick(v, 0)] } else { [pick(v, 0), pick(v, 1)] };
        let k = two(kernel);
        let (s, d) = (two(&self.strides), two(&self.dilations));
        let hw = if n == 1 { [1, spatial[0]] } else { [spatial[0], spatial[1]] };
        let mut pads = [0usize; 4];
        match self.auto_pad.as_str() {
            "VALID" => {}
            "SAME_UPPER" | "SAME_LOWER" => {
                for i in 0..2 {
                    let out = hw[i].div_ceil(s[i]);
                    let total = ((out.max(1) - 1) * s[i] + (k[i] - 1) * d[i] + 1).saturating_sub(hw[i]);
                    let (small, big) = (total / 2, total - total / 2);
                    let (begin, end) = if self.auto_pad == "SAME_UPPER" { (small, big) } else { (big, small) };
                    pads[i] = begin;
                    pads[i + 2] = end;
                }
            }
            _ => match (n, self.pads.as_slice()) {
                (_, []) => {}
                (1, [b, e]) => pads = [0, *b, 0, *e],
                (2, [t, l, b, r]) => pads = [*t, *l, *b, *r],
                _ => return Err(candle_core::Error::Msg(format!("pads {:?} do not fit {n} spatial dims", self.pads))),
            },
        }
        Ok(Resolved { kernel: k, stride: s, dilation: d, pads })
    }
}

/// Runs `f` on a 4-D view of a 3-D (1-D spatial) or 4-D input, restoring the rank after.
fn as_2d(x: &Tensor, f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    match x.rank() {
        3 => f(&x.unsqueeze(2)?)?.squeeze(2),
        4 => f(x),
        r => Err(candle_core::Error::Msg(format!("only 1-D and 2-D spatial inputs are supported, got rank {r}"))),
    }
}

/// A Conv node's attributes, resolved against each input's shape.
#[derive(Clone, Debug)]
pub(crate) struct ConvSpec {
    window: Window,
    groups: usize,
}

impl ConvSpec {
    pub fn of(node: &NodeProto) -> Result<ConvSpec, EngineError> {
        let window = window(node)?;
        let groups = attr::int_or(node, "group", 1)?;
        let groups =
            usize::try_from(groups).ok().filter(|g| *g > 0).ok_or_else(|| invalid(node, format!("group {groups}")))?;
        Ok(ConvSpec { window, groups })
    }

    /// The 2-D parameters for this input, and the weight as 4-D.
    pub fn params(&self, input: &Tensor, weight: &Tensor) -> candle_core::Result<(ConvParams, Tensor)> {
        let wdims = weight.dims();
        let kernel: Vec<usize> =
            self.window.kernel.clone().unwrap_or_else(|| wdims.get(2..).unwrap_or_default().to_vec());
        let r = self.window.resolve(input.dims().get(2..).unwrap_or_default(), &kernel)?;
        let p = ConvParams { stride: r.stride, dilation: r.dilation, pads: r.pads, groups: self.groups };
        let weight = if weight.rank() == 3 { weight.unsqueeze(2)? } else { weight.clone() };
        Ok((p, weight))
    }
}

pub(crate) fn build_conv(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let spec = ConvSpec::of(node)?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (input, weight) = (req(x, 0)?, req(x, 1)?);
        let (p, weight) = spec.params(input, weight)?;
        let y = as_2d(input, |x4| if native(x4) { conv2d(x4, &weight, p) } else { portable::conv2d(x4, &weight, p) })?;
        let y = match opt(x, 2) {
            Some(b) => {
                let mut shape = vec![1usize; y.rank()];
                shape[1] = b.elem_count();
                y.broadcast_add(&b.reshape(shape)?)?
            }
            None => y,
        };
        Ok(vec![y])
    })))
}

fn build_pool(node: &NodeProto, kind: PoolKind) -> Result<Box<dyn Op>, EngineError> {
    let w = window(node)?;
    let kernel = w.kernel.clone().ok_or_else(|| invalid(node, "kernel_shape is required"))?;
    if attr::int_or(node, "storage_order", 0)? != 0 {
        return Err(invalid(node, "storage_order 1 (column major) is not supported"));
    }
    let ceil_mode = attr::int_or(node, "ceil_mode", 0)? != 0;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let r = w.resolve(input.dims().get(2..).unwrap_or_default(), &kernel)?;
        let p = PoolParams { kind, kernel: r.kernel, stride: r.stride, dilation: r.dilation, pads: r.pads, ceil_mode };
        Ok(vec![as_2d(input, |x4| if native(x4) { pool2d(x4, p) } else { portable::pool2d(x4, p) })?])
    })))
}

fn build_max_pool(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    build_pool(node, PoolKind::Max)
}

fn build_avg_pool(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let count_include_pad = attr::int_or(node, "count_include_pad", 0)? != 0;
    build_pool(node, PoolKind::Average { count_include_pad })
}

fn build_global_avg(_: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    Ok(Box::new(FnOp(|x: &[Option<Tensor>]| {
        let input = req(x, 0)?;
        let dims: Vec<usize> = (2..input.rank()).collect();
        Ok(vec![input.mean_keepdim(dims)?])
    })))
}

fn build_global_max(_: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    Ok(Box::new(FnOp(|x: &[Option<Tensor>]| {
        let mut y = req(x, 0)?.clone();
        for d in (2..y.rank()).rev() {
            y = y.max_keepdim(d)?;
        }
        Ok(vec![y])
    })))
}

/// ConvTranspose on candle's kernel, which takes one padding, stride and dilation for both
/// axes and no groups: decoders of encoder-decoder exports (upsampling x2) fit; others are
/// refused by name.
fn build_conv_transpose(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let w = window(node)?;
    let one = |v: &[usize], what: &str, default: usize| -> Result<usize, EngineError> {
        match v {
            [] => Ok(default),
            [first, rest @ ..] if rest.iter().all(|x| x == first) => Ok(*first),
            _ => Err(invalid(node, format!("{what} {v:?} differ between axes; only equal ones are supported"))),
        }
    };
    if w.auto_pad != "NOTSET" {
        return Err(invalid(node, format!("auto_pad {} is not supported", w.auto_pad)));
    }
    if attr::int_or(node, "group", 1)? != 1 || attr::ints(node, "output_shape")?.is_some() {
        return Err(invalid(node, "only group 1 without output_shape is supported"));
    }
    let (pad, stride, dilation) =
        (one(&w.pads, "pads", 0)?, one(&w.strides, "strides", 1)?, one(&w.dilations, "dilations", 1)?);
    let out_pad = one(&usizes(node, "output_padding")?.unwrap_or_default(), "output_padding", 0)?;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (input, kernel) = (req(x, 0)?, req(x, 1)?);
        if input.rank() != 4 {
            return Err(candle_core::Error::Msg(format!(
                "ConvTranspose: rank {} input, only 2-D is supported",
                input.rank()
            )));
        }
        let mut y = input.conv_transpose2d(kernel, pad, out_pad, stride, dilation)?;
        if let Some(b) = opt(x, 2) {
            y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
        }
        Ok(vec![y])
    })))
}
