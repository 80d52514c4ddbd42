//! Random ids that are unique, not secret: lock tokens, instance ids, reservation ids.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

/// 128 random bits: a process-wide counter and the clock, each hashed under a fresh random
/// key. Unique per call; not for secrets.
pub(crate) fn random_u128() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let high = RandomState::new().hash_one((count, std::process::id()));
    let low = RandomState::new().hash_one(std::time::SystemTime::now());
    (u128::from(high) << 64) | u128::from(low)
}

/// A number in [0, 1) that differs between calls and processes: for jitter.
pub(crate) fn random_fraction() -> f64 {
    (random_u128() as u64 >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_differ() {
        assert_ne!(super::random_u128(), super::random_u128());
        let fraction = super::random_fraction();
        assert!((0.0..1.0).contains(&fraction));
    }
}
