//! BatchNormalization as fused CPU kernels, with recorded statistics (`eval()`) or the
//! batch's own (`train()`), optionally followed by a clamp (the Clip/ReLU that follows
//! almost every BatchNormalization in a CNN, folded in by the engine). One pass forward; the
//! backward is one pass for the per-channel sums and one for the input gradient, where the
//! composite candle expressions cost a pass and a buffer per elementary op. Planes of 128
//! elements or more go channel by channel, training statistics with the output and the sums
//! with the input gradient, while a channel's planes are in cache (see `forward` and
//! `backward`); planes of 16 elements or fewer go an image at a time (see `small`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{lanes_sum, par_planes, simd, slice, write_front, Real};

mod backward;
mod depthwise;
mod forward;
mod small;

pub use depthwise::{batch_norm_depthwise, fuses as fuses_depthwise};

/// Clamp applied to the normalised output: y = min(max(z, lo), hi).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    pub lo: f64,
    pub hi: f64,
}

/// Grouping of x as [N, C, inner].
fn planes(l: &Layout, c_expected: usize) -> candle_core::Result<(usize, usize, usize)> {
    let dims = l.shape().dims();
    let (n, c) = match dims {
        [n, c, ..] => (*n, *c),
        _ => return Err(candle_core::Error::Msg(format!("BatchNormalization needs [N, C, ...], got {dims:?}"))),
    };
    if c != c_expected {
        return Err(candle_core::Error::Msg(format!("BatchNormalization: {c} channels, statistics for {c_expected}")));
    }
    Ok((n, c, dims[2..].iter().product::<usize>().max(1)))
}

fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op} supports float32 and float64 only"))
}

/// y = clamp(x * k[c] + (bias[c] - mean[c] * k[c])) with k = scale / sqrt(var + eps), for x
/// [N, C, ...]; differentiable in x, scale and bias. With `batch` the statistics are the
/// batch's own and the gradient flows through them too.
#[derive(Clone, Debug)]
struct Normalise {
    mean: Vec<f64>,
    /// 1 / sqrt(var + eps)
    inv_std: Vec<f64>,
    clamp: Option<Clamp>,
    batch: bool,
}

impl Normalise {
    /// Normalisation by the batch's statistics [C] (mean, biased variance).
    fn with_batch_statistics(
        mean: &Tensor,
        var: &Tensor,
        eps: f64,
        clamp: Option<Clamp>,
    ) -> candle_core::Result<Normalise> {
        let inv_std = host(var)?.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        Ok(Normalise { mean: host(mean)?, inv_std, clamp, batch: true })
    }

    fn run<T: Real + candle_core::WithDType>(
        &self,
        s: [&CpuStorage; 3],
        l: [&Layout; 3],
    ) -> candle_core::Result<Vec<T>> {
        let (_, c, inner) = planes(l[0], self.mean.len())?;
        let (x, scale, bias) = (slice::<T>(s[0], l[0])?, slice::<T>(s[1], l[1])?, slice::<T>(s[2], l[2])?);
        if scale.len() != c || bias.len() != c {
            return Err(candle_core::Error::Msg(
                "BatchNormalization: scale or bias length differs from channels".into(),
            ));
        }
        let clamp = self.clamp.map(|k| (T::real(k.lo), T::real(k.hi)));
        if inner <= small::PLANE {
            let kb: Vec<(T, T)> =
                (0..c).map(|ch| affine(scale[ch], bias[ch], self.mean[ch], self.inv_std[ch])).collect();
            let [k, b] = small::spread_affine(inner, &kb);
            return Ok(small::normalise(x, [&k, &b], clamp));
        }
        // SAFETY: the count returned is write_front's, which counts the elements it wrote.
        let y = unsafe {
            par_planes(
                x.len(),
                inner,
                #[inline(always)]
                |p, yp| {
                    let xp = &x[p * inner..(p * inner + inner).min(x.len())];
                    let ch = p % c;
                    normalise_plane(yp, xp, affine(scale[ch], bias[ch], self.mean[ch], self.inv_std[ch]), clamp)
                },
            )
        };
        Ok(y)
    }
}

