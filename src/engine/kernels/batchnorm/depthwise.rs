//! Training-mode BatchNormalization (and its folded clamp) feeding a depthwise convolution,
//! as one kernel each way: the expand-then-depthwise pair of every MobileNet block. Both
//! ops work channel by channel, so one task takes a channel through both. Forward, the
//! channel's statistics, then each image's plane normalised straight into the convolution's
//! padded buffer: the normalised activation, the largest tensor of the block (six times the
//! block's input), is never written or read back. Backward, each image's gradient with
//! respect to that activation goes into a buffer of the channel's planes, where the
//! BatchNormalization's sums and input gradient read it from cache; as two ops it was
//! written whole and read back twice. The same sums in the same order as the two ops (the
//! statistics, the taps, the weight gradient's units of images, the BatchNormalization
//! backward's per-plane sums in image order): the values bit for bit.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::super::conv2d::{ConvParams, Geometry};
use super::super::depthwise::{Plane, Scratch};
use super::super::{clamp_to, simd, slice, Real, SideOutput};
use super::backward::{ChannelMajor, PLANE};
use super::{affine, host, ChannelPlanes, ChannelStats, Clamp, Gate, Grads, Normalise};

/// Input planes of at least this many elements take the fused kernel. Measured per plane
/// size on MobileNetV2's step (examples/profile_step, each pass's kernel time against the
/// two ops'): at 224x224 batch 16, 112x112 to 28x28 planes faster both ways (forward
/// 1.1-1.7x, backward 1.1-1.7x), 14x14 faster forward and 1.1x slower backward (a channel's
/// short planes lie an image apart, where the two ops each read their tensor in storage
/// order); at 64x64 batch 32, 32x32 faster both ways, 16x16 even.
const FUSED_PLANE: usize = 512;

/// Whether [`batch_norm_depthwise`] takes x of shape `x` into a convolution with weight
/// `w`: a depthwise convolution on the padded-plane path (maps too small for it go channels
/// last, image by image) with input planes of [`FUSED_PLANE`] elements or more.
pub fn fuses(x: &[usize], w: &[usize], p: ConvParams) -> bool {
    Geometry::new(x, w, p).is_ok_and(|g| g.depthwise() && g.small().is_none() && g.h * g.w >= FUSED_PLANE.max(PLANE))
}

/// The depthwise convolution with weight `w` of BatchNormalization of x by the batch's
/// statistics, then `clamp`: (the convolution's output, batch mean, biased batch variance);
/// differentiable in x, scale, bias and w. Only where [`fuses`] holds, on the CPU.
pub fn batch_norm_depthwise(
    x: &Tensor,
    [scale, bias]: [&Tensor; 2],
    eps: f64,
    clamp: Option<Clamp>,
    (w, p): (&Tensor, ConvParams),
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let g = geometry(x.dims(), w.dims(), p)?;
    let affine = Tensor::stack(&[scale.flatten_all()?, bias.flatten_all()?], 0)?;
    let stats = Arc::new(Mutex::new(None));
    let y = x.apply_op3(&affine, &w, Forward { g, eps, clamp, stats: stats.clone() })?;
    let [mean, var] = statistics(&stats)?;
    let c = mean.len();
    let tensor = |v: Vec<f64>| Tensor::from_vec(v, c, x.device())?.to_dtype(x.dtype());
    Ok((y, tensor(mean)?, tensor(var)?))
}

fn geometry(x: &[usize], w: &[usize], p: ConvParams) -> candle_core::Result<Geometry> {
    let g = Geometry::new(x, w, p)?;
    if !fuses(x, w, p) {
        return Err(candle_core::Error::Msg(format!(
            "batchnorm-depthwise: input {x:?} and weight {w:?} are not a depthwise convolution on large planes"
        )));
    }
    Ok(g)
}

/// The batch statistics [mean, biased variance] the forward pass left.
fn statistics(stats: &Mutex<Option<[Vec<f64>; 2]>>) -> candle_core::Result<[Vec<f64>; 2]> {
    let missing = || candle_core::Error::Msg("batchnorm-depthwise: no statistics".into());
    stats.lock().map_err(|_| missing())?.clone().ok_or_else(missing)
}

/// (x, [scale; bias] as [2, C], w) -> the convolution's output; the batch statistics are
/// left in `stats` (as f64 of the tensor type's values) for the running averages and the
/// backward pass.
struct Forward {
    g: Geometry,
    eps: f64,
    clamp: Option<Clamp>,
    stats: Arc<Mutex<Option<[Vec<f64>; 2]>>>,
}

