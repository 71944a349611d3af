//! CPU kernels for the ops whose candle versions are too slow or too limited for training
//! real backbones: grouped/depthwise 2-D convolution with asymmetric padding and its
//! gradients, pooling with padding, ceil mode and any stride, BatchNorm with its clamp, and
//! a transformer's row-wise ops (softmax, layer normalisation, GELU, a bias or scale along
//! the last axis). They run as candle custom ops, so autograd sees them like any other op.

/// The error of a kernel given storage other than float32 or float64.
pub(crate) fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op} supports float32 and float64 only"))
}

/// Dispatches a kernel body on the storage's float type (defined before the kernel modules,
/// so they see it without an import): `on_float!(storage, name, |T|
/// body)` runs `body` with `T` the element type and wraps its `Vec<T>` back into storage;
/// other types return the [`unsupported`] error from the enclosing function.
macro_rules! on_float {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
            _ => return Err($crate::engine::kernels::unsupported($name)),
        }
    };
}

/// [`on_float!`] with the kernel's wall time recorded under "<name> <dims of layout>" while
/// [`timing`] is on: `timed_on_float!(storage, name, layout, |T| body)`.
macro_rules! timed_on_float {
    ($s:expr, $name:expr, $l:expr, |$t:ident| $body:expr) => {
        $crate::engine::kernels::timing::timed(
            || format!("{} {:?}", $name, $l.dims()),
            || -> candle_core::Result<candle_core::CpuStorage> { Ok(on_float!($s, $name, |$t| $body)) },
        )?
    };
}

/// Which implementation an op takes: mtpack's CPU kernels, or compositions of candle's own
/// ops that run on any device ([`crate::engine::portable`]). A CUDA engine always runs the
/// portable ones; a CPU engine can be told to (`--kernels portable`), which is how the
/// computation a GPU does is checked on a machine without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// mtpack's kernels on the CPU, the portable ones elsewhere.
    #[default]
    Native,
    /// candle's ops on every device.
    Portable,
}

thread_local! {
    // Set for the span of one engine forward pass on the thread that runs it (the op
    // dispatch; the kernels' worker threads never choose).
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether an op on `t` takes mtpack's CPU kernel.
pub fn native(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && !PORTABLE.with(std::cell::Cell::get)
}

/// The arithmetic of the linear layers' matrix products (`--precision`): a transformer's
/// MatMuls. Everything else (convolutions, whose products are bound by memory rather than
/// arithmetic here; normalisation, activations, the loss, the weights and optimizer state)
/// stays f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32, on AMX tiles (CPUs with AMX-BF16 only).
    Bf16,
}

impl Precision {
    /// An error naming what is missing when this machine cannot compute at `self`.
    pub fn check_available(self) -> Result<(), String> {
        match self {
            Precision::Bf16 if !amx::available() => Err("--precision bf16 needs a CPU with AMX-BF16 (Intel Xeon \
                 4th generation or later) and a Linux kernel that grants its tiles; this one has none"
                .into()),
            _ => Ok(()),
        }
    }
}

thread_local! {
    // Set, like PORTABLE, for the span of an engine forward pass; a matrix product records it
    // in its op so that its backward pass computes at the same precision.
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
}

/// The precision of matrix products chosen on this thread.
pub fn precision() -> Precision {
    PRECISION.with(std::cell::Cell::get)
}

/// Runs `f` with matrix products at `p` on this thread, restoring the previous choice after.
pub fn with_precision<R>(p: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|c| c.replace(p)));
    f()
}

/// Runs `f` with the portable implementations chosen on this thread (or not), restoring the
/// previous choice after.
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PORTABLE.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PORTABLE.with(|p| p.replace(k == Kernels::Portable)));
    f()
}

