//! Depthwise convolution (one input channel per group) for one image, forward and both
//! gradients. Each input plane is first copied into a zero-padded buffer split into stride
//! phases in both axes (row `r` of row phase `p` holds padded row `r * stride + p`, and the
//! same for columns). Output positions are then laid out with the buffer's row pitch
//! ("extended" rows: a few extra columns per row that are computed and dropped), so each
//! kernel tap is ONE contiguous multiply-add over the whole output plane: long loops the
//! compiler vectorises, for any stride, dilation or padding, even on the 4x4 planes deep in
//! a network where a per-row loop would be all overhead.

use std::mem::MaybeUninit;

use super::{lanes_dot as dot, Real};

/// The padded, phase-split plane layout for one convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plane {
    /// input height and width
    pub h: usize,
    pub w: usize,
    /// output height and width
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// [top, left, bottom, right]
    pub pads: [usize; 4],
    /// output channels per input channel
    pub multiplier: usize,
}

impl Plane {
    /// Rows of one phase: every padded row, plus one so that the last tap's extended run
    /// stays inside the phase.
    fn phase_rows(&self) -> usize {
        (self.h + self.pads[0] + self.pads[2]).div_ceil(self.stride[0]) + 1
    }

    /// Columns of one phase (the row pitch of the buffer and of extended outputs).
    fn pitch(&self) -> usize {
        (self.w + self.pads[1] + self.pads[3]).div_ceil(self.stride[1])
    }

    fn buffer_len(&self) -> usize {
        self.stride[0] * self.stride[1] * self.phase_rows() * self.pitch()
    }

    /// Length of an output plane in extended rows.
    fn extended_len(&self) -> usize {
        self.oh * self.pitch()
    }

    /// Buffer index of padded position (py, px).
    #[inline(always)]
    fn at(&self, py: usize, px: usize) -> usize {
        let [sy, sx] = self.stride;
        let phase = (py % sy) * sx + px % sx;
        (phase * self.phase_rows() + py / sy) * self.pitch() + px / sx
    }

    /// Start of the run that kernel tap (ki, kj) reads for the whole extended output plane.
    #[inline(always)]
    fn tap(&self, ki: usize, kj: usize) -> usize {
        self.at(ki * self.dilation[0], kj * self.dilation[1])
    }

    /// Buffer offsets of every kernel tap, in filter order.
    fn taps(&self) -> Vec<usize> {
        (0..self.kh).flat_map(move |ki| (0..self.kw).map(move |kj| self.tap(ki, kj))).collect()
    }

    /// Working memory for one image's channels.
    pub fn scratch<T: Real>(&self) -> Scratch<T> {
        Scratch {
            buf: vec![T::zero(); self.buffer_len()],
            ext: vec![T::zero(); self.extended_len()],
            taps: self.taps(),
            runs: (0..self.h).flat_map(|iy| self.phase_runs(iy)).collect(),
            dirty: false,
            grad: Vec::new(),
        }
    }

    /// Column phases per input row: the runs of `Scratch::runs` that each row has.
    fn runs_per_row(&self) -> usize {
        self.stride[1].min(self.w).max(1)
    }

    /// Writes input plane `x` [h*w] into the scratch buffer. Only positions of the input
    /// are written: padding and phase tails keep their zeros, so the buffer serves every
    /// channel without clearing.
    #[inline(always)]
    pub fn fill<T: Real>(&self, x: &[T], s: &mut Scratch<T>) {
        self.fill_mapped(x, s, |v| v);
    }

