//! Where the training step's code runs: on one of the rayon pool's own threads.
//!
//! mtpack's kernels split every convolution and BatchNorm pass over the rayon pool, several
//! hundred parallel regions per MobileNetV2 step. Called from a thread outside the pool
//! (the process's main thread), each region is handed to the pool through its injector and
//! the caller blocks until it is done: a futex wake-up of a parked worker and one back, in
//! a virtual machine an inter-processor interrupt each, about 1 750 futex calls per step
//! (strace) and a twelfth of the step's samples in the kernel's wake-up path (perf). Run on
//! a pool thread, a region's halves are pushed to that thread's own queue and taken by the
//! others, which between regions of a step are still spinning and never park: the futex
//! calls per step drop to none, and the step runs 1.10x faster on 2 cores
//! (examples/profile_step). The results do not change: the kernels' sums do not depend
//! on which thread runs which part.

/// Stack of each pool thread. The step's code (candle's recursive walk of the autograd
/// graph among it) ran on the main thread's 8 MiB; the pool's threads get more than that,
/// as address space, committed only where touched.
const STACK_BYTES: usize = 16 << 20;

/// Builds rayon's global pool with [`STACK_BYTES`] stacks (threads: `RAYON_NUM_THREADS`,
/// else one per core, as rayon's default). Call before anything uses rayon; if the pool
/// already exists it is left as it is.
pub fn configure_pool() {
    // An error means the pool was built already (by an earlier call or an earlier rayon
    // use), which leaves the default stacks: still correct, as before this module.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(STACK_BYTES).build_global();
}

/// Runs `f` on a thread of rayon's global pool and returns its result; on a pool thread
/// already, runs it in place.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_pool_thread_and_returns_the_result() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, value) = on_pool(|| (rayon::current_thread_index(), 41 + 1));
        assert!(inside.is_some());
        assert_eq!(value, 42);
        // A nested call runs in place, on the same thread.
        assert!(on_pool(|| rayon::current_thread_index() == on_pool(rayon::current_thread_index)));
    }
}