pub mod amx;
pub mod batchnorm;
pub mod conv2d;
mod depthwise;
mod depthwise_small;
pub mod matmul_bf16;
pub mod pointwise;
pub mod pool2d;
pub mod rows;
mod scratch;
pub mod timing;

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// min(max(v, lo), hi) as two comparisons, the clamp every kernel applies (Clip, ReLU6 and
/// those folded into BatchNormalization): one vector max and one min, where `Float::max`
/// and `min` (IEEE maxNum, NaN-aware) kept the loops around them scalar in places (the fused
/// BatchNormalization-depthwise kernel's stride-2 fill: 19.5 against 15.6 ms on a
/// [16, 96, 112, 112] input). A NaN becomes `lo`, as `Float::max` made it; a -0 equal to
/// `lo` = 0 becomes `lo`.
#[inline(always)]
pub(crate) fn clamp_to<T: PartialOrd + Copy>(v: T, lo: T, hi: T) -> T {
    let v = if v > lo { v } else { lo };
    if v < hi {
        v
    } else {
        hi
    }
}

/// Element types the kernels run on: f32 for training, f64 for gradient checks.
pub trait Real:
    num_traits::Float + std::iter::Sum + Send + Sync + Default + std::ops::AddAssign + 'static + std::fmt::Debug
{
    fn real(v: f64) -> Self;
    /// The error function: to full precision in f64 (gradient checks), by a rational
    /// approximation within a few float32 ulps in f32 (GELU's hot loop).
    fn erf(self) -> Self;
    /// e^x: the library's in f64 (gradient checks); in f32 a branch-free polynomial within
    /// 2 ulps whose loops vectorise (softmax, GELU's gradient), where `f32::exp` is a
    /// library call per element.
    fn exp_fast(self) -> Self;
    /// The magnitude below which [`Real::flush_tiny`] writes 0.
    const TINY: Self;
    /// 0 where |self| is below [`Real::TINY`], else self (a compare and a select, so loops
    /// around it still vectorise). See `TINY_F32`.
    #[inline(always)]
    fn flush_tiny(self) -> Self {
        if self.abs() < Self::TINY {
            Self::zero()
        } else {
            self
        }
    }
}

/// Below this magnitude (2^-100) the kernels that can write near-subnormal values (GELU and
/// its gradient, softmax and its gradient: products with a density or an exponential that
/// underflows) write 0. A subnormal operand costs the CPU a microcode assist per
/// instruction: a matrix product whose operand held 2.4% subnormals (ViT-S/14's first GELU
/// gradient, as fc1's weight-gradient operand) took 434 ms where the same product without
/// them takes 7. Flushing exactly the subnormals would not be enough: the next op may scale
/// (attention's 1/8, a layer scale) and push values just above 2^-126 below it, so the bound
/// keeps 26 binades of margin. The MXCSR flush-to-zero bits would do it everywhere, but Rust
/// code must not change the floating-point environment. A value this small moves no float32
/// sum of training's activations or gradients, which are many binades larger.
const TINY_F32: f32 = f32::from_bits((127 - 100) << 23);

impl Real for f32 {
    const TINY: Self = TINY_F32;

    fn real(v: f64) -> Self {
        v as f32
    }

    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }

    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Real for f64 {
    /// f64's own margin above its subnormals (2^-1000): gradient checks in f64 see no flush.
    const TINY: Self = f64::from_bits((1023 - 1000) << 52);
    fn real(v: f64) -> Self {
        v
    }

    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }

    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// erf(x) in float32 as the ratio of an odd degree-13 and an even degree-8 polynomial on
/// [-4, 4] (beyond, erf is 1 to float32 precision): no branch and no library call, so the
/// loop around it vectorises.
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn erf_f32(v: f32) -> f32 {
    let x = v.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_258_013_06e-10 + 2.770_681_428_959_02e-08;
    for a in [
        -2.101_024_020_825_08e-06,
        -5.692_506_394_623_46e-05,
        -7.349_906_303_268_55e-04,
        -2.954_599_808_540_25e-03,
        -1.609_603_332_624_15e-02,
    ] {
        p = p * x2 + a;
    }
    let mut q = x2 * -1.456_607_184_649_96e-05 + -2.133_740_552_789_05e-04;
    for b in [-1.682_826_974_382_03e-03, -7.373_329_167_204_68e-03, -1.426_473_905_141_89e-02] {
        q = q * x2 + b;
    }
    x * p / q
}