impl Forward {
    /// The output; the statistics go to `stats`.
    fn run<T: Real>(&self, [x, affine, w]: [&[T]; 3]) -> candle_core::Result<Vec<T>> {
        let g = &self.g;
        let (n, c, hw, outs) = (g.n, g.cin, g.h * g.w, g.cout_g * g.ohw());
        let taps = g.cout_g * g.kh * g.kw;
        if affine.len() != 2 * c || w.len() != c * taps || x.len() != n * c * hw {
            return Err(candle_core::Error::Msg("batchnorm-depthwise: scale, bias or weight size".into()));
        }
        let len = n * c * outs;
        let mut y: Vec<T> = Vec::with_capacity(len);
        let out = ChannelPlanes::over(&mut y);
        let pl = g.plane();
        let clamp = self.clamp.map(|k| (T::real(k.lo), T::real(k.hi)));
        let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
        let per: Vec<(T, T)> = (0..c)
            .into_par_iter()
            .map_init(
                || pl.scratch::<T>(),
                |s, ch| {
                    let (mean, var) = ChannelStats::channel(x, (n, c, hw), ch);
                    let (k, b) = affine_of(affine, c, ch, f(mean), 1.0 / (f(var) + self.eps).sqrt());
                    let planes =
                        Planes { pl: &pl, x, w: &w[ch * taps..][..taps], out: &out, ch, dims: (n, c, hw, outs) };
                    // The clamp chosen outside the per-element closure, so each form vectorises.
                    match clamp {
                        Some((lo, hi)) => planes.forward(s, |v| clamp_to(v * k + b, lo, hi)),
                        None => planes.forward(s, |v| v * k + b),
                    }
                    (mean, var)
                },
            )
            .collect();
        // SAFETY: every output plane (i, ch) was written in full above (`Plane::forward`
        // writes every element of the planes it is given).
        unsafe { y.set_len(len) };
        let stats = [per.iter().map(|p| f(p.0)).collect(), per.iter().map(|p| f(p.1)).collect()];
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("batchnorm-depthwise: lock".into()))? = Some(stats);
        Ok(y)
    }
}

/// Channel `ch`'s (k, b) of its affine map z = x * k + b from [scale; bias] [2, C].
fn affine_of<T: Real>(sb: &[T], c: usize, ch: usize, mean: f64, inv_std: f64) -> (T, T) {
    let at = |i: usize| sb.get(i).copied().unwrap_or(T::zero());
    affine(at(ch), at(c + ch), mean, inv_std)
}

/// One channel's planes through the convolution.
struct Planes<'a, T> {
    pl: &'a Plane,
    x: &'a [T],
    /// the channel's filters
    w: &'a [T],
    out: &'a ChannelPlanes<T>,
    ch: usize,
    /// (images, channels, input plane, output planes per channel)
    dims: (usize, usize, usize, usize),
}