impl CustomOp3 for Normalise {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm"
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
        let (s, l) = ([s1, s2, s3], [l1, l2, l3]);
        let storage = super::timing::timed(
            || format!("{} {:?}", self.name(), l1.dims()),
            || match s1 {
                CpuStorage::F32(_) => Ok(CpuStorage::F32(self.run::<f32>(s, l)?)),
                CpuStorage::F64(_) => Ok(CpuStorage::F64(self.run::<f64>(s, l)?)),
                _ => Err(unsupported(self.name())),
            },
        )?;
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let scale = host(scale)?;
        // Both passes below apply the clamp's mask as they read dy, so no masked copy is
        // made, and recompute it from x, so y is not read.
        let gate = match self.clamp {
            Some(clamp) => Some(Gate {
                clamp,
                scale: scale.clone(),
                bias: host(bias)?,
                mean: self.mean.clone(),
                inv_std: self.inv_std.clone(),
            }),
            None => None,
        };
        let (_, c, inner) = planes(x.layout(), self.mean.len())?;
        let grads = Grads { scale, gate, m: (x.elem_count() / c.max(1)).max(1) as f64 };
        match inner >= backward::PLANE {
            true => backward::ChannelMajor::new(self.clone(), grads).run(x, &dy),
            false => self.two_passes(x, &dy, grads),
        }
    }
}

/// What both backward routes need besides x and dy.
struct Grads {
    /// the scale's values
    scale: Vec<f64>,
    gate: Option<Gate>,
    /// elements per channel
    m: f64,
}

impl Normalise {
    /// The backward pass as a pass for the per-channel sums, then one for the input
    /// gradient, each over the whole tensor in storage order: the route for planes under
    /// [`backward::PLANE`] elements, too short for a channel's planes to be read one after
    /// another at full speed.
    fn two_passes(
        &self,
        x: &Tensor,
        dy: &Tensor,
        g: Grads,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // [2, C]: sum(dy * xhat) and sum(dy) per channel.
        let sums = x.apply_op2_no_bwd(
            dy,
            &Sums { mean: self.mean.clone(), inv_std: self.inv_std.clone(), gate: g.gate.clone() },
        )?;
        let host_sums = host(&sums)?;
        let c = self.mean.len();
        let mut coef = Combine { a: vec![0.0; c], b: vec![0.0; c], c0: vec![0.0; c], batch: self.batch, gate: g.gate };
        for ch in 0..c {
            let at = |i: usize| host_sums.get(i).copied().unwrap_or(0.0);
            [coef.a[ch], coef.b[ch], coef.c0[ch]] = self.coefficients(ch, &g.scale, [at(ch), at(c + ch)], g.m);
        }
        let dx = dy.apply_op2_no_bwd(x, &coef)?;
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }

    /// Channel `ch`'s input gradient as dx = a * g + b * x + c0, [a, b, c0], from its sums
    /// [sum(g * xhat), sum(g)] over `m` elements (g the masked dy). Recorded statistics:
    /// a = scale * inv_std. Batch statistics add the paths through the mean and variance:
    /// dx = k * (g - sum(g)/m - xhat * sum(g * xhat)/m), xhat = (x - mean) * inv_std.
    fn coefficients(&self, ch: usize, scale: &[f64], [dxhat, dsum]: [f64; 2], m: f64) -> [f64; 3] {
        let inv = self.inv_std.get(ch).copied().unwrap_or(0.0);
        let k = scale.get(ch).copied().unwrap_or(0.0) * inv;
        if !self.batch {
            return [k, 0.0, 0.0];
        }
        let slope = k * inv * dxhat / m;
        [k, -slope, -k * dsum / m + slope * self.mean.get(ch).copied().unwrap_or(0.0)]
    }
}

/// An output of [N, C, inner] written by per-channel tasks, each writing only its own
/// channel's planes (which lie an image apart, so no task owns a contiguous slice).
struct ChannelPlanes<T>(*mut MaybeUninit<T>);

// SAFETY: tasks write disjoint planes (the contract of `ChannelPlanes::write`).
unsafe impl<T: Send> Sync for ChannelPlanes<T> {}

impl<T: Real> ChannelPlanes<T> {
    /// Over the spare capacity of `v`.
    fn over(v: &mut Vec<T>) -> ChannelPlanes<T> {
        ChannelPlanes(v.spare_capacity_mut().as_mut_ptr())
    }

