//! A global allocator that keeps a few freed blocks of 32 MiB or more for the next request
//! of the same size. glibc serves blocks that large from fresh mmap calls (its threshold
//! cannot be raised past 32 MiB) and unmaps them on free, so a training step that
//! allocates and frees the same large activations every step (MobileNetV2 at 3x224x224,
//! batch 16: [16, 96, 112, 112], 77 MB, five times per step) pays a page fault and the
//! kernel's zeroing for every 4 KiB page of each, every step: the input gradient of that
//! layer's depthwise convolution took 22 ms where its forward took 9. Keeping such blocks
//! in glibc's heap instead (M_MMAP_MAX 0) fixed the faults but fragmented the heap: peak
//! memory rose by half on LwF. Here each block stays its own mapping and is handed out
//! whole again, only for a request of the same page-rounded size, so nothing fragments,
//! and at most [`CAP`] bytes are kept. Blocks are kept only while a [`keep_large_blocks`]
//! guard lives (the training loop's), and go back to the system when the last guard is
//! dropped: a dataset's arrays, freed between tasks and never asked for again, would
//! otherwise stay resident (a first version kept blocks always, and the real sequence's
//! peak memory rose by the whole cap, 1860 -> 2369 MB).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks from this size on are kept (glibc's largest mmap threshold).
const LARGE: usize = 32 << 20;
/// Blocks kept at once.
const SLOTS: usize = 8;
/// Bytes kept at once: a bound on the resident memory this adds.
pub const CAP: usize = 512 << 20;
const PAGE: usize = 4096;

/// Freed large blocks as (page-rounded size, alignment, address); size 0 is an empty slot.
struct Kept {
    blocks: [(usize, usize, usize); SLOTS],
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept { blocks: [(0, 0, 0); SLOTS], bytes: 0 });
/// Live [`KeepGuard`]s.
static GUARDS: AtomicUsize = AtomicUsize::new(0);

/// The allocator: [`System`], plus the kept blocks. Install it with
/// `#[global_allocator] static A: Recycling = Recycling::new();`.
#[derive(Default)]
pub struct Recycling;

/// While a guard lives, freed large blocks are kept for reuse; when the last one is
/// dropped, every kept block goes back to the system.
#[must_use = "blocks are kept only while the guard lives"]
pub struct KeepGuard(());

/// Keeps freed large blocks for the next request of their size until the guard is dropped
/// (nested guards: until the last one is).
pub fn keep_large_blocks() -> KeepGuard {
    GUARDS.fetch_add(1, Ordering::SeqCst);
    KeepGuard(())
}

impl Drop for KeepGuard {
    fn drop(&mut self) {
        if GUARDS.fetch_sub(1, Ordering::SeqCst) == 1 {
            release_kept();
        }
    }
}

/// Frees every kept block (outside the lock: freeing may take the system's own locks).
fn release_kept() {
    let blocks = match KEPT.lock() {
        Ok(mut k) => {
            k.bytes = 0;
            std::mem::replace(&mut k.blocks, [(0, 0, 0); SLOTS])
        }
        Err(_) => return,
    };
    for (size, align, addr) in blocks {
        if let (true, Ok(l)) = (size > 0, Layout::from_size_align(size, align)) {
            // SAFETY: a kept block was allocated by System with exactly this layout, and
            // taking it out of the cache above made this the only reference to it.
            unsafe { System.dealloc(addr as *mut u8, l) };
        }
    }
}

impl Recycling {
    pub const fn new() -> Recycling {
        Recycling
    }

    /// The layout a large request is served with (its size rounded up to pages), or None
    /// for requests that go to [`System`] as they are.
    fn large(l: Layout) -> Option<Layout> {
        if l.size() < LARGE || l.align() > PAGE {
            return None;
        }
        Layout::from_size_align(l.size().checked_next_multiple_of(PAGE)?, l.align()).ok()
    }

    /// A kept block for layout `big`, taken out of the cache.
    fn take(big: Layout) -> Option<*mut u8> {
        let mut k = KEPT.lock().ok()?;
        let found = k.blocks.iter_mut().find(|b| b.0 == big.size() && b.1 == big.align());
        let (size, _, addr) = found.map(std::mem::take)?;
        k.bytes -= size;
        Some(addr as *mut u8)
    }

    /// Keeps the block at `p` allocated for `big` if a guard lives and there is room;
    /// false when the caller must free it.
    fn keep(big: Layout, p: *mut u8) -> bool {
        if GUARDS.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let Ok(mut k) = KEPT.lock() else { return false };
        if k.bytes + big.size() > CAP {
            return false;
        }
        let Some(free) = k.blocks.iter_mut().find(|b| b.0 == 0) else { return false };
        *free = (big.size(), big.align(), p as usize);
        k.bytes += big.size();
        true
    }
}