    /// [`Plane::fill`] with `f` of each element: the input of a convolution computed as it
    /// is copied (a BatchNormalization's output from its input), never stored whole.
    #[inline(always)]
    pub fn fill_mapped<T: Real>(&self, x: &[T], s: &mut Scratch<T>, f: impl Fn(T) -> T) {
        if s.dirty {
            s.buf.iter_mut().for_each(|v| *v = T::zero());
            s.dirty = false;
        }
        let sx = self.stride[1];
        let (even, odd) = (self.w.div_ceil(2), self.w / 2);
        for (row, runs) in x.chunks_exact(self.w).zip(s.runs.chunks_exact(self.runs_per_row())) {
            if let (2, &[(0, a), (1, b)]) = (sx, runs) {
                if let Some((e, o)) = two_runs(&mut s.buf, (a, even), (b, odd)) {
                    deinterleave(row, e, o, &f);
                    continue;
                }
            }
            for &(first, at) in runs {
                let dst = &mut s.buf[at..];
                if sx == 1 {
                    // A plain loop: `step_by` kept this loop scalar.
                    dst[..row.len()].iter_mut().zip(row).for_each(|(d, &v)| *d = f(v));
                } else {
                    row.iter().skip(first).step_by(sx).zip(dst.iter_mut()).for_each(|(&v, d)| *d = f(v));
                }
            }
        }
    }

    /// For input row `iy`: per column phase, the first input column in that phase and the
    /// buffer offset where that phase's run of the row starts. Input columns `first`,
    /// `first + stride`, ... land at consecutive buffer positions from there. Computed once
    /// per layer into `Scratch::runs`: its divisions cost more than copying a small plane.
    fn phase_runs(&self, iy: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let [top, left, ..] = self.pads;
        let sx = self.stride[1];
        (0..sx.min(self.w)).map(move |first| (first, self.at(iy + top, first + left)))
    }

    /// Writes the buffer-shaped gradient `buf` into the input plane gradient `dx`, every
    /// element (each input position has exactly one place in the buffer). Written as
    /// `0 + g`, the value an addition into a zeroed plane gave (a -0 becomes +0), without
    /// the zeroing pass.
    #[inline(always)]
    fn unfill<T: Real>(&self, buf: &[T], runs: &[(usize, usize)], dx: &mut [MaybeUninit<T>]) {
        let sx = self.stride[1];
        let put = |d: &mut MaybeUninit<T>, &g: &T| {
            d.write(T::zero() + g);
        };
        let (even, odd) = (self.w.div_ceil(2), self.w / 2);
        for (row, runs) in dx.chunks_exact_mut(self.w).zip(runs.chunks_exact(self.runs_per_row())) {
            if let (2, &[(0, a), (1, b)]) = (sx, runs) {
                interleave(&buf[a..a + even], &buf[b..b + odd], row);
                continue;
            }
            for &(first, at) in runs {
                if sx == 1 {
                    row.iter_mut().zip(&buf[at..]).for_each(|(d, g)| put(d, g));
                } else {
                    row.iter_mut().skip(first).step_by(sx).zip(&buf[at..]).for_each(|(d, g)| put(d, g));
                }
            }
        }
    }

    /// Copies an output plane [oh*ow] into extended rows, the extra columns zero.
    #[inline(always)]
    fn extend<T: Real>(&self, y: &[T], ext: &mut [T]) {
        let pitch = self.pitch();
        for (e, row) in ext.chunks_exact_mut(pitch).zip(y.chunks_exact(self.ow)) {
            e[..self.ow].copy_from_slice(row);
            e[self.ow..].iter_mut().for_each(|v| *v = T::zero());
        }
    }

    /// Output planes [multiplier, oh*ow] of one input channel, filled into `s`, through
    /// filters `w` [multiplier, kh*kw]; every element of `y` is written.
    #[inline(always)]
    pub fn forward<T: Real>(&self, s: &mut Scratch<T>, w: &[T], y: &mut [MaybeUninit<T>]) {
        let (ohw, len) = (self.oh * self.ow, self.extended_len());
        let Scratch { buf, ext, taps, .. } = s;
        for (ym, wm) in y.chunks_exact_mut(ohw).zip(w.chunks_exact(taps.len())).take(self.multiplier) {
            // The first tap assigns, the others add: no zeroing pass.
            for (t, (&at, &wv)) in taps.iter().zip(wm).enumerate() {
                let run = ext.iter_mut().zip(&buf[at..at + len]);
                if t == 0 {
                    run.for_each(|(o, &x)| *o = wv * x);
                } else {
                    run.for_each(|(o, &x)| *o += wv * x);
                }
            }
            for (row, e) in ym.chunks_exact_mut(self.ow).zip(ext.chunks_exact(self.pitch())) {
                row.iter_mut().zip(&e[..self.ow]).for_each(|(d, &v)| {
                    d.write(v);
                });
            }
        }
    }

