//! Row-wise kernels over the last axis, as transformers use them: softmax and layer
//! normalisation, one pass forward and one backward each. As exported they are chains of
//! elementary ops (max, subtract, exp, sum, divide; ReduceMean, Sub, Pow, ReduceMean, Add,
//! Sqrt, Div, Mul, Add), each a pass over the activations and a buffer kept for the
//! backward pass. Rows are split among threads in fixed blocks and every sum runs in a
//! fixed order, so results do not depend on the thread count.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{lanes, lanes_dot, lanes_sum, lanes_sum_sq_dev, par_written, simd, simd_widest, slice, Real};

/// Elements a thread takes at a time: whole rows, about this many.
const BLOCK: usize = 16 * 1024;

/// Length of the last axis; an error for a scalar.
fn row_len(l: &Layout) -> candle_core::Result<usize> {
    match l.shape().dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(candle_core::Error::Msg("row-wise kernel needs a non-empty last axis".into())),
    }
}

/// Fills a vector of x's size row by row: `f(i, row_out)` writes all of row i (length d).
fn by_rows<T: Real>(n: usize, d: usize, f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send) -> Vec<T> {
    let rows_per_block = (BLOCK / d).max(1);
    // SAFETY: every row of each block is handed to `f`, which writes all d elements of it.
    unsafe {
        par_written(n, rows_per_block * d, |b, out| {
            for (r, row) in out.chunks_mut(d).enumerate() {
                f(b * rows_per_block + r, row);
            }
            out.len()
        })
    }
}

/// A row the caller has written in full, as initialised values. Kernels write intermediate
/// values (softmax's exponentials) into their output row and finish them in place: collected
/// into a `Vec` instead, they were computed out of line, by the collecting function, in
/// baseline four-wide code rather than in the kernel's vector code (and allocated per row).
///
/// # Safety
/// Every element of `out` must have been written.
#[inline(always)]
unsafe fn written<T>(out: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: MaybeUninit<T> has T's layout, and the caller wrote every element.
    unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Softmax over the last axis.
#[derive(Clone, Copy, Debug)]
struct Softmax;

fn softmax_rows<T: Real>(x: &[T], d: usize) -> Vec<T> {
    by_rows(x.len(), d, |r, out| {
        simd_widest(
            #[inline(always)]
            || {
                let row = &x[r * d..(r + 1) * d];
                let m = row.iter().copied().fold(T::neg_infinity(), T::max);
                // The exponentials go into the output row and are scaled there ([`written`]).
                out.iter_mut().zip(row).for_each(|(o, &v)| {
                    o.write((v - m).exp_fast());
                });
                // SAFETY: every element of `out` was written just above (both are d long).
                let e = unsafe { written(out) };
                let inv = T::one() / lanes_sum(e);
                e.iter_mut().for_each(|v| *v = (*v * inv).flush_tiny());
            },
        )
    })
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "mtpack-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = row_len(l)?;
        Ok((timed_on_float!(s, self.name(), l, |T| softmax_rows::<T>(slice(s, l)?, d)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGrad)?))
    }
}

/// (y, dy) -> y * (dy - sum(dy * y)) per row.
#[derive(Clone, Copy, Debug)]
struct SoftmaxGrad;

fn softmax_grad_rows<T: Real>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    by_rows(y.len(), d, |r, out| {
        simd_widest(
            #[inline(always)]
            || {
                let (yr, gr) = (&y[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                let s = lanes_dot(yr, gr);
                out.iter_mut().zip(yr.iter().zip(gr)).for_each(|(o, (&yv, &g))| {
                    o.write((yv * (g - s)).flush_tiny());
                });
            },
        )
    })
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "mtpack-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = row_len(l1)?;
        same_size(l1, l2)?;
        let out = timed_on_float!(s1, self.name(), l1, |T| softmax_grad_rows::<T>(slice(s1, l1)?, slice(s2, l2)?, d));
        Ok((out, l1.shape().clone()))
    }
}