/// e^x in float32 (Cephes' expf): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by a degree-7
/// polynomial, 2^n put into the exponent bits. n is rounded by adding 1.5 * 2^23 (the float's
/// low mantissa bits then hold n), so nothing in it is a call or a branch. Inputs are clamped
/// to where 2^n is a normal float: below -87.3 the result is 2^-126 rather than 0 (softmax's
/// and the normal density's smallest terms, far below any sum they enter).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn exp_f32(v: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = v.clamp(-87.3, 88.3);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts, the first exact in float32, so n * ln 2 is subtracted without loss.
    let r = x - n * 0.693_359_375 - n * -2.121_944_400_546_905_8e-4;
    let mut p = 1.987_569_150_0e-4_f32;
    for c in [1.398_199_950_7e-3, 8.333_451_907_3e-3, 4.166_579_589_4e-2, 1.666_666_545_9e-1, 5.000_000_120_1e-1] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // n is in [-126, 127] after the clamp, so n + 127 is a valid biased exponent.
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// The contiguous slice of a storage for a layout; kernels require contiguous inputs.
pub fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => data.get(start..end).ok_or_else(|| candle_core::Error::Msg("layout out of range".into())),
        None => Err(candle_core::Error::RequiresContiguous { op: "mtpack kernel" }),
    }
}

/// The contiguous part of a destination's data for a layout (in-place ops write there).
pub fn slice_mut<'a, T>(data: &'a mut [T], l: &Layout) -> candle_core::Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => {
            data.get_mut(start..end).ok_or_else(|| candle_core::Error::Msg("layout out of range".into()))
        }
        None => Err(candle_core::Error::RequiresContiguous { op: "mtpack in-place kernel" }),
    }
}

/// Elements per part of an elementwise in-place update split over the pool (16 KiB of
/// float32 per operand): smaller tensors (biases, BatchNorm, most early weights) are one
/// part, updated on the calling thread.
const UPDATE_PART: usize = 1 << 12;

/// Runs `f(start, part)` over consecutive parts of `dst` in parallel, `start` being the
/// part's offset in `dst`. For elementwise updates only: each element's result does not
/// depend on how the tensor is split or which thread runs which part, so it is the same on
/// any number of threads. SGD's and EWC's steps ran on one thread over every weight after
/// each training step (2.7 and 2.1 ms of a 76 ms MobileNetV2 step at 3x64x64).
pub fn par_update<T: Send>(dst: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if dst.len() <= UPDATE_PART {
        f(0, dst);
        return;
    }
    dst.par_chunks_mut(UPDATE_PART).enumerate().for_each(|(i, part)| f(i * UPDATE_PART, part));
}

/// The elements of `s` beside a part of [`par_update`] (`start`, `len`); empty where `s` is
/// shorter, which callers rule out by checking lengths first.
pub fn beside<T>(s: &[T], start: usize, len: usize) -> &[T] {
    s.get(start..start + len).unwrap_or(&[])
}

/// Whether an in-place CPU pass may update `w` reading `others`: all contiguous CPU float32
/// or float64 tensors of `w`'s type (otherwise callers take their tensor expressions).
pub fn in_place_cpu(w: &candle_core::Tensor, others: &[&candle_core::Tensor]) -> bool {
    let float = matches!(w.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    let like_w = |t: &candle_core::Tensor| t.dtype() == w.dtype() && t.is_contiguous() && t.device().is_cpu();
    float && like_w(w) && others.iter().all(|t| like_w(t))
}

/// Runs `f` compiled for AVX2 where the CPU has it, else as built. The binary targets the
/// x86-64 baseline (SSE2), so without this the kernels' loops run four floats wide; `f` and
/// what it calls must be inlined into it (`#[inline(always)]`, closures included: a closure
/// left out of line is compiled for the baseline) for the wider code to apply. Only the
/// vector width changes, never the order of operations (Rust never fuses a multiply and an
/// add on its own), so results are identical either way.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { wide(f) };
        }
    }
    f()
}

