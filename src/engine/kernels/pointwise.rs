//! Clip (ReLU6, HardSigmoid's clamp) as one pass each way; as a composite of candle's
//! maximum/minimum it costs two passes and buffers forward and four backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, Real};

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

/// (x, dy) -> dy where lo < x < hi, else 0.
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
                    *o = if (v > lo) & (v < hi) { d } else { T::zero() };
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
    fn clamp_gradient() {
        let x = seeded(&[4, 7], 6, DType::F64);
        check_gradients(&[x], |v| clamp(&v[0], -0.4, 0.3), 1e-6).unwrap();
    }
}
