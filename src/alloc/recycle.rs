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
//! and at most [`CAP`] bytes are kept.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks from this size on are kept (glibc's largest mmap threshold).
const LARGE: usize = 32 << 20;
/// Blocks kept at once.
const SLOTS: usize = 8;
/// Bytes kept at once: a bound on the resident memory this adds.
pub const CAP: usize = 512 << 20;
const PAGE: usize = 4096;

/// Freed large blocks as (page-rounded size, address); size 0 is an empty slot.
struct Kept {
    blocks: [(usize, usize); SLOTS],
    bytes: usize,
}

/// The allocator: [`System`], plus the kept blocks. Install it with
/// `#[global_allocator] static A: Recycling = Recycling::new();`.
pub struct Recycling {
    kept: Mutex<Kept>,
}

impl Default for Recycling {
    fn default() -> Self {
        Self::new()
    }
}

impl Recycling {
    pub const fn new() -> Recycling {
        Recycling { kept: Mutex::new(Kept { blocks: [(0, 0); SLOTS], bytes: 0 }) }
    }

    /// The layout a large request is served with (its size rounded up to pages), or None
    /// for requests that go to [`System`] as they are.
    fn large(l: Layout) -> Option<Layout> {
        if l.size() < LARGE || l.align() > PAGE {
            return None;
        }
        Layout::from_size_align(l.size().checked_next_multiple_of(PAGE)?, l.align()).ok()
    }

    /// A kept block of exactly `size` bytes, taken out of the cache.
    fn take(&self, size: usize) -> Option<*mut u8> {
        let mut k = self.kept.lock().ok()?;
        let (_, addr) = k.blocks.iter_mut().find(|b| b.0 == size).map(std::mem::take)?;
        k.bytes -= size;
        Some(addr as *mut u8)
    }

    /// Keeps the block at `p` of `size` bytes if there is room; false when the caller must
    /// free it.
    fn keep(&self, size: usize, p: *mut u8) -> bool {
        let Ok(mut k) = self.kept.lock() else { return false };
        if k.bytes + size > CAP {
            return false;
        }
        let Some(free) = k.blocks.iter_mut().find(|b| b.0 == 0) else { return false };
        *free = (size, p as usize);
        k.bytes += size;
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
            Some(big) => self.take(big.size()).unwrap_or_else(|| unsafe { System.alloc(big) }),
            // SAFETY: the caller's layout, as GlobalAlloc requires.
            None => unsafe { System.alloc(l) },
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        match Self::large(l) {
            Some(big) => match self.take(big.size()) {
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
                if !self.keep(big.size(), p) {
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

    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_size_only() {
        let a = Recycling::new();
        let big = layout(LARGE + 100);
        // SAFETY: every block is freed with the layout it was allocated with.
        unsafe {
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
            assert_eq!(a.kept.lock().unwrap().bytes, 2 * (LARGE + PAGE) + PAGE);
            release(&a);
        }
    }

    /// Frees what `a` kept (a test's allocator is not the process's, which never drops).
    unsafe fn release(a: &Recycling) {
        for (size, addr) in a.kept.lock().unwrap().blocks.iter_mut().map(std::mem::take) {
            if size > 0 {
                // SAFETY: kept blocks came from System with this size; the tests use align 64.
                unsafe { System.dealloc(addr as *mut u8, layout(size)) };
            }
        }
    }

    #[test]
    fn at_most_the_cap_is_kept() {
        let a = Recycling::new();
        let big = layout(CAP / 2 + PAGE);
        // SAFETY: as above.
        unsafe {
            let (p, q) = (a.alloc(big), a.alloc(big));
            a.dealloc(p, big);
            a.dealloc(q, big); // over the cap: freed to the system
            assert_eq!(a.kept.lock().unwrap().bytes, big.size());
            let r = a.alloc(big);
            assert_eq!(r, p);
            a.dealloc(r, big);
            release(&a);
        }
    }

    #[test]
    fn realloc_across_the_threshold_keeps_the_contents() {
        let a = Recycling::new();
        // SAFETY: as above.
        unsafe {
            let p = a.alloc(layout(4096));
            p.write_bytes(3, 4096);
            let q = a.realloc(p, layout(4096), LARGE + 1);
            assert!(std::slice::from_raw_parts(q, 4096).iter().all(|&b| b == 3));
            let r = a.realloc(q, layout(LARGE + 1), 100);
            assert!(std::slice::from_raw_parts(r, 100).iter().all(|&b| b == 3));
            a.dealloc(r, layout(100));
        }
    }
}