/// [`simd`] with AVX-512 where the CPU has it, for kernels bound by arithmetic rather than
/// memory (GELU's erf and exp, softmax's exp): GELU's gradient over ViT-S/14's fc1 output
/// took 1.7 ms against 3.3 with AVX2. The passes over memory stay on [`simd`]: with AVX-512
/// MobileNetV2's BatchNorm and depthwise kernels made its step no faster (75-78 ms against
/// 74-75). The same results on every path, as for [`simd`].
#[inline(always)]
pub(crate) fn simd_widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn widest<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { widest(f) };
        }
    }
    simd(f)
}

/// A vector of `n` elements written chunk by chunk in parallel, without the zeroing pass
/// of `vec![0; n]` (memset was ~8% of a MobileNetV2 training step). `write(i, chunk)` fills
/// the i-th chunk of `chunk` elements (the last may be shorter) from the front and returns
/// how many it wrote; anything it left is set to zero here.
///
/// # Safety
/// `write` must initialise the first `k` elements of its chunk, `k` being the count it
/// returns (a larger count than it wrote would make the vector expose uninitialised memory).
pub(crate) unsafe fn par_written<T: Real>(
    n: usize,
    chunk: usize,
    write: impl Fn(usize, &mut [MaybeUninit<T>]) -> usize + Sync + Send,
) -> Vec<T> {
    // SAFETY: the same contract.
    unsafe { par_written_with(n, chunk, |i, c| (write(i, c), ())).0 }
}

/// [`par_written`] whose writer also returns a value per chunk (a partial sum, say): the
/// values come back in chunk order, whatever order the threads ran the chunks in.
///
/// # Safety
/// As [`par_written`].
pub(crate) unsafe fn par_written_with<T: Real, R: Send>(
    n: usize,
    chunk: usize,
    write: impl Fn(usize, &mut [MaybeUninit<T>]) -> (usize, R) + Sync + Send,
) -> (Vec<T>, Vec<R>) {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let values = v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| {
            let (done, value) = write(i, c);
            let done = done.min(c.len());
            c[done..].iter_mut().for_each(|e| {
                e.write(T::zero());
            });
            value
        })
        .collect();
    // SAFETY: the chunks cover all n elements; in each, `write` initialised the first `done`
    // (it writes from the front and counts what it wrote) and the rest were zeroed above.
    unsafe { v.set_len(n) };
    (v, values)
}

/// A custom op's second output (a candle custom op returns one tensor): `cpu_fwd` puts it,
/// the caller takes it once the op has run.
#[derive(Default)]
pub(crate) struct SideOutput(std::sync::Mutex<Option<candle_core::CpuStorage>>);

impl SideOutput {
    pub(crate) fn holding(s: Option<candle_core::CpuStorage>) -> SideOutput {
        SideOutput(std::sync::Mutex::new(s))
    }

    pub(crate) fn put(&self, s: candle_core::CpuStorage, op: &str) -> candle_core::Result<()> {
        let mut slot = self.0.lock().map_err(|_| candle_core::Error::Msg(format!("{op}: lock")))?;
        *slot = Some(s);
        Ok(())
    }

    pub(crate) fn take(&self) -> Option<candle_core::CpuStorage> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }

    /// The output as a float tensor of `shape` on `device`; an error naming `op` if the op
    /// left none.
    pub(crate) fn take_tensor(
        &self,
        shape: impl Into<candle_core::Shape>,
        device: &candle_core::Device,
        op: &str,
    ) -> candle_core::Result<candle_core::Tensor> {
        let missing = || candle_core::Error::Msg(format!("{op}: no second output"));
        match self.take().ok_or_else(missing)? {
            candle_core::CpuStorage::F32(v) => candle_core::Tensor::from_vec(v, shape, device),
            candle_core::CpuStorage::F64(v) => candle_core::Tensor::from_vec(v, shape, device),
            _ => Err(missing()),
        }
    }
}