fn same_size(a: &Layout, b: &Layout) -> candle_core::Result<()> {
    if a.shape() != b.shape() {
        return Err(candle_core::Error::Msg(format!(
            "row-wise kernel: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}

/// Softmax over the last axis of a contiguous float tensor, differentiable.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * scale + bias,
/// with the row's own mean and (biased) variance; differentiable in x, scale and bias.
#[derive(Clone, Copy, Debug)]
struct LayerNorm {
    eps: f64,
}

/// The row's mean and 1 / sqrt(var + eps).
#[inline(always)]
fn row_stats<T: Real>(row: &[T], eps: f64) -> (T, T) {
    let d = T::real(row.len() as f64);
    let mean = lanes_sum(row) / d;
    let var = lanes_sum_sq_dev(row, mean) / d;
    (mean, T::one() / (var + T::real(eps)).sqrt())
}

fn layer_norm_rows<T: Real>(x: &[T], scale: &[T], bias: &[T], d: usize, eps: f64) -> Vec<T> {
    by_rows(x.len(), d, |r, out| {
        simd(
            #[inline(always)]
            || {
                let row = &x[r * d..(r + 1) * d];
                let (mean, inv) = row_stats(row, eps);
                out.iter_mut().zip(row.iter().zip(scale.iter().zip(bias))).for_each(|(o, (&v, (&s, &b)))| {
                    o.write((v - mean) * inv * s + b);
                });
            },
        )
    })
}

fn params_len(l: &Layout, d: usize, what: &str) -> candle_core::Result<()> {
    if l.shape().elem_count() != d {
        return Err(candle_core::Error::Msg(format!(
            "layer normalisation: {what} has {} elements, the normalised axis {d}",
            l.shape().elem_count()
        )));
    }
    Ok(())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "mtpack-layer-norm"
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
        let d = row_len(l1)?;
        params_len(l2, d, "scale")?;
        params_len(l3, d, "bias")?;
        let out = timed_on_float!(s1, self.name(), l1, |T| layer_norm_rows::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?,
            d,
            self.eps
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(&dy, scale, &LayerNormGradX { eps: self.eps })?;
        let sums = x.apply_op2_no_bwd(&dy, &LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(sums.get(0)?.reshape(scale.shape())?), Some(sums.get(1)?.reshape(scale.shape())?)))
    }
}

/// (x, dy, scale) -> dx = inv * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale.
#[derive(Clone, Copy, Debug)]
struct LayerNormGradX {
    eps: f64,
}

fn layer_norm_dx_rows<T: Real>(x: &[T], dy: &[T], scale: &[T], d: usize, eps: f64) -> Vec<T> {
    by_rows(x.len(), d, |r, out| {
        simd(
            #[inline(always)]
            || {
                let (row, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                let (mean, inv) = row_stats(row, eps);
                // g = dy * scale is built in the output row and dx computed over it there, as
                // softmax does; xhat = (x - mean) * inv is recomputed where it is needed.
                out.iter_mut().zip(gr.iter().zip(scale)).for_each(|(o, (&a, &s))| {
                    o.write(a * s);
                });
                // SAFETY: every element of `out` was written just above (all three are d long).
                let g = unsafe { written(out) };
                let n = T::real(d as f64);
                let (a, b) = (lanes_sum(g) / n, lanes(g, row, |gv, v| gv * ((v - mean) * inv)) / n);
                g.iter_mut().zip(row).for_each(|(gv, &v)| *gv = inv * (*gv - a - (v - mean) * inv * b));
            },
        )
    })
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "mtpack-layer-norm-dx"
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
        let d = row_len(l1)?;
        same_size(l1, l2)?;
        params_len(l3, d, "scale")?;
        let out = timed_on_float!(s1, self.name(), l1, |T| layer_norm_dx_rows::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            slice(s3, l3)?,
            d,
            self.eps
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// (x, dy) -> [2, d]: sum over rows of dy * xhat (the scale's gradient) and of dy (the
/// bias's). Blocks of rows are summed in parallel, then the blocks in order.
#[derive(Clone, Copy, Debug)]
struct LayerNormGradParams {
    eps: f64,
}

fn layer_norm_dparams<T: Real>(x: &[T], dy: &[T], d: usize, eps: f64) -> Vec<T> {
    column_sums(
        x.len() / d,
        d,
        2,
        #[inline(always)]
        |r, acc| {
            let (row, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let (mean, inv) = row_stats(row, eps);
            let (ds, db) = acc.split_at_mut(d);
            for j in 0..d {
                ds[j] += gr[j] * (row[j] - mean) * inv;
                db[j] += gr[j];
            }
        },
    )
}

/// `k` sums of length d over `rows` rows: `add(r, acc)` adds row r's terms into `acc`
/// ([k * d]). Fixed blocks of rows are summed in parallel, then the blocks in order, so the
/// result does not depend on the thread count.
pub(crate) fn column_sums<T: Real>(rows: usize, d: usize, k: usize, add: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let rows_per_block = (BLOCK / d.max(1)).max(1);
    let blocks = rows.div_ceil(rows_per_block);
    let partial: Vec<Vec<T>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            simd(
                #[inline(always)]
                || {
                    let mut acc = vec![T::zero(); k * d];
                    for r in b * rows_per_block..((b + 1) * rows_per_block).min(rows) {
                        add(r, &mut acc);
                    }
                    acc
                },
            )
        })
        .collect();
    let mut total = vec![T::zero(); k * d];
    for p in &partial {
        total.iter_mut().zip(p).for_each(|(t, &v)| *t += v);
    }
    total
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "mtpack-layer-norm-dparams"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = row_len(l1)?;
        same_size(l1, l2)?;
        let out = timed_on_float!(s1, self.name(), l1, |T| layer_norm_dparams::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            d,
            self.eps
        ));
        Ok((out, Shape::from((2, d))))
    }
}

/// Layer normalisation over the last axis of `x` with `scale` and `bias` of its length.
pub fn layer_norm_last(x: &Tensor, scale: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&scale.contiguous()?, &bias.contiguous()?, LayerNorm { eps })
}

/// `x op v` with v a vector along x's last axis (a bias or a per-feature scale, as every
/// linear layer and layer scale of a transformer applies it). Broadcast through candle, the
/// backward pass reduces the gradient over all other axes on one thread; here the vector's
/// gradient is summed over row blocks in parallel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOp {
    Add,
    Mul,
}

impl RowOp {
    #[inline(always)]
    fn apply<T: Real>(self, a: T, b: T) -> T {
        match self {
            RowOp::Add => a + b,
            RowOp::Mul => a * b,
        }
    }
}

fn row_broadcast_rows<T: Real>(x: &[T], v: &[T], op: RowOp) -> Vec<T> {
    let d = v.len();
    by_rows(x.len(), d, |r, out| {
        simd(
            #[inline(always)]
            || {
                out.iter_mut().zip(x[r * d..(r + 1) * d].iter().zip(v)).for_each(|(o, (&a, &b))| {
                    o.write(op.apply(a, b));
                });
            },
        )
    })
}

impl CustomOp2 for RowOp {
    fn name(&self) -> &'static str {
        "mtpack-row-broadcast"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = row_len(l1)?;
        params_len(l2, d, "the broadcast vector")?;
        let out =
            timed_on_float!(s1, self.name(), l1, |T| row_broadcast_rows::<T>(slice(s1, l1)?, slice(s2, l2)?, *self));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (dx, dv) = match self {
            RowOp::Add => (dy.clone(), dy.apply_op2_no_bwd(&dy, &ColumnSums { times_other: false })?),
            RowOp::Mul => {
                (dy.apply_op2_no_bwd(v, &RowOp::Mul)?, dy.apply_op2_no_bwd(x, &ColumnSums { times_other: true })?)
            }
        };
        Ok((Some(dx), Some(dv.reshape(v.shape())?)))
    }
}

/// (dy, x) -> [d]: the sum over rows of dy (or of dy * x).
#[derive(Clone, Copy, Debug)]
struct ColumnSums {
    times_other: bool,
}

fn column_sums_of<T: Real>(dy: &[T], x: &[T], d: usize, times_other: bool) -> Vec<T> {
    column_sums(
        dy.len() / d,
        d,
        1,
        #[inline(always)]
        |r, acc| {
            let g = &dy[r * d..(r + 1) * d];
            if times_other {
                acc.iter_mut().zip(g.iter().zip(&x[r * d..(r + 1) * d])).for_each(|(a, (&gv, &xv))| *a += gv * xv);
            } else {
                acc.iter_mut().zip(g).for_each(|(a, &gv)| *a += gv);
            }
        },
    )
}

impl CustomOp2 for ColumnSums {
    fn name(&self) -> &'static str {
        "mtpack-column-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = row_len(l1)?;
        same_size(l1, l2)?;
        let out = timed_on_float!(s1, self.name(), l1, |T| column_sums_of::<T>(
            slice(s1, l1)?,
            slice(s2, l2)?,
            d,
            self.times_other
        ));
        Ok((out, Shape::from(d)))
    }
}