    /// Writes into `dx` [h*w] (every element) the gradient of one input channel from the
    /// output gradients `dy` [multiplier, oh*ow] through filters `w`.
    #[inline(always)]
    pub fn backward_input<T: Real>(&self, s: &mut Scratch<T>, dy: &[T], w: &[T], dx: &mut [MaybeUninit<T>]) {
        let (ohw, len) = (self.oh * self.ow, self.extended_len());
        s.buf.iter_mut().for_each(|v| *v = T::zero());
        s.dirty = true;
        let Scratch { buf, ext, taps, runs, .. } = s;
        for (dym, wm) in dy.chunks_exact(ohw).zip(w.chunks_exact(taps.len())).take(self.multiplier) {
            self.extend(dym, ext);
            for (&at, &wv) in taps.iter().zip(wm) {
                buf[at..at + len].iter_mut().zip(ext.iter()).for_each(|(d, &g)| *d += wv * g);
            }
        }
        self.unfill(buf, runs, dx);
    }

    /// Adds to `dw` [multiplier, kh*kw] the filter gradient of one input channel, filled
    /// into `s`, from the output gradients `dy` [multiplier, oh*ow].
    #[inline(always)]
    pub fn backward_weight<T: Real>(&self, s: &mut Scratch<T>, dy: &[T], dw: &mut [T]) {
        let (ohw, len) = (self.oh * self.ow, self.extended_len());
        let Scratch { buf, ext, taps, .. } = s;
        for (dym, dwm) in dy.chunks_exact(ohw).zip(dw.chunks_exact_mut(taps.len())).take(self.multiplier) {
            self.extend(dym, ext);
            for (&at, acc) in taps.iter().zip(dwm.iter_mut()) {
                *acc += dot(ext, &buf[at..at + len]);
            }
        }
    }

    /// Both gradients of one input channel from one pass over its output gradients `dy`
    /// [multiplier, oh*ow]: adds the filter gradient to `dw` [multiplier, kh*kw] and writes
    /// every element of `dx` [h*w]. The same sums in the same order as `fill` +
    /// `backward_weight` and `backward_input`, so the same values bit for bit, with each
    /// output gradient plane read and extended once instead of twice.
    #[inline(always)]
    pub fn backward_both<T: Real>(
        &self,
        s: &mut Scratch<T>,
        [x, dy, w]: [&[T]; 3],
        dx: &mut [MaybeUninit<T>],
        dw: &mut [T],
    ) {
        self.fill(x, s);
        self.backward_filled(s, [dy, w], dx, dw);
    }

    /// [`Plane::backward_both`] of the input already in the scratch buffer.
    #[inline(always)]
    pub fn backward_filled<T: Real>(
        &self,
        s: &mut Scratch<T>,
        [dy, w]: [&[T]; 2],
        dx: &mut [MaybeUninit<T>],
        dw: &mut [T],
    ) {
        let (ohw, len) = (self.oh * self.ow, self.extended_len());
        let Scratch { buf, ext, taps, runs, grad, .. } = s;
        if grad.len() == buf.len() {
            grad.iter_mut().for_each(|v| *v = T::zero());
        } else {
            *grad = vec![T::zero(); buf.len()];
        }
        let k = taps.len();
        for ((dym, wm), dwm) in
            dy.chunks_exact(ohw).zip(w.chunks_exact(k)).zip(dw.chunks_exact_mut(k)).take(self.multiplier)
        {
            self.extend(dym, ext);
            for (&at, acc) in taps.iter().zip(dwm.iter_mut()) {
                *acc += dot(ext, &buf[at..at + len]);
            }
            for (&at, &wv) in taps.iter().zip(wm) {
                grad[at..at + len].iter_mut().zip(ext.iter()).for_each(|(d, &g)| *d += wv * g);
            }
        }
        self.unfill(grad, runs, dx);
    }
}

