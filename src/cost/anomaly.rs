//! Anomalies: a bucket's cost over a factor of its trailing average.

use std::collections::HashMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::money::MicroUsd;
use super::store::{BucketTotal, BucketWidth, Dimension};

/// The anomaly rule: cost in the current bucket over `factor_percent` of the trailing average,
/// once there is enough history, and by at least `floor`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AnomalyConfig {
    /// The factor over the trailing average, in percent. Default 200 (the report's "2×").
    pub factor_percent: u32,
    /// The fewest trailing buckets, counted from the entity's first spend, before anything
    /// is flagged: a new spender is not an anomaly. Default 3.
    pub warmup_buckets: usize,
    /// The smallest excess over the average worth flagging. Default $0.05.
    pub floor: MicroUsd,
    /// Trailing hourly buckets averaged. Default 24.
    pub hourly_history: usize,
    /// Trailing daily buckets averaged. Default 7.
    pub daily_history: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            factor_percent: 200,
            warmup_buckets: 3,
            floor: MicroUsd::from_micros(50_000),
            hourly_history: 24,
            daily_history: 7,
        }
    }
}

/// A user or service whose cost in a bucket was anomalous.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Anomaly {
    /// User or service.
    pub dimension: Dimension,
    /// Which user or service.
    pub key: String,
    /// Hourly or daily.
    pub width: BucketWidth,
    /// The bucket's start.
    pub bucket: Timestamp,
    /// Its cost.
    pub cost: MicroUsd,
    /// The trailing average: what was expected.
    pub expected: MicroUsd,
    /// `cost - expected`; anomalies are ranked by it.
    pub excess: MicroUsd,
    /// `cost / expected`.
    pub ratio: f64,
}

/// Flags the anomalies of `current` (a bucket start) given the costs of `history` (the
/// previous bucket starts, oldest first). `totals` may hold any buckets; others are ignored.
pub(crate) fn detect(
    config: &AnomalyConfig,
    dimension: Dimension,
    width: BucketWidth,
    totals: &[BucketTotal],
    current: Timestamp,
    history: &[Timestamp],
) -> Vec<Anomaly> {
    let position: HashMap<Timestamp, usize> =
        history.iter().enumerate().map(|(i, b)| (*b, i)).collect();
    // Per entity: its cost in the current bucket, and per history bucket.
    let mut series: HashMap<&str, (i64, Vec<i64>)> = HashMap::new();
    for total in totals {
        let slot = series
            .entry(total.key.as_str())
            .or_insert_with(|| (0, vec![0; history.len()]));
        if total.bucket == current {
            slot.0 = slot.0.saturating_add(total.cost.micros());
        } else if let Some(i) = position.get(&total.bucket) {
            slot.1[*i] = slot.1[*i].saturating_add(total.cost.micros());
        }
    }
    let mut found = Vec::new();
    for (key, (cost, past)) in series {
        let Some(first) = past.iter().position(|c| *c > 0) else {
            continue;
        };
        let active = &past[first..];
        if cost <= 0 || active.len() < config.warmup_buckets.max(1) {
            continue;
        }
        let sum: i128 = active.iter().map(|c| *c as i128).sum();
        let count = active.len() as i128;
        let over_factor = cost as i128 * count * 100 > config.factor_percent as i128 * sum;
        let expected = super::money::round_div(sum, count);
        let excess = cost.saturating_sub(expected);
        if over_factor && excess >= config.floor.micros() {
            found.push(Anomaly {
                dimension,
                key: key.to_owned(),
                width,
                bucket: current,
                cost: MicroUsd::from_micros(cost),
                expected: MicroUsd::from_micros(expected),
                excess: MicroUsd::from_micros(excess),
                ratio: if expected > 0 {
                    cost as f64 / expected as f64
                } else {
                    f64::INFINITY
                },
            });
        }
    }
    found
}

/// Ranks anomalies by excess dollars, highest first.
pub(crate) fn rank(anomalies: &mut [Anomaly]) {
    anomalies.sort_by(|a, b| b.excess.cmp(&a.excess).then(a.key.cmp(&b.key)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(n: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 / 3600 * 3600 + n * 3600).unwrap()
    }

    fn total(key: &str, bucket: Timestamp, dollars_cents: i64) -> BucketTotal {
        BucketTotal {
            key: key.into(),
            bucket,
            cost: MicroUsd::from_micros(dollars_cents * 10_000),
        }
    }

    fn run(totals: &[BucketTotal]) -> Vec<Anomaly> {
        let history: Vec<_> = (0..24).map(hour).collect();
        let mut found = detect(
            &AnomalyConfig::default(),
            Dimension::User,
            BucketWidth::Hour,
            totals,
            hour(24),
            &history,
        );
        rank(&mut found);
        found
    }

    #[test]
    fn flags_cost_over_twice_the_trailing_average_ranked_by_excess() {
        let mut totals = Vec::new();
        for h in 0..24 {
            totals.push(total("steady", hour(h), 100));
            totals.push(total("small", hour(h), 10));
        }
        totals.push(total("steady", hour(24), 500)); // $5 vs $1: excess $4
        totals.push(total("small", hour(24), 100)); // $1 vs $0.10: excess $0.90
        let found = run(&totals);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].key, "steady");
        assert_eq!(found[0].expected.micros(), 1_000_000);
        assert_eq!(found[0].excess.micros(), 4_000_000);
        assert_eq!(found[1].key, "small");
    }

    #[test]
    fn exactly_twice_is_not_an_anomaly() {
        let mut totals: Vec<_> = (0..24).map(|h| total("u", hour(h), 100)).collect();
        totals.push(total("u", hour(24), 200));
        assert!(run(&totals).is_empty());
    }

    #[test]
    fn new_spenders_and_cent_noise_are_not_anomalies() {
        // Two hours of history: below the warm-up of three.
        let mut totals = vec![
            total("new", hour(22), 100),
            total("new", hour(23), 100),
            total("new", hour(24), 10_000),
        ];
        // 1 cent → 4 cents is 4x, but $0.03 over is under the $0.05 floor.
        for h in 0..24 {
            totals.push(total("tiny", hour(h), 1));
        }
        totals.push(total("tiny", hour(24), 4));
        assert!(run(&totals).is_empty());
    }

    #[test]
    fn quiet_hours_after_the_first_spend_count_as_zero() {
        // Spent $1 once 10 hours ago, nothing since: the average over 10 hours is $0.10.
        let totals = vec![total("u", hour(14), 100), total("u", hour(24), 100)];
        let found = run(&totals);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].expected.micros(), 100_000);
    }
}