// SAFETY: every block handed out is either System's own answer to the same layout or a
// block System allocated for the same page-rounded layout and that was freed (and not
// handed out since); every block freed to System goes back with the layout it was
// allocated with (the rounding depends on the request's size and alignment only).
unsafe impl GlobalAlloc for Recycling {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        match Self::large(l) {
            // SAFETY: as for System; `large` keeps the alignment and rounds the size up.
            Some(big) => Self::take(big).unwrap_or_else(|| unsafe { System.alloc(big) }),
            // SAFETY: the caller's layout, as GlobalAlloc requires.
            None => unsafe { System.alloc(l) },
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match Self::large(l) {
            Some(big) => match Self::take(big) {
                Some(p) => {
                    // Clearing a kept block costs less than faulting in fresh zero pages.
                    // SAFETY: p is a block of big.size() >= l.size() writable bytes.
                    unsafe { std::ptr::write_bytes(p, 0, l.size()) };
                    p
                }
                // SAFETY: as in alloc.
                None => unsafe { System.alloc_zeroed(big) },
            },
            // SAFETY: as in alloc.
            None => unsafe { System.alloc_zeroed(l) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        match Self::large(l) {
            Some(big) => {
                if !Self::keep(big, p) {
                    // SAFETY: p was allocated for `big` (alloc's rounding of this layout).
                    unsafe { System.dealloc(p, big) }
                }
            }
            // SAFETY: p was allocated by System for l.
            None => unsafe { System.dealloc(p, l) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, l.align()) else { return std::ptr::null_mut() };
        if Self::large(l).is_none() && Self::large(new).is_none() {
            // SAFETY: both sizes small: System allocated p for l, as realloc requires.
            return unsafe { System.realloc(p, l, new_size) };
        }
        // SAFETY: a new block for `new`, the overlap copied, the old one freed through
        // dealloc with its own layout: the default realloc, through this allocator.
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                self.dealloc(p, l);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 64).unwrap()
    }

    fn kept_bytes() -> usize {
        KEPT.lock().unwrap().bytes
    }

    /// One test: the cache is process-wide, and tests run in parallel.
    #[test]
    fn large_blocks_are_kept_for_their_size_while_a_guard_lives() {
        let a = Recycling::new();
        let big = layout(LARGE + 100);
        // SAFETY: every block is freed with the layout it was allocated with.
        unsafe {
            // Without a guard nothing is kept.
            let p = a.alloc(big);
            a.dealloc(p, big);
            assert_eq!(kept_bytes(), 0);
            let guard = keep_large_blocks();
            let p = a.alloc(big);
            assert!(!p.is_null());
            p.write_bytes(7, big.size());
            a.dealloc(p, big);
            // The same size gets the same block back; another size a block of its own.
            let other = a.alloc(layout(LARGE + 2 * PAGE));
            assert_ne!(other, p);
            let again = a.alloc(big);
            assert_eq!(again, p, "kept and handed out again");
            // A zeroed request for that size gets the kept block cleared.
            a.dealloc(again, big);
            let z = a.alloc_zeroed(big);
            assert_eq!(z, p);
            assert!(std::slice::from_raw_parts(z, big.size()).iter().all(|&b| b == 0));
            a.dealloc(z, big);
            a.dealloc(other, layout(LARGE + 2 * PAGE));
            // Small blocks are never kept.
            let s = a.alloc(layout(1024));
            a.dealloc(s, layout(1024));
            assert_eq!(kept_bytes(), 2 * (LARGE + PAGE) + PAGE);
            // A nested guard's end keeps the blocks; the last one's releases them.
            drop(keep_large_blocks());
            assert_eq!(kept_bytes(), 2 * (LARGE + PAGE) + PAGE);
            drop(guard);
            assert_eq!(kept_bytes(), 0);

            // At most the cap is kept.
            let guard = keep_large_blocks();
            let half = layout(CAP / 2 + PAGE);
            let (p, q) = (a.alloc(half), a.alloc(half));
            a.dealloc(p, half);
            a.dealloc(q, half); // over the cap: freed to the system
            assert_eq!(kept_bytes(), half.size());
            let r = a.alloc(half);
            assert_eq!(r, p);
            a.dealloc(r, half);

            // realloc across the threshold keeps the contents.
            let p = a.alloc(layout(4096));
            p.write_bytes(3, 4096);
            let q = a.realloc(p, layout(4096), LARGE + 1);
            assert!(std::slice::from_raw_parts(q, 4096).iter().all(|&b| b == 3));
            let r = a.realloc(q, layout(LARGE + 1), 100);
            assert!(std::slice::from_raw_parts(r, 100).iter().all(|&b| b == 3));
            a.dealloc(r, layout(100));
            drop(guard);
            assert_eq!(kept_bytes(), 0);
        }
    }
}