/// The element-wise sum of `parts` [len] added in their order from zeros: with parts fixed
/// by the batch size, the total does not depend on the thread count.
pub(crate) fn sum_in_order<T: Real>(parts: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut total = vec![T::zero(); len];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    total
}

/// `a` [rows, cols] as [cols, rows].
#[inline(always)]
pub(crate) fn transposed<T: Real>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::zero(); rows * cols];
    let Some(a) = a.get(..rows * cols) else { return t };
    // Eight rows side by side: each column's eight values are stored as one run, where a
    // row at a time stored every value on its own, a row of `t` apart (scalar stores were
    // most of the small-map depthwise layers' transposes).
    let blocks = a.chunks_exact(8 * cols.max(1));
    let rest = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        let src: [&[T]; 8] = std::array::from_fn(|j| &block[j * cols..][..cols]);
        for col in 0..cols {
            let run = &mut t[col * rows + 8 * b..][..8];
            for (j, d) in run.iter_mut().enumerate() {
                *d = src[j][col];
            }
        }
    }
    let first = rows - rest.len() / cols.max(1);
    for (r, row) in rest.chunks_exact(cols.max(1)).enumerate() {
        for (col, &v) in row.iter().enumerate() {
            t[col * rows + first + r] = v;
        }
    }
    t
}

/// [`par_written`] over planes of `inner` elements: `write(p, plane)` writes plane `p` from
/// the front and returns how many it wrote. Small planes are grouped, so that a task and a
/// call into the wide code (see [`simd`]) cover at least [`PLANE_GROUP`] elements: one
/// per 2x2 plane cost several times the plane's own arithmetic. `write` must be
/// `#[inline(always)]` for the wide code to reach it.
///
/// # Safety
/// As [`par_written`]: `write` must initialise the first `k` elements of its plane, `k`
/// being the count it returns.
pub(crate) unsafe fn par_planes<T: Real>(
    n: usize,
    inner: usize,
    write: impl Fn(usize, &mut [MaybeUninit<T>]) -> usize + Sync + Send,
) -> Vec<T> {
    let inner = inner.max(1);
    let per = (PLANE_GROUP / inner).max(1);
    // SAFETY: each group's count is the sum of its planes' counts up to the first plane left
    // short, so it covers exactly the group's written front.
    unsafe {
        par_written(n, per * inner, |i, group| {
            simd(
                #[inline(always)]
                || {
                    let mut done = 0;
                    for (j, plane) in group.chunks_mut(inner).enumerate() {
                        let wrote = write(i * per + j, plane).min(plane.len());
                        done += wrote;
                        if wrote < plane.len() {
                            break;
                        }
                    }
                    done
                },
            )
        })
    }
}

/// Elements per task of [`par_planes`] at least (one plane when planes are larger).
const PLANE_GROUP: usize = 2048;

/// [`par_written`] for chunk writers that fill their whole chunk or fail: the first error
/// is returned (its chunk, and any other failed one, left zeroed and then dropped).
///
/// # Safety
/// When `fill` returns `Ok`, it must have initialised every element of its chunk.
pub(crate) unsafe fn par_filled<T: Real>(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) -> candle_core::Result<()> + Sync + Send,
) -> candle_core::Result<Vec<T>> {
    let failed = std::sync::Mutex::new(None);
    // SAFETY: a chunk counts as written only when `fill` succeeded, which by this function's
    // contract means it initialised all of it; a failed one reports 0 and is zeroed.
    let v = unsafe {
        par_written(n, chunk, |i, c| match fill(i, c) {
            Ok(()) => c.len(),
            Err(e) => {
                if let Ok(mut f) = failed.lock() {
                    f.get_or_insert(e);
                }
                0
            }
        })
    };
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(v),
    }
}

/// Writes `f(item)` into the front of `out` for each item; returns how many were written.
#[inline(always)]
pub(crate) fn write_front<T, I>(
    out: &mut [MaybeUninit<T>],
    items: impl Iterator<Item = I>,
    f: impl Fn(I) -> T,
) -> usize {
    out.iter_mut().zip(items).map(|(o, i)| o.write(f(i))).count()
}

