//! Both gradients of a depthwise convolution in one pass, for the backward pass of a trained
//! layer whose input is trained too (every depthwise layer of a fine-tuned MobileNet). Run
//! as two passes, each read the output gradient and laid it out again (extended rows, or
//! channels-last on small maps), and the weight gradient's pass read the input as well;
//! here each image's output gradient and input are read once for both. The values are
//! those of the two passes bit for bit: the same sums in the same order, images in the
//! same units.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::super::{par_written_with, slice, sum_in_order, timing, Real, SideOutput};
use super::{dims4, ConvParams, Geometry};

/// (x, w, dy) -> dx; the weight gradient is left in `weight_grad`, a second output that a
/// custom op cannot return.
struct DepthwiseGrads {
    p: ConvParams,
    weight_grad: SideOutput,
}

impl CustomOp3 for DepthwiseGrads {
    fn name(&self) -> &'static str {
        "mtpack-conv2d-depthwise-grads"
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
        let (xs, ws) = (dims4(l1)?, dims4(l2)?);
        let g = Geometry::new(&xs, &ws, self.p)?;
        g.check_output(l3)?;
        if !g.depthwise() {
            return Err(candle_core::Error::Msg(format!(
                "{}: input {xs:?} and weight {ws:?} are not a depthwise convolution",
                self.name()
            )));
        }
        let (dx, dw) = timing::timed(
            || format!("conv2d grad-both depthwise {xs:?}"),
            || -> candle_core::Result<_> {
                Ok(match s1 {
                    CpuStorage::F32(_) => {
                        let (dx, dw) = grads::<f32>(&g, [slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?]);
                        (CpuStorage::F32(dx), CpuStorage::F32(dw))
                    }
                    CpuStorage::F64(_) => {
                        let (dx, dw) = grads::<f64>(&g, [slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?]);
                        (CpuStorage::F64(dx), CpuStorage::F64(dw))
                    }
                    _ => {
                        return Err(candle_core::Error::Msg(format!(
                            "{} supports float32 and float64 only",
                            self.name()
                        )))
                    }
                })
            },
        )?;
        self.weight_grad.put(dw, self.name())?;
        Ok((dx, Shape::from(xs.to_vec())))
    }
}

/// (input gradient, weight gradient) of a depthwise convolution of `x` with `w`, given the
/// output gradient `dy`, from one kernel pass (see the module's note).
pub(crate) fn depthwise_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: ConvParams,
) -> candle_core::Result<(Tensor, Tensor)> {
    let op = DepthwiseGrads { p, weight_grad: SideOutput::default() };
    let dx = x.apply_op3_no_bwd(w, dy, &op)?;
    let dw = op.weight_grad.take_tensor(w.shape(), w.device(), op.name())?;
    Ok((dx, dw))
}

/// The two gradients [dx, dw] from [x, w, dy] (shapes checked by the caller).
fn grads<T: Real>(g: &Geometry, [x, w, dy]: [&[T]; 3]) -> (Vec<T>, Vec<T>) {
    if let Some(small) = g.small() {
        return small.backward_both(x, dy, w);
    }
    let (in_item, out_item, unit) = (g.cin * g.h * g.w, g.cout * g.ohw(), g.n.div_ceil(8).max(1));
    let wlen = g.cout * g.k();
    // SAFETY: the depthwise kernel writes every element of the input planes it is given
    // (tested: fill then unfill is the identity), the channels make up an image and a
    // unit's images follow one another.
    let (dx, partials) = unsafe {
        par_written_with(g.n * in_item, unit * in_item.max(1), |u, dxu| {
            let mut dw = vec![T::zero(); wlen];
            for (j, dxi) in dxu.chunks_exact_mut(in_item.max(1)).enumerate() {
                let i = u * unit + j;
                let (xi, dyi) = (&x[i * in_item..][..in_item], &dy[i * out_item..][..out_item]);
                g.depthwise_each(
                    #[inline(always)]
                    |pl, s, [xr, wr, yr]| {
                        pl.backward_both(s, [&xi[xr.clone()], &dyi[yr], &w[wr.clone()]], &mut dxi[xr], &mut dw[wr])
                    },
                );
            }
            (dxu.len(), dw)
        })
    };
    (dx, sum_in_order(partials, wlen))
}

#[cfg(test)]
mod tests {
    use super::super::{tests::cases, Conv2d, Pass};
    use super::*;
    use crate::engine::gradcheck::{bits, seeded};
    use candle_core::DType;

    #[test]
    fn both_gradients_equal_the_separate_passes_bit_for_bit() {
        let depthwise =
            cases().into_iter().filter(|(xs, ws, p)| Geometry::new(xs, ws, *p).is_ok_and(|g| g.depthwise()));
        let mut seen = 0;
        for (xs, ws, p) in depthwise {
            // Eleven images as well: units of two with one left over.
            for n in [xs[0], 11] {
                let xs = [n, xs[1], xs[2], xs[3]];
                for dtype in [DType::F32, DType::F64] {
                    let (x, w) = (seeded(&xs, 5, dtype), seeded(&ws, 6, dtype));
                    let g = Geometry::new(&xs, &ws, p).unwrap();
                    let dy = seeded(&[n, g.cout, g.oh, g.ow], 7, dtype);
                    let (dx, dw) = depthwise_grads(&x, &w, &dy, p).unwrap();
                    let want_dx = w.apply_op2_no_bwd(&dy, &Conv2d { p, pass: Pass::GradInput(xs) }).unwrap();
                    let want_dw = x.apply_op2_no_bwd(&dy, &Conv2d { p, pass: Pass::GradWeight(ws) }).unwrap();
                    assert_eq!((dx.dims(), dw.dims()), (want_dx.dims(), want_dw.dims()));
                    assert!(bits(&dx) == bits(&want_dx), "dx {xs:?} {ws:?} {p:?} {dtype:?}");
                    assert!(bits(&dw) == bits(&want_dw), "dw {xs:?} {ws:?} {p:?} {dtype:?}");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 24, "{seen} cases");
    }

    #[test]
    fn wrong_shapes_and_other_convolutions_are_errors() {
        let (x, w) = (seeded(&[1, 3, 4, 4], 1, DType::F32), seeded(&[3, 1, 3, 3], 2, DType::F32));
        let p = ConvParams { stride: [1, 1], dilation: [1, 1], pads: [1; 4], groups: 3 };
        assert!(depthwise_grads(&x, &w, &seeded(&[1, 3, 3, 4], 3, DType::F32), p).is_err());
        let dense = seeded(&[3, 3, 3, 3], 4, DType::F32);
        let p = ConvParams { groups: 1, ..p };
        let err = depthwise_grads(&x, &dense, &seeded(&[1, 3, 4, 4], 3, DType::F32), p).unwrap_err();
        assert!(err.to_string().contains("not a depthwise convolution"), "{err}");
    }
}