    /// Lets `f` write the plane of `len` elements at `start` from the front (it returns the
    /// count written) and zeroes the rest, so the whole plane is initialised.
    ///
    /// # Safety
    /// `start + len` must lie within the capacity the pointer came from, and no other task
    /// may touch these elements.
    #[inline(always)]
    unsafe fn write(&self, start: usize, len: usize, f: impl FnOnce(&mut [MaybeUninit<T>]) -> usize) {
        // SAFETY: in bounds and exclusive, by this function's contract.
        let o = unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) };
        let wrote = f(o).min(len);
        o[wrote..].iter_mut().for_each(|v| {
            v.write(T::zero());
        });
    }
}

/// y = clamp(x * k + b) over one plane; returns the count written (write_front's).
#[inline(always)]
fn normalise_plane<T: Real>(y: &mut [MaybeUninit<T>], x: &[T], (k, b): (T, T), clamp: Option<(T, T)>) -> usize {
    match clamp {
        // The same clamp as the Clip kernel: folding the Clip in changes no value.
        Some((lo, hi)) => write_front(y, x.iter(), |&v| super::clamp_to(v * k + b, lo, hi)),
        None => write_front(y, x.iter(), |&v| v * k + b),
    }
}

/// The affine map of one channel as the forward pass computes it: z = x * k + b.
#[inline(always)]
fn affine<T: Real>(scale: T, bias: T, mean: f64, inv_std: f64) -> (T, T) {
    let k = scale * T::real(inv_std);
    (k, bias - T::real(mean) * k)
}

/// The folded clamp's gradient mask: dy passes where lo < z < hi, with z = x * k + b
/// recomputed from x exactly as the forward pass computed it. That is the same test as
/// lo < y < hi on the clamped output, without a pass over y.
#[derive(Clone, Debug)]
struct Gate {
    clamp: Clamp,
    scale: Vec<f64>,
    bias: Vec<f64>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
}

impl Gate {
    /// The mask spread over an image [c, inner], for the small-plane passes.
    fn spread<T: Real>(&self, c: usize, inner: usize) -> small::Mask<T> {
        let at = |v: &[f64], ch: usize| v.get(ch).copied().unwrap_or(0.0);
        let kb: Vec<(T, T)> = (0..c)
            .map(|ch| {
                let (scale, bias) = (T::real(at(&self.scale, ch)), T::real(at(&self.bias, ch)));
                affine(scale, bias, at(&self.mean, ch), at(&self.inv_std, ch))
            })
            .collect();
        let [k, b] = small::spread_affine(inner, &kb);
        small::Mask { k, b, lo: T::real(self.clamp.lo), hi: T::real(self.clamp.hi) }
    }

    /// The mask of channel `ch`: (dy, x) -> dy where the clamp passes it, else 0.
    #[inline(always)]
    fn channel<T: Real>(&self, ch: usize) -> impl Fn(T, T) -> T {
        let at = |v: &[f64]| v.get(ch).copied().unwrap_or(0.0);
        let (k, b) = affine(T::real(at(&self.scale)), T::real(at(&self.bias)), at(&self.mean), at(&self.inv_std));
        let (lo, hi) = (T::real(self.clamp.lo), T::real(self.clamp.hi));
        move |d: T, v: T| {
            let z = v * k + b;
            // `&`, not `&&`: without a branch the loop vectorises.
            if (z > lo) & (z < hi) {
                d
            } else {
                T::zero()
            }
        }
    }
}

/// (x, dy) -> [2, C]: per channel sum(g * (x - mean) * inv_std) and sum(g), with g the
/// masked dy.
#[derive(Clone, Debug)]
struct Sums {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    gate: Option<Gate>,
}

impl GradPass for Sums {
    fn channels(&self) -> usize {
        self.mean.len()
    }

    fn pass<T: Real>(&self, [x, dy]: [&[T]; 2], (n, c, inner): (usize, usize, usize)) -> Vec<T> {
        if inner <= small::PLANE {
            let mask = self.gate.as_ref().map(|g| g.spread(c, inner));
            return self.per_channel(small::sums(x, dy, (n, c, inner), mask.as_ref()));
        }
        let totals = channel_totals(n, c, |p| {
            let span = p * inner..(p + 1) * inner;
            let planes = (&x[span.clone()], &dy[span]);
            simd(
                #[inline(always)]
                || match &self.gate {
                    Some(g) => plane_sums(planes, g.channel(p % c)),
                    None => plane_sums(planes, |d, _| d),
                },
            )
        });
        self.per_channel(totals)
    }
}

