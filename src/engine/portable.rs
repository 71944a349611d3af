//! The ops whose fast versions are CPU kernels ([`super::kernels`]), written with candle's own
//! tensor ops so they run, and differentiate, on any device candle has: convolution with
//! asymmetric padding and groups, depthwise convolution, pooling with padding and ceil mode,
//! and BatchNorm with batch statistics. A CUDA engine runs these; a CPU engine runs them when
//! told to (`--kernels portable`), and the tests hold them to the CPU kernels' values and
//! gradients, so the GPU computes what the CPU computes.
//!
//! Every windowed op reads its input through [`Windows`]: the padded input viewed once as
//! stride phases, each kernel tap then a strided view of one phase. No im2col buffer, no
//! per-channel loop; a tap costs one elementwise op over the output.

use candle_core::Tensor;

use super::kernels::batchnorm::Clamp;
use super::kernels::conv2d::ConvParams;
use super::kernels::pool2d::{out_size, PoolKind, PoolParams};

fn msg(s: String) -> candle_core::Error {
    candle_core::Error::Msg(s)
}

/// Pads `dim` of `x` with `before` and `after` entries of `fill`.
fn pad_dim(x: &Tensor, dim: usize, before: usize, after: usize, fill: f64) -> candle_core::Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    if fill == 0.0 {
        return x.pad_with_zeros(dim, before, after);
    }
    let block = |n: usize| -> candle_core::Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims[dim] = n;
        Tensor::full(fill, dims, x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(block(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(block(after)?);
    }
    Tensor::cat(&parts, dim)
}

/// A [N, C, H, W] input padded and split into stride phases, so that every kernel tap is a
/// strided view of [N, C, OH, OW].
struct Windows {
    /// [N, C, H'/sh, sh, W'/sw, sw]
    phases: Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    out: [usize; 2],
}

impl Windows {
    /// `fill` fills the explicit padding `pads` ([top, left, bottom, right]); `tail` fills
    /// what ceil mode reads past it (and the rounding up to whole stride phases, never read).
    fn new(
        x: &Tensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pads: [usize; 4],
        ceil: bool,
        [fill, tail]: [f64; 2],
    ) -> candle_core::Result<Windows> {
        let &[n, c, h, w] = x.dims() else {
            return Err(msg(format!("a 2-D window op needs a 4-D input, got {:?}", x.dims())));
        };
        if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
            return Err(msg(format!("zero kernel, stride or dilation: {kernel:?} {stride:?} {dilation:?}")));
        }
        let size = |a: usize, len: usize| {
            out_size(len, kernel[a], stride[a], dilation[a], pads[a], pads[a + 2], ceil)
                .ok_or_else(|| msg(format!("window {kernel:?} does not fit input {:?} with pads {pads:?}", x.dims())))
        };
        let out = [size(0, h)?, size(1, w)?];
        // Rows read: up to (out-1)*s + (k-1)*d; round the padded extent up to whole phases.
        let extent = |a: usize, len: usize| {
            let read = (out[a] - 1) * stride[a] + (kernel[a] - 1) * dilation[a] + 1;
            let padded = len + pads[a] + pads[a + 2];
            (read.max(padded)).div_ceil(stride[a]) * stride[a] - padded
        };
        let (eh, ew) = (extent(0, h), extent(1, w));
        let x = pad_dim(&pad_dim(x, 2, pads[0], pads[2], fill)?, 3, pads[1], pads[3], fill)?;
        let x = pad_dim(&pad_dim(&x, 2, 0, eh, tail)?, 3, 0, ew, tail)?;
        let (hp, wp) = (x.dim(2)?, x.dim(3)?);
        let phases = x.contiguous()?.reshape((n, c, hp / stride[0], stride[0], wp / stride[1], stride[1]))?;
        Ok(Windows { phases, kernel, stride, dilation, out })
    }

    /// The input under kernel tap (i, j) at every output position: [N, C, OH, OW].
    fn tap(&self, i: usize, j: usize) -> candle_core::Result<Tensor> {
        let (r, c) = (i * self.dilation[0], j * self.dilation[1]);
        let (sh, sw) = (self.stride[0], self.stride[1]);
        self.phases
            .narrow(5, c % sw, 1)?
            .narrow(3, r % sh, 1)?
            .narrow(4, c / sw, self.out[1])?
            .narrow(2, r / sh, self.out[0])?
            .squeeze(5)?
            .squeeze(3)
    }

    fn taps(&self) -> impl Iterator<Item = (usize, usize)> {
        let [kh, kw] = self.kernel;
        (0..kh).flat_map(move |i| (0..kw).map(move |j| (i, j)))
    }
}

/// 2-D convolution of [N, C, H, W] by [O, C/groups, KH, KW], any padding, groups, stride.
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    let (c, o) = (x.dim(1)?, w.dim(0)?);
    if p.groups > 1 && p.groups == c && o % c == 0 {
        return depthwise(x, w, p);
    }
    if p.stride[0] != p.stride[1] || p.dilation[0] != p.dilation[1] {
        return Err(msg(format!(
            "convolution with strides {:?} and dilations {:?}: unequal ones run on the CPU kernels only",
            p.stride, p.dilation
        )));
    }
    let x = x.pad_with_zeros(2, p.pads[0], p.pads[2])?.pad_with_zeros(3, p.pads[1], p.pads[3])?;
    x.conv2d(&w.contiguous()?, 0, p.stride[0], p.dilation[0], p.groups)
}