/// `buf[a.0..a.0 + a.1]` and `buf[b.0..b.0 + b.1]` as two mutable slices, in that order;
/// None if they overlap or leave `buf`.
fn two_runs<T>(buf: &mut [T], a: (usize, usize), b: (usize, usize)) -> Option<(&mut [T], &mut [T])> {
    let (first, second, swapped) = if a.0 <= b.0 { (a, b, false) } else { (b, a, true) };
    if first.0 + first.1 > second.0 || second.0 + second.1 > buf.len() {
        return None;
    }
    let (lo, hi) = buf.split_at_mut(second.0);
    let (x, y) = (&mut lo[first.0..first.0 + first.1], &mut hi[..second.1]);
    Some(if swapped { (y, x) } else { (x, y) })
}

/// A row's even columns into `even` and odd ones into `odd`, each through `f`: one pass over pairs, which the
/// compiler vectorises with shuffles, where a strided loop per column phase stayed scalar
/// (the stride-2 layers' copies were a tenth of a 224x224 step's samples).
#[inline(always)]
fn deinterleave<T: Copy>(row: &[T], even: &mut [T], odd: &mut [T], f: impl Fn(T) -> T) {
    let (pairs, rest) = row.as_chunks::<2>();
    for ((p, e), o) in pairs.iter().zip(even.iter_mut()).zip(odd.iter_mut()) {
        *e = f(p[0]);
        *o = f(p[1]);
    }
    if let (Some(&last), Some(e)) = (rest.first(), even.get_mut(pairs.len())) {
        *e = f(last);
    }
}

/// The inverse of [`deinterleave`] into an uninitialised row, each value written as `0 + g`
/// (see `Plane::unfill`).
#[inline(always)]
fn interleave<T: Real>(even: &[T], odd: &[T], row: &mut [MaybeUninit<T>]) {
    let (pairs, rest) = row.as_chunks_mut::<2>();
    let n = pairs.len();
    for ((p, &e), &o) in pairs.iter_mut().zip(even).zip(odd) {
        p[0].write(T::zero() + e);
        p[1].write(T::zero() + o);
    }
    if let (Some(d), Some(&e)) = (rest.first_mut(), even.get(n)) {
        d.write(T::zero() + e);
    }
}

/// A padded plane buffer, an extended output plane and the tap offsets, reused across the
/// channels of one image.
pub(super) struct Scratch<T> {
    buf: Vec<T>,
    ext: Vec<T>,
    taps: Vec<usize>,
    /// Per input row, `Plane::runs_per_row` entries of (first column, buffer offset).
    runs: Vec<(usize, usize)>,
    /// The buffer holds gradients, not zero padding.
    dirty: bool,
    /// A second buffer-shaped plane for the input gradient when the buffer holds the input
    /// (`Plane::backward_both`); empty until then.
    grad: Vec<T>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_unfill_is_the_identity_for_any_stride_and_padding() {
        let cases = [(1, [0, 0, 0, 0]), (2, [1, 1, 1, 1]), (2, [0, 0, 1, 1]), (3, [2, 0, 1, 2])];
        for ((stride, pads), w) in cases.into_iter().flat_map(|c| [(c, 7), (c, 8)]) {
            let p = Plane {
                h: 5,
                w,
                oh: 1,
                ow: 1,
                kh: 1,
                kw: 1,
                stride: [stride, stride],
                dilation: [1, 1],
                pads,
                multiplier: 1,
            };
            let x: Vec<f64> = (0..5 * w).map(|i| i as f64 + 1.0).collect();
            let mut s = p.scratch::<f64>();
            p.fill(&x, &mut s);
            assert_eq!(s.buf.iter().sum::<f64>(), x.iter().sum::<f64>(), "stride {stride}: padding stays zero");
            for (i, &v) in x.iter().enumerate() {
                let at = p.at(i / w + pads[0], i % w + pads[1]);
                assert_eq!(s.buf[at], v, "stride {stride} pads {pads:?} width {w}: element {i} where the taps read it");
            }
            let mut back = vec![MaybeUninit::new(f64::NAN); 5 * w];
            p.unfill(&s.buf, &s.runs, &mut back);
            // SAFETY: initialised above (NaN where unfill would have missed an element).
            let back: Vec<f64> = back.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(back, x, "stride {stride} pads {pads:?}: every element written, once");
        }
    }
}