impl<T: Real> Planes<'_, T> {
    fn input(&self, i: usize) -> &[T] {
        let (_, c, hw, _) = self.dims;
        &self.x[(i * c + self.ch) * hw..][..hw]
    }

    /// Each image's output planes, from its input plane normalised by `norm`.
    #[inline(always)]
    fn forward(&self, s: &mut Scratch<T>, norm: impl Fn(T) -> T) {
        let (n, c, _, outs) = self.dims;
        simd(
            #[inline(always)]
            || {
                for i in 0..n {
                    self.pl.fill_mapped(self.input(i), s, &norm);
                    // SAFETY: image i's output planes of this channel lie inside the output of
                    // n * c such runs, and only this channel's task writes them.
                    unsafe {
                        self.out.write((i * c + self.ch) * outs, outs, |o| {
                            self.pl.forward(s, self.w, o);
                            o.len()
                        })
                    };
                }
            },
        );
    }

    /// The filter gradient of this channel, and into `dz` [n * hw] each image's gradient
    /// with respect to the normalised input, from the output gradient `dy`: images in units
    /// of `unit`, each unit's sum from zero and the units' sums added in order, as the
    /// depthwise convolution's own backward pass sums them.
    #[inline(always)]
    fn backward(&self, s: &mut Scratch<T>, dy: &[T], dz: &mut [T], norm: impl Fn(T) -> T) -> Vec<T> {
        let (n, c, hw, outs) = self.dims;
        let unit = n.div_ceil(8).max(1);
        let mut dw = vec![T::zero(); self.w.len()];
        let mut part = vec![T::zero(); self.w.len()];
        for first in (0..n).step_by(unit) {
            part.iter_mut().for_each(|v| *v = T::zero());
            for i in first..(first + unit).min(n) {
                self.pl.fill_mapped(self.input(i), s, &norm);
                let dyi = &dy[(i * c + self.ch) * outs..][..outs];
                let dzi = &mut dz[i * hw..][..hw];
                // SAFETY: a slice of initialised T viewed as MaybeUninit<T>, which the
                // kernel only writes (T is Copy: nothing is dropped).
                let dzi = unsafe { &mut *(dzi as *mut [T] as *mut [MaybeUninit<T>]) };
                self.pl.backward_filled(s, [dyi, self.w], dzi, &mut part);
            }
            dw.iter_mut().zip(&part).for_each(|(a, &p)| *a += p);
        }
        dw
    }
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-depthwise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = timed_on_float!(s1, self.name(), l1, |T| self.run::<T>([
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?
        ])?);
        let g = &self.g;
        Ok((y, Shape::from((g.n, g.cout, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [mean, var] = statistics(&self.stats)?;
        let sb = host(affine)?;
        let c = mean.len();
        let (scale, bias) = (sb[..c.min(sb.len())].to_vec(), sb[c.min(sb.len())..].to_vec());
        let affine = sb.clone();
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let gate = self.clamp.map(|clamp| Gate {
            clamp,
            scale: scale.clone(),
            bias,
            mean: mean.clone(),
            inv_std: inv_std.clone(),
        });
        let norm = Normalise { mean, inv_std, clamp: self.clamp, batch: true };
        let m = (self.g.n * self.g.h * self.g.w).max(1) as f64;
        let op = Backward {
            g: self.g,
            clamp: self.clamp,
            affine,
            bn: ChannelMajor::new(norm, Grads { scale, gate, m }),
            sums: SideOutput::default(),
            weight_grad: SideOutput::default(),
        };
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &op)?;
        let sums = op.sums.take_tensor((2, c), x.device(), op.name())?;
        let dw = op.weight_grad.take_tensor(w.shape(), w.device(), op.name())?;
        Ok((Some(dx), Some(sums), Some(dw)))
    }
}

/// (x, w, dy) -> dx; the BatchNormalization's [d scale; d bias] [2, C] and the filter
/// gradient are left in `sums` and `weight_grad`.
struct Backward {
    g: Geometry,
    clamp: Option<Clamp>,
    /// [scale; bias], [2, C]
    affine: Vec<f64>,
    /// The BatchNormalization's backward pass (and the statistics it normalises by).
    bn: ChannelMajor,
    sums: SideOutput,
    weight_grad: SideOutput,
}

impl Backward {
    /// dx; the sums and the filter gradient go to `sums` and `weight_grad`.
    fn run<T: Real + WithDType>(&self, [x, w, dy]: [&[T]; 3]) -> candle_core::Result<Vec<T>> {
        let g = &self.g;
        let (n, c, hw, outs) = (g.n, g.cin, g.h * g.w, g.cout_g * g.ohw());
        let taps = g.cout_g * g.kh * g.kw;
        if w.len() != c * taps || x.len() != n * c * hw || dy.len() != n * c * outs {
            return Err(candle_core::Error::Msg("batchnorm-depthwise gradient: input, weight or gradient size".into()));
        }
        let len = n * c * hw;
        let mut dx: Vec<T> = Vec::with_capacity(len);
        let out = ChannelPlanes::over(&mut dx);
        let pl = g.plane();
        let clamp = self.clamp.map(|k| (T::real(k.lo), T::real(k.hi)));
        let sb: Vec<T> = self.affine.iter().map(|&v| T::real(v)).collect();
        let per: Vec<([T; 2], Vec<T>)> = (0..c)
            .into_par_iter()
            .map_init(
                || (pl.scratch::<T>(), vec![T::zero(); n * hw]),
                |(s, dz), ch| {
                    let (mean, inv_std) = self.bn.statistics(ch);
                    let (k, b) = affine_of(&sb, c, ch, mean, inv_std);
                    let planes =
                        Planes { pl: &pl, x, w: &w[ch * taps..][..taps], out: &out, ch, dims: (n, c, hw, outs) };
                    simd(
                        #[inline(always)]
                        || {
                            let dw = match clamp {
                                Some((lo, hi)) => planes.backward(s, dy, dz, |v| clamp_to(v * k + b, lo, hi)),
                                None => planes.backward(s, dy, dz, |v| v * k + b),
                            };
                            // SAFETY: `out` holds the n * c input planes, and only this
                            // channel's task writes channel ch's.
                            let sums = unsafe { self.bn.channel(ch, (n, c, hw), x, |i| &dz[i * hw..][..hw], &out) };
                            (sums, dw)
                        },
                    )
                },
            )
            .collect();
        // SAFETY: every plane (i, ch) was written in full by `ChannelMajor::channel`.
        unsafe { dx.set_len(len) };
        let sums = per.iter().map(|p| p.0[0]).chain(per.iter().map(|p| p.0[1])).collect();
        self.sums.put(T::to_cpu_storage_owned(sums), self.name())?;
        self.weight_grad.put(T::to_cpu_storage_owned(per.into_iter().flat_map(|p| p.1).collect()), self.name())?;
        Ok(dx)
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-depthwise-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dx = timed_on_float!(s1, self.name(), l1, |T| self.run::<T>([
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?
        ])?);
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{batch_norm_train, Clamp};
    use super::*;
    use crate::engine::gradcheck::{bits, check_gradients, seeded};
    use crate::engine::kernels::conv2d::conv2d;
    use candle_core::{DType, Var};

    fn p(stride: usize, pad: usize, groups: usize) -> ConvParams {
        ConvParams { stride: [stride; 2], dilation: [1, 1], pads: [pad; 4], groups }
    }

    /// Stride 1 and 2, odd and even widths, a channel multiplier of 2 and a 5x5 kernel.
    fn cases() -> Vec<([usize; 4], [usize; 4], ConvParams)> {
        vec![
            ([2, 3, 33, 32], [3, 1, 3, 3], p(1, 1, 3)),
            ([3, 2, 33, 34], [4, 1, 3, 3], p(2, 1, 2)),
            ([2, 2, 32, 33], [2, 1, 5, 5], p(2, 2, 2)),
        ]
    }

    #[test]
    fn equals_the_two_ops_bit_for_bit_values_and_gradients() {
        for (xs, ws, p) in cases() {
            assert!(fuses(&xs, &ws, p), "{xs:?} {ws:?}");
            for dtype in [DType::F32, DType::F64] {
                for clamp in [None, Some(Clamp { lo: 0.0, hi: 0.4 })] {
                    let var = |t: Tensor| Var::from_tensor(&t).unwrap();
                    let x = var(((seeded(&xs, 1, dtype) * 3.0).unwrap() + 0.5).unwrap());
                    let (scale, bias) = (var(seeded(&xs[1..2], 2, dtype)), var(seeded(&xs[1..2], 3, dtype)));
                    let w = var(seeded(&ws, 4, dtype));
                    let (y, mean, v) = batch_norm_depthwise(&x, [&scale, &bias], 1e-5, clamp, (&w, p)).unwrap();
                    let (z, mean2, v2) = batch_norm_train(&x, &scale, &bias, 1e-5, clamp).unwrap();
                    let y2 = conv2d(&z, &w, p).unwrap();
                    let case = format!("{xs:?} {ws:?} {dtype:?} clamp {clamp:?}");
                    assert_eq!(y.dims(), y2.dims(), "{case}");
                    for (a, b, what) in [(&y, &y2, "output"), (&mean, &mean2, "mean"), (&v, &v2, "variance")] {
                        assert!(bits(a) == bits(b), "{what}: {case}");
                    }
                    let r = seeded(y.dims(), 5, dtype);
                    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads2 = y2.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                    for (t, what) in [(&x, "x"), (&scale, "scale"), (&bias, "bias"), (&w, "w")] {
                        let (a, b) = (grads.get(t).unwrap(), grads2.get(t).unwrap());
                        assert!(bits(a) == bits(b), "gradient of {what}: {case}");
                    }
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (xs, ws, p) in [([2, 2, 32, 33], [2, 1, 3, 3], p(1, 1, 2)), ([2, 2, 33, 34], [4, 1, 3, 3], p(2, 1, 2))] {
            let x = ((seeded(&xs, 6, DType::F64) * 2.0).unwrap() + 0.3).unwrap();
            let inputs = [x, seeded(&[2], 7, DType::F64), seeded(&[2], 8, DType::F64), seeded(&ws, 9, DType::F64)];
            for clamp in [None, Some(Clamp { lo: -0.2, hi: 0.5 })] {
                check_gradients(
                    &inputs,
                    |v| Ok(batch_norm_depthwise(&v[0], [&v[1], &v[2]], 1e-5, clamp, (&v[3], p))?.0),
                    1e-6,
                )
                .unwrap_or_else(|e| panic!("{xs:?} {ws:?} clamp {clamp:?}: {e}"));
            }
        }
    }

    #[test]
    fn other_convolutions_are_refused() {
        let x = seeded(&[2, 2, 12, 12], 1, DType::F32);
        let (scale, bias) = (seeded(&[2], 2, DType::F32), seeded(&[2], 3, DType::F32));
        // A dense convolution, then a depthwise one on planes under FUSED_PLANE.
        for (w, p) in
            [(seeded(&[2, 2, 3, 3], 4, DType::F32), p(1, 1, 1)), (seeded(&[2, 1, 3, 3], 4, DType::F32), p(2, 1, 2))]
        {
            assert!(!fuses(x.dims(), w.dims(), p));
            let e = batch_norm_depthwise(&x, [&scale, &bias], 1e-5, None, (&w, p)).unwrap_err();
            assert!(e.to_string().contains("not a depthwise convolution on large planes"), "{e}");
        }
    }
}