/// `x op v`, v broadcast along x's last axis, when v holds exactly that many elements and
/// broadcasting would not add axes to x; None otherwise (the caller broadcasts generally).
pub fn row_broadcast(x: &Tensor, v: &Tensor, op: RowOp) -> candle_core::Result<Option<Tensor>> {
    let d = x.dims().last().copied().unwrap_or(0);
    let fits = x.rank() >= 2
        && v.rank() <= x.rank()
        && v.dims().last() == Some(&d)
        && v.elem_count() == d
        && x.dtype() == v.dtype()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && super::native(x);
    if !fits {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&v.contiguous()?, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::{DType, D};

    #[test]
    fn softmax_matches_definition_and_gradients() {
        let x = seeded(&[3, 4, 7], 1, DType::F64);
        let y = softmax_last(&x).unwrap();
        let e = x.exp().unwrap();
        let want = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let diff = (y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "softmax differs by {diff}");
        // float32 through the polynomial exp, within float32 rounding of the float64 result.
        let y32 = softmax_last(&x.to_dtype(DType::F32).unwrap()).unwrap().to_dtype(DType::F64).unwrap();
        let diff32 = (y32 - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff32 < 1e-6, "float32 softmax differs by {diff32}");
        check_gradients(&[x], |v| softmax_last(&v[0]), 1e-6).unwrap();
    }

    /// Probabilities and their gradients below 2^-100 are written as 0 in float32 (a peaked
    /// attention row otherwise hands subnormals to the next product); larger ones stay.
    #[test]
    fn softmax_writes_no_tiny_float32_values() {
        let x = [0.0f32, -60.0, -68.0, -95.0, -120.0];
        let y = softmax_rows(&x, x.len());
        assert_eq!(&y[3..], &[0.0, 0.0]);
        assert!(y[1] > 0.0 && y[2] > 0.0 && (y[1] as f64 - (-60f64).exp()).abs() < 1e-6 * (-60f64).exp());
        let dy = [1.0f32, -1.0, 2.0, 0.5, 1.0];
        let dx = softmax_grad_rows(&y, &dy, x.len());
        let s: f32 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        assert!((dx[1] - y[1] * (dy[1] - s)).abs() <= 1e-6 * dx[1].abs());
        assert!(dx.iter().all(|&v| v == 0.0 || v.abs() >= <f32 as Real>::TINY));
        // A row of tiny probabilities times a tiny gradient: flushed, not subnormal.
        let tiny = softmax_grad_rows(&[1e-20f32, 1.0], &[1e-15, 0.0], 2);
        assert_eq!(tiny[0], 0.0);
    }

    /// The kernels run AVX-512 (or AVX2) code; every element must be what this test's own
    /// code, built for the baseline, computes from the same formula, bit for bit.
    #[test]
    fn softmax_vector_code_equals_baseline_code() {
        let d = 300;
        let x: Vec<f32> = (0..3 * d).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        let dy: Vec<f32> = (0..3 * d).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1).collect();
        let (y, dx) = (softmax_rows(&x, d), softmax_grad_rows(&softmax_rows(&x, d), &dy, d));
        for r in 0..3 {
            let (row, yr, gr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|&v| (v - m).exp_fast()).collect();
            let inv = 1.0 / lanes_sum(&e);
            let dot = lanes_dot(yr, gr);
            for j in 0..d {
                assert_eq!(yr[j].to_bits(), (e[j] * inv).flush_tiny().to_bits(), "softmax row {r} column {j}");
                let want = (yr[j] * (gr[j] - dot)).flush_tiny();
                assert_eq!(dx[r * d + j].to_bits(), want.to_bits(), "gradient row {r} column {j}");
            }
        }
    }

    /// As for softmax: LayerNorm's input gradient in the kernel's vector code equals the
    /// baseline code's g = dy * scale, xhat, and inv * (g - mean(g) - xhat * mean(g * xhat)).
    #[test]
    fn layer_norm_dx_vector_code_equals_baseline_code() {
        let d = 384;
        let x: Vec<f32> = (0..2 * d).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.05).collect();
        let dy: Vec<f32> = (0..2 * d).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1).collect();
        let scale: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let dx = layer_norm_dx_rows(&x, &dy, &scale, d, 1e-6);
        for r in 0..2 {
            let (row, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let (mean, inv) = row_stats(row, 1e-6);
            let g: Vec<f32> = gr.iter().zip(&scale).map(|(&a, &s)| a * s).collect();
            let xhat: Vec<f32> = row.iter().map(|&v| (v - mean) * inv).collect();
            let (a, b) = (lanes_sum(&g) / d as f32, lanes_dot(&g, &xhat) / d as f32);
            for j in 0..d {
                let want = inv * (g[j] - a - xhat[j] * b);
                assert_eq!(dx[r * d + j].to_bits(), want.to_bits(), "row {r} column {j}");
            }
        }
    }

    #[test]
    fn layer_norm_matches_definition_and_gradients() {
        let x = seeded(&[2, 3, 6], 2, DType::F64);
        let (s, b) = (seeded(&[6], 3, DType::F64), seeded(&[6], 4, DType::F64));
        let y = layer_norm_last(&x, &s, &b, 1e-5).unwrap();
        let m = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&m).unwrap();
        let v = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = c.broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap()).unwrap();
        let want = want.broadcast_mul(&s).unwrap().broadcast_add(&b).unwrap();
        let diff = (y - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "layer norm differs by {diff}");
        check_gradients(&[x, s, b], |v| layer_norm_last(&v[0], &v[1], &v[2], 1e-5), 1e-6).unwrap();
    }

    #[test]
    fn layer_norm_parameter_sums_span_several_blocks() {
        // More rows than one block holds, so the per-block partial sums are combined.
        let d = 8;
        let rows = BLOCK / d * 2 + 3;
        let x = seeded(&[rows, d], 5, DType::F64);
        let dy = seeded(&[rows, d], 6, DType::F64);
        let got: Vec<f64> = x
            .apply_op2_no_bwd(&dy, &LayerNormGradParams { eps: 1e-5 })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (xs, gs): (Vec<f64>, Vec<f64>) =
            (x.flatten_all().unwrap().to_vec1().unwrap(), dy.flatten_all().unwrap().to_vec1().unwrap());
        let mut want = vec![0.0; 2 * d];
        for r in 0..rows {
            let row = &xs[r * d..(r + 1) * d];
            let (mean, inv) = row_stats(row, 1e-5);
            for j in 0..d {
                want[j] += gs[r * d + j] * (row[j] - mean) * inv;
                want[d + j] += gs[r * d + j];
            }
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn row_broadcast_matches_candle_and_gradients() {
        let x = seeded(&[2, 3, 5], 8, DType::F64);
        for (op, shape) in [(RowOp::Add, vec![5]), (RowOp::Mul, vec![1, 1, 5]), (RowOp::Mul, vec![5])] {
            let v = seeded(&shape, 9, DType::F64);
            let got = row_broadcast(&x, &v, op).unwrap().unwrap();
            let want = match op {
                RowOp::Add => x.broadcast_add(&v),
                RowOp::Mul => x.broadcast_mul(&v),
            }
            .unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(diff, 0.0);
            check_gradients(&[x.clone(), v], |t| Ok(row_broadcast(&t[0], &t[1], op)?.unwrap()), 1e-6).unwrap();
        }
        // A vector that is not along the last axis, or that would add axes, is left to candle.
        assert!(row_broadcast(&x, &seeded(&[3, 1], 9, DType::F64), RowOp::Add).unwrap().is_none());
        assert!(row_broadcast(&x, &seeded(&[1, 1, 1, 5], 9, DType::F64), RowOp::Add).unwrap().is_none());
    }

    #[test]
    fn wrong_parameter_length_is_an_error() {
        let x = seeded(&[2, 6], 2, DType::F32);
        let s = seeded(&[5], 3, DType::F32);
        let err = layer_norm_last(&x, &s, &s, 1e-5).unwrap_err().to_string();
        assert!(err.contains("scale has 5 elements"), "{err}");
    }
}
