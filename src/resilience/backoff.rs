//! Exponential backoff with jitter, shared by every component that retries.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff with jitter: before retry `n` (0 for the first) the ceiling is
/// `min(max, base * 2^n)`, and the wait is drawn uniformly from
/// `[ceiling * (1 - jitter), ceiling)`. `jitter` 1.0 is "full jitter" (anywhere from zero),
/// 0.0 is none.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Backoff {
    /// The ceiling before the first retry. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub base: Duration,
    /// The largest ceiling. Default 5 min.
    #[serde(with = "crate::serde_duration")]
    pub max: Duration,
    /// The share of the ceiling that is random, from 0.0 to 1.0. Default 0.5: every wait is
    /// at least half its ceiling, so waits still grow, and retries of many jobs that failed
    /// together spread out.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// A backoff from `base` up to `max`, with the default jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            ..Backoff::default()
        }
    }

    /// The same backoff with `jitter` (clamped to 0.0..=1.0).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// The wait before retry `retry` (0 for the first).
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << retry.min(31))
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let fraction = 1.0 - jitter * crate::random::random_fraction();
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * fraction).unwrap_or(ceiling)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn waits_grow_stay_under_the_cap_and_are_jittered() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for retry in 0..40 {
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << retry.min(31))
                .min(Duration::from_secs(1));
            let wait = backoff.delay(retry);
            assert!(wait <= ceiling, "retry {retry}: {wait:?} > {ceiling:?}");
            assert!(
                wait >= ceiling / 2,
                "retry {retry}: {wait:?} < half of {ceiling:?}"
            );
        }
        let waits: HashSet<Duration> = (0..20).map(|_| backoff.delay(3)).collect();
        assert!(waits.len() > 10, "jittered: {waits:?}");
    }

    #[test]
    fn full_jitter_can_wait_less_than_half_and_none_is_exact() {
        let full = Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).jitter(1.0);
        assert!((0..200).any(|_| full.delay(0) < Duration::from_millis(500)));
        let none = Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).jitter(0.0);
        assert_eq!(none.delay(2), Duration::from_secs(4));
        assert_eq!(none.jitter(f64::NAN).delay(9), Duration::from_secs(8));
    }
}
