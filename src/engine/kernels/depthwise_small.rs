//! Depthwise convolution of small feature maps, vectorised across channels. Deep in a
//! network the maps are a few pixels a side (4x4, 2x2 at 64x64 input) with hundreds of
//! channels; the padded-plane kernels of `depthwise` then run loops of a few elements
//! per channel, all overhead (a 2x2 map cost twenty times a 32x32 one per output). Here each
//! image is transposed to channels-last, [positions, channels], so that every kernel tap
//! is one multiply-add over all channels at once, and transposed back. Multiplier 1 only
//! (one output channel per input channel), which is what MobileNets and EfficientNets use.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{par_written, par_written_with, simd, sum_in_order, transposed, Real};

/// One depthwise convolution with multiplier 1 over [n, c, hw] -> [n, c, ohw]: which input
/// position each kernel tap of each output position reads.
#[derive(Clone, Debug)]
pub(super) struct SmallDepthwise {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub ohw: usize,
    /// taps per filter (kh * kw)
    pub k: usize,
    /// `pairs[starts[o]..starts[o + 1]]` are output position o's taps
    starts: Vec<usize>,
    /// (tap, input position) of every tap that lands inside the input, in filter order
    pairs: Vec<(usize, usize)>,
}

impl SmallDepthwise {
    /// `reads(o)` lists output position o's (tap, input position) pairs inside the input.
    pub fn new<I: IntoIterator<Item = (usize, usize)>>(
        [n, c, hw, ohw, k]: [usize; 5],
        reads: impl Fn(usize) -> I,
    ) -> SmallDepthwise {
        let (mut starts, mut pairs) = (vec![0], Vec::new());
        for o in 0..ohw {
            pairs.extend(reads(o));
            starts.push(pairs.len());
        }
        SmallDepthwise { n, c, hw, ohw, k, starts, pairs }
    }

    /// Output position o's (tap, input position) pairs.
    #[inline(always)]
    fn taps_of(&self, o: usize) -> &[(usize, usize)] {
        &self.pairs[self.starts[o]..self.starts[o + 1]]
    }

