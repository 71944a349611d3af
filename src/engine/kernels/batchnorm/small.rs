//! BatchNormalization's passes over small planes (4x4 and smaller, such as [N, 960, 2, 2]
//! deep in a MobileNetV2 at 64x64), an image at a time. Plane by plane, each channel's
//! few elements cost a coefficient lookup, a loop set-up and a task of their own, which made
//! these layers cost two to six times more per element than large planes. Here the
//! per-channel coefficients are spread over an image's [C, inner] elements once per call,
//! and every pass is one long loop over contiguous images.

use rayon::prelude::*;

use super::super::{par_planes, simd, write_front, Real};

/// Planes of at most this many elements take the per-image passes.
pub(super) const PLANE: usize = 16;

/// `per(ch)` for each element of an image [c, inner].
pub(super) fn spread<T: Copy>(c: usize, inner: usize, per: impl Fn(usize) -> T) -> Vec<T> {
    (0..c).flat_map(|ch| std::iter::repeat_n(per(ch), inner)).collect()
}

/// Per-channel affine maps (k, b) spread over an image [c, inner]: [k, b].
pub(super) fn spread_affine<T: Copy>(inner: usize, kb: &[(T, T)]) -> [Vec<T>; 2] {
    let c = kb.len();
    [spread(c, inner, |ch| kb[ch].0), spread(c, inner, |ch| kb[ch].1)]
}

/// The clamp's gradient mask per element: dy passes where lo < x * k + b < hi, z computed
/// as the forward pass computed it.
pub(super) struct Mask<T> {
    pub k: Vec<T>,
    pub b: Vec<T>,
    pub lo: T,
    pub hi: T,
}

/// y = clamp(x * k + b) per element, images [len] at a time, with `k` and `b` spread.
pub(super) fn normalise<T: Real>(x: &[T], [k, b]: [&[T]; 2], clamp: Option<(T, T)>) -> Vec<T> {
    let len = k.len().max(1);
    // SAFETY: write_front returns the count it wrote.
    unsafe {
        par_planes(
            x.len(),
            len,
            #[inline(always)]
            |i, y| {
                let terms = x[i * len..].iter().zip(k).zip(b);
                match clamp {
                    // The same max/min as the plane kernel and the Clip kernel.
                    Some((lo, hi)) => write_front(y, terms, |((&v, &k), &b)| super::super::clamp_to(v * k + b, lo, hi)),
                    None => write_front(y, terms, |((&v, &k), &b)| v * k + b),
                }
            },
        )
    }
}

/// dx = a * g + b * x + c0 per element (b and c0 only with batch statistics), g the masked
/// dy; the coefficients spread over an image.
pub(super) fn combine<T: Real>(dy: &[T], x: &[T], [a, b, c0]: [&[T]; 3], mask: Option<&Mask<T>>) -> Vec<T> {
    let len = a.len().max(1);
    let batch = !b.is_empty();
    // SAFETY: write_front returns the count it wrote.
    unsafe {
        par_planes(
            dy.len(),
            len,
            #[inline(always)]
            |i, o| {
                let (d, v) = (&dy[i * len..], &x[i * len..]);
                match (mask, batch) {
                    (Some(m), true) => {
                        write_front(o, gated(d, v, m).zip(v).zip(a).zip(b).zip(c0), |((((g, &v), &a), &b), &c)| {
                            a * g + b * v + c
                        })
                    }
                    (Some(m), false) => write_front(o, gated(d, v, m).zip(a), |(g, &a)| a * g),
                    (None, true) => {
                        write_front(o, d.iter().zip(v).zip(a).zip(b).zip(c0), |((((&g, &v), &a), &b), &c)| {
                            a * g + b * v + c
                        })
                    }
                    (None, false) => write_front(o, d.iter().zip(a), |(&g, &a)| a * g),
                }
            },
        )
    }
}

/// The masked dy of one image.
#[inline(always)]
fn gated<'a, T: Real>(dy: &'a [T], x: &'a [T], m: &'a Mask<T>) -> impl Iterator<Item = T> + 'a {
    dy.iter().zip(x).zip(&m.k).zip(&m.b).map(|(((&d, &v), &k), &b)| {
        let z = v * k + b;
        // `&`, not `&&`: without a branch the loop vectorises.
        if (z > m.lo) & (z < m.hi) {
            d
        } else {
            T::zero()
        }
    })
}

/// Per channel sum(g * x) and sum(g) over [n, c, inner], g the masked dy.
pub(super) fn sums<T: Real>(
    x: &[T],
    dy: &[T],
    (n, c, inner): (usize, usize, usize),
    mask: Option<&Mask<T>>,
) -> Vec<[f64; 2]> {
    let len = c * inner;
    totals::<T, 2>(n, c, inner, |i, acc| {
        let (xi, di) = (&x[i * len..][..len], &dy[i * len..][..len]);
        let (sx, sg) = acc.split_at_mut(len);
        match mask {
            Some(m) => {
                for (((sx, sg), g), &v) in sx.iter_mut().zip(sg.iter_mut()).zip(gated(di, xi, m)).zip(xi) {
                    *sx += g * v;
                    *sg += g;
                }
            }
            None => {
                for (((sx, sg), &g), &v) in sx.iter_mut().zip(sg.iter_mut()).zip(di).zip(xi) {
                    *sx += g * v;
                    *sg += g;
                }
            }
        }
    })
}

/// Per channel sum(x) (K = 1) or sum((x - m)^2) given the spread means `m`.
pub(super) fn moments<T: Real>(x: &[T], (n, c, inner): (usize, usize, usize), m: Option<&[T]>) -> Vec<f64> {
    let len = c * inner;
    let t = totals::<T, 1>(n, c, inner, |i, acc| {
        let xi = &x[i * len..][..len];
        match m {
            Some(m) => {
                for ((a, &v), &m) in acc.iter_mut().zip(xi).zip(m) {
                    *a += (v - m) * (v - m);
                }
            }
            None => {
                for (a, &v) in acc.iter_mut().zip(xi) {
                    *a += v;
                }
            }
        }
    });
    t.into_iter().map(|[v]| v).collect()
}

/// Per-channel totals of K values per element over [n, c, inner]: `add(image, acc)` adds
/// an image's values into `acc` [K, c * inner]. Units of images fixed by n accumulate in T,
/// each channel's elements then go to f64, and the units are added in order: the totals do
/// not depend on the thread count.
fn totals<T: Real, const K: usize>(
    n: usize,
    c: usize,
    inner: usize,
    add: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<[f64; K]> {
    let (len, unit) = (c * inner, n.div_ceil(8).max(1));
    let partial = |u: usize| -> Vec<[f64; K]> {
        let mut acc = vec![T::zero(); K * len];
        simd(
            #[inline(always)]
            || {
                // A `for` loop, not `for_each`: the fold behind `for_each` was compiled
                // outside this wide function, as scalar code.
                for i in u * unit..((u + 1) * unit).min(n) {
                    add(i, &mut acc);
                }
            },
        );
        let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
        (0..c)
            .map(|ch| std::array::from_fn(|k| acc[k * len + ch * inner..][..inner].iter().map(|&v| f(v)).sum()))
            .collect()
    };
    let partials: Vec<Vec<[f64; K]>> = (0..n.div_ceil(unit)).into_par_iter().map(partial).collect();
    let mut out = vec![[0.0; K]; c];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            for k in 0..K {
                o[k] += v[k];
            }
        }
    }
    out
}
