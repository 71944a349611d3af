//! Steps that run two graph nodes as one kernel where it applies, and as the two nodes'
//! own ops everywhere else (so what they compute never depends on the route).

use candle_core::Tensor;

use super::conv::{build_conv, ConvSpec};
use super::norm::{build_batch_norm_clamped, Training};
use super::{opt, req};
use crate::engine::kernels::batchnorm::{self, Clamp};
use crate::engine::kernels::native;
use crate::engine::registry::{BuildCtx, FnOp, Op};
use crate::engine::EngineError;
use crate::onnx::pb::NodeProto;

/// A BatchNormalization (with its folded `clamp`) whose output only a depthwise Conv reads,
/// as one step: inputs are the BatchNormalization's five, then the Conv's weight and
/// optional bias; outputs the Conv's output, then the running averages when training. In
/// training with batch statistics, on the CPU kernels, a depthwise convolution on large
/// planes without a bias runs as [`batchnorm::batch_norm_depthwise`] (the normalised
/// activation never stored); anything else runs the two ops one after the other.
pub(crate) fn build_batch_norm_depthwise(
    bn: &NodeProto,
    clamp: Option<Clamp>,
    conv: &NodeProto,
    ctx: &BuildCtx,
) -> Result<Box<dyn Op>, EngineError> {
    let train = Training::of(bn, ctx)?;
    let (norm_op, conv_op, spec) =
        (build_batch_norm_clamped(bn, ctx, clamp)?, build_conv(conv, ctx)?, ConvSpec::of(conv)?);
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let (input, weight) = (req(x, 0)?, req(x, 5)?);
        if train.batch_statistics(input)
            && native(input)
            && input.rank() == 4
            && weight.rank() == 4
            && opt(x, 6).is_none()
        {
            let (p, weight) = spec.params(input, weight)?;
            if batchnorm::fuses_depthwise(input.dims(), weight.dims(), p) {
                let affine = [req(x, 1)?, req(x, 2)?];
                let (y, bm, bv) = batchnorm::batch_norm_depthwise(input, affine, train.eps, clamp, (&weight, p))?;
                let [mean, var] = train.running(input, [req(x, 3)?, req(x, 4)?], [&bm, &bv])?;
                return Ok(vec![y, mean, var]);
            }
        }
        let mut outs = norm_op.forward(x.get(..5).unwrap_or_default())?;
        let normalised = outs.first().cloned();
        let conv_in: Vec<Option<Tensor>> = std::iter::once(normalised).chain(x.iter().skip(5).cloned()).collect();
        let y = conv_op.forward(&conv_in)?.into_iter().next();
        match (outs.first_mut(), y) {
            (Some(first), Some(y)) => *first = y,
            _ => return Err(candle_core::Error::Msg("BatchNormalization+Conv: an op returned no output".into())),
        }
        Ok(outs)
    })))
}
