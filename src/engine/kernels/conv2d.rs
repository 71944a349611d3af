//! 2-D convolution (NCHW, OIHW weights) with groups, strides, dilations and asymmetric
//! padding, plus both gradients. Dense groups use im2col + GEMM; depthwise convolution (one
//! input channel per group) runs on padded planes (see `depthwise`), or channels-last on
//! small maps (see `depthwise_small`), which is what makes MobileNet-style backbones
//! train at a useful speed. Work is split over the batch with rayon.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use std::ops::Range;

use super::depthwise::{Plane, Scratch};
use super::depthwise_small::SmallDepthwise;
use super::scratch::{copy_row, with_buffers};
use std::mem::MaybeUninit;

use super::{gemm, gemm_into, par_filled, par_written, simd, slice, sum_in_order, transposed, Real};

mod depthwise_grads;

/// Output positions up to which a depthwise convolution runs channels-last (8x8 maps and
/// smaller). On MobileNetV2's training step at 64x64 (examples/profile_step), against the
/// padded planes: 2x2 maps 4-9x faster, 4x4 maps 2-3x, 8x8 maps 1.0-1.3x (7x7 at 224x224:
/// even); 16x16 and 32x32 maps 0.8x and 0.5-0.7x, where the transposes cost more than the
/// planes' overhead.
const SMALL_MAP: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// [top, left, bottom, right]
    pub pads: [usize; 4],
    pub groups: usize,
}

/// Sizes of one convolution, derived once from the input and weight shapes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub(super) n: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    cin_g: usize,
    pub(super) cout_g: usize,
    p: ConvParams,
}

impl Geometry {
    pub(super) fn new(x: &[usize], wt: &[usize], p: ConvParams) -> candle_core::Result<Geometry> {
        let (&[n, cin, h, w], &[cout, cin_g, kh, kw]) = (x, wt) else {
            return Err(candle_core::Error::Msg(format!("conv2d needs 4-D input and weight, got {x:?} and {wt:?}")));
        };
        let bad = |m: String| Err(candle_core::Error::Msg(m));
        if p.groups == 0 || cin != cin_g * p.groups || cout % p.groups != 0 {
            return bad(format!("conv2d: {cin} input channels, weight {wt:?}, groups {}", p.groups));
        }
        if p.stride.contains(&0) || p.dilation.contains(&0) {
            return bad("conv2d: zero stride or dilation".into());
        }
        if kh == 0 || kw == 0 {
            return bad(format!("conv2d: empty {kh}x{kw} kernel"));
        }
        let out = |size: usize, k: usize, s: usize, d: usize, p0: usize, p1: usize| {
            let span = d * (k.max(1) - 1) + 1;
            (size + p0 + p1).checked_sub(span).map(|v| v / s + 1)
        };
        let (Some(oh), Some(ow)) = (
            out(h, kh, p.stride[0], p.dilation[0], p.pads[0], p.pads[2]),
            out(w, kw, p.stride[1], p.dilation[1], p.pads[1], p.pads[3]),
        ) else {
            return bad(format!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w}"));
        };
        Ok(Geometry { n, cin, h, w, cout, kh, kw, oh, ow, cin_g, cout_g: cout / p.groups, p })
    }

    /// An output gradient must have the output's shape: the kernels slice it by image.
    fn check_output(&self, dy: &Layout) -> candle_core::Result<()> {
        let want = [self.n, self.cout, self.oh, self.ow];
        match dims4(dy)? == want {
            true => Ok(()),
            false => Err(candle_core::Error::Msg(format!(
                "conv2d gradient: output gradient {:?}, expected {want:?}",
                dy.dims()
            ))),
        }
    }

    pub(super) fn depthwise(&self) -> bool {
        self.cin_g == 1 && self.p.groups > 1
    }

    fn k(&self) -> usize {
        self.cin_g * self.kh * self.kw
    }

    pub(super) fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    /// Input row/column read by output position `o` and kernel tap `k` along one axis.
    #[inline]
    fn src(o: usize, k: usize, s: usize, d: usize, pad: usize, size: usize) -> Option<usize> {
        (o * s + k * d).checked_sub(pad).filter(|&i| i < size)
    }

