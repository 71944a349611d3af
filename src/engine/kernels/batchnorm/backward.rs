//! BatchNormalization's backward pass over large planes, channel by channel. As two passes
//! over the whole tensor (the per-channel sums, then the input gradient) x and dy were each
//! read twice from memory: at 224x224 a MobileNetV2 activation is tens of megabytes, far
//! past the caches. Here one task takes a channel: its sums over the batch's planes, its
//! coefficients, then its input gradient while those planes are still in cache. The same
//! sums in the same order (planes in image order, from zero, in f64), the same rounding of
//! the sums to the tensor's type before the coefficients, the same coefficients and the
//! same per-element expressions: the values of the two passes bit for bit.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::{simd, slice, timing, Real, SideOutput};
use super::{combine_plane, plane_sums, planes, unsupported, ChannelPlanes, Grads, Normalise, Sums};

/// Planes of at least this many elements take the channel-by-channel pass. Measured per
/// plane size on MobileNetV2's step (examples/profile_step, kernel time of the backward
/// pass against the two passes): at 224x224 batch 16, 14x14 to 112x112 planes 1.1-1.6x
/// faster, 7x7 1.1x; at 64x64 batch 32, 32x32 planes 1.1-1.8x, 16x16 0.9x and 8x8 0.6x,
/// where a whole activation fits in the caches and reading a channel's short planes an
/// image apart loses to reading the tensor in storage order.
pub(super) const PLANE: usize = 128;

/// (x, dy) -> dx; the per-channel sums [2, C] (the scale's and bias's gradients) are left
/// in `sums_out`, a second output a custom op cannot return.
pub(super) struct ChannelMajor {
    norm: Normalise,
    sums: Sums,
    g: Grads,
    sums_out: SideOutput,
}

impl ChannelMajor {
    pub(super) fn new(norm: Normalise, g: Grads) -> ChannelMajor {
        let sums = Sums { mean: norm.mean.clone(), inv_std: norm.inv_std.clone(), gate: g.gate.clone() };
        ChannelMajor { norm, sums, g, sums_out: SideOutput::default() }
    }

    /// (dx, d scale, d bias) of x [N, C, ...] from dy.
    pub(super) fn run(
        &self,
        x: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op2_no_bwd(dy, self)?;
        let sums = self.sums_out.take_tensor((2, self.g.scale.len()), x.device(), self.name())?;
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }

    /// dx [N, C, inner] and the sums [2, C] from x and dy, a task per channel.
    fn pass<T: Real>(&self, [x, dy]: [&[T]; 2], (n, c, inner): (usize, usize, usize)) -> (Vec<T>, Vec<T>) {
        let len = n * c * inner;
        let mut dx: Vec<T> = Vec::with_capacity(len);
        let out = ChannelPlanes::over(&mut dx);
        let per: Vec<[T; 2]> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let span = |i: usize| (i * c + ch) * inner..(i * c + ch + 1) * inner;
                // SAFETY: `out` holds n * c planes of `inner` elements, and only this
                // channel's task writes channel `ch`'s.
                simd(
                    #[inline(always)]
                    || unsafe { self.channel(ch, (n, c, inner), x, |i| &dy[span(i)], &out) },
                )
            })
            .collect();
        // SAFETY: every plane (i, ch) of the n * c planes of `inner` elements was written
        // in full above (combine_plane's front, then zeros).
        unsafe { dx.set_len(len) };
        (dx, per.iter().map(|p| p[0]).chain(per.iter().map(|p| p[1])).collect())
    }

    /// Channel `ch`'s (mean, 1 / sqrt(var + eps)) the pass normalises by.
    pub(super) fn statistics(&self, ch: usize) -> (f64, f64) {
        let at = |v: &[f64]| v.get(ch).copied().unwrap_or(0.0);
        (at(&self.norm.mean), at(&self.norm.inv_std))
    }

    /// Channel `ch`'s sums [sum(dy * xhat), sum(dy)] (dy masked by the clamp), returned, and
    /// its input gradient planes, written into `out` where x's planes lie; `dy(i)` is image
    /// i's output gradient plane of this channel.
    ///
    /// # Safety
    /// `out` must hold n * c planes of `inner` elements, and no other task may write this
    /// channel's planes.
    #[inline(always)]
    pub(super) unsafe fn channel<'a, T: Real>(
        &self,
        ch: usize,
        (n, c, inner): (usize, usize, usize),
        x: &[T],
        dy: impl Fn(usize) -> &'a [T],
        out: &ChannelPlanes<T>,
    ) -> [T; 2] {
        let span = |i: usize| (i * c + ch) * inner..(i * c + ch + 1) * inner;
        let mut totals = [0.0f64; 2];
        for i in 0..n {
            let planes = (&x[span(i)], dy(i));
            let t = match &self.g.gate {
                Some(g) => plane_sums(planes, g.channel(ch)),
                None => plane_sums(planes, |d, _| d),
            };
            totals[0] += t[0];
            totals[1] += t[1];
        }
        let sums: [T; 2] = self.sums.channel(ch, totals);
        let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
        let coef = self.norm.coefficients(ch, &self.g.scale, [f(sums[0]), f(sums[1])], self.g.m);
        let [a, b, c0] = coef.map(T::real);
        for i in 0..n {
            let planes = [dy(i), &x[span(i)]];
            let (coef, batch) = ([a, b, c0], self.norm.batch);
            // SAFETY: plane (i, ch) lies inside `out`, and only this task writes it (this
            // function's contract).
            unsafe {
                out.write(span(i).start, inner, |o| match &self.g.gate {
                    Some(g) => combine_plane(o, planes, coef, batch, g.channel(ch)),
                    None => combine_plane(o, planes, coef, batch, |d, _| d),
                })
            };
        }
        sums
    }
}

