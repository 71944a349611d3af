//! Working buffers of the convolution kernels, kept per thread, and copies of short rows.
//!
//! A pointwise convolution on a small feature map gathers the columns of several images
//! side by side (see `conv2d`), in buffers that were allocated and zeroed for every unit of
//! images: a memset pass and an allocation each time, 3-4% of a MobileNetV2 step's samples
//! at 3x64x64. Kept per thread, a buffer is allocated once and never zeroed again: every
//! user overwrites what it reads. Rows of 2x2 and 4x4 maps (16 and 64 bytes) were copied
//! by a library call each, whose overhead was most of the copy; [`copy_row`] copies the
//! short sizes inline.

use std::any::Any;
use std::cell::RefCell;

use super::Real;

/// Largest buffer kept between calls, in elements; larger ones are allocated per call.
const KEEP: usize = 1 << 22;

thread_local! {
    // Two buffers per element type (a kernel needs at most two at once).
    static KEPT: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with two buffers of `lens` elements whose contents are unspecified (values a
/// previous call left): `f` must write every element it reads. Reuses this thread's kept
/// buffers, or fresh ones when they are in use or the sizes are over [`KEEP`].
pub(super) fn with_buffers<T: Real, R>(lens: [usize; 2], f: impl FnOnce(&mut [T], &mut [T]) -> R) -> R {
    let taken = (lens[0].max(lens[1]) <= KEEP).then(|| KEPT.with(|k| take::<T>(&mut k.borrow_mut()))).flatten();
    let [mut a, mut b] = taken.unwrap_or_default();
    for (buf, &len) in [&mut a, &mut b].into_iter().zip(&lens) {
        if buf.len() < len {
            buf.resize(len, T::zero());
        }
    }
    let out = f(&mut a[..lens[0]], &mut b[..lens[1]]);
    if a.len() <= KEEP && b.len() <= KEEP {
        KEPT.with(|k| k.borrow_mut().push(Box::new([a, b])));
    }
    out
}

/// Removes and returns this thread's kept pair of `T` buffers, if any.
fn take<T: Real>(kept: &mut Vec<Box<dyn Any>>) -> Option<[Vec<T>; 2]> {
    let at = kept.iter().position(|b| b.is::<[Vec<T>; 2]>())?;
    kept.swap_remove(at).downcast::<[Vec<T>; 2]>().ok().map(|b| *b)
}

/// Copies `src` into the front of `dst`, with the lengths of small feature-map rows
/// (1, 4, 9, 16, 49 and 64 elements: 1x1 to 8x8 maps) as fixed-size copies the compiler
/// inlines.
#[inline(always)]
pub(super) fn copy_row<T: Copy>(dst: &mut [T], src: &[T]) {
    #[inline(always)]
    fn fixed<T: Copy, const N: usize>(dst: &mut [T], src: &[T]) {
        dst[..N].copy_from_slice(&src[..N]);
    }
    match src.len() {
        1 => fixed::<T, 1>(dst, src),
        4 => fixed::<T, 4>(dst, src),
        9 => fixed::<T, 9>(dst, src),
        16 => fixed::<T, 16>(dst, src),
        49 => fixed::<T, 49>(dst, src),
        64 => fixed::<T, 64>(dst, src),
        n => dst[..n].copy_from_slice(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_per_thread_and_sized_as_asked() {
        let first = with_buffers::<f32, _>([8, 3], |a, b| {
            a.fill(1.0);
            b.fill(2.0);
            (a.len(), b.len(), a.as_ptr() as usize)
        });
        assert_eq!((first.0, first.1), (8, 3));
        // The same allocation comes back, with what the last user left.
        let again = with_buffers::<f32, _>([4, 5], |a, b| (a.as_ptr() as usize, a[0], b.len()));
        assert_eq!(again, (first.2, 1.0, 5));
        // Nested use gets fresh buffers; f64 has its own.
        with_buffers::<f32, _>([2, 2], |a, _| {
            let inner = with_buffers::<f32, _>([2, 2], |b, _| b.as_ptr() as usize);
            assert_ne!(inner, a.as_ptr() as usize);
        });
        assert_eq!(with_buffers::<f64, _>([2, 1], |a, b| a.len() + b.len()), 3);
    }

    #[test]
    fn short_and_long_rows_copy_exactly() {
        for n in [0, 1, 3, 4, 9, 16, 17, 49, 64, 100] {
            let src: Vec<u32> = (0..n as u32).collect();
            let mut dst = vec![u32::MAX; n + 2];
            copy_row(&mut dst, &src);
            assert_eq!(&dst[..n], &src[..], "{n} elements");
            assert_eq!(&dst[n..], &[u32::MAX; 2], "{n}: nothing past the row");
        }
    }
}