impl Sums {
    /// [2, C] from the per-channel sum(g * x) and sum(g): sum(g * xhat), then sum(g).
    fn per_channel<T: Real>(&self, totals: Vec<[f64; 2]>) -> Vec<T> {
        let per: Vec<[T; 2]> = totals.into_iter().enumerate().map(|(ch, t)| self.channel(ch, t)).collect();
        per.iter().map(|p| p[0]).chain(per.iter().map(|p| p[1])).collect()
    }

    /// Channel `ch`'s [sum(g * xhat), sum(g)] from its [sum(g * x), sum(g)].
    fn channel<T: Real>(&self, ch: usize, [dx, dd]: [f64; 2]) -> [T; 2] {
        let at = |v: &[f64]| v.get(ch).copied().unwrap_or(0.0);
        [T::real((dx - at(&self.mean) * dd) * at(&self.inv_std)), T::real(dd)]
    }
}

/// Per-channel totals of per-plane values over [N, C, inner]: `plane(p)` for every plane p
/// in storage order (in parallel), then each channel's values added in image order from
/// 0.0. The same sums in the same order as walking each channel's planes, but read as
/// stored: a channel's planes lie an image apart, a page or more for small planes, where
/// the hardware prefetcher does not follow and every plane was a cache miss.
fn channel_totals<const K: usize>(
    n: usize,
    c: usize,
    plane: impl Fn(usize) -> [f64; K] + Sync + Send,
) -> Vec<[f64; K]> {
    let partial: Vec<[f64; K]> = (0..n * c).into_par_iter().with_min_len(16).map(plane).collect();
    let mut totals = vec![[0.0f64; K]; c];
    for image in partial.chunks(c.max(1)) {
        for (t, v) in totals.iter_mut().zip(image) {
            for k in 0..K {
                t[k] += v[k];
            }
        }
    }
    totals
}

/// sum(g * x) and sum(g) over one plane (x, dy), with g = mask(dy, x), in eight lanes of T
/// and then in f64.
#[inline(always)]
fn plane_sums<T: Real>((x, dy): (&[T], &[T]), mask: impl Fn(T, T) -> T) -> [f64; 2] {
    let (mut sx, mut sg) = ([T::zero(); 8], [T::zero(); 8]);
    // Fixed-size chunks: with slices of unknown length the masked loop stayed scalar.
    let ((cx, rx), (cd, rd)) = (x.as_chunks::<8>(), dy.as_chunks::<8>());
    let (mut tx, mut tg) = (T::zero(), T::zero());
    for (&a, &d) in rx.iter().zip(rd) {
        let g = mask(d, a);
        tx += g * a;
        tg += g;
    }
    // Two loops over the plane, not one: with both sums in one loop the compiler paired
    // each lane's two sums in a vector instead of vectorising across lanes, and stayed
    // scalar. The second loop reads the plane from cache.
    for (xa, da) in cx.iter().zip(cd) {
        for i in 0..8 {
            sx[i] += mask(da[i], xa[i]) * xa[i];
        }
    }
    for (xa, da) in cx.iter().zip(cd) {
        for i in 0..8 {
            sg[i] += mask(da[i], xa[i]);
        }
    }
    let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
    [f(sx.iter().copied().sum::<T>() + tx), f(sg.iter().copied().sum::<T>() + tg)]
}

/// o = a * g + b * x + c0 over one plane with batch statistics, else o = a * g; g =
/// mask(dy, x). A mask that ignores x leaves x unread without batch statistics.
#[inline(always)]
fn combine_plane<T: Real>(
    o: &mut [MaybeUninit<T>],
    [dy, x]: [&[T]; 2],
    [a, b, c0]: [T; 3],
    batch: bool,
    mask: impl Fn(T, T) -> T,
) -> usize {
    if batch {
        write_front(o, dy.iter().zip(x), |(&d, &v)| a * mask(d, v) + b * v + c0)
    } else {
        write_front(o, dy.iter().zip(x), |(&d, &v)| a * mask(d, v))
    }
}

