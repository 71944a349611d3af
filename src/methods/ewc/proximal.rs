//! EWC's proximal step written in place: theta <- (theta + c * FT) / (1 + c * F) in one pass
//! over the weight. As tensor expressions it allocated and wrote four buffers per weight
//! after every optimizer step (c * FT, the numerator, the denominator, the quotient) and then
//! copied the quotient into the variable. The arithmetic is the expressions', in the same
//! order and precision (candle's affine is `v * mul + add`), so the weights are bit for bit
//! the same.

use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor, Var};

use crate::engine::kernels::{beside, in_place_cpu, par_update, simd, slice, slice_mut, Real};

/// theta = (theta + (ft * c + 0)) / (f * c + 1); applied to the weight, reading [f, ft].
struct Proximal {
    c: f64,
}

impl Proximal {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        theta: &mut [T],
        l: &Layout,
        [(fs, fl), (fts, ftl)]: [(&CpuStorage, &Layout); 2],
    ) -> candle_core::Result<()> {
        let theta = slice_mut(theta, l)?;
        let (f, ft) = (slice::<T>(fs, fl)?, slice::<T>(fts, ftl)?);
        if f.len() != theta.len() || ft.len() != theta.len() {
            return Err(candle_core::Error::Msg(format!(
                "ewc proximal: {} weights against {} and {} Fisher entries",
                theta.len(),
                f.len(),
                ft.len()
            )));
        }
        let (c, zero, one) = (T::real(self.c), T::zero(), T::one());
        par_update(theta, |at, part| {
            let (f, ft) = (beside(f, at, part.len()), beside(ft, at, part.len()));
            simd(
                #[inline(always)]
                || {
                    part.iter_mut()
                        .zip(f)
                        .zip(ft)
                        .for_each(|((w, &f), &ft)| *w = (*w + (ft * c + zero)) / (f * c + one))
                },
            )
        });
        Ok(())
    }
}

impl InplaceOp3 for Proximal {
    fn name(&self) -> &'static str {
        "mtpack-ewc-proximal"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        l: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
        fts: &CpuStorage,
        ftl: &Layout,
    ) -> candle_core::Result<()> {
        match dst {
            CpuStorage::F32(v) => self.run::<f32>(v, l, [(fs, fl), (fts, ftl)]),
            CpuStorage::F64(v) => self.run::<f64>(v, l, [(fs, fl), (fts, ftl)]),
            _ => Err(candle_core::Error::Msg("ewc proximal: float32 and float64 only".into())),
        }
    }
}

/// One proximal step of `var` towards the anchors: in place where the weight and both sums
/// are contiguous CPU floats of one type, else as tensor expressions (CUDA).
pub(super) fn step(var: &Var, f: &Tensor, ft: &Tensor, c: f64) -> candle_core::Result<()> {
    let w = var.as_tensor();
    if in_place_cpu(w, &[f, ft]) {
        return w.inplace_op3(f, ft, &Proximal { c });
    }
    let num = (w + ft.affine(c, 0.0)?)?;
    let den = f.affine(c, 1.0)?;
    var.set(&num.div(&den)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_equals_the_tensor_expressions_bit_for_bit() {
        // One part, and several parts of the pool's split with a shorter last one.
        for n in [1000, 3 * 4096 + 17] {
            in_place_matches_on(n);
        }
    }

    fn in_place_matches_on(n: usize) {
        let vals = |k: f32| (0..n).map(|i| (i as f32 * 0.37 + k).sin() * 3.0).collect::<Vec<f32>>();
        let f = Tensor::from_vec(vals(1.0).iter().map(|v| v.abs()).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        let ft = Tensor::from_vec(vals(2.0), n, &Device::Cpu).unwrap();
        let start = Tensor::from_vec(vals(3.0), n, &Device::Cpu).unwrap();
        let c = 0.01 * 100.0;
        let var = Var::from_tensor(&start).unwrap();
        step(&var, &f, &ft, c).unwrap();
        let expected = ((&start + ft.affine(c, 0.0).unwrap()).unwrap().div(&f.affine(c, 1.0).unwrap())).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_ne!(got, start.to_vec1::<f32>().unwrap(), "the weights moved");
        assert_eq!(got, expected.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn a_mismatched_fisher_is_an_error() {
        let var = Var::from_tensor(&Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let short = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(step(&var, &short, &short, 1.0).is_err());
    }
}
