//! Max and average pooling over NCHW with padding, strides, dilations and ceil mode, and
//! their gradients (candle's own pooling has no padding and differentiates only when the
//! kernel equals the stride).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, Real};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    /// `count_include_pad`: divide by the window size including padding.
    Average {
        count_include_pad: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolParams {
    pub kind: PoolKind,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// [top, left, bottom, right]
    pub pads: [usize; 4],
    pub ceil_mode: bool,
}

/// Output length of a window sweep over `size` (pads p0, p1), or `None` when the window does
/// not fit; ceil mode as ONNX Runtime and PyTorch count it.
pub(crate) fn out_size(size: usize, k: usize, s: usize, d: usize, p0: usize, p1: usize, ceil: bool) -> Option<usize> {
    let span = d * (k.max(1) - 1) + 1;
    let room = (size + p0 + p1).checked_sub(span)?;
    let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
    // A window must start inside the input or its leading padding.
    if ceil && (out - 1) * s >= size + p0 {
        out -= 1;
    }
    Some(out)
}

#[derive(Clone, Copy, Debug)]
struct Geometry {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    p: PoolParams,
}

impl Geometry {
    fn new(x: &[usize], p: PoolParams) -> candle_core::Result<Geometry> {
        let &[n, c, h, w] = x else {
            return Err(candle_core::Error::Msg(format!("pooling needs a 4-D input, got {x:?}")));
        };
        if p.stride.contains(&0) || p.dilation.contains(&0) || p.kernel.contains(&0) {
            return Err(candle_core::Error::Msg(format!("pooling: zero kernel, stride or dilation in {p:?}")));
        }
        let oh = out_size(h, p.kernel[0], p.stride[0], p.dilation[0], p.pads[0], p.pads[2], p.ceil_mode);
        let ow = out_size(w, p.kernel[1], p.stride[1], p.dilation[1], p.pads[1], p.pads[3], p.ceil_mode);
        let (Some(oh), Some(ow)) = (oh, ow) else {
            return Err(candle_core::Error::Msg(format!(
                "pooling: kernel {:?} larger than padded input {h}x{w}",
                p.kernel
            )));
        };
        Ok(Geometry { planes: n * c, h, w, oh, ow, p })
    }

    /// Input positions of the window of output (oy, ox) that lie inside the input, and the
    /// divisor an average uses.
    fn window(&self, oy: usize, ox: usize, taps: &mut Vec<usize>) -> usize {
        taps.clear();
        let p = self.p;
        let mut padded = 0;
        for ki in 0..p.kernel[0] {
            let y = (oy * p.stride[0] + ki * p.dilation[0]) as isize - p.pads[0] as isize;
            for kj in 0..p.kernel[1] {
                let x = (ox * p.stride[1] + kj * p.dilation[1]) as isize - p.pads[1] as isize;
                let in_pad = y < (self.h + p.pads[2]) as isize && x < (self.w + p.pads[3]) as isize;
                padded += in_pad as usize;
                if y >= 0 && x >= 0 && (y as usize) < self.h && (x as usize) < self.w {
                    taps.push(y as usize * self.w + x as usize);
                }
            }
        }
        match p.kind {
            PoolKind::Average { count_include_pad: true } => padded,
            _ => taps.len(),
        }
    }
}

fn forward<T: Real>(x: &[T], g: &Geometry) -> Vec<T> {
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    let mut out = vec![T::zero(); g.planes * op];
    out.par_chunks_mut(op.max(1)).zip(x.par_chunks(ip.max(1))).for_each(|(y, xi)| {
        let mut taps = Vec::new();
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let count = g.window(oy, ox, &mut taps);
                y[oy * g.ow + ox] = match g.p.kind {
                    PoolKind::Max => taps.iter().map(|&i| xi[i]).fold(T::neg_infinity(), T::max),
                    PoolKind::Average { .. } => taps.iter().map(|&i| xi[i]).sum::<T>() / T::real(count.max(1) as f64),
                };
            }
        }
    });
    out
}

fn backward<T: Real>(x: &[T], dy: &[T], g: &Geometry) -> Vec<T> {
    let (ip, op) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![T::zero(); g.planes * ip];
    dx.par_chunks_mut(ip.max(1)).zip(x.par_chunks(ip.max(1)).zip(dy.par_chunks(op.max(1)))).for_each(
        |(dxi, (xi, dyi))| {
            let mut taps = Vec::new();
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let count = g.window(oy, ox, &mut taps);
                    let d = dyi[oy * g.ow + ox];
                    match g.p.kind {
                        // The gradient goes to the first maximum, as in the forward pass.
                        PoolKind::Max => {
                            let best = taps.iter().copied().fold(None, |b: Option<usize>, i| match b {
                                Some(j) if xi[j] >= xi[i] => Some(j),
                                _ => Some(i),
                            });
                            if let Some(i) = best {
                                dxi[i] += d;
                            }
                        }
                        PoolKind::Average { .. } => {
                            let share = d / T::real(count.max(1) as f64);
                            taps.iter().for_each(|&i| dxi[i] += share);
                        }
                    }
                }
            }
        },
    );
    dx
}

