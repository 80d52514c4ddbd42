//! A counter kept locally for a component's `stats()` snapshot and mirrored to the `metrics`
//! facade.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Label};

/// A counter kept locally for a `stats()` snapshot and mirrored to a `metrics` counter.
pub(crate) struct Tally {
    local: AtomicU64,
    metric: Counter,
}

impl Tally {
    pub(crate) fn new(name: &'static str, labels: Vec<Label>) -> Self {
        Tally {
            local: AtomicU64::new(0),
            metric: metrics::counter!(name, labels),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.local.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}