/// Sums `f(a[i], b[i])` in eight independent lanes, so that the loop vectorises (the
/// compiler may not reassociate one serial float sum).
#[inline(always)]
pub(crate) fn lanes<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += f(xa[i], xb[i]);
        }
    }
    acc.iter().copied().sum::<T>() + tail
}

/// Dot product of two equally long slices, vectorised.
#[inline(always)]
pub(crate) fn lanes_dot<T: Real>(a: &[T], b: &[T]) -> T {
    lanes(a, b, |x, y| x * y)
}

/// Sum of a slice, vectorised.
#[inline(always)]
pub(crate) fn lanes_sum<T: Real>(a: &[T]) -> T {
    lanes(a, a, |x, _| x)
}

/// Sum of squared deviations from `m`, vectorised.
#[inline(always)]
pub(crate) fn lanes_sum_sq_dev<T: Real>(a: &[T], m: T) -> T {
    lanes(a, a, |x, _| (x - m) * (x - m))
}

/// `c (m x n) = [c +] a (m x k) * b (k x n)`, row-major, with optional transposes given as
/// the operands' own storage order. Sizes are checked; a mismatch is an error, never UB.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_trans: bool,
    b: &[T],
    b_trans: bool,
    c: &mut [T],
    accumulate: bool,
) -> candle_core::Result<()> {
    check_gemm(m, n, k, a.len(), b.len(), c.len())?;
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|v| *v = T::zero());
        }
        return Ok(());
    }
    // SAFETY: sizes checked above; `c` is initialised, so reading it to accumulate is fine.
    unsafe { gemm_raw(m, n, k, (a, a_trans), (b, b_trans), c.as_mut_ptr(), accumulate) };
    Ok(())
}

/// `c = a * b` into uninitialised `c`; every one of its first m*n elements is written.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_trans: bool,
    b: &[T],
    b_trans: bool,
    c: &mut [MaybeUninit<T>],
) -> candle_core::Result<()> {
    check_gemm(m, n, k, a.len(), b.len(), c.len())?;
    if k == 0 {
        c[..m * n].iter_mut().for_each(|v| {
            v.write(T::zero());
        });
        return Ok(());
    }
    // SAFETY: sizes checked above; with `accumulate` false gemm writes every element of c
    // without reading it, so c may start uninitialised.
    unsafe { gemm_raw(m, n, k, (a, a_trans), (b, b_trans), c.as_mut_ptr().cast::<T>(), false) };
    Ok(())
}

fn check_gemm(m: usize, n: usize, k: usize, a: usize, b: usize, c: usize) -> candle_core::Result<()> {
    if a < m * k || b < k * n || c < m * n {
        return Err(candle_core::Error::Msg(format!(
            "gemm sizes: a {a} < {m}x{k} or b {b} < {k}x{n} or c {c} < {m}x{n}"
        )));
    }
    Ok(())
}

