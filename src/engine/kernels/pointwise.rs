//! Element-wise activations as one pass each way: Clip (ReLU6, HardSigmoid's clamp), which
//! as a composite of candle's maximum/minimum costs two passes and buffers forward and four
//! backward, and GELU, which transformers export as five ops (Div, Erf, Add, Mul, Mul).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{clamp_to, par_written, simd_widest, slice, write_front, Real};

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
                Ok((CpuStorage::F32(self.map(slice::<f32>(s, l)?, |v| clamp_to(v, lo, hi))), shape))
            }
            CpuStorage::F64(_) => {
                Ok((CpuStorage::F64(self.map(slice::<f64>(s, l)?, |v| clamp_to(v, self.lo, self.hi))), shape))
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

/// GELU, x * Phi(x) with Phi the standard normal CDF, exactly (through erf) or by the tanh
/// approximation.
#[derive(Clone, Copy, Debug)]
pub struct Gelu {
    pub tanh: bool,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const TANH_CUBIC: f64 = 0.044_715;

impl Gelu {
    /// (gelu(x), d gelu / dx) by the tanh approximation.
    #[inline(always)]
    fn eval_tanh<T: Real>(x: T) -> (T, T) {
        let half = T::real(0.5);
        let (c, k) = (T::real(SQRT_2_OVER_PI), T::real(TANH_CUBIC));
        let t = (c * x * (T::one() + k * x * x)).tanh();
        let dt = (T::one() - t * t) * c * (T::one() + T::real(3.0) * k * x * x);
        (half * x * (T::one() + t), half * (T::one() + t) + half * x * dt)
    }

    /// (gelu(x), d gelu / dx) exactly, through erf.
    #[inline(always)]
    fn eval_erf<T: Real>(x: T) -> (T, T) {
        let half = T::real(0.5);
        let cdf = half * (T::one() + (x * T::real(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = (-half * x * x).exp_fast() * T::real(0.398_942_280_401_432_7);
        (x * cdf, cdf + x * pdf)
    }

    /// `f` of each of `len` items, chunk i of 4096 from `items(i)`, in parallel. Callers pick
    /// the form (erf or tanh) outside the loop: with the choice inside, the compiler kept the
    /// per-element function out of line, one call per element and no vector code.
    #[inline(always)]
    fn map_chunks<T: Real, I, It>(len: usize, items: impl Fn(usize) -> It + Sync, f: impl Fn(I) -> T + Sync) -> Vec<T>
    where
        It: Iterator<Item = I>,
    {
        // SAFETY: write_front returns exactly the count it wrote.
        unsafe {
            par_written(len, 4096, |i, out| {
                simd_widest(
                    #[inline(always)]
                    || write_front(out, items(i), &f),
                )
            })
        }
    }

    fn forward<T: Real>(&self, x: &[T]) -> Vec<T> {
        let items = |i: usize| x[i * 4096..].iter();
        if self.tanh {
            Self::map_chunks(x.len(), items, |&v| Self::eval_tanh(v).0.flush_tiny())
        } else {
            Self::map_chunks(x.len(), items, |&v| Self::eval_erf(v).0.flush_tiny())
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "mtpack-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((timed_on_float!(s, self.name(), l, |T| self.forward(slice::<T>(s, l)?)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGrad(*self))?))
    }
}

/// (x, dy) -> dy * gelu'(x).
#[derive(Clone, Copy, Debug)]
struct GeluGrad(Gelu);

impl GeluGrad {
    fn pass<T: Real>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let items = |i: usize| x[i * 4096..].iter().zip(&dy[i * 4096..]);
        if self.0.tanh {
            Gelu::map_chunks(x.len(), items, |(&v, &d)| (d * Gelu::eval_tanh(v).1).flush_tiny())
        } else {
            Gelu::map_chunks(x.len(), items, |(&v, &d)| (d * Gelu::eval_erf(v).1).flush_tiny())
        }
    }
}

impl candle_core::CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "mtpack-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l2.shape() != l1.shape() {
            return Err(candle_core::Error::Msg("mtpack-gelu-grad: x and dy shapes differ".into()));
        }
        Ok((
            timed_on_float!(s1, self.name(), l1, |T| self.pass::<T>(slice(s1, l1)?, slice(s2, l2)?)),
            l1.shape().clone(),
        ))
    }
}

/// Differentiable GELU, one pass each way.
pub fn gelu(x: &Tensor, tanh: bool) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu { tanh })
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

    /// Far in GELU's negative tail the value and the gradient underflow: float32 writes 0
    /// there (a subnormal operand slows the next matrix product ~60x), and is untouched
    /// wherever the result is above 2^-100.
    #[test]
    fn gelu_writes_no_tiny_float32_values() {
        // The named points, then enough values for every vector lane of the AVX-512 and
        // AVX2 code: each element must be what the scalar function gives, bit for bit.
        let mut x: Vec<f32> = vec![-14.0, -13.3, -20.0, -6.0, -3.0, 0.5, 4.0];
        x.extend((0..997).map(|i| (i as f32 - 600.0) * 0.023));
        let dy = vec![1e-3f32; x.len()];
        for tanh in [false, true] {
            let y = Gelu { tanh }.forward(&x);
            let g = GeluGrad(Gelu { tanh }).pass(&x, &dy);
            for (i, &v) in x.iter().enumerate() {
                let (value, slope) = if tanh { Gelu::eval_tanh(v) } else { Gelu::eval_erf(v) };
                for (got, raw) in [(y[i], value), (g[i], 1e-3 * slope)] {
                    let want = if raw.abs() < <f32 as Real>::TINY { 0.0 } else { raw };
                    assert_eq!(got.to_bits(), want.to_bits(), "x {v} tanh {tanh}: {got} vs {raw}");
                    assert!(got == 0.0 || got.abs() >= <f32 as Real>::TINY);
                }
            }
        }
        // The erf form's gradient at -14 is below the bound unflushed: the case that matters.
        assert!((1e-3 * Gelu::eval_erf(-14.0f32).1).abs() < <f32 as Real>::TINY);
        assert_eq!(GeluGrad(Gelu { tanh: false }).pass(&[-14.0f32], &[1e-3])[0], 0.0);
    }

    #[test]
    fn gelu_values_and_gradients() {
        let x = (seeded(&[5, 9], 7, DType::F64) * 3.0).unwrap();
        for tanh in [false, true] {
            let y: Vec<f64> = gelu(&x, tanh).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f64> =
                if tanh { x.gelu() } else { x.gelu_erf() }.unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b} (tanh {tanh})");
            }
            check_gradients(std::slice::from_ref(&x), |v| gelu(&v[0], tanh), 1e-6).unwrap();
        }
        // float32 through the rational erf stays within float32 rounding of the exact value.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let y32: Vec<f32> = gelu(&x32, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let exact: Vec<f64> = x.gelu_erf().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in y32.iter().zip(&exact) {
            assert!((*a as f64 - b).abs() < 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // So does its float32 gradient, through the polynomial exp (the float64 one uses libm's).
        let (xs, xs32): (Vec<f64>, Vec<f32>) =
            (x.flatten_all().unwrap().to_vec1().unwrap(), x32.flatten_all().unwrap().to_vec1().unwrap());
        let dy = vec![1.0; xs.len()];
        let grad = GeluGrad(Gelu { tanh: false });
        for (a, b) in grad.pass(&xs32, &vec![1.0f32; xs.len()]).iter().zip(grad.pass(&xs, &dy)) {
            assert!((*a as f64 - b).abs() < 2e-6 * (1.0 + b.abs()), "gradient {a} vs {b}");
        }
    }
}