    /// Whether the columns are the input itself (1x1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == [1, 1] && self.p.pads == [0; 4]
    }

    /// Images whose columns go into one GEMM. A small feature map alone makes a GEMM too
    /// narrow to run near peak (a 4x4 map gives 16 columns), so the columns of several
    /// images sit side by side. It depends on the shapes only: the results do not depend
    /// on the thread count.
    fn unit(&self) -> usize {
        (512 / self.ohw().max(1)).clamp(1, 16).min(self.n.max(1))
    }

    /// Whether the weight gradient is computed as its transpose, columns times output
    /// gradient ([k, cout_g] per group, transposed once summed). With the smaller of the two
    /// on the GEMM's row side, a projection's gradient over long columns runs faster: in
    /// MobileNetV2's 224x224 step (batch 16) 144 -> 24 channels at 56x56 took 3.1 ms against
    /// 5.5, 96 -> 24 1.7 against 3.4; at 64x64 (batch 32), 192 -> 32 at 8x8 0.44 against
    /// 0.64. Over short columns (a unit of 7x7 or 2x2 maps) writing and transposing the
    /// larger result costs more than it saves (960 -> 320 channels at 7x7: 6.1 ms against
    /// 5.0), hence the length. Each element is the same sum over the same columns in the
    /// same order either way (tested bit for bit).
    fn weight_grad_transposed(&self) -> bool {
        !self.depthwise() && self.k() > self.cout_g && self.unit() * self.ohw() >= 512
    }

    /// Images per task of the passes whose values do not depend on how the batch is cut
    /// (the output and the input gradient: each element is one GEMM dot product over the
    /// same k, whatever the columns beside it): as many tasks as [`Geometry::unit`] makes,
    /// of even sizes. A batch of 16 on 7x7 maps went in units of 10 and 6 images, one thread
    /// idle for the last four. The weight gradient sums over a unit's columns, so it keeps
    /// [`Geometry::unit`] and its results.
    fn even_unit(&self) -> usize {
        let unit = self.unit();
        self.n.div_ceil(self.n.div_ceil(unit).max(1)).max(1)
    }

    /// Whether the columns of a unit are the input itself (one image, pointwise).
    fn direct(&self, imgs: usize) -> bool {
        self.pointwise() && imgs == 1
    }

    /// Elements of the buffer [`Geometry::columns`] writes for `imgs` images (0 when direct).
    fn columns_len(&self, imgs: usize) -> usize {
        if self.direct(imgs) {
            0
        } else {
            self.k() * imgs * self.ohw()
        }
    }

    /// The columns [cin_g*kh*kw, imgs*oh*ow] of group `g` for the `imgs` images in `x`:
    /// the input itself when [`Geometry::direct`], else written (every element) into `buf`
    /// of [`Geometry::columns_len`] elements.
    fn columns<'a, T: Real>(&self, x: &'a [T], imgs: usize, g: usize, buf: &'a mut [T]) -> &'a [T] {
        let (in_item, pitch) = (self.cin * self.h * self.w, imgs * self.ohw());
        if self.direct(imgs) {
            return &x[g * self.cin_g * self.ohw()..][..self.cin_g * self.ohw()];
        }
        for i in 0..imgs {
            self.im2col(&x[i * in_item..][..in_item], g, buf, pitch, i * self.ohw());
        }
        buf
    }

    /// Writes the im2col rows of group `g` of one image: row r at `cols[r * pitch + off..]`.
    fn im2col<T: Real>(&self, x: &[T], g: usize, cols: &mut [T], pitch: usize, off: usize) {
        let (ohw, p) = (self.ohw(), self.p);
        for c in 0..self.cin_g {
            let plane = &x[(g * self.cin_g + c) * self.h * self.w..][..self.h * self.w];
            if self.pointwise() {
                copy_row(&mut cols[c * pitch + off..], plane);
                continue;
            }
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = &mut cols[((c * self.kh + ki) * self.kw + kj) * pitch + off..][..ohw];
                    for oy in 0..self.oh {
                        let iy = Self::src(oy, ki, p.stride[0], p.dilation[0], p.pads[0], self.h);
                        for ox in 0..self.ow {
                            let ix = Self::src(ox, kj, p.stride[1], p.dilation[1], p.pads[1], self.w);
                            row[oy * self.ow + ox] = match (iy, ix) {
                                (Some(iy), Some(ix)) => plane[iy * self.w + ix],
                                _ => T::zero(),
                            };
                        }
                    }
                }
            }
        }
    }

    /// Adds im2col-shaped gradient rows (row r at `cols[r * pitch + off..]`) back into the
    /// input gradient of group `g` of one image.
    fn col2im<T: Real>(&self, cols: &[T], g: usize, dx: &mut [T], pitch: usize, off: usize) {
        let (ohw, p) = (self.ohw(), self.p);
        for c in 0..self.cin_g {
            let plane = &mut dx[(g * self.cin_g + c) * self.h * self.w..][..self.h * self.w];
            if self.pointwise() {
                plane.iter_mut().zip(&cols[c * pitch + off..][..ohw]).for_each(|(d, &v)| *d += v);
                continue;
            }
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = &cols[((c * self.kh + ki) * self.kw + kj) * pitch + off..][..ohw];
                    for oy in 0..self.oh {
                        let Some(iy) = Self::src(oy, ki, p.stride[0], p.dilation[0], p.pads[0], self.h) else {
                            continue;
                        };
                        for ox in 0..self.ow {
                            if let Some(ix) = Self::src(ox, kj, p.stride[1], p.dilation[1], p.pads[1], self.w) {
                                plane[iy * self.w + ix] += row[oy * self.ow + ox];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Output channels [c0, c0 + cc) of `imgs` images laid out [imgs][cout][ohw], side by
    /// side as [cc, imgs*ohw] in `buf` (every element written; or the slice itself for one
    /// image, `buf` then unused and possibly empty).
    fn gather<'a, T: Real>(&self, y: &'a [T], imgs: usize, c0: usize, cc: usize, buf: &'a mut [T]) -> &'a [T] {
        let ohw = self.ohw();
        if imgs == 1 {
            return &y[c0 * ohw..][..cc * ohw];
        }
        for i in 0..imgs {
            for c in 0..cc {
                copy_row(&mut buf[(c * imgs + i) * ohw..], &y[(i * self.cout + c0 + c) * ohw..][..ohw]);
            }
        }
        &buf[..cc * imgs * ohw]
    }

    /// Elements of the buffer [`Geometry::gather`] writes for `cc` channels of `imgs` images.
    fn gather_len(&self, imgs: usize, cc: usize) -> usize {
        if imgs == 1 {
            0
        } else {
            cc * imgs * self.ohw()
        }
    }

    /// The inverse of [`Geometry::gather`]: writes [cc, imgs*ohw] into the images' channels.
    /// `channels` is the images' channel count (cout for outputs, cin for a pointwise
    /// convolution's input gradient, whose planes are output-sized).
    fn scatter<T: Real>(&self, src: &[T], imgs: usize, [channels, c0, cc]: [usize; 3], y: &mut [MaybeUninit<T>]) {
        let ohw = self.ohw();
        // SAFETY: MaybeUninit<T> has T's layout, and every T is a valid MaybeUninit<T>.
        let src: &[MaybeUninit<T>] = unsafe { &*(src as *const [T] as *const [MaybeUninit<T>]) };
        for i in 0..imgs {
            for c in 0..cc {
                copy_row(&mut y[(i * channels + c0 + c) * ohw..], &src[(c * imgs + i) * ohw..][..ohw]);
            }
        }
    }

    /// The channels-last kernels of a depthwise convolution with multiplier 1 whose output
    /// map has at most [`SMALL_MAP`] positions; None for every other convolution.
    pub(super) fn small(&self) -> Option<SmallDepthwise> {
        if !self.depthwise() || self.cout_g != 1 || self.ohw() > SMALL_MAP {
            return None;
        }
        let p = self.p;
        let reads = |o: usize| {
            let (oy, ox) = (o / self.ow, o % self.ow);
            (0..self.kh).flat_map(move |ki| {
                (0..self.kw).filter_map(move |kj| {
                    let iy = Geometry::src(oy, ki, p.stride[0], p.dilation[0], p.pads[0], self.h)?;
                    let ix = Geometry::src(ox, kj, p.stride[1], p.dilation[1], p.pads[1], self.w)?;
                    Some((ki * self.kw + kj, iy * self.w + ix))
                })
            })
        };
        Some(SmallDepthwise::new([self.n, self.cin, self.h * self.w, self.ohw(), self.kh * self.kw], reads))
    }

    /// The padded-plane layout of a depthwise convolution.
    pub(super) fn plane(&self) -> Plane {
        Plane {
            h: self.h,
            w: self.w,
            oh: self.oh,
            ow: self.ow,
            kh: self.kh,
            kw: self.kw,
            stride: self.p.stride,
            dilation: self.p.dilation,
            pads: self.p.pads,
            multiplier: self.cout_g,
        }
    }

    /// Calls `f(plane, scratch, [input plane, filters, outputs])` for each input channel of a
    /// depthwise convolution of one image (ranges into that image's tensors), with the
    /// loops compiled wide (see [`simd`]).
    #[inline(always)]
    fn depthwise_each<T: Real>(&self, mut f: impl FnMut(&Plane, &mut Scratch<T>, [Range<usize>; 3])) {
        let (pl, hw, taps, outs) =
            (self.plane(), self.h * self.w, self.cout_g * self.kh * self.kw, self.cout_g * self.ohw());
        let mut s = pl.scratch();
        simd(
            #[inline(always)]
            || {
                for ic in 0..self.cin {
                    f(&pl, &mut s, [ic * hw..(ic + 1) * hw, ic * taps..(ic + 1) * taps, ic * outs..(ic + 1) * outs]);
                }
            },
        );
    }
}

fn forward<T: Real>(x: &[T], w: &[T], g: &Geometry) -> candle_core::Result<Vec<T>> {
    forward_in_units(x, w, g, g.even_unit())
}

/// The output, dense groups' GEMMs taking `unit` images at a time.
fn forward_in_units<T: Real>(x: &[T], w: &[T], g: &Geometry, unit: usize) -> candle_core::Result<Vec<T>> {
    if let Some(small) = g.small() {
        return Ok(small.forward(x, w));
    }
    let (in_item, out_item) = (g.cin * g.h * g.w, g.cout * g.ohw());
    if g.depthwise() {
        // SAFETY: the depthwise kernel writes every element of the output planes it is given,
        // and the input channels' planes make up the whole image (gradient-checked against
        // finite differences and compared with ONNX Runtime in the engine's tests).
        return Ok(unsafe {
            par_written(g.n * out_item, out_item.max(1), |i, y| {
                let xi = &x[i * in_item..][..in_item];
                g.depthwise_each(
                    #[inline(always)]
                    |pl, s, [xr, wr, yr]| {
                        pl.fill(&xi[xr], s);
                        pl.forward(s, &w[wr], &mut y[yr]);
                    },
                );
                y.len()
            })
        });
    }
    let unit = unit.max(1);
    // SAFETY: forward_unit writes every element of its images' outputs when it succeeds: the
    // groups' output channels make them up.
    unsafe {
        par_filled(g.n * out_item, (unit * out_item).max(1), |u, y| {
            let imgs = y.len() / out_item.max(1);
            forward_unit(&x[u * unit * in_item..][..imgs * in_item], w, g, imgs, y)
        })
    }
}

/// The outputs of `imgs` images, written into `y` (every element).
fn forward_unit<T: Real>(
    xu: &[T],
    w: &[T],
    g: &Geometry,
    imgs: usize,
    y: &mut [MaybeUninit<T>],
) -> candle_core::Result<()> {
    let pitch = imgs * g.ohw();
    let ylen = if imgs > 1 { g.cout_g * pitch } else { 0 };
    with_buffers([g.columns_len(imgs), ylen], |colbuf, ybuf| {
        for grp in 0..g.p.groups {
            let cols = g.columns(xu, imgs, grp, colbuf);
            let wg = &w[grp * g.cout_g * g.k()..][..g.cout_g * g.k()];
            if imgs == 1 {
                let yg = &mut y[grp * g.cout_g * g.ohw()..][..g.cout_g * g.ohw()];
                gemm_into(g.cout_g, g.ohw(), g.k(), wg, false, cols, false, yg)?;
            } else {
                gemm(g.cout_g, pitch, g.k(), wg, false, cols, false, ybuf, false)?;
                g.scatter(ybuf, imgs, [g.cout, grp * g.cout_g, g.cout_g], y);
            }
        }
        Ok(())
    })
}

fn backward_input<T: Real>(w: &[T], dy: &[T], g: &Geometry) -> candle_core::Result<Vec<T>> {
    backward_input_in_units(w, dy, g, g.even_unit())
}

/// The input gradient, dense groups' GEMMs taking `unit` images at a time.
fn backward_input_in_units<T: Real>(w: &[T], dy: &[T], g: &Geometry, unit: usize) -> candle_core::Result<Vec<T>> {
    if let Some(small) = g.small() {
        return Ok(small.backward_input(dy, w));
    }
    let (in_item, out_item) = (g.cin * g.h * g.w, g.cout * g.ohw());
    if g.depthwise() {
        // SAFETY: the depthwise kernel writes every element of the input planes it is given
        // (tested: fill then unfill is the identity), and the channels make up the image.
        return Ok(unsafe {
            par_written(g.n * in_item, in_item.max(1), |i, dxi| {
                let dyi = &dy[i * out_item..][..out_item];
                g.depthwise_each(
                    #[inline(always)]
                    |pl, s, [xr, wr, yr]| pl.backward_input(s, &dyi[yr], &w[wr], &mut dxi[xr]),
                );
                dxi.len()
            })
        });
    }
    if g.pointwise() {
        return pointwise_backward_input(w, dy, g, unit);
    }
    let mut dx = vec![T::zero(); g.n * in_item];
    let unit = unit.max(1);
    dx.par_chunks_mut((unit * in_item).max(1)).zip(dy.par_chunks((unit * out_item).max(1))).try_for_each(
        |(dxu, dyu)| -> candle_core::Result<()> {
            let imgs = dyu.len() / out_item.max(1);
            let pitch = imgs * g.ohw();
            with_buffers([g.gather_len(imgs, g.cout_g), g.k() * pitch], |dybuf, dcols| {
                for grp in 0..g.p.groups {
                    let wg = &w[grp * g.cout_g * g.k()..][..g.cout_g * g.k()];
                    let dyg = g.gather(dyu, imgs, grp * g.cout_g, g.cout_g, dybuf);
                    gemm(g.k(), pitch, g.cout_g, wg, true, dyg, false, dcols, false)?;
                    for (i, dxi) in dxu.chunks_exact_mut(in_item).enumerate() {
                        g.col2im(dcols, grp, dxi, pitch, i * g.ohw());
                    }
                }
                Ok(())
            })
        },
    )?;
    Ok(dx)
}

/// The input gradient of a pointwise convolution: every element is written once (no
/// overlapping taps), so it is written into uninitialised memory, not added to zeros.
fn pointwise_backward_input<T: Real>(w: &[T], dy: &[T], g: &Geometry, unit: usize) -> candle_core::Result<Vec<T>> {
    let (in_item, out_item, unit) = (g.cin * g.h * g.w, g.cout * g.ohw(), unit.max(1));
    // SAFETY: the groups' input channels make up every image's gradient, and each group's
    // is written whole (gemm_into or scatter) before Ok.
    unsafe {
        par_filled(g.n * in_item, (unit * in_item).max(1), |u, dxu| {
            let imgs = dxu.len() / in_item.max(1);
            let dyu = &dy[u * unit * out_item..][..imgs * out_item];
            let pitch = imgs * g.ohw();
            let dcols_len = if imgs > 1 { g.cin_g * pitch } else { 0 };
            with_buffers([g.gather_len(imgs, g.cout_g), dcols_len], |dybuf, dcols| {
                (0..g.p.groups).try_for_each(|grp| {
                    let wg = &w[grp * g.cout_g * g.k()..][..g.cout_g * g.k()];
                    let dyg = g.gather(dyu, imgs, grp * g.cout_g, g.cout_g, dybuf);
                    if imgs == 1 {
                        let dxg = &mut dxu[grp * g.cin_g * g.ohw()..][..g.cin_g * g.ohw()];
                        return gemm_into(g.cin_g, g.ohw(), g.cout_g, wg, true, dyg, false, dxg);
                    }
                    gemm(g.cin_g, pitch, g.cout_g, wg, true, dyg, false, dcols, false)?;
                    g.scatter(dcols, imgs, [g.cin, grp * g.cin_g, g.cin_g], dxu);
                    Ok(())
                })
            })
        })
    }
}

fn backward_weight<T: Real>(x: &[T], dy: &[T], g: &Geometry) -> candle_core::Result<Vec<T>> {
    backward_weight_oriented(x, dy, g, g.weight_grad_transposed())
}

/// The weight gradient, its GEMMs computing the transpose when `by_transpose` (dense groups).
fn backward_weight_oriented<T: Real>(
    x: &[T],
    dy: &[T],
    g: &Geometry,
    by_transpose: bool,
) -> candle_core::Result<Vec<T>> {
    if let Some(small) = g.small() {
        return Ok(small.backward_weight(x, dy));
    }
    let (in_item, out_item) = (g.cin * g.h * g.w, g.cout * g.ohw());
    let wlen = g.cout * g.k();
    // Units of images summed in order: the result does not depend on the thread count or
    // scheduling, so a resumed run reproduces an uninterrupted one bit for bit.
    let unit = if g.depthwise() { g.n.div_ceil(8).max(1) } else { g.unit() };
    let partial = |u: usize| -> candle_core::Result<Vec<T>> {
        let items = (u * unit)..((u + 1) * unit).min(g.n);
        let imgs = items.len();
        let xu = &x[items.start * in_item..][..imgs * in_item];
        let dyu = &dy[items.start * out_item..][..imgs * out_item];
        let mut dw = vec![T::zero(); wlen];
        if g.depthwise() {
            for (xi, dyi) in xu.chunks_exact(in_item).zip(dyu.chunks_exact(out_item)) {
                g.depthwise_each(
                    #[inline(always)]
                    |pl, s, [xr, wr, yr]| {
                        pl.fill(&xi[xr], s);
                        pl.backward_weight(s, &dyi[yr], &mut dw[wr]);
                    },
                );
            }
            return Ok(dw);
        }
        with_buffers(
            [g.columns_len(imgs), g.gather_len(imgs, g.cout_g)],
            |colbuf, dybuf| -> candle_core::Result<()> {
                for grp in 0..g.p.groups {
                    let cols = g.columns(xu, imgs, grp, colbuf);
                    let dyg = g.gather(dyu, imgs, grp * g.cout_g, g.cout_g, dybuf);
                    let dwg = &mut dw[grp * g.cout_g * g.k()..][..g.cout_g * g.k()];
                    let n = imgs * g.ohw();
                    if by_transpose {
                        gemm(g.k(), g.cout_g, n, cols, false, dyg, true, dwg, true)?;
                    } else {
                        gemm(g.cout_g, g.k(), n, dyg, false, cols, true, dwg, true)?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(dw)
    };
    let partials: Vec<candle_core::Result<Vec<T>>> = (0..g.n.div_ceil(unit)).into_par_iter().map(partial).collect();
    let dw = sum_in_order(partials.into_iter().collect::<candle_core::Result<_>>()?, wlen);
    if !by_transpose {
        return Ok(dw);
    }
    // The units' sums were taken element by element on the transposed blocks, so the
    // transpose changes no value.
    let block = g.cout_g * g.k();
    Ok(dw.chunks_exact(block).flat_map(|t| transposed(t, g.k(), g.cout_g)).collect())
}

/// Which computation a [`Conv2d`] custom op performs.
#[derive(Clone, Copy, Debug)]
enum Pass {
    /// (input, weight) -> output
    Forward,
    /// (weight, grad_output) -> grad_input, for this input shape
    GradInput([usize; 4]),
    /// (input, grad_output) -> grad_weight, for this weight shape
    GradWeight([usize; 4]),
}

#[derive(Clone, Copy, Debug)]
struct Conv2d {
    p: ConvParams,
    pass: Pass,
}

fn dims4(l: &Layout) -> candle_core::Result<[usize; 4]> {
    l.shape().dims4().map(|(a, b, c, d)| [a, b, c, d])
}

impl Conv2d {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (a, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
        super::timing::timed(|| self.label(l1, l2), || self.pass_on(a, b, l1, l2))
    }

    /// "conv2d <pass> <kind> <input shape>", for [`super::timing`]; the kind is the one the
    /// kernels dispatch on.
    fn label(&self, l1: &Layout, l2: &Layout) -> String {
        let (pass, x, w) = match self.pass {
            Pass::Forward => ("forward", dims4(l1), dims4(l2)),
            Pass::GradInput(xs) => ("grad-input", Ok(xs), dims4(l1)),
            Pass::GradWeight(ws) => ("grad-weight", dims4(l1), Ok(ws)),
        };
        let (x, w) = (x.unwrap_or_default(), w.unwrap_or_default());
        let kind = match Geometry::new(&x, &w, self.p) {
            Ok(g) if g.depthwise() => "depthwise",
            Ok(g) if g.pointwise() => "pointwise",
            _ => "dense",
        };
        format!("conv2d {pass} {kind} {x:?}")
    }

    fn pass_on<T: Real>(&self, a: &[T], b: &[T], l1: &Layout, l2: &Layout) -> candle_core::Result<(Vec<T>, Shape)> {
        match self.pass {
            Pass::Forward => {
                let g = Geometry::new(&dims4(l1)?, &dims4(l2)?, self.p)?;
                Ok((forward(a, b, &g)?, Shape::from((g.n, g.cout, g.oh, g.ow))))
            }
            Pass::GradInput(xs) => {
                let g = Geometry::new(&xs, &dims4(l1)?, self.p)?;
                g.check_output(l2)?;
                Ok((backward_input(a, b, &g)?, Shape::from(xs.to_vec())))
            }
            Pass::GradWeight(ws) => {
                let g = Geometry::new(&dims4(l1)?, &ws, self.p)?;
                g.check_output(l2)?;
                Ok((backward_weight(a, b, &g)?, Shape::from(ws.to_vec())))
            }
        }
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "mtpack-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(s1, l1, s2, l2).map(|(v, s)| (CpuStorage::F32(v), s)),
            CpuStorage::F64(_) => self.run::<f64>(s1, l1, s2, l2).map(|(v, s)| (CpuStorage::F64(v), s)),
            _ => Err(candle_core::Error::Msg(format!("{} supports float32 and float64 only", "mtpack-conv2d"))),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let xs = dims4(x.layout())?;
        let ws = dims4(w.layout())?;
        if x.track_op() && w.track_op() && Geometry::new(&xs, &ws, self.p)?.depthwise() {
            let (dx, dw) = depthwise_grads::depthwise_grads(x, w, &dy, self.p)?;
            return Ok((Some(dx), Some(dw)));
        }
        // A gradient nobody reads is not computed: the image into the first convolution,
        // or the weights of a frozen layer.
        let dx = match x.track_op() {
            true => Some(w.apply_op2_no_bwd(&dy, &Conv2d { p: self.p, pass: Pass::GradInput(xs) })?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(x.apply_op2_no_bwd(&dy, &Conv2d { p: self.p, pass: Pass::GradWeight(ws) })?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// Differentiable convolution of `x` [N, C, H, W] with `w` [O, C/groups, KH, KW].
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d { p, pass: Pass::Forward })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::{DType, Device};

    fn naive(x: &Tensor, w: &Tensor, p: ConvParams) -> Vec<f64> {
        let xs = x.dims4().unwrap();
        let ws = w.dims4().unwrap();
        let g = Geometry::new(&[xs.0, xs.1, xs.2, xs.3], &[ws.0, ws.1, ws.2, ws.3], p).unwrap();
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![0.0; g.n * g.cout * g.oh * g.ow];
        for n in 0..g.n {
            for oc in 0..g.cout {
                let grp = oc / g.cout_g;
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = 0.0;
                        for c in 0..g.cin_g {
                            let ic = grp * g.cin_g + c;
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let iy = (oy * p.stride[0] + ki * p.dilation[0]) as isize - p.pads[0] as isize;
                                    let ix = (ox * p.stride[1] + kj * p.dilation[1]) as isize - p.pads[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                        continue;
                                    }
                                    s += xv[((n * g.cin + ic) * g.h + iy as usize) * g.w + ix as usize]
                                        * wv[((oc * g.cin_g + c) * g.kh + ki) * g.kw + kj];
                                }
                            }
                        }
                        out[((n * g.cout + oc) * g.oh + oy) * g.ow + ox] = s;
                    }
                }
            }
        }
        out
    }

    pub(super) fn cases() -> Vec<([usize; 4], [usize; 4], ConvParams)> {
        let p = |s: usize, pads: [usize; 4], groups: usize, d: usize| ConvParams {
            stride: [s, s],
            dilation: [d, d],
            pads,
            groups,
        };
        vec![
            ([2, 3, 7, 6], [4, 3, 3, 3], p(1, [1, 1, 1, 1], 1, 1)), // dense, same padding
            ([2, 4, 7, 7], [6, 2, 3, 3], p(2, [1, 0, 2, 1], 2, 1)), // grouped, strided, asymmetric
            ([2, 4, 6, 6], [4, 1, 3, 3], p(2, [1, 1, 1, 1], 4, 1)), // depthwise strided
            ([1, 3, 5, 5], [6, 1, 3, 3], p(1, [0, 0, 0, 0], 3, 1)), // depthwise multiplier 2
            ([2, 3, 5, 4], [5, 3, 1, 1], p(1, [0, 0, 0, 0], 1, 1)), // pointwise
            ([1, 2, 9, 9], [3, 2, 3, 3], p(1, [2, 2, 2, 2], 1, 2)), // dilated
            ([1, 4, 3, 3], [2, 4, 1, 1], p(1, [0, 0, 0, 0], 1, 1)), // pointwise, input used directly
            ([3, 2, 20, 20], [3, 2, 1, 1], p(1, [0, 0, 0, 0], 1, 1)), // one image per GEMM
            ([5, 2, 12, 12], [4, 2, 3, 3], p(1, [1, 1, 1, 1], 1, 1)), // 3 images per GEMM, 2 left over
            ([2, 2, 9, 8], [2, 1, 3, 3], p(2, [2, 1, 0, 2], 2, 2)), // depthwise dilated, asymmetric
            ([1, 2, 11, 10], [4, 1, 5, 5], p(3, [2, 2, 1, 0], 2, 1)), // depthwise 5x5 stride 3, multiplier 2
            // Depthwise with multiplier 1 on maps over SMALL_MAP positions: the padded planes
            // (the depthwise cases above with multiplier 1 run channels-last).
            ([2, 3, 10, 9], [3, 1, 3, 3], p(1, [1, 1, 1, 1], 3, 1)),
            ([1, 2, 19, 17], [2, 1, 3, 3], p(2, [1, 0, 1, 1], 2, 1)),
            ([2, 5, 3, 2], [5, 1, 3, 3], p(1, [1, 1, 1, 1], 5, 1)), // channels-last, 3x2 map
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for (xs, ws, p) in cases() {
            let x = seeded(&xs, 1, DType::F64);
            let w = seeded(&ws, 2, DType::F64);
            let y: Vec<f64> = conv2d(&x, &w, p).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want = naive(&x, &w, p);
            assert_eq!(y.len(), want.len());
            let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "{xs:?} {ws:?} {p:?}: max error {err}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // d(sum(y * r))/dx and /dw against central differences, in double precision.
        for (xs, ws, p) in cases() {
            let x = seeded(&xs, 3, DType::F64);
            let w = seeded(&ws, 4, DType::F64);
            check_gradients(&[x, w], |v| conv2d(&v[0], &v[1], p), 1e-6)
                .unwrap_or_else(|e| panic!("{xs:?} {ws:?} {p:?}: {e}"));
        }
    }

    fn dw_bits<T: Real + candle_core::WithDType>(x: &Tensor, dy: &Tensor, g: &Geometry, transposed: bool) -> Vec<u64> {
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<T>().unwrap();
        vec_bits(backward_weight_oriented(&v(x), &v(dy), g, transposed).unwrap())
    }

    /// The small cases in float64, then `pointwise` ([n, cin, cout, hw] of a 1x1 convolution
    /// on hw x hw maps) and `dense` (input and weight shapes of a 3x3 convolution, padding 1)
    /// in float32.
    fn f64_cases_and_f32(
        pointwise: &[[usize; 4]],
        dense: &[([usize; 4], [usize; 4])],
    ) -> Vec<([usize; 4], [usize; 4], ConvParams, DType)> {
        let p1 = ConvParams { stride: [1, 1], dilation: [1, 1], pads: [0; 4], groups: 1 };
        let mut shapes: Vec<_> = cases().into_iter().map(|(xs, ws, p)| (xs, ws, p, DType::F64)).collect();
        shapes
            .extend(pointwise.iter().map(|&[n, cin, cout, hw]| ([n, cin, hw, hw], [cout, cin, 1, 1], p1, DType::F32)));
        shapes.extend(dense.iter().map(|&(xs, ws)| (xs, ws, ConvParams { pads: [1; 4], ..p1 }, DType::F32)));
        shapes
    }

    #[test]
    fn weight_gradient_is_the_same_either_way_round() {
        // Transposed or not, each element is the same sum in the same order: bit for bit,
        // on the small cases and on MobileNetV2-like projections and expansions in float32.
        let pointwise = [[3, 48, 8, 9], [2, 8, 48, 9], [2, 40, 24, 28], [5, 64, 16, 7], [4, 16, 64, 7]];
        for (xs, ws, p, dtype) in f64_cases_and_f32(&pointwise, &[([2, 24, 9, 9], [8, 24, 3, 3])]) {
            let g = Geometry::new(&xs, &ws, p).unwrap();
            if g.depthwise() {
                continue;
            }
            let x = seeded(&xs, 5, dtype);
            let dy = seeded(&[g.n, g.cout, g.oh, g.ow], 6, dtype);
            let bits = |t: bool| match dtype {
                DType::F32 => dw_bits::<f32>(&x, &dy, &g, t),
                _ => dw_bits::<f64>(&x, &dy, &g, t),
            };
            assert_eq!(bits(true), bits(false), "{xs:?} {ws:?} {p:?}");
        }
    }

    #[test]
    fn output_and_input_gradient_do_not_depend_on_the_units() {
        // Units of one image, of the old and the even sizes, and the whole batch: the same
        // bits (16 images on 7x7 maps: units of 10 and 6, or 8 and 8).
        for (xs, ws, p, dtype) in f64_cases_and_f32(&[[16, 24, 40, 7]], &[([11, 8, 6, 6], [12, 8, 3, 3])]) {
            let g = Geometry::new(&xs, &ws, p).unwrap();
            let x = seeded(&xs, 7, dtype);
            let w = seeded(&ws, 8, dtype);
            let dy = seeded(&[g.n, g.cout, g.oh, g.ow], 9, dtype);
            let passes = |unit: usize| match dtype {
                DType::F32 => unit_bits::<f32>(&x, &w, &dy, &g, unit),
                _ => unit_bits::<f64>(&x, &w, &dy, &g, unit),
            };
            let want = passes(g.unit());
            for unit in [1, g.even_unit(), g.n] {
                assert_eq!(passes(unit), want, "{xs:?} {ws:?} {p:?}, units of {unit}");
            }
        }
    }

    fn unit_bits<T: Real + candle_core::WithDType>(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        g: &Geometry,
        unit: usize,
    ) -> [Vec<u64>; 2] {
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<T>().unwrap();
        let y = forward_in_units(&v(x), &v(w), g, unit).unwrap();
        let dx = backward_input_in_units(&v(w), &v(dy), g, unit).unwrap();
        [vec_bits(y), vec_bits(dx)]
    }

    fn vec_bits<T: Real + candle_core::WithDType>(t: Vec<T>) -> Vec<u64> {
        let len = t.len();
        crate::engine::gradcheck::bits(&Tensor::from_vec(t, len, &Device::Cpu).unwrap())
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 2, 3, 3), DType::F32, &dev).unwrap();
        let p = ConvParams { stride: [1, 1], dilation: [1, 1], pads: [0; 4], groups: 1 };
        assert!(conv2d(&x, &w, p).is_err());
        let w = Tensor::zeros((2, 3, 5, 5), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, p).is_err());
        // A gradient pass given an output gradient of the wrong shape refuses it, depthwise
        // (sliced by image) or not.
        for (w, groups) in [((3, 1, 3, 3), 3), ((2, 3, 3, 3), 1)] {
            let w = Tensor::zeros(w, DType::F32, &dev).unwrap();
            let p = ConvParams { groups, ..p };
            let dy = Tensor::zeros((1, w.dims()[0], 1, 1), DType::F32, &dev).unwrap();
            for pass in [Pass::GradInput([1, 3, 4, 4]), Pass::GradWeight([w.dims()[0], 3 / groups, 3, 3])] {
                let (a, b) = match pass {
                    Pass::GradInput(_) => (&w, &dy),
                    _ => (&x, &dy),
                };
                assert!(a.apply_op2_no_bwd(b, &Conv2d { p, pass }).is_err(), "{pass:?} groups {groups}");
            }
        }
    }
}
