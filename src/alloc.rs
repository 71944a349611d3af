//! Process settings for training: the allocator, candle's thread pool, and rayon's (see
//! [`crate::parallel`]).
//!
//! Allocator. Every candle op allocates its output; with glibc's
//! defaults, buffers over 128 KiB come from fresh mmap calls and go back to the kernel on
//! free, so each training step pays page faults and page zeroing for every activation and
//! gradient (a third of the step time on MobileNetV2, measured with perf). Keeping such
//! buffers in the heap lets them be reused. Past glibc's largest threshold (32 MiB) the
//! binaries' global allocator, [`Recycling`], keeps freed blocks for the next request of
//! their size while the training loop runs ([`keep_large_blocks`]).

mod recycle;
pub use recycle::{keep_large_blocks, KeepGuard, Recycling};

/// glibc's largest heap of a thread's arena (64 MiB on 64-bit). With a top pad this large
/// an arena never unmaps a heap that has emptied (glibc keeps the pad's worth free): the
/// kernels allocate on the pool's threads, whose arenas otherwise unmapped their heaps
/// between parallel regions and faulted them in again, 40-60 thousand page faults per
/// MobileNetV2 224x224 step in some runs (perf stat), 0 with the pad, and the step's
/// median 380-426 ms in those runs against 377-380.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_HEAP_BYTES: libc::c_int = 64 << 20;

/// Raises glibc's mmap and trim thresholds and its top pad (a no-op on other platforms),
/// stops candle's pool threads from spinning between ops, and builds rayon's pool with the
/// stacks the step needs on it ([`crate::parallel::configure_pool`]).
pub fn tune_for_training() {
    // candle's CPU pool spins 25 000 iterations after each parallel op before parking. The
    // training step interleaves candle ops with mtpack's rayon kernels, so those spinning
    // threads take cores from the kernels: with no spin the MobileNetV2 step is ~15%
    // faster on 2 cores (examples/profile_step). A value the user set is kept.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any threads
    // that allocate are started by mtpack, and glibc serialises it with its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024 * 1024);
        libc::mallopt(libc::M_TOP_PAD, ARENA_HEAP_BYTES);
    }
    crate::parallel::configure_pool();
}

/// The machine's physical memory in bytes, where the platform says.
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system configuration values.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return u64::try_from(pages).ok()?.checked_mul(u64::try_from(size).ok()?);
        }
    }
    None
}

/// Refuses an allocation of `bytes` that this machine could not hold, before it is tried
/// (a failed allocation aborts the process instead of returning an error). `None` for a
/// size beyond any address space.
pub fn check_fits(bytes: Option<u64>) -> Result<(), String> {
    let limit = physical_memory().unwrap_or(u64::MAX);
    match bytes {
        Some(b) if b <= limit => Ok(()),
        Some(b) => Err(format!(
            "{:.1} GiB needed, more than this machine's {:.1} GiB of memory",
            b as f64 / (1u64 << 30) as f64,
            limit as f64 / (1u64 << 30) as f64
        )),
        None => Err("the size overflows any address space".into()),
    }
}