/// # Safety
/// `a` and `b` hold at least m*k and k*n elements, `c` points to at least m*n writable
/// elements (initialised when `accumulate`), and k > 0 or m*n == 0.
unsafe fn gemm_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    (a, a_trans): (&[T], bool),
    (b, b_trans): (&[T], bool),
    c: *mut T,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Strides (column stride, row stride) of each operand as stored.
    let (a_cs, a_rs) = if a_trans { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_trans { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the caller guarantees the sizes; gemm computes every index from them.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clamp_keeps_float_max_and_min_values_nan_included() {
        let values = [f32::NAN, -7.5, -0.0, 0.0, 1e-40, 3.25, 6.0, 9.0, f32::INFINITY, f32::NEG_INFINITY];
        for (lo, hi) in [(0.0f32, 6.0f32), (-0.2, 0.4), (0.0, f32::INFINITY)] {
            for v in values {
                let (got, want) = (clamp_to(v, lo, hi), num_traits::Float::min(num_traits::Float::max(v, lo), hi));
                assert!(got == want && !got.is_nan(), "clamp_to({v}, {lo}, {hi}) = {got}, max/min {want}");
            }
        }
    }

    #[test]
    fn float32_erf_is_within_a_few_ulps() {
        let worst = (-6000..=6000)
            .map(|i| i as f64 * 1e-3)
            .map(|x| (erf_f32(x as f32) as f64 - candle_core::cpu::erf::erf_f64(x)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 4e-7, "largest error {worst}");
    }

    #[test]
    fn the_flush_bounds_are_two_to_the_minus_100_and_minus_1000() {
        assert_eq!(TINY_F32 as f64, 2f64.powi(-100));
        assert_eq!(<f64 as Real>::TINY, 2f64.powi(-1000));
        assert_eq!((-1e-31f32).flush_tiny(), 0.0);
        assert_eq!(1e-30f32.flush_tiny(), 1e-30);
        assert!(f32::NAN.flush_tiny().is_nan());
    }

    #[test]
    fn float32_exp_is_within_two_ulps() {
        let worst = (-87_000..=88_000)
            .map(|i| i as f64 * 1e-3 + 1.7e-4)
            .map(|x| {
                let x32 = x as f32;
                let exact = (x32 as f64).exp();
                (exp_f32(x32) as f64 - exact).abs() / exact
            })
            .fold(0.0, f64::max);
        assert!(worst < 2.0 * f32::EPSILON as f64, "largest relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 1.3e-38 && exp_f32(f32::NEG_INFINITY) < 1.3e-38);
        assert!(exp_f32(1e30).is_finite());
    }

    #[test]
    fn plane_groups_write_every_plane_and_zero_what_a_plane_left() {
        for (planes, inner) in [(3000, 1), (700, 3), (5, 4096), (0, 4)] {
            // SAFETY: the writer initialises the front of each plane it reports.
            let v: Vec<f64> = unsafe {
                par_planes(planes * inner, inner, |p, out| write_front(out, 0..inner, |i| (p * inner + i) as f64))
            };
            assert_eq!(v, (0..planes * inner).map(|i| i as f64).collect::<Vec<_>>(), "{planes} x {inner}");
        }
        // A plane written short ends its group there: the rest of that group is zeroed, never
        // left uninitialised, and other groups are untouched.
        let inner = 4;
        let per = PLANE_GROUP / inner;
        let v: Vec<f64> = unsafe {
            par_planes(3 * per * inner, inner, |p, out| {
                let n = if p == 1 { 2 } else { inner };
                write_front(&mut out[..n], 0..n, |_| 1.0)
            })
        };
        assert_eq!(&v[..6], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert!(v[6..per * inner].iter().all(|&x| x == 0.0));
        assert!(v[per * inner..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn lane_sums_match_serial_sums() {
        let a: Vec<f64> = (0..21).map(|i| i as f64 * 0.25).collect();
        let b: Vec<f64> = (0..21).map(|i| 1.0 - i as f64).collect();
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((lanes_dot(&a, &b) - dot).abs() < 1e-12);
        assert!((lanes_sum(&a) - a.iter().sum::<f64>()).abs() < 1e-12);
        let dev: f64 = a.iter().map(|x| (x - 1.5) * (x - 1.5)).sum();
        assert!((lanes_sum_sq_dev(&a, 1.5) - dev).abs() < 1e-12);
    }

    #[test]
    fn gemm_with_transposes_matches_naive() {
        let (m, n, k) = (3, 4, 5);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64).sin()).collect();
        let naive = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f64>();
        let mut c = vec![0.0; m * n];
        gemm(m, n, k, &a, false, &b, false, &mut c, false).unwrap();
        let at: Vec<f64> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c2 = vec![1.0; m * n];
        gemm(m, n, k, &at, true, &bt, true, &mut c2, true).unwrap();
        for i in 0..m {
            for j in 0..n {
                assert!((c[i * n + j] - naive(i, j)).abs() < 1e-12);
                assert!((c2[i * n + j] - naive(i, j) - 1.0).abs() < 1e-12);
            }
        }
        assert!(gemm(m, n, k, &a[1..], false, &b, false, &mut c, false).is_err());
    }
}
