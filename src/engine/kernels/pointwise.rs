//! Fused per-channel and element-wise kernels for the ops every CNN block repeats:
//! BatchNormalization with recorded statistics, and Clip (ReLU6). Written as composite
//! candle expressions they cost several full passes and allocations each way; fused, one
//! pass forward and one backward, parallel over channel planes.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, Real};

/// y = x * k[c] + (bias[c] - mean[c] * k[c]) with k = scale / sqrt(var + eps), for x
/// [N, C, ...]; differentiable in x, scale and bias.
#[derive(Clone, Debug)]
struct BatchNorm {
    mean: Vec<f64>,
    /// 1 / sqrt(var + eps)
    inv_std: Vec<f64>,
}

/// Grouping of x as [N, C, inner].
fn planes(l: &Layout, c_expected: usize) -> candle_core::Result<(usize, usize, usize)> {
    let dims = l.shape().dims();
    let (n, c) = match dims {
        [n, c, ..] => (*n, *c),
        _ => return Err(candle_core::Error::Msg(format!("BatchNormalization needs [N, C, ...], got {dims:?}"))),
    };
    if c != c_expected {
        return Err(candle_core::Error::Msg(format!("BatchNormalization: {c} channels, statistics for {c_expected}")));
    }
    Ok((n, c, dims[2..].iter().product()))
}

impl BatchNorm {
    fn forward<T: Real>(&self, x: &[T], scale: &[T], bias: &[T], (_, c, inner): (usize, usize, usize)) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(inner.max(1)).zip(x.par_chunks(inner.max(1))).enumerate().for_each(|(p, (yp, xp))| {
            let ch = p % c;
            let k = scale[ch] * T::real(self.inv_std[ch]);
            let b = bias[ch] - T::real(self.mean[ch]) * k;
            yp.iter_mut().zip(xp).for_each(|(o, &v)| *o = v * k + b);
        });
        y
    }

    fn run<T: Real + candle_core::WithDType>(
        &self,
        s: [&CpuStorage; 3],
        l: [&Layout; 3],
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let dims = planes(l[0], self.mean.len())?;
        let (x, scale, bias) = (slice::<T>(s[0], l[0])?, slice::<T>(s[1], l[1])?, slice::<T>(s[2], l[2])?);
        if scale.len() != dims.1 || bias.len() != dims.1 {
            return Err(candle_core::Error::Msg(
                "BatchNormalization: scale or bias length differs from channels".into(),
            ));
        }
        Ok((self.forward(x, scale, bias, dims), l[0].shape().clone()))
    }
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm"
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
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>([s1, s2, s3], [l1, l2, l3]).map(|(v, s)| (CpuStorage::F32(v), s)),
            CpuStorage::F64(_) => self.run::<f64>([s1, s2, s3], [l1, l2, l3]).map(|(v, s)| (CpuStorage::F64(v), s)),
            _ => Err(candle_core::Error::Msg("mtpack-batchnorm supports float32 and float64 only".into())),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // dx = dy * scale * inv_std, per channel plane.
        let dx = dy.apply_op2_no_bwd(scale, &BatchNormGrad { bn: self.clone(), part: GradPart::Input })?;
        // [2, C]: sum(dy * (x - mean) * inv_std) and sum(dy) per channel.
        let sums = x.apply_op2_no_bwd(&dy, &BatchNormGrad { bn: self.clone(), part: GradPart::Affine })?;
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

#[derive(Clone, Copy, Debug)]
enum GradPart {
    /// (dy, scale) -> dx
    Input,
    /// (x, dy) -> [dscale; dbias]
    Affine,
}

#[derive(Clone, Debug)]
struct BatchNormGrad {
    bn: BatchNorm,
    part: GradPart,
}

impl BatchNormGrad {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        a: &[T],
        la: &Layout,
        b: &[T],
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (_, c, inner) = planes(la, self.bn.mean.len())?;
        let inner = inner.max(1);
        match self.part {
            GradPart::Input => {
                let mut dx = vec![T::zero(); a.len()];
                dx.par_chunks_mut(inner).zip(a.par_chunks(inner)).enumerate().for_each(|(p, (o, d))| {
                    let ch = p % c;
                    let k = b[ch] * T::real(self.bn.inv_std[ch]);
                    o.iter_mut().zip(d).for_each(|(o, &v)| *o = v * k);
                });
                Ok((dx, la.shape().clone()))
            }
            GradPart::Affine => {
                let planes_total = a.len() / inner;
                let sums: Vec<(T, T)> = (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let (m, inv) = (T::real(self.bn.mean[ch]), T::real(self.bn.inv_std[ch]));
                        let (mut ds, mut db) = (T::zero(), T::zero());
                        for p in (ch..planes_total).step_by(c) {
                            for (&x, &d) in a[p * inner..][..inner].iter().zip(&b[p * inner..][..inner]) {
                                ds += d * (x - m) * inv;
                                db += d;
                            }
                        }
                        (ds, db)
                    })
                    .collect();
                let mut out: Vec<T> = sums.iter().map(|s| s.0).collect();
                out.extend(sums.iter().map(|s| s.1));
                Ok((out, Shape::from((2, c))))
            }
        }
    }
}