#[derive(Clone, Copy, Debug)]
struct Pool2d(PoolParams);

#[derive(Clone, Copy, Debug)]
struct Pool2dGrad(PoolParams);

fn dims4(l: &Layout) -> candle_core::Result<[usize; 4]> {
    l.shape().dims4().map(|(a, b, c, d)| [a, b, c, d])
}

impl CustomOp1 for Pool2d {
    fn name(&self) -> &'static str {
        "mtpack-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims4(l)?;
        let g = Geometry::new(&dims, self.0)?;
        let shape = Shape::from((dims[0], dims[1], g.oh, g.ow));
        match s {
            CpuStorage::F32(_) => Ok((CpuStorage::F32(forward(slice::<f32>(s, l)?, &g)), shape)),
            CpuStorage::F64(_) => Ok((CpuStorage::F64(forward(slice::<f64>(s, l)?, &g)), shape)),
            _ => Err(candle_core::Error::Msg(format!("{} supports float32 and float64 only", "mtpack-pool2d"))),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &Pool2dGrad(self.0))?))
    }
}

impl CustomOp2 for Pool2dGrad {
    fn name(&self) -> &'static str {
        "mtpack-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims4(l1)?;
        let g = Geometry::new(&dims, self.0)?;
        let shape = Shape::from(dims.to_vec());
        match s1 {
            CpuStorage::F32(_) => {
                Ok((CpuStorage::F32(backward(slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?, &g)), shape))
            }
            CpuStorage::F64(_) => {
                Ok((CpuStorage::F64(backward(slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?, &g)), shape))
            }
            _ => Err(candle_core::Error::Msg(format!("{} supports float32 and float64 only", "mtpack-pool2d-grad"))),
        }
    }
}

/// Differentiable 2-D pooling of `x` [N, C, H, W].
pub fn pool2d(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pool2d(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::DType;

    fn p(kind: PoolKind, k: usize, s: usize, pads: [usize; 4], ceil: bool) -> PoolParams {
        PoolParams { kind, kernel: [k, k], stride: [s, s], dilation: [1, 1], pads, ceil_mode: ceil }
    }

    #[test]
    fn max_pool_with_padding_by_hand() {
        let x = Tensor::new(&[[[[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]], &candle_core::Device::Cpu)
            .unwrap();
        let y = pool2d(&x, p(PoolKind::Max, 2, 2, [1, 1, 1, 1], false)).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![1.0, 3.0, 7.0, 9.0]);
        // Excluding padding from the count: the corner window averages just the 1.
        let avg = PoolKind::Average { count_include_pad: false };
        let y = pool2d(&x, p(avg, 2, 2, [1, 1, 1, 1], false)).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![1.0, 2.5, 5.5, 7.0]);
        let inc = PoolKind::Average { count_include_pad: true };
        let y = pool2d(&x, p(inc, 2, 2, [1, 1, 1, 1], false)).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![0.25, 1.25, 2.75, 7.0]);
    }

    #[test]
    fn ceil_mode_adds_the_partial_window() {
        let x = seeded(&[1, 1, 5, 5], 1, DType::F64);
        let floor = pool2d(&x, p(PoolKind::Max, 2, 2, [0; 4], false)).unwrap();
        let ceil = pool2d(&x, p(PoolKind::Max, 2, 2, [0; 4], true)).unwrap();
        assert_eq!((floor.dims4().unwrap().2, ceil.dims4().unwrap().2), (2, 3));
    }

    #[test]
    fn gradients_match_finite_differences() {
        for params in [
            p(PoolKind::Max, 3, 2, [1, 1, 1, 1], false),
            p(PoolKind::Max, 2, 1, [0, 0, 1, 1], true),
            p(PoolKind::Average { count_include_pad: false }, 3, 2, [1, 1, 1, 1], false),
            p(PoolKind::Average { count_include_pad: true }, 3, 1, [1, 0, 1, 2], false),
            p(PoolKind::Average { count_include_pad: false }, 2, 2, [0; 4], true),
        ] {
            let x = seeded(&[2, 3, 6, 5], 7, DType::F64);
            check_gradients(&[x], |v| pool2d(&v[0], params), 1e-6).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        }
    }
}
