//! Matrix products in bf16 on Intel AMX tiles, summed in f32: the `--precision bf16` path
//! of the linear layers ([`super::matmul_bf16`]).
//!
//! The operands are rounded to bf16 (nearest even) while they are packed into tiles: A as
//! 16x32 tiles, B as 32x16 tiles with pairs of k interleaved (the layout `tdpbf16ps` reads).
//! Each 32x32 block of C is four accumulator tiles over the whole k; zero padding to whole
//! tiles adds nothing. Per element of C the sum is in f32 in a fixed order, so the result does
//! not depend on the thread count.
//!
//! Convolutions keep their f32 products: at MobileNetV2's sizes (k = 16-96 channels, large
//! n) writing C and packing B bound them, and this path was measured slower there (a
//! 96x1024x16 product 37 us vs 24 us in f32) while a transformer's (k = 384-2056) run at
//! several times the f32 rate.

use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of a tile, and the f32 columns of an accumulator tile.
const ROWS: usize = 16;
/// bf16 values in a tile's 64-byte row.
const ROW_BF16: usize = 32;
/// Bytes of one tile.
const TILE_BYTES: usize = ROWS * 64;
/// Side of the block of C four tiles accumulate.
const BLOCK: usize = 2 * ROWS;

/// Whether this CPU has AMX-BF16 and the OS lets this process use its tiles (asked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && os_permits_tiles())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    let (max, edx) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0).edx) };
    max >= 7 && edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx() -> bool {
    false
}

/// Linux hands out the tiles' 8 KiB of register state only to processes that ask for it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn os_permits_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn os_permits_tiles() -> bool {
    false
}

/// f32 to bf16, rounding to nearest even; NaN stays NaN.
pub fn bf16(x: f32) -> u16 {
    (rounded_high(x) >> 16) as u16
}

/// The f32 a bf16 stands for.
pub fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The bf16 of `x` in the upper half of a word, the lower half zero; a select rather than a
/// branch for NaN, so that packing loops vectorise.
#[inline(always)]
fn rounded_high(x: f32) -> u32 {
    let b = x.to_bits();
    let nearest_even = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { b | 0x0040_0000 } else { nearest_even }) & 0xffff_0000
}

/// Two bf16 in one 32-bit word, the even k in the low half (the pairs `tdpbf16ps` multiplies).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (rounded_high(lo) >> 16) | rounded_high(hi)
}

/// Words of a tile row: 16 pairs of k (an A tile) or 16 columns of one pair (a B tile).
const WORDS: usize = 16;

/// An operand seen along k: element (o, p) of outer index o (A's row, B's column) and k
/// index p at `data[o * outer + p * along]`; outside `outers` x `ks` it reads as zero.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    outer: usize,
    along: usize,
    outers: usize,
    ks: usize,
}

