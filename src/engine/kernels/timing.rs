//! Wall time per kernel call, for finding where a training step's time goes (forward and
//! backward passes alike, which the engine's per-node forward profile cannot see). Off
//! unless a profiler turns it on; off, a call costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<BTreeMap<String, (Duration, usize)>> = Mutex::new(BTreeMap::new());

/// Starts or stops recording.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// What was recorded since the last call, and clears it: (kernel and shape, total wall time,
/// calls), by name.
pub fn take() -> Vec<(String, Duration, usize)> {
    let recorded = TIMES.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
    recorded.into_iter().map(|(k, (d, n))| (k, d, n)).collect()
}

/// Runs `f`, adding its wall time under `key()` while recording is on.
#[inline]
pub(crate) fn timed<R>(key: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let r = f();
    let took = start.elapsed();
    if let Ok(mut t) = TIMES.lock() {
        let e = t.entry(key()).or_default();
        e.0 += took;
        e.1 += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_on() {
        take();
        timed(|| "timing-test off".into(), || ());
        enable(true);
        timed(|| "timing-test on".into(), || std::thread::sleep(Duration::from_millis(2)));
        timed(|| "timing-test on".into(), || ());
        enable(false);
        // Other tests' kernels may run (and be recorded) meanwhile: look at these keys only.
        let got = take();
        assert!(!got.iter().any(|(k, ..)| k == "timing-test off"), "{got:?}");
        let on: Vec<_> = got.iter().filter(|(k, ..)| k == "timing-test on").collect();
        assert_eq!(on.len(), 1, "{got:?}");
        assert_eq!(on[0].2, 2);
        assert!(on[0].1 >= Duration::from_millis(2));
    }
}