/// Depthwise convolution (groups = input channels), each output channel a weighted sum of
/// the kernel taps of its input channel. A channel multiplier m > 1 repeats each input
/// channel m times first (output channel g*m + k reads input channel g).
fn depthwise(x: &Tensor, w: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let m = o / c;
    let x = if m > 1 { x.unsqueeze(2)?.broadcast_as((n, c, m, h, wd))?.reshape((n, o, h, wd))? } else { x.clone() };
    let win = Windows::new(&x, [kh, kw], p.stride, p.dilation, p.pads, false, [0.0, 0.0])?;
    // [O, 1, KH, KW] -> [1, O, KH, KW]: tap (i, j) is then a [1, O, 1, 1] view.
    let w = w.transpose(0, 1)?;
    let mut y: Option<Tensor> = None;
    for (i, j) in win.taps() {
        let term = win.tap(i, j)?.broadcast_mul(&w.narrow(2, i, 1)?.narrow(3, j, 1)?)?;
        y = Some(match y {
            Some(acc) => (acc + term)?,
            None => term,
        });
    }
    y.ok_or_else(|| msg("depthwise convolution with an empty kernel".into()))
}

/// Max or average pooling with padding, dilation and ceil mode.
pub fn pool2d(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    match p.kind {
        PoolKind::Max => {
            let win = Windows::new(x, p.kernel, p.stride, p.dilation, p.pads, p.ceil_mode, [f64::NEG_INFINITY; 2])?;
            let mut y: Option<Tensor> = None;
            for (i, j) in win.taps() {
                let t = win.tap(i, j)?;
                y = Some(match y {
                    Some(acc) => acc.maximum(&t)?,
                    None => t,
                });
            }
            y.ok_or_else(|| msg("max pooling with an empty kernel".into()))
        }
        PoolKind::Average { count_include_pad } => {
            let sum = |x: &Tensor, fill: [f64; 2]| -> candle_core::Result<Tensor> {
                let win = Windows::new(x, p.kernel, p.stride, p.dilation, p.pads, p.ceil_mode, fill)?;
                let mut y: Option<Tensor> = None;
                for (i, j) in win.taps() {
                    let t = win.tap(i, j)?;
                    y = Some(match y {
                        Some(acc) => (acc + t)?,
                        None => t,
                    });
                }
                y.ok_or_else(|| msg("average pooling with an empty kernel".into()))
            };
            // The divisor of each output: the input positions under its window, plus the
            // explicit padding when it counts; never what ceil mode reads past the padding.
            let (_, _, h, w) = x.dims4()?;
            let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
            let count = sum(&ones, [if count_include_pad { 1.0 } else { 0.0 }, 0.0])?;
            sum(x, [0.0, 0.0])?.broadcast_div(&count)
        }
    }
}

/// Reshapes a per-channel vector to broadcast over axis 1 of a rank-`rank` tensor.
pub(crate) fn per_channel(v: &Tensor, rank: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1usize; rank.max(2)];
    shape[1] = v.elem_count();
    v.reshape(shape)
}

/// BatchNorm over the batch's own statistics (axes 0 and 2..), then the folded clamp:
/// returns y and the batch mean and biased variance ([C], detached), as the CPU kernel does.
pub fn batch_norm_train(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    eps: f64,
    clamp: Option<Clamp>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let r = x.rank();
    // float32 sums of a whole batch's channel (16k values at 32x32, batch 16) one after
    // another, as candle's CPU reduction adds them, lose the mean of a channel whose mean is
    // large against its spread: centred on that mean, the first BatchNorm's scale gradient
    // was 2% off the kernels'. Shifting each channel by the first image's mean (detached, so
    // the gradient is exactly the mean's), then summing per image before over images, keeps
    // the sums short and centred: the error is float32 rounding again.
    let shift = batch_mean(&x.narrow(0, 0, 1)?)?.detach();
    let mean = (batch_mean(&x.broadcast_sub(&shift)?)?.broadcast_add(&shift))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = batch_mean(&centred.sqr()?)?;
    let k = per_channel(scale, r)?.broadcast_mul(&(var.clone() + eps)?.sqrt()?.recip()?)?;
    let mut y = centred.broadcast_mul(&k)?.broadcast_add(&per_channel(bias, r)?)?;
    if let Some(c) = clamp {
        y = clamped(&y, c)?;
    }
    Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
}

/// The mean over every axis but the channels (1), keeping them: each image's spatial mean
/// first, then the mean over images.
fn batch_mean(x: &Tensor) -> candle_core::Result<Tensor> {
    let spatial: Vec<usize> = (2..x.rank()).collect();
    let per_image = if spatial.is_empty() { x.clone() } else { x.mean_keepdim(spatial)? };
    per_image.mean_keepdim(0)
}

/// `x` clamped to [lo, hi] (an infinite bound is no bound).
pub fn clamped(x: &Tensor, c: Clamp) -> candle_core::Result<Tensor> {
    let mut y = x.clone();
    if c.lo.is_finite() {
        y = y.maximum(c.lo)?;
    }
    if c.hi.is_finite() {
        y = y.minimum(c.hi)?;
    }
    Ok(y)
}

#[cfg(test)]
#[path = "portable_tests.rs"]
mod tests;
