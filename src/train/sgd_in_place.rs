//! SGD with momentum written in place: the momentum buffer and the weight each updated in one
//! pass. As tensor expressions, a parameter's step allocated and wrote five buffers (scaled
//! buffer, new buffer, update, new weight, and the copy into the variable): 5% of a
//! MobileNetV2 training step at 3x64x64. The arithmetic is the expressions', in the same
//! order and precision, so the weights are bit for bit the same. A masked parameter (PackNet's)
//! takes the same path with its update multiplied by the mask in the weight's pass: as
//! expressions it wrote seven buffers a step.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::engine::kernels::{beside, in_place_cpu, par_update, simd, slice, slice_mut, Real};

/// buf = (buf * momentum + 0) + d, with d = g, or g + (w * decay + 0) when `decay` is not 0
/// (the + 0 of candle's affine, which the expressions used, turns -0 into +0);
/// applied to the buffer, reading [g, w].
struct Momentum {
    momentum: f64,
    decay: f64,
}

/// w = w - (buf * lr + 0); applied to the weight, reading [buf].
struct Descend {
    lr: f64,
}

/// w = w - ((buf * lr + 0) * mask); applied to the weight, reading [buf, mask]: a masked
/// parameter's step (PackNet's frozen weights), where the expressions multiplied the update
/// by the mask before subtracting it.
struct DescendMasked {
    lr: f64,
}

/// Runs `f` on the float32 or float64 data of `dst`.
macro_rules! on_dst_impl {
    ($dst:expr, $name:expr, |$t:ident, $v:ident| $body:expr) => {
        match $dst {
            CpuStorage::F32($v) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64($v) => {
                type $t = f64;
                $body
            }
            _ => Err(candle_core::Error::Msg(format!("{}: float32 and float64 only", $name))),
        }
    };
}

pub(super) use on_dst_impl as on_dst;

pub(super) fn same_len<T>(dst: &[T], src: &[T]) -> candle_core::Result<()> {
    match dst.len() == src.len() {
        true => Ok(()),
        false => Err(candle_core::Error::Msg(format!(
            "optimizer step in place: {} elements against {}",
            dst.len(),
            src.len()
        ))),
    }
}

impl Momentum {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        dst: &mut [T],
        l: &Layout,
        [(gs, gl), (ws, wl)]: [(&CpuStorage, &Layout); 2],
    ) -> candle_core::Result<()> {
        let (buf, g, w) = (slice_mut(dst, l)?, slice::<T>(gs, gl)?, slice::<T>(ws, wl)?);
        same_len(buf, g)?;
        same_len(buf, w)?;
        let (mu, decay, zero) = (T::real(self.momentum), T::real(self.decay), T::zero());
        let plain = self.decay == 0.0;
        par_update(buf, |at, part| {
            let (g, w) = (beside(g, at, part.len()), beside(w, at, part.len()));
            simd(
                #[inline(always)]
                || match plain {
                    true => part.iter_mut().zip(g).for_each(|(b, &g)| *b = (*b * mu + zero) + g),
                    false => part
                        .iter_mut()
                        .zip(g)
                        .zip(w)
                        .for_each(|((b, &g), &w)| *b = (*b * mu + zero) + (g + (w * decay + zero))),
                },
            )
        });
        Ok(())
    }
}

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "mtpack-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<()> {
        on_dst!(dst, self.name(), |T, v| self.run::<T>(v, l, [(gs, gl), (ws, wl)]))
    }
}

impl Descend {
    fn run<T: Real + candle_core::WithDType + std::ops::SubAssign>(
        &self,
        dst: &mut [T],
        l: &Layout,
        [(bs, bl)]: [(&CpuStorage, &Layout); 1],
    ) -> candle_core::Result<()> {
        let (w, buf) = (slice_mut(dst, l)?, slice::<T>(bs, bl)?);
        same_len(w, buf)?;
        let (lr, zero) = (T::real(self.lr), T::zero());
        par_update(w, |at, part| {
            let buf = beside(buf, at, part.len());
            simd(
                #[inline(always)]
                || part.iter_mut().zip(buf).for_each(|(w, &b)| *w -= b * lr + zero),
            )
        });
        Ok(())
    }
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "mtpack-sgd-descend"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, l: &Layout, bs: &CpuStorage, bl: &Layout) -> candle_core::Result<()> {
        on_dst!(dst, self.name(), |T, v| self.run::<T>(v, l, [(bs, bl)]))
    }
}

impl DescendMasked {
    fn run<T: Real + candle_core::WithDType + std::ops::SubAssign>(
        &self,
        dst: &mut [T],
        l: &Layout,
        [(bs, bl), (ms, ml)]: [(&CpuStorage, &Layout); 2],
    ) -> candle_core::Result<()> {
        let (w, buf, mask) = (slice_mut(dst, l)?, slice::<T>(bs, bl)?, slice::<T>(ms, ml)?);
        same_len(w, buf)?;
        same_len(w, mask)?;
        let (lr, zero) = (T::real(self.lr), T::zero());
        par_update(w, |at, part| {
            let (buf, mask) = (beside(buf, at, part.len()), beside(mask, at, part.len()));
            simd(
                #[inline(always)]
                || part.iter_mut().zip(buf).zip(mask).for_each(|((w, &b), &m)| *w -= (b * lr + zero) * m),
            )
        });
        Ok(())
    }
}

impl InplaceOp3 for DescendMasked {
    fn name(&self) -> &'static str {
        "mtpack-sgd-descend-masked"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        on_dst!(dst, self.name(), |T, v| self.run::<T>(v, l, [(bs, bl), (ms, ml)]))
    }
}

/// Whether the in-place step applies: the weight, its gradient and its momentum buffer (if
/// any, such as one read from a checkpoint) CPU float tensors of one type, contiguous.
pub(super) fn applies(w: &Tensor, g: &Tensor, buf: Option<&Tensor>, mask: Option<&Tensor>) -> bool {
    let others: Vec<&Tensor> = [Some(g), buf, mask].into_iter().flatten().collect();
    in_place_cpu(w, &others) && mask.is_none_or(|m| m.elem_count() == w.elem_count())
}

/// One SGD step of `var` with gradient `g` (already multiplied by `mask` where there is
/// one): updates `buf` (the momentum buffer) in place, or returns the new one when there was
/// none (a copy, so that later steps own it), then the weight in place, its update
/// multiplied by `mask`. The caller checks [`applies`] (with the mask as one more tensor).
pub(super) fn step(
    var: &Var,
    g: &Tensor,
    buf: Option<&Tensor>,
    mask: Option<&Tensor>,
    (momentum, decay, lr): (f64, f64, f64),
) -> candle_core::Result<Option<Tensor>> {
    let w = var.as_tensor();
    let (fresh, buf) = match buf {
        Some(b) => {
            b.inplace_op3(g, w, &Momentum { momentum, decay })?;
            (None, b.clone())
        }
        None => {
            let d = if decay != 0.0 { (g + w.affine(decay, 0.0)?)? } else { g.clone() };
            // Detached: built from the weight (a Var), it would otherwise carry an op graph.
            let b = d.copy()?.detach();
            (Some(b.clone()), b)
        }
    };
    match mask {
        Some(m) => w.inplace_op3(&buf, m, &DescendMasked { lr })?,
        None => w.inplace_op2(&buf, &Descend { lr })?,
    }
    Ok(fresh)
}