impl Operand<'_> {
    /// The word of outer index o and k pair q, zero-padded at the edges.
    #[inline(always)]
    fn word(&self, o: usize, q: usize) -> u32 {
        let at = |p: usize| match o < self.outers && p < self.ks {
            true => self.data.get(o * self.outer + p * self.along).copied().unwrap_or(0.0),
            false => 0.0,
        };
        pair(at(2 * q), at(2 * q + 1))
    }

    /// Writes the tile (outer tile `ot`, k tile `kt`) in A's layout (`lines_outer`: row r is
    /// outer index r, word w is k pair w) or B's (row r is k pair r, word w outer index w)
    /// into zeroed `out`.
    #[inline(always)]
    fn tile(&self, (ot, kt): (usize, usize), lines_outer: bool, out: &mut [u32]) {
        let (o0, q0) = (ot * WORDS, kt * WORDS);
        let outers = self.outers.saturating_sub(o0).min(WORDS);
        // Pairs with both k inside; an odd k left over makes one more, half zero.
        let pairs = (self.ks.saturating_sub(2 * q0) / 2).min(WORDS);
        let put = |out: &mut [u32], o: usize, q: usize, v: u32| {
            let (line, w) = if lines_outer { (o, q) } else { (q, o) };
            out[line * WORDS + w] = v;
        };
        if pairs < WORDS && 2 * (q0 + pairs) < self.ks {
            (0..outers).for_each(|o| put(out, o, pairs, self.word(o0 + o, q0 + pairs)));
        }
        let d = |o: usize, p: usize| o * self.outer + p * self.along;
        // Read the source along its contiguous direction.
        match (self.along == 1, lines_outer) {
            // k contiguous, a line per outer index: consecutive values per line.
            (true, true) => {
                for (line, row) in out.chunks_exact_mut(WORDS).take(outers).enumerate() {
                    let src = &self.data[d(o0 + line, 2 * q0)..][..2 * pairs];
                    row.iter_mut().zip(src.chunks_exact(2)).for_each(|(v, p)| *v = pair(p[0], p[1]));
                }
            }
            // k contiguous, a line per k pair: a word column per outer index, read along k.
            (true, false) => {
                for w in 0..outers {
                    let src = &self.data[d(o0 + w, 2 * q0)..][..2 * pairs];
                    for (line, p) in src.chunks_exact(2).enumerate() {
                        out[line * WORDS + w] = pair(p[0], p[1]);
                    }
                }
            }
            // Outer contiguous: two source rows (k even, k odd) give a line of B's words...
            (false, false) => {
                for (q, row) in out.chunks_exact_mut(WORDS).take(pairs).enumerate() {
                    let even = &self.data[d(o0, 2 * (q0 + q))..][..outers];
                    let odd = &self.data[d(o0, 2 * (q0 + q) + 1)..][..outers];
                    row.iter_mut().zip(even.iter().zip(odd)).for_each(|(v, (&lo, &hi))| *v = pair(lo, hi));
                }
            }
            // ... or a column of A's (A read transposed: the activations of a weight gradient).
            (false, true) => {
                for q in 0..pairs {
                    let even = &self.data[d(o0, 2 * (q0 + q))..][..outers];
                    let odd = &self.data[d(o0, 2 * (q0 + q) + 1)..][..outers];
                    for (o, (&lo, &hi)) in even.iter().zip(odd).enumerate() {
                        out[o * WORDS + q] = pair(lo, hi);
                    }
                }
            }
        }
    }

    /// Every tile, [outer tile][k tile], outer tiles padded to `outer_tiles`, in parallel.
    fn pack(&self, outer_tiles: usize, k_tiles: usize, lines_outer: bool) -> Vec<u32> {
        let mut out = vec![0u32; outer_tiles * k_tiles * ROWS * WORDS];
        out.par_chunks_mut(ROWS * WORDS).enumerate().with_min_len(16).for_each(|(t, tile)| {
            let (ot, kt) = (t / k_tiles, t % k_tiles);
            if ot * WORDS < self.outers {
                super::simd(
                    #[inline(always)]
                    || self.tile((ot, kt), lines_outer, tile),
                );
            }
        });
        out
    }
}

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_full() -> TileConfig {
        let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        c.colsb[..8].fill(64);
        c.rows[..8].fill(ROWS as u8);
        c
    }
}

/// Releases the tiles when a product ends, however it ends.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    unsafe fn load() -> Tiles {
        let cfg = TileConfig::all_full();
        // SAFETY: the caller checked that the CPU has AMX and the OS allows it; `cfg` is a
        // valid 64-byte palette-1 configuration.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `load`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32x32 block of C at `cp`, rows `row` f32 apart: the sum over `k_tiles` of the
/// A tiles at `a0`, `a1` (rows 0-15, 16-31) times the B tiles at `b0`, `b1` (columns 0-15,
/// 16-31), each advancing one tile per k-tile.
///
/// # Safety
/// Tiles are configured ([`Tiles::load`]); each pointer has `k_tiles` tiles after it;
/// k_tiles > 0; `cp` has 32 rows of 32 writable f32 at `row` apart.
#[inline(always)]
unsafe fn block(a: [*const u16; 2], b: [*const u16; 2], k_tiles: usize, (cp, row): (*mut f32, usize)) {
    let cs = row * 4;
    // SAFETY: per the contract: the loads and stores touch 4 x 16 rows of 64 bytes of C.
    unsafe {
        std::arch::asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {tile}",
            "add {a1}, {tile}",
            "add {b0}, {tile}",
            "add {b1}, {tile}",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            n = inout(reg) k_tiles => _,
            s = in(reg) 64usize,
            tile = const TILE_BYTES,
            cs = in(reg) cs,
            c0 = in(reg) cp,
            c1 = in(reg) cp.add(ROWS),
            c2 = in(reg) cp.add(ROWS * row),
            c3 = in(reg) cp.add(ROWS * row + ROWS),
            options(nostack)
        );
    }
}

/// An operand packed into tiles: A's (a line per row, 16 k pairs a line) or B's (a line per
/// k pair, 16 columns a line), [outer tile][k tile], outer tiles padded to whole blocks.
struct Packed {
    words: Vec<u32>,
    k_tiles: usize,
}

impl Packed {
    fn new(op: Operand, lines_outer: bool) -> Packed {
        let k_tiles = op.ks.div_ceil(ROW_BF16);
        Packed { words: op.pack(2 * op.outers.div_ceil(BLOCK), k_tiles, lines_outer), k_tiles }
    }

    /// The first of outer tile `t`'s k tiles.
    fn tile(&self, t: usize) -> *const u16 {
        self.words[t * self.k_tiles * ROWS * WORDS..].as_ptr().cast::<u16>()
    }
}

/// Rows of C each task computes: whole blocks, few enough tasks to keep both threads busy
/// on a transformer's products without packing A in slivers.
const TASK_ROWS: usize = 4 * BLOCK;