    /// Output [n, c, ohw] from input [n, c, hw] and filters [c, k].
    pub fn forward<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let (c, wt) = (self.c, transposed(w, self.c, self.k));
        let in_item = c * self.hw;
        self.per_image(
            self.ohw,
            #[inline(always)]
            |i, yt| {
                let xt = transposed(&x[i * in_item..][..in_item], c, self.hw);
                for (o, acc) in yt.chunks_exact_mut(c).enumerate() {
                    for &(t, s) in self.taps_of(o) {
                        let (wr, xr) = (&wt[t * c..][..c], &xt[s * c..][..c]);
                        acc.iter_mut().zip(wr).zip(xr).for_each(|((a, &wv), &xv)| *a += wv * xv);
                    }
                }
            },
        )
    }

    /// Input gradient [n, c, hw] from output gradients [n, c, ohw] through filters [c, k].
    pub fn backward_input<T: Real>(&self, dy: &[T], w: &[T]) -> Vec<T> {
        let (c, wt) = (self.c, transposed(w, self.c, self.k));
        let out_item = c * self.ohw;
        self.per_image(
            self.hw,
            #[inline(always)]
            |i, dxt| {
                let dyt = transposed(&dy[i * out_item..][..out_item], c, self.ohw);
                for (o, g) in dyt.chunks_exact(c).enumerate() {
                    for &(t, s) in self.taps_of(o) {
                        let (wr, dr) = (&wt[t * c..][..c], &mut dxt[s * c..][..c]);
                        dr.iter_mut().zip(wr).zip(g).for_each(|((d, &wv), &gv)| *d += wv * gv);
                    }
                }
            },
        )
    }

    /// [n, c, positions], image by image in parallel: `image(i, t)` adds image i's result
    /// into the zeroed channels-last `t` [positions, c], which is then transposed into place.
    #[inline(always)]
    fn per_image<T: Real>(&self, positions: usize, image: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
        let item = self.c * positions;
        // SAFETY: from_channels_last returns the count it wrote, from the front.
        unsafe {
            par_written(self.n * item, item.max(1), |i, out| {
                simd(
                    #[inline(always)]
                    || {
                        let mut t = vec![T::zero(); item];
                        image(i, &mut t);
                        from_channels_last(&t, self.c, positions, out)
                    },
                )
            })
        }
    }

    /// Filter gradient [c, k] from inputs [n, c, hw] and output gradients [n, c, ohw]. Images
    /// are summed in units fixed by n, and the units in order: the result does not depend on
    /// the thread count.
    pub fn backward_weight<T: Real>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let (c, unit) = (self.c, self.n.div_ceil(8).max(1));
        let (in_item, out_item) = (c * self.hw, c * self.ohw);
        let partial = |u: usize| -> Vec<T> {
            let mut dwt = vec![T::zero(); self.k * c];
            simd(
                #[inline(always)]
                || {
                    for i in (u * unit)..((u + 1) * unit).min(self.n) {
                        let xt = transposed(&x[i * in_item..][..in_item], c, self.hw);
                        let dyt = transposed(&dy[i * out_item..][..out_item], c, self.ohw);
                        for (o, g) in dyt.chunks_exact(c).enumerate() {
                            for &(t, s) in self.taps_of(o) {
                                let (acc, xr) = (&mut dwt[t * c..][..c], &xt[s * c..][..c]);
                                acc.iter_mut().zip(g).zip(xr).for_each(|((a, &gv), &xv)| *a += gv * xv);
                            }
                        }
                    }
                },
            );
            dwt
        };
        let partials: Vec<Vec<T>> = (0..self.n.div_ceil(unit)).into_par_iter().map(partial).collect();
        transposed(&sum_in_order(partials, self.k * c), self.k, c)
    }

    /// Both gradients, (input gradient [n, c, hw], filter gradient [c, k]), from one pass
    /// over each image: its output gradient is transposed once, not once per gradient. The
    /// same sums in the same order as `backward_input` and `backward_weight` (images in the
    /// same units), so the same values bit for bit.
    pub fn backward_both<T: Real>(&self, x: &[T], dy: &[T], w: &[T]) -> (Vec<T>, Vec<T>) {
        let (c, wt, unit) = (self.c, transposed(w, self.c, self.k), self.n.div_ceil(8).max(1));
        let (in_item, out_item) = (c * self.hw, c * self.ohw);
        // SAFETY: from_channels_last returns the count it wrote, from the front, and a unit's
        // images are written one after the other.
        let (dx, partials) = unsafe {
            par_written_with(self.n * in_item, unit * in_item.max(1), |u, dxu| {
                simd(
                    #[inline(always)]
                    || {
                        let mut dwt = vec![T::zero(); self.k * c];
                        let mut done = 0;
                        for (j, dxi) in dxu.chunks_mut(in_item.max(1)).enumerate() {
                            let i = u * unit + j;
                            let xt = transposed(&x[i * in_item..][..in_item], c, self.hw);
                            let dyt = transposed(&dy[i * out_item..][..out_item], c, self.ohw);
                            let mut dxt = vec![T::zero(); in_item];
                            for (o, g) in dyt.chunks_exact(c).enumerate() {
                                for &(t, s) in self.taps_of(o) {
                                    let (acc, xr) = (&mut dwt[t * c..][..c], &xt[s * c..][..c]);
                                    acc.iter_mut().zip(g).zip(xr).for_each(|((a, &gv), &xv)| *a += gv * xv);
                                    let (wr, dr) = (&wt[t * c..][..c], &mut dxt[s * c..][..c]);
                                    dr.iter_mut().zip(wr).zip(g).for_each(|((d, &wv), &gv)| *d += wv * gv);
                                }
                            }
                            done += from_channels_last(&dxt, c, self.hw, dxi);
                        }
                        (done, dwt)
                    },
                )
            })
        };
        (dx, transposed(&sum_in_order(partials, self.k * c), self.k, c))
    }
}

/// Writes channels-last `t` [positions, c] into `out` [c, positions]; returns the count
/// written (all of `out` when the sizes agree).
#[inline(always)]
fn from_channels_last<T: Real>(t: &[T], c: usize, positions: usize, out: &mut [MaybeUninit<T>]) -> usize {
    let planes = out.chunks_exact_mut(positions.max(1)).take(c);
    let written = planes.len() * positions;
    for (ch, plane) in planes.enumerate() {
        for (p, o) in plane.iter_mut().enumerate() {
            o.write(t[p * c + ch]);
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_round_trip() {
        let a: Vec<f64> = (0..12).map(f64::from).collect();
        let t = transposed(&a, 3, 4);
        assert_eq!(t[1], 4.0, "column 0 of row 1");
        assert_eq!(transposed(&t, 4, 3), a);
        let mut out = vec![MaybeUninit::new(f64::NAN); 12];
        assert_eq!(from_channels_last(&t, 3, 4, &mut out), 12);
        // SAFETY: initialised above.
        let back: Vec<f64> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(back, a);
        // Blocks of eight rows and a remainder, against the definition.
        for (rows, cols) in [(19, 5), (16, 1), (8, 3), (1, 7)] {
            let a: Vec<f64> = (0..rows * cols).map(|v| v as f64).collect();
            let t = transposed(&a, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], a[r * cols + c], "[{rows}, {cols}] at ({r}, {c})");
                }
            }
        }
    }
}
