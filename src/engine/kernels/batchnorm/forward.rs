//! Training-mode BatchNormalization's forward pass over large planes, channel by channel.
//! The batch statistics already take a channel's planes one after another (the mean, then
//! the squared deviations from cache); here the same task then writes the channel's
//! normalised planes while x is still in cache, where a separate pass in storage order read
//! all of x from memory once more (at 224x224 a MobileNetV2 activation is tens of
//! megabytes). The same statistics, the same affine map and clamp as the separate ops: the
//! values bit for bit.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::{slice, timing, Real, SideOutput};
use super::{affine, host, normalise_plane, planes, unsupported, ChannelPlanes, ChannelStats, Clamp, Normalise};

/// Planes of at least this many elements take the channel-by-channel pass (the same bound
/// as the backward pass's, [`super::backward::PLANE`]).
pub(super) const PLANE: usize = super::backward::PLANE;

/// As [`super::batch_norm_train`], for x [N, C, ...] with planes of [`PLANE`] elements or
/// more, contiguous, on the CPU.
pub(super) fn batch_norm_train(
    x: &Tensor,
    [scale, bias]: [&Tensor; 2],
    eps: f64,
    clamp: Option<Clamp>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let fused = StatsAndOutput { scale: host(scale)?, bias: host(bias)?, eps, clamp, y: SideOutput::default() };
    let stats = x.detach().apply_op1_no_bwd(&fused)?;
    let (mean_t, var_t) = (stats.get(0)?, stats.get(1)?);
    let norm = Normalise::with_batch_statistics(&mean_t, &var_t, eps, clamp)?;
    let y = SideOutput::holding(fused.y.take());
    let y = x.apply_op3(&scale.contiguous()?, &bias.contiguous()?, Computed { norm, y })?;
    Ok((y, mean_t, var_t))
}

/// x -> the batch statistics [2, C] (mean, biased variance); the normalised output is
/// left in `y`, a second output a custom op cannot return.
struct StatsAndOutput {
    scale: Vec<f64>,
    bias: Vec<f64>,
    eps: f64,
    clamp: Option<Clamp>,
    y: SideOutput,
}

impl StatsAndOutput {
    /// (y, statistics [2, C]) of x, a task per channel.
    fn run<T: Real>(&self, x: &[T], (n, c, inner): (usize, usize, usize)) -> (Vec<T>, Vec<T>) {
        let len = n * c * inner;
        let mut y: Vec<T> = Vec::with_capacity(len);
        let out = ChannelPlanes::over(&mut y);
        let clamp = self.clamp.map(|k| (T::real(k.lo), T::real(k.hi)));
        let per: Vec<(T, T)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let out = &out;
                let (mean, var) = ChannelStats::channel(x, (n, c, inner), ch);
                let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
                let at = |v: &[f64]| T::real(v.get(ch).copied().unwrap_or(0.0));
                let kb = affine(at(&self.scale), at(&self.bias), f(mean), 1.0 / (f(var) + self.eps).sqrt());
                super::super::simd(
                    #[inline(always)]
                    || {
                        for i in 0..n {
                            let start = (i * c + ch) * inner;
                            // SAFETY: plane (i, ch) lies inside the buffer of n * c * inner
                            // elements, and only this channel's task writes it.
                            unsafe {
                                out.write(start, inner, |o| normalise_plane(o, &x[start..start + inner], kb, clamp))
                            };
                        }
                    },
                );
                (mean, var)
            })
            .collect();
        // SAFETY: every plane (i, ch) of the n * c planes of `inner` elements was written
        // in full above (normalise_plane's front, then zeros).
        unsafe { y.set_len(len) };
        (y, per.iter().map(|p| p.0).chain(per.iter().map(|p| p.1)).collect())
    }
}

impl CustomOp1 for StatsAndOutput {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-forward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = planes(l, self.scale.len())?;
        let (y, stats) = timing::timed(
            || format!("{} {:?}", self.name(), l.dims()),
            || match s {
                CpuStorage::F32(_) => {
                    let (y, stats) = self.run(slice::<f32>(s, l)?, dims);
                    Ok((CpuStorage::F32(y), CpuStorage::F32(stats)))
                }
                CpuStorage::F64(_) => {
                    let (y, stats) = self.run(slice::<f64>(s, l)?, dims);
                    Ok((CpuStorage::F64(y), CpuStorage::F64(stats)))
                }
                _ => Err(unsupported(self.name())),
            },
        )?;
        self.y.put(y, self.name())?;
        Ok((stats, Shape::from((2, dims.1))))
    }
}

/// [`Normalise`] whose output was computed with the statistics: the forward pass hands it
/// over (computing it afresh only if it is missing or of another size), the backward pass
/// is Normalise's.
struct Computed {
    norm: Normalise,
    y: SideOutput,
}

impl CustomOp3 for Computed {
    fn name(&self) -> &'static str {
        self.norm.name()
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
        let ready = self.y.take();
        match ready {
            Some(y) if fits(&y, s1, l1.shape().elem_count()) => Ok((y, l1.shape().clone())),
            _ => self.norm.cpu_fwd(s1, l1, s2, l2, s3, l3),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.norm.bwd(x, scale, bias, y, dy)
    }
}

/// Whether `y` is `len` elements of x's type.
fn fits(y: &CpuStorage, x: &CpuStorage, len: usize) -> bool {
    match (y, x) {
        (CpuStorage::F32(v), CpuStorage::F32(_)) => v.len() == len,
        (CpuStorage::F64(v), CpuStorage::F64(_)) => v.len() == len,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::batch_norm_train_two_ops;
    use super::*;
    use crate::engine::gradcheck::{bits, seeded};
    use candle_core::DType;

    #[test]
    fn channel_by_channel_equals_the_two_ops_bit_for_bit() {
        for (shape, dtype) in [([3, 4, 12, 11], DType::F32), ([2, 3, 9, 15], DType::F64)] {
            for clamp in [None, Some(Clamp { lo: 0.0, hi: 0.4 })] {
                let x = ((seeded(&shape, 1, dtype) * 3.0).unwrap() + 0.5).unwrap();
                let (scale, bias) = (seeded(&shape[1..2], 2, dtype), seeded(&shape[1..2], 3, dtype));
                let fused = batch_norm_train(&x, [&scale, &bias], 1e-5, clamp).unwrap();
                let two = batch_norm_train_two_ops(&x, &scale, &bias, 1e-5, clamp).unwrap();
                for (a, b) in [(fused.0, two.0), (fused.1, two.1), (fused.2, two.2)] {
                    assert!(bits(&a) == bits(&b), "{shape:?} {dtype:?} clamp {clamp:?}");
                }
            }
        }
    }
}