impl candle_core::CustomOp2 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => {
                self.run::<f32>(slice(s1, l1)?, l1, slice(s2, l2)?).map(|(v, s)| (CpuStorage::F32(v), s))
            }
            CpuStorage::F64(_) => {
                self.run::<f64>(slice(s1, l1)?, l1, slice(s2, l2)?).map(|(v, s)| (CpuStorage::F64(v), s))
            }
            _ => Err(candle_core::Error::Msg("mtpack-batchnorm supports float32 and float64 only".into())),
        }
    }
}

/// Inference-statistics batch normalisation over axis 1, differentiable in x, scale, bias.
pub fn batch_norm(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean: Vec<f64> = mean.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let var: Vec<f64> = var.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    x.contiguous()?.apply_op3(&scale.contiguous()?, &bias.contiguous()?, BatchNorm { mean, inv_std })
}

/// Per-channel mean and biased variance of x [N, C, ...], as [2, C]; no gradient.
#[derive(Clone, Copy, Debug)]
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "mtpack-channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn stats<T: Real>(x: &[T], n: usize, c: usize, inner: usize) -> Vec<T> {
            let per: Vec<(T, T)> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let count = T::real((n * inner).max(1) as f64);
                    let plane = |b: usize| &x[(b * c + ch) * inner..][..inner];
                    let mean = (0..n).map(|b| plane(b).iter().copied().sum::<T>()).sum::<T>() / count;
                    let var =
                        (0..n).map(|b| plane(b).iter().map(|&v| (v - mean) * (v - mean)).sum::<T>()).sum::<T>() / count;
                    (mean, var)
                })
                .collect();
            per.iter().map(|p| p.0).chain(per.iter().map(|p| p.1)).collect()
        }
        let dims = l.shape().dims();
        let (n, c) = match dims {
            [n, c, ..] => (*n, *c),
            _ => return Err(candle_core::Error::Msg(format!("BatchNormalization needs [N, C, ...], got {dims:?}"))),
        };
        let inner: usize = dims[2..].iter().product::<usize>().max(1);
        let shape = Shape::from((2, c));
        match s {
            CpuStorage::F32(_) => Ok((CpuStorage::F32(stats(slice::<f32>(s, l)?, n, c, inner)), shape)),
            CpuStorage::F64(_) => Ok((CpuStorage::F64(stats(slice::<f64>(s, l)?, n, c, inner)), shape)),
            _ => Err(candle_core::Error::Msg("mtpack-channel-stats supports float32 and float64 only".into())),
        }
    }
}

/// Batch normalisation with the batch's own statistics (training mode, as PyTorch's
/// `train()`): the gradient flows through the mean and variance too,
/// dx = scale * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)) per channel.
#[derive(Clone, Debug)]
struct BatchNormTrain(BatchNorm);

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-train"
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
        self.0.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, dscale, dbias) = self.0.bwd(x, scale, bias, res, dy)?;
        let (Some(dscale), Some(dbias)) = (dscale, dbias) else {
            return Err(candle_core::Error::Msg("batch norm gradient missing".into()));
        };
        // With m = N * inner: mean(dy) = dbias / m and mean(dy * xhat) = dscale / m.
        let c = self.0.mean.len();
        let m = (x.elem_count() / c.max(1)) as f64;
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let dev = x.device();
        let inv = Tensor::new(self.0.inv_std.as_slice(), dev)?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let mean = Tensor::new(self.0.mean.as_slice(), dev)?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let xhat = x.broadcast_sub(&mean)?.broadcast_mul(&inv)?;
        let centred = dy
            .broadcast_sub(&(dbias.reshape(shape.clone())? / m)?)?
            .sub(&xhat.broadcast_mul(&(dscale.reshape(shape.clone())? / m)?)?)?;
        let dx = centred.broadcast_mul(&scale.reshape(shape)?.broadcast_mul(&inv)?)?;
        Ok((Some(dx), Some(dscale), Some(dbias)))
    }
}

/// Training-mode batch normalisation: normalises with the batch's statistics and returns
/// them too (mean and biased variance, each [C]) for the running averages.
pub fn batch_norm_train(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let stats = x.detach().apply_op1_no_bwd(&ChannelStats)?;
    let (mean_t, var_t) = (stats.get(0)?, stats.get(1)?);
    let mean: Vec<f64> = mean_t.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let var: Vec<f64> = var_t.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let y = x.apply_op3(&scale.contiguous()?, &bias.contiguous()?, BatchNormTrain(BatchNorm { mean, inv_std }))?;
    Ok((y, mean_t, var_t))
}