/// The two equally shaped contiguous inputs of a gradient pass.
fn two<'a, T: candle_core::WithDType>(s: [&'a CpuStorage; 2], l: [&Layout; 2]) -> candle_core::Result<[&'a [T]; 2]> {
    if l[1].shape() != l[0].shape() {
        return Err(candle_core::Error::Msg("batchnorm gradient: shapes differ".into()));
    }
    Ok([slice(s[0], l[0])?, slice(s[1], l[1])?])
}

/// A backward pass over two equally shaped tensors (x and dy in some order), per element
/// type; `channels` is the channel count it was built for.
trait GradPass: Sync {
    fn channels(&self) -> usize;
    fn pass<T: Real>(&self, inputs: [&[T]; 2], dims: (usize, usize, usize)) -> Vec<T>;

    /// `cpu_fwd` of the pass as a candle op: checks the layouts, runs it on f32 or f64.
    fn cpu(&self, name: &str, s: [&CpuStorage; 2], l: [&Layout; 2]) -> candle_core::Result<CpuStorage> {
        let dims = planes(l[0], self.channels())?;
        super::timing::timed(
            || format!("{name} {:?}", l[0].dims()),
            || match s[0] {
                CpuStorage::F32(_) => Ok(CpuStorage::F32(self.pass(two(s, l)?, dims))),
                CpuStorage::F64(_) => Ok(CpuStorage::F64(self.pass(two(s, l)?, dims))),
                _ => Err(unsupported(name)),
            },
        )
    }
}

impl CustomOp2 for Sums {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = self.cpu(self.name(), [s1, s2], [l1, l2])?;
        Ok((storage, Shape::from((2, self.mean.len()))))
    }
}

/// (dy, x) -> a[c] * g + b[c] * x + c0[c] over channel planes, with g the masked dy; x is
/// read only with batch statistics or a clamp.
#[derive(Clone, Debug)]
struct Combine {
    a: Vec<f64>,
    b: Vec<f64>,
    c0: Vec<f64>,
    batch: bool,
    gate: Option<Gate>,
}

impl GradPass for Combine {
    fn channels(&self) -> usize {
        self.a.len()
    }

    fn pass<T: Real>(&self, [dy, x]: [&[T]; 2], (_, c, inner): (usize, usize, usize)) -> Vec<T> {
        if inner <= small::PLANE {
            let spread = |v: &[f64]| small::spread(c, inner, |ch| T::real(v[ch]));
            let (b, c0) = match self.batch {
                true => (spread(&self.b), spread(&self.c0)),
                false => (Vec::new(), Vec::new()),
            };
            let mask = self.gate.as_ref().map(|g| g.spread(c, inner));
            return small::combine(dy, x, [&spread(&self.a), &b, &c0], mask.as_ref());
        }
        // SAFETY: combine_plane returns write_front's count of the elements it wrote.
        unsafe {
            par_planes(
                dy.len(),
                inner,
                #[inline(always)]
                |p, o| {
                    let span = p * inner..(p * inner + inner).min(dy.len());
                    let (dp, xp) = (&dy[span.clone()], &x[span]);
                    let ch = p % c;
                    let (a, b, c0) = (T::real(self.a[ch]), T::real(self.b[ch]), T::real(self.c0[ch]));
                    match &self.gate {
                        Some(g) => combine_plane(o, [dp, xp], [a, b, c0], self.batch, g.channel(ch)),
                        None => combine_plane(o, [dp, xp], [a, b, c0], self.batch, |d, _| d),
                    }
                },
            )
        }
    }
}

impl CustomOp2 for Combine {
    fn name(&self) -> &'static str {
        "mtpack-batchnorm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.cpu(self.name(), [s1, s2], [l1, l2])?, l1.shape().clone()))
    }
}

/// Per-channel mean and biased variance of x [N, C, ...], as [2, C]; no gradient.
#[derive(Clone, Copy, Debug)]
struct ChannelStats;

impl ChannelStats {
    fn run<T: Real>(x: &[T], (n, c, inner): (usize, usize, usize)) -> Vec<T> {
        let count = (n * inner).max(1) as f64;
        if inner <= small::PLANE {
            let mean: Vec<f64> = small::moments(x, (n, c, inner), None).iter().map(|s| s / count).collect();
            let m = small::spread(c, inner, |ch| T::real(mean[ch]));
            let var = small::moments(x, (n, c, inner), Some(&m));
            return mean
                .iter()
                .chain(&var)
                .enumerate()
                .map(|(i, &v)| T::real(if i < c { v } else { v / count }))
                .collect();
        }
        let per: Vec<(T, T)> = (0..c).into_par_iter().map(|ch| Self::channel(x, (n, c, inner), ch)).collect();
        per.iter().map(|p| p.0).chain(per.iter().map(|p| p.1)).collect()
    }