/// `a (m x k) * b (k x n)` with the operands rounded to bf16 and the sums in f32, row-major,
/// each operand transposed as stored when its flag says so (as [`super::gemm`] takes them).
/// B is packed once; row blocks of C run in parallel, each packing its rows of A. Every
/// element is the same sum in the same order whatever the thread count.
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    (a, a_trans): (&[f32], bool),
    (b, b_trans): (&[f32], bool),
) -> Result<Vec<f32>, String> {
    if a.len() < m * k || b.len() < k * n {
        return Err(format!("bf16 matmul sizes: a {} < {m}x{k} or b {} < {k}x{n}", a.len(), b.len()));
    }
    if !available() {
        return Err("bf16 matrix products need AMX-BF16, which this CPU or OS does not offer".into());
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let b = match b_trans {
        false => Operand { data: b, outer: 1, along: n, outers: n, ks: k },
        true => Operand { data: b, outer: k, along: 1, outers: n, ks: k },
    };
    let pb = Packed::new(b, false);
    let mut c = vec![0f32; m * n];
    c.par_chunks_mut(TASK_ROWS * n).enumerate().for_each(|(t, ct)| {
        let (r0, rows) = (t * TASK_ROWS, ct.len() / n);
        let a = match a_trans {
            false => Operand { data: &a[r0 * k..], outer: k, along: 1, outers: rows, ks: k },
            true => Operand { data: &a[r0..], outer: 1, along: m, outers: rows, ks: k },
        };
        // SAFETY: `available` was checked; `ct` holds `rows` rows of n.
        unsafe { product(&Packed::new(a, true), &pb, (rows, n), ct) };
    });
    Ok(c)
}

/// C (rows x n, row-major in `c`) = the packed A times the packed B.
///
/// # Safety
/// [`available`] returned true; `a` packs `rows` rows and `b` n columns, over the same k.
unsafe fn product(a: &Packed, b: &Packed, (rows, n): (usize, usize), c: &mut [f32]) {
    let mut out = [0f32; BLOCK * BLOCK];
    // SAFETY: the caller checked `available`.
    let _tiles = unsafe { Tiles::load() };
    for nb in 0..n.div_ceil(BLOCK) {
        let tb = [b.tile(2 * nb), b.tile(2 * nb + 1)];
        for mb in 0..rows.div_ceil(BLOCK) {
            let ta = [a.tile(2 * mb), a.tile(2 * mb + 1)];
            let (h, w) = ((rows - mb * BLOCK).min(BLOCK), (n - nb * BLOCK).min(BLOCK));
            let at = mb * BLOCK * n + nb * BLOCK;
            if h == BLOCK && w == BLOCK {
                // SAFETY: each tile has k_tiles after it in its packing; the block lies in c.
                unsafe { block(ta, tb, a.k_tiles, (c[at..].as_mut_ptr(), n)) };
                continue;
            }
            // SAFETY: as above, into the block-sized `out`.
            unsafe { block(ta, tb, a.k_tiles, (out.as_mut_ptr(), BLOCK)) };
            for (r, src) in out.chunks_exact(BLOCK).take(h).enumerate() {
                c[at + r * n..][..w].copy_from_slice(&src[..w]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to the even 1.0.
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 512.0), 0x3f81);
        assert_eq!(f32_of(bf16(-2.5)), -2.5);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert_eq!(f32_of(bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Every transpose, edges smaller than a tile and a block, k below and above one tile, and
    /// more rows than one task: equal to the f64 product of the bf16-rounded operands up to
    /// f32 summation.
    #[test]
    fn products_equal_the_rounded_operands_product() {
        if !available() {
            eprintln!("skipped: this CPU or OS has no AMX-BF16");
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 3), (32, 32, 32), (33, 17, 65), (70, 100, 40), (300, 48, 200)] {
            for (a_trans, b_trans) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (values(m * k, 1 + m as u64), values(k * n, 2 + n as u64));
                let c = matmul((m, n, k), (&a, a_trans), (&b, b_trans)).unwrap();
                let at = |i: usize, p: usize| f32_of(bf16(if a_trans { a[p * m + i] } else { a[i * k + p] })) as f64;
                let bt = |p: usize, j: usize| f32_of(bf16(if b_trans { b[j * k + p] } else { b[p * n + j] })) as f64;
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                        let scale: f64 = (0..k).map(|p| (at(i, p) * bt(p, j)).abs()).sum::<f64>() + 1.0;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * scale * (k as f64).sqrt().max(1.0),
                            "{m}x{n}x{k} trans {a_trans}/{b_trans} at ({i},{j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        if !available() {
            return;
        }
        let (m, n, k) = (700, 70, 90);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| matmul((m, n, k), (&a, true), (&b, false)).unwrap())
        };
        assert_eq!(on(1), on(3));
    }

    #[test]
    fn short_operands_are_an_error() {
        assert!(matmul((4, 4, 4), (&[0.0; 15], false), (&[0.0; 16], false)).is_err());
    }
}
