//! A small latency histogram: log-spaced buckets from 1 µs to about 10 minutes, each about 4%
//! wide, so a percentile is within 4% of the true value. Fixed size, mergeable, no allocation
//! per record.

use std::time::Duration;

/// Bucket growth factor: each bucket's upper bound is 4% above the previous one's.
const GROWTH: f64 = 1.04;
/// Buckets: 1 µs · 1.04^520 ≈ 700 s; slower requests land in the last bucket.
const BUCKETS: usize = 520;

/// Request latencies, counted in log-spaced buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LatencyHistogram {
    counts: Box<[u32]>,
    total: u64,
    max_micros: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max_micros: 0,
        }
    }
}

fn bucket(micros: u64) -> usize {
    if micros <= 1 {
        return 0;
    }
    let index = ((micros as f64).ln() / GROWTH.ln()).ceil() as usize;
    index.min(BUCKETS - 1)
}

/// The upper bound of bucket `index`, in µs.
fn upper_micros(index: usize) -> f64 {
    GROWTH.powi(index as i32)
}

impl LatencyHistogram {
    pub(crate) fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let slot = &mut self.counts[bucket(micros)];
        *slot = slot.saturating_add(1);
        self.total += 1;
        self.max_micros = self.max_micros.max(micros);
    }

    pub(crate) fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total += other.total;
        self.max_micros = self.max_micros.max(other.max_micros);
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0.0 to 1.0) in ms: the upper bound of the bucket it falls in,
    /// never above the largest value recorded. 0 when empty.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return upper_micros(index).min(self.max_micros as f64) / 1e3;
            }
        }
        self.max_ms()
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.max_micros as f64 / 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_four_percent() {
        let mut histogram = LatencyHistogram::default();
        for ms in 1..=1_000u64 {
            histogram.record(Duration::from_millis(ms));
        }
        for (q, exact) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let got = histogram.quantile_ms(q);
            assert!(
                got >= exact && got <= exact * 1.04,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(histogram.max_ms(), 1_000.0);
        assert_eq!(histogram.quantile_ms(1.0), 1_000.0);
    }

    #[test]
    fn merging_adds_counts_and_empty_is_zero() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        assert_eq!(a.quantile_ms(0.95), 0.0);
        a.record(Duration::from_micros(10));
        b.record(Duration::from_secs(2));
        b.record(Duration::from_secs(3_600));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.max_ms(), 3_600_000.0);
        assert!(a.quantile_ms(0.5) >= 2_000.0 && a.quantile_ms(0.5) < 2_100.0);
    }
}