    /// Mean and biased variance of channel `ch` of large planes, its planes read one after
    /// another (the second pass from cache).
    fn channel<T: Real>(x: &[T], (n, c, inner): (usize, usize, usize), ch: usize) -> (T, T) {
        let count = (n * inner).max(1) as f64;
        let plane = |b: usize| &x[(b * c + ch) * inner..][..inner];
        let total = |f: &dyn Fn(&[T]) -> T| (0..n).map(|b| f(plane(b)).to_f64().unwrap_or(f64::NAN)).sum::<f64>();
        let mean = simd(
            #[inline(always)]
            || total(&|p| lanes_sum(p)) / count,
        );
        let m = T::real(mean);
        let var = simd(
            #[inline(always)]
            || total(&|p| super::lanes_sum_sq_dev(p, m)) / count,
        );
        (T::real(mean), T::real(var))
    }
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "mtpack-channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = planes(l, l.shape().dims().get(1).copied().unwrap_or(0))?;
        let shape = Shape::from((2, dims.1));
        let storage = super::timing::timed(
            || format!("{} {:?}", self.name(), l.dims()),
            || match s {
                CpuStorage::F32(_) => Ok(CpuStorage::F32(Self::run(slice::<f32>(s, l)?, dims))),
                CpuStorage::F64(_) => Ok(CpuStorage::F64(Self::run(slice::<f64>(s, l)?, dims))),
                _ => Err(unsupported(self.name())),
            },
        )?;
        Ok((storage, shape))
    }
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()
}

/// Inference-statistics batch normalisation over axis 1, then `clamp`; differentiable in
/// x, scale and bias.
pub fn batch_norm(
    x: &Tensor,
    [scale, bias, mean, var]: [&Tensor; 4],
    eps: f64,
    clamp: Option<Clamp>,
) -> candle_core::Result<Tensor> {
    let inv_std = host(var)?.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let op = Normalise { mean: host(mean)?, inv_std, clamp, batch: false };
    x.contiguous()?.apply_op3(&scale.contiguous()?, &bias.contiguous()?, op)
}

/// Training-mode batch normalisation, then `clamp`: normalises with the batch's statistics
/// and returns them too (mean and biased variance, each [C]) for the running averages.
pub fn batch_norm_train(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    eps: f64,
    clamp: Option<Clamp>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let inner = x.dims().get(2..).map_or(1, |d| d.iter().product::<usize>());
    if inner >= forward::PLANE && x.device().is_cpu() {
        return forward::batch_norm_train(&x, [scale, bias], eps, clamp);
    }
    batch_norm_train_two_ops(&x, scale, bias, eps, clamp)
}