impl CustomOp2 for ChannelMajor {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = planes(l1, self.g.scale.len())?;
        if l2.shape() != l1.shape() {
            return Err(candle_core::Error::Msg("batchnorm gradient: shapes differ".into()));
        }
        let (dx, sums) = timing::timed(
            || format!("{} {:?}", self.name(), l1.dims()),
            || match s1 {
                CpuStorage::F32(_) => {
                    let (dx, sums) = self.pass::<f32>([slice(s1, l1)?, slice(s2, l2)?], dims);
                    Ok((CpuStorage::F32(dx), CpuStorage::F32(sums)))
                }
                CpuStorage::F64(_) => {
                    let (dx, sums) = self.pass::<f64>([slice(s1, l1)?, slice(s2, l2)?], dims);
                    Ok((CpuStorage::F64(dx), CpuStorage::F64(sums)))
                }
                _ => Err(unsupported(self.name())),
            },
        )?;
        self.sums_out.put(sums, self.name())?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{batch_norm_train, Clamp, Gate};
    use super::*;
    use crate::engine::gradcheck::{bits, seeded};
    use candle_core::DType;

    #[test]
    fn channel_by_channel_equals_the_two_passes_bit_for_bit() {
        let clamp = Clamp { lo: 0.0, hi: 0.5 };
        for (shape, dtype) in [
            ([3, 4, 5, 6], DType::F32),
            ([2, 3, 17, 1], DType::F64),
            ([5, 2, 4, 5], DType::F32),
            ([2, 3, 12, 12], DType::F32),
        ] {
            for (batch, clamp) in [(true, Some(clamp)), (true, None), (false, Some(clamp)), (false, None)] {
                let x = seeded(&shape, 1, dtype);
                let (_, mean, var) =
                    batch_norm_train(&x, &seeded(&[shape[1]], 2, dtype), &seeded(&[shape[1]], 3, dtype), 1e-5, clamp)
                        .unwrap();
                let inv_std = super::super::host(&var).unwrap().iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
                let norm = Normalise { mean: super::super::host(&mean).unwrap(), inv_std, clamp, batch };
                let scale: Vec<f64> = (0..shape[1]).map(|c| 0.5 + c as f64 * 0.3).collect();
                let gate = clamp.map(|clamp| Gate {
                    clamp,
                    scale: scale.clone(),
                    bias: vec![0.1; shape[1]],
                    mean: norm.mean.clone(),
                    inv_std: norm.inv_std.clone(),
                });
                let grads =
                    || Grads { scale: scale.clone(), gate: gate.clone(), m: (shape[0] * shape[2] * shape[3]) as f64 };
                let dy = seeded(&shape, 4, dtype);
                let fused = ChannelMajor::new(norm.clone(), grads()).run(&x, &dy).unwrap();
                let two = norm.two_passes(&x, &dy, grads()).unwrap();
                for (a, b) in [(fused.0, two.0), (fused.1, two.1), (fused.2, two.2)] {
                    let (a, b) = (a.unwrap(), b.unwrap());
                    assert!(bits(&a) == bits(&b), "{shape:?} {dtype:?} batch {batch} clamp {clamp:?}");
                }
            }
        }
    }
}
