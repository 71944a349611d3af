//! A 2-D matrix product with bf16 operands and f32 sums (AMX, [`super::amx`]) as a
//! differentiable op: what `--precision bf16` runs for a linear layer (tokens times a weight)
//! and for both of its gradients, which are products of the same kind.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{amx, slice};

/// Which product the op computes from its two inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    /// (A [m, k], B [k, n]) -> A B
    Forward,
    /// (dC [m, n], B [k, n]) -> dA = dC B^T
    GradA,
    /// (A [m, k], dC [m, n]) -> dB = A^T dC
    GradB,
}

#[derive(Clone, Copy, Debug)]
struct MatMulBf16(Pass);

impl MatMulBf16 {
    /// (m, n, k) of the product and whether each input is read transposed.
    fn dims(&self, l1: &Layout, l2: &Layout) -> candle_core::Result<((usize, usize, usize), bool, bool)> {
        let ((r1, c1), (r2, c2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let (dims, inner_matches) = match self.0 {
            Pass::Forward => (((r1, c2, c1), false, false), c1 == r2),
            Pass::GradA => (((r1, r2, c1), false, true), c1 == c2),
            Pass::GradB => (((c1, c2, r1), true, false), r1 == r2),
        };
        if !inner_matches {
            return Err(candle_core::Error::Msg(format!(
                "bf16 matmul ({:?}): shapes {:?} and {:?} do not chain",
                self.0,
                l1.dims(),
                l2.dims()
            )));
        }
        Ok(dims)
    }
}

impl CustomOp2 for MatMulBf16 {
    fn name(&self) -> &'static str {
        "mtpack-matmul-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, n, k), ta, tb) = self.dims(l1, l2)?;
        let (a, b) = (slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?);
        let c = super::timing::timed(
            || format!("{} {:?} {:?}", self.name(), self.0, (m, n, k)),
            || amx::matmul((m, n, k), (a, ta), (b, tb)),
        )
        .map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.0 != Pass::Forward {
            return Err(candle_core::Error::Msg("bf16 matmul: gradients of a gradient are not computed".into()));
        }
        let dc = dc.contiguous()?;
        // A gradient nobody reads is not computed (a frozen weight's, the input's).
        let da = a.track_op().then(|| dc.apply_op2_no_bwd(b, &MatMulBf16(Pass::GradA))).transpose()?;
        let db = b.track_op().then(|| a.apply_op2_no_bwd(&dc, &MatMulBf16(Pass::GradB))).transpose()?;
        Ok((da, db))
    }
}

/// `a` [m, k] times `b` [k, n] in bf16 with f32 sums, differentiable in both.
pub fn matmul_bf16(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, MatMulBf16(Pass::Forward))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Values and both gradients against candle's f32 product: equal within bf16 rounding
    /// (8 bits of mantissa, so a few 1e-3 relative over sums of 96 terms).
    #[test]
    fn values_and_gradients_match_the_f32_product() -> candle_core::Result<()> {
        if !super::amx::available() {
            eprintln!("skipped: this CPU or OS has no AMX-BF16");
            return Ok(());
        }
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (70, 96), &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (96, 40), &Device::Cpu)?)?;
        let w = Tensor::randn(0f32, 1., (70, 40), &Device::Cpu)?;
        let loss = |c: Tensor| (c * &w).and_then(|x| x.sum_all());
        let (lb, lf) = (loss(super::matmul_bf16(&a, &b)?)?, loss(a.matmul(&b)?)?);
        let (gb, gf) = (lb.backward()?, lf.backward()?);
        let rel = |x: &Tensor, y: &Tensor| -> candle_core::Result<f32> {
            let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / y.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let c_rel = rel(&super::matmul_bf16(&a, &b)?, &a.matmul(&b)?)?;
        assert!(c_rel < 1e-2, "values {c_rel}");
        for v in [&a, &b] {
            let (x, y) = (gb.get(v).expect("bf16 gradient"), gf.get(v).expect("f32 gradient"));
            assert_eq!(x.dims(), y.dims());
            let r = rel(x, y)?;
            assert!(r < 1e-2 && r > 0.0, "gradient relative difference {r}");
        }
        Ok(())
    }
}
