//! Piggyback's masked weight as one op: W * m with m = (s > threshold) + (s - s), whose
//! value is exactly the binary mask and whose gradient reaches the scores s straight through
//! as dL/dW_masked * W. As tensor expressions (a comparison, a cast, a subtraction, an addition
//! and the product, then their backward passes, the frozen W's gradient among them) it cost
//! five passes over every backbone weight forward and more backward, at every step. The
//! arithmetic is the expressions': the same mask value (the (s - s) term included, so a NaN
//! score still poisons its weight) and the same gradient product.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::engine::kernels::{beside, par_update, simd, slice, Real};

pub(super) struct StraightThrough {
    pub threshold: f64,
}

impl StraightThrough {
    fn run<T: Real + candle_core::WithDType>(&self, w: &[T], s: &[T]) -> candle_core::Result<Vec<T>> {
        if w.len() != s.len() {
            return Err(candle_core::Error::Msg(format!(
                "piggyback mask: {} weights against {} scores",
                w.len(),
                s.len()
            )));
        }
        let (threshold, zero, one) = (T::real(self.threshold), T::zero(), T::one());
        let mut out = w.to_vec();
        par_update(&mut out, |at, part| {
            let s = beside(s, at, part.len());
            simd(
                #[inline(always)]
                || {
                    part.iter_mut().zip(s).for_each(|(w, &s)| {
                        let bin = if s > threshold { one } else { zero };
                        // The expressions' s - detach(s): 0, or NaN for a NaN score.
                        #[allow(clippy::eq_op)]
                        let straight = bin + (s - s);
                        *w *= straight;
                    })
                },
            )
        });
        Ok(out)
    }
}

impl CustomOp2 for StraightThrough {
    fn name(&self) -> &'static str {
        "mtpack-piggyback-mask"
    }

    fn cpu_fwd(&self, ws: &CpuStorage, wl: &Layout, ss: &CpuStorage, sl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match (ws, ss) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.run::<f32>(slice(ws, wl)?, slice(ss, sl)?)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.run::<f64>(slice(ws, wl)?, slice(ss, sl)?)?)
            }
            _ => return Err(candle_core::Error::Msg("piggyback mask: float32 or float64, one type".into())),
        };
        Ok((storage, wl.shape().clone()))
    }

    /// The frozen weight gets no gradient; the scores get the masked weight's times W, as
    /// the product's backward pass gives its right-hand side.
    fn bwd(&self, w: &Tensor, _s: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(grad.mul(w)?)))
    }
}

/// W masked by `scores` (see the module): the fused op where mtpack's CPU kernels run, the
/// expressions elsewhere (a GPU, `--kernels portable`).
pub(super) fn masked(w: &Tensor, scores: &Tensor, threshold: f64) -> candle_core::Result<Tensor> {
    let same = w.dtype() == scores.dtype() && w.dims() == scores.dims();
    if same && crate::engine::kernels::native(w) && w.is_contiguous() && scores.is_contiguous() {
        return w.apply_op2(scores, StraightThrough { threshold });
    }
    let bin = scores.gt(threshold)?.to_dtype(w.dtype())?;
    // Exactly `bin` in value; the gradient reaches the scores unchanged.
    let straight = (bin + (scores - scores.detach())?)?;
    w.mul(&straight)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The fused op against the expressions: values and the scores' gradient bit for bit,
    /// over one part and several of the pool's split.
    #[test]
    fn the_fused_mask_equals_the_expressions_bit_for_bit() {
        for n in [37, 3 * 4096 + 5] {
            let w = Tensor::randn(0f32, 1f32, n, &Device::Cpu).unwrap();
            let s = Var::from_tensor(&Tensor::randn(0.005f32, 0.01f32, n, &Device::Cpu).unwrap()).unwrap();
            let up = Tensor::randn(0f32, 1f32, n, &Device::Cpu).unwrap();
            let run = |fused: bool| {
                let kernels = if fused { crate::engine::kernels::Kernels::Native } else { crate::engine::kernels::Kernels::Portable };
                let out = crate::engine::kernels::with_kernels(kernels, || masked(&w, s.as_tensor(), 0.005)).unwrap();
                let grads = (&out * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let g = grads.get(s.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
                (out.to_vec1::<f32>().unwrap(), g)
            };
            let (fused, expressions) = (run(true), run(false));
            assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v != 0.0), "both sides of the threshold");
            assert_eq!(fused, expressions);
        }
    }
}
