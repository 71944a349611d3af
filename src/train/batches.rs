//! Mini-batches with a seeded shuffle: epoch `e` of seed `s` always visits the same order, so
//! a resumed run sees exactly the batches an uninterrupted one would.

use crate::rng::Rng;

/// Index batches of one epoch.
pub fn epoch_batches(n: usize, batch: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut idx);
    idx.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_epoch_and_covering() {
        let a = epoch_batches(10, 3, 7, 0);
        assert_eq!(a, epoch_batches(10, 3, 7, 0));
        assert_ne!(a, epoch_batches(10, 3, 7, 1));
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        let mut all: Vec<usize> = a.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