/// Clamp to [lo, hi]; the gradient passes where lo < x < hi.
#[derive(Clone, Copy, Debug)]
struct Clamp {
    lo: f64,
    hi: f64,
}

impl Clamp {
    fn map<T: Real>(&self, x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &v)| *o = f(v)));
        y
    }
}

impl CustomOp1 for Clamp {
    fn name(&self) -> &'static str {
        "mtpack-clamp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l.shape().clone();
        match s {
            CpuStorage::F32(_) => {
                let (lo, hi) = (self.lo as f32, self.hi as f32);
                Ok((CpuStorage::F32(self.map(slice::<f32>(s, l)?, |v| v.max(lo).min(hi))), shape))
            }
            CpuStorage::F64(_) => {
                Ok((CpuStorage::F64(self.map(slice::<f64>(s, l)?, |v| v.max(self.lo).min(self.hi))), shape))
            }
            _ => Err(candle_core::Error::Msg("mtpack-clamp supports float32 and float64 only".into())),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &ClampGrad(*self))?))
    }
}

#[derive(Clone, Copy, Debug)]
struct ClampGrad(Clamp);

impl candle_core::CustomOp2 for ClampGrad {
    fn name(&self) -> &'static str {
        "mtpack-clamp-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn pass<T: Real>(x: &[T], dy: &[T], lo: T, hi: T) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(dy.par_chunks(4096))).for_each(|(o, (xs, ds))| {
                for ((o, &v), &d) in o.iter_mut().zip(xs).zip(ds) {
                    *o = if v > lo && v < hi { d } else { T::zero() };
                }
            });
            out
        }
        let shape = l1.shape().clone();
        let Clamp { lo, hi } = self.0;
        match s1 {
            CpuStorage::F32(_) => {
                Ok((CpuStorage::F32(pass(slice(s1, l1)?, slice(s2, l2)?, lo as f32, hi as f32)), shape))
            }
            CpuStorage::F64(_) => Ok((CpuStorage::F64(pass(slice(s1, l1)?, slice(s2, l2)?, lo, hi)), shape)),
            _ => Err(candle_core::Error::Msg("mtpack-clamp supports float32 and float64 only".into())),
        }
    }
}

/// Differentiable clamp (ReLU6 and Clip), one pass each way.
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Clamp { lo, hi })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::DType;

    #[test]
    fn batch_norm_matches_the_formula_and_its_gradients() {
        let x = seeded(&[2, 3, 4, 5], 1, DType::F64);
        let (scale, bias) = (seeded(&[3], 2, DType::F64), seeded(&[3], 3, DType::F64));
        let mean = seeded(&[3], 4, DType::F64);
        let var = (seeded(&[3], 5, DType::F64).abs().unwrap() + 0.5).unwrap();
        let y = batch_norm(&x, &scale, &bias, &mean, &var, 1e-5).unwrap();
        let r = |t: &Tensor| t.reshape((1, 3, 1, 1)).unwrap();
        let want = x
            .broadcast_sub(&r(&mean))
            .unwrap()
            .broadcast_div(&r(&(&var + 1e-5).unwrap().sqrt().unwrap()))
            .unwrap()
            .broadcast_mul(&r(&scale))
            .unwrap()
            .broadcast_add(&r(&bias))
            .unwrap();
        let d: f64 = (y - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(d < 1e-12, "{d}");
        check_gradients(&[x, scale, bias], |v| batch_norm(&v[0], &v[1], &v[2], &mean, &var, 1e-5), 1e-6).unwrap();
    }

    #[test]
    fn training_batch_norm_gradients_include_the_batch_statistics() {
        let x = seeded(&[3, 2, 3, 4], 7, DType::F64);
        let (scale, bias) = (seeded(&[2], 8, DType::F64), seeded(&[2], 9, DType::F64));
        let (y, mean, var) = batch_norm_train(&x, &scale, &bias, 1e-5).unwrap();
        // Normalised output: per channel mean 0 (before scale and shift).
        let m: Vec<f64> = mean.to_vec1().unwrap();
        let v: Vec<f64> = var.to_vec1().unwrap();
        assert_eq!(m.len(), 2);
        assert!(v.iter().all(|v| *v > 0.0));
        assert_eq!(y.dims(), x.dims());
        check_gradients(&[x, scale, bias], |t| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0), 1e-6).unwrap();
    }

    #[test]
    fn clamp_gradient() {
        let x = seeded(&[4, 7], 6, DType::F64);
        check_gradients(&[x], |v| clamp(&v[0], -0.4, 0.3), 1e-6).unwrap();
    }
}