/// [`batch_norm_train`] as the statistics, then the normalisation over the whole tensor.
fn batch_norm_train_two_ops(
    x: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
    eps: f64,
    clamp: Option<Clamp>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let stats = x.detach().apply_op1_no_bwd(&ChannelStats)?;
    let (mean_t, var_t) = (stats.get(0)?, stats.get(1)?);
    let op = Normalise::with_batch_statistics(&mean_t, &var_t, eps, clamp)?;
    let y = x.apply_op3(&scale.contiguous()?, &bias.contiguous()?, op)?;
    Ok((y, mean_t, var_t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::DType;

    fn reference(x: &Tensor, [scale, bias, mean, var]: [&Tensor; 4]) -> Tensor {
        let r = |t: &Tensor| t.reshape((1, t.elem_count(), 1, 1)).unwrap();
        x.broadcast_sub(&r(mean))
            .unwrap()
            .broadcast_div(&r(&(var + 1e-5).unwrap().sqrt().unwrap()))
            .unwrap()
            .broadcast_mul(&r(scale))
            .unwrap()
            .broadcast_add(&r(bias))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// One shape per path: planes of 20 elements, of 4 (the small-plane passes) and of
    /// 130 (the channel-by-channel backward pass).
    const SHAPES: [[usize; 4]; 3] = [[2, 3, 4, 5], [3, 3, 2, 2], [2, 3, 10, 13]];

    #[test]
    fn batch_norm_matches_the_formula_and_its_gradients() {
        for shape in SHAPES {
            batch_norm_matches_on(&shape);
        }
    }

    fn batch_norm_matches_on(shape: &[usize]) {
        let x = seeded(shape, 1, DType::F64);
        let (scale, bias) = (seeded(&[3], 2, DType::F64), seeded(&[3], 3, DType::F64));
        let mean = seeded(&[3], 4, DType::F64);
        let var = (seeded(&[3], 5, DType::F64).abs().unwrap() + 0.5).unwrap();
        let y = batch_norm(&x, [&scale, &bias, &mean, &var], 1e-5, None).unwrap();
        let want = reference(&x, [&scale, &bias, &mean, &var]);
        assert!(max_diff(&y, &want) < 1e-12);
        let clamp = Some(Clamp { lo: -0.2, hi: 0.3 });
        let y = batch_norm(&x, [&scale, &bias, &mean, &var], 1e-5, clamp).unwrap();
        assert!(max_diff(&y, &want.clamp(-0.2, 0.3).unwrap()) < 1e-12);
        for clamp in [None, clamp] {
            check_gradients(
                &[x.clone(), scale.clone(), bias.clone()],
                |v| batch_norm(&v[0], [&v[1], &v[2], &mean, &var], 1e-5, clamp),
                1e-6,
            )
            .unwrap();
        }
    }

    #[test]
    fn training_batch_norm_gradients_include_the_batch_statistics() {
        for shape in SHAPES {
            training_batch_norm_on(&shape);
        }
    }

    fn training_batch_norm_on(shape: &[usize]) {
        let x = seeded(shape, 7, DType::F64);
        let (scale, bias) = (seeded(&[3], 8, DType::F64), seeded(&[3], 9, DType::F64));
        let (y, mean, var) = batch_norm_train(&x, &scale, &bias, 1e-5, None).unwrap();
        // The statistics are the batch's: the output is the formula with them.
        let want = reference(&x, [&scale, &bias, &mean, &var]);
        assert!(max_diff(&y, &want) < 1e-12);
        let m: Vec<f64> = x.transpose(0, 1).unwrap().flatten_from(1).unwrap().mean(1).unwrap().to_vec1().unwrap();
        let got: Vec<f64> = mean.to_vec1().unwrap();
        assert!(m.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-12));
        for clamp in [None, Some(Clamp { lo: 0.0, hi: 0.5 })] {
            check_gradients(
                &[x.clone(), scale.clone(), bias.clone()],
                |t| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-5, clamp)?.0),
                1e-6,
            )
            .unwrap();
        }
    }

    /// The statistics themselves (the tests above check outputs and gradients against
    /// the statistics returned), in float32, on both paths.
    #[test]
    fn float32_statistics_match_candle_on_small_and_large_planes() {
        for shape in [[32usize, 96, 2, 2], [32, 96, 4, 4], [8, 16, 8, 8]] {
            let x = ((seeded(&shape, 11, DType::F32) * 2.0).unwrap() + 3.0).unwrap();
            let (scale, bias) = (seeded(&shape[1..2], 12, DType::F32), seeded(&shape[1..2], 13, DType::F32));
            let (_, mean, var) = batch_norm_train(&x, &scale, &bias, 1e-5, Some(Clamp { lo: 0.0, hi: 6.0 })).unwrap();
            let xt = x.transpose(0, 1).unwrap().flatten_from(1).unwrap();
            let m = xt.mean_keepdim(1).unwrap();
            let v = xt.broadcast_sub(&m).unwrap().sqr().unwrap().mean(1).unwrap();
            let (m, v): (Vec<f32>, Vec<f32>) = (m.flatten_all().unwrap().to_vec1().unwrap(), v.to_vec1().unwrap());
            let (gm, gv): (Vec<f32>, Vec<f32>) = (mean.to_vec1().unwrap(), var.to_vec1().unwrap());
            for ch in 0..shape[1] {
                assert!((m[ch] - gm[ch]).abs() < 1e-4, "{shape:?} mean {ch}: {} vs {}", gm[ch], m[ch]);
                assert!((v[ch] - gv[ch]).abs() < 1e-4, "{shape:?} var {ch}: {} vs {}", gv[ch], v[ch]);
            }
        }
    }
}
