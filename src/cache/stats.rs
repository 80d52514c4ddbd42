//! Counters of a tiered cache: a [`CacheStats`] snapshot for health endpoints, and the same
//! figures through the `metrics` facade.

use std::sync::atomic::{AtomicBool, Ordering};

use metrics::Label;

use crate::tally::Tally;
use serde::Serialize;

/// The counters of one tier.
pub(crate) struct TierTally {
    pub(crate) name: String,
    pub(crate) hits: Tally,
    pub(crate) misses: Tally,
    pub(crate) promotions: Tally,
    pub(crate) demotions: Tally,
    pub(crate) bytes_raw: Tally,
    pub(crate) bytes_stored: Tally,
}

impl TierTally {
    fn new(cache: &str, tier: &str) -> Self {
        let labels = || {
            vec![
                Label::new("cache", cache.to_owned()),
                Label::new("tier", tier.to_owned()),
            ]
        };
        TierTally {
            name: tier.to_owned(),
            hits: Tally::new("pupkit_cache_hits_total", labels()),
            misses: Tally::new("pupkit_cache_misses_total", labels()),
            promotions: Tally::new("pupkit_cache_promotions_total", labels()),
            demotions: Tally::new("pupkit_cache_demotions_total", labels()),
            bytes_raw: Tally::new("pupkit_cache_written_bytes_raw_total", labels()),
            bytes_stored: Tally::new("pupkit_cache_written_bytes_stored_total", labels()),
        }
    }

    fn snapshot(&self) -> TierStats {
        let (hits, misses) = (self.hits.get(), self.misses.get());
        TierStats {
            name: self.name.clone(),
            hits,
            misses,
            hit_rate: ratio(hits, hits + misses),
            promotions: self.promotions.get(),
            demotions: self.demotions.get(),
            bytes_raw: self.bytes_raw.get(),
            bytes_stored: self.bytes_stored.get(),
        }
    }
}

/// All counters of one named cache. Tier 0 is L0; shared tier `i` is at `i + 1`.
pub(crate) struct CacheTally {
    pub(crate) name: String,
    pub(crate) tiers: Vec<TierTally>,
    pub(crate) loader_calls: Tally,
    pub(crate) loader_errors: Tally,
    pub(crate) coalesced_loads: Tally,
    pub(crate) lock_waits: Tally,
    pub(crate) lock_timeouts: Tally,
    pub(crate) stale_served: Tally,
    pub(crate) eager_refreshes: Tally,
    pub(crate) fail_safe_activations: Tally,
    pub(crate) backplane_received: Tally,
    pub(crate) backplane_resubscribed: Tally,
    pub(crate) backend_errors: Tally,
    pub(crate) corrupt_entries: Tally,
    pub(crate) stale_by_tag: Tally,
    pub(crate) oversized_values: Tally,
    backend_failing: AtomicBool,
}

impl CacheTally {
    pub(crate) fn new(cache: &str, shared_tiers: &[&str]) -> Self {
        let tiers = std::iter::once("l0")
            .chain(shared_tiers.iter().copied())
            .map(|tier| TierTally::new(cache, tier))
            .collect();
        let labels = || vec![Label::new("cache", cache.to_owned())];
        let errors = |kind: &'static str| {
            Tally::new(
                "pupkit_cache_errors_total",
                vec![
                    Label::new("cache", cache.to_owned()),
                    Label::new("kind", kind),
                ],
            )
        };
        CacheTally {
            name: cache.to_owned(),
            tiers,
            loader_calls: Tally::new("pupkit_cache_loader_calls_total", labels()),
            loader_errors: Tally::new("pupkit_cache_loader_errors_total", labels()),
            coalesced_loads: Tally::new("pupkit_cache_coalesced_loads_total", labels()),
            lock_waits: Tally::new("pupkit_cache_lock_waits_total", labels()),
            lock_timeouts: Tally::new("pupkit_cache_lock_timeouts_total", labels()),
            stale_served: Tally::new("pupkit_cache_stale_served_total", labels()),
            eager_refreshes: Tally::new("pupkit_cache_eager_refreshes_total", labels()),
            fail_safe_activations: Tally::new("pupkit_cache_fail_safe_activations_total", labels()),
            backplane_received: Tally::new("pupkit_cache_backplane_received_total", labels()),
            backplane_resubscribed: Tally::new(
                "pupkit_cache_backplane_resubscribed_total",
                labels(),
            ),
            backend_errors: errors("backend"),
            corrupt_entries: errors("corrupt"),
            stale_by_tag: Tally::new("pupkit_cache_stale_by_tag_total", labels()),
            oversized_values: errors("oversized"),
            backend_failing: AtomicBool::new(false),
        }
    }

    /// The tally of shared tier `i`.
    pub(crate) fn shared(&self, i: usize) -> &TierTally {
        &self.tiers[i + 1]
    }

    pub(crate) fn l0(&self) -> &TierTally {
        &self.tiers[0]
    }

    /// Counts a backend failure; logs a warning when the backend goes from healthy to failing.
    pub(crate) fn backend_failed(&self, backend: &str, error: &crate::Error) {
        self.backend_errors.add(1);
        if !self.backend_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(cache = %self.name, backend, error = %error_chain(error), "shared cache tiers failing; serving from L0 and loaders");
        } else {
            tracing::debug!(cache = %self.name, backend, error = %error_chain(error), "shared cache tiers still failing");
        }
    }

    /// Notes a backend success; logs when the backend recovers.
    pub(crate) fn backend_ok(&self, backend: &str) {
        if self.backend_failing.load(Ordering::Relaxed)
            && self.backend_failing.swap(false, Ordering::Relaxed)
        {
            tracing::info!(cache = %self.name, backend, "shared cache tiers answering again");
        }
    }

    pub(crate) fn snapshot(
        &self,
        l0_enabled: bool,
        l0_entries: u64,
        l0_weighted_bytes: u64,
    ) -> CacheStats {
        let tiers: Vec<TierStats> = self.tiers.iter().map(TierTally::snapshot).collect();
        let hits: u64 = tiers.iter().map(|t| t.hits).sum();
        // Every lookup starts in the first tier it probes: L0, or the hottest shared tier.
        let first = &tiers[if l0_enabled { 0 } else { 1 }];
        let lookups = first.hits + first.misses;
        CacheStats {
            name: self.name.clone(),
            hit_rate: ratio(hits, lookups),
            hits,
            lookups,
            tiers,
            l0_entries,
            l0_weighted_bytes,
            loader_calls: self.loader_calls.get(),
            loader_errors: self.loader_errors.get(),
            coalesced_loads: self.coalesced_loads.get(),
            lock_waits: self.lock_waits.get(),
            lock_timeouts: self.lock_timeouts.get(),
            stale_served: self.stale_served.get(),
            eager_refreshes: self.eager_refreshes.get(),
            fail_safe_activations: self.fail_safe_activations.get(),
            backplane_received: self.backplane_received.get(),
            backplane_resubscribed: self.backplane_resubscribed.get(),
            backend_errors: self.backend_errors.get(),
            corrupt_entries: self.corrupt_entries.get(),
            stale_by_tag: self.stale_by_tag.get(),
            oversized_values: self.oversized_values.get(),
            backend_failing: self.backend_failing.load(Ordering::Relaxed),
            breaker: None,
        }
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A snapshot of one tier's counters.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TierStats {
    /// `"l0"` or the shared tier's name.
    pub name: String,
    /// Reads answered by this tier.
    pub hits: u64,
    /// Reads that looked here and found nothing valid.
    pub misses: u64,
    /// hits / (hits + misses), 0 when idle.
    pub hit_rate: f64,
    /// Entries copied into this tier because they were read often.
    pub promotions: u64,
    /// Entries that left this tier while their home tier kept them (a hot copy expiring, an
    /// L0 eviction or expiry).
    pub demotions: u64,
    /// Payload bytes written to this tier, before compression.
    pub bytes_raw: u64,
    /// Payload bytes written to this tier, as stored.
    pub bytes_stored: u64,
}

/// A snapshot of one named cache's counters, for health endpoints.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// The cache's name.
    pub name: String,
    /// Lookups answered by any tier, over all lookups.
    pub hit_rate: f64,
    /// Lookups answered by any tier.
    pub hits: u64,
    /// Lookups (each starts in the first tier it probes).
    pub lookups: u64,
    /// L0 first, then the shared tiers hottest first.
    pub tiers: Vec<TierStats>,
    /// Entries in L0 (approximate, as moka reports).
    pub l0_entries: u64,
    /// L0's weighted size in bytes (approximate).
    pub l0_weighted_bytes: u64,
    /// Calls of loaders (a batch loader counts once).
    pub loader_calls: u64,
    /// Loader calls that failed.
    pub loader_errors: u64,
    /// Callers that joined a load already in flight for their key instead of loading.
    pub coalesced_loads: u64,
    /// Loads that waited for another instance holding the key's load lock.
    pub lock_waits: u64,
    /// Lock waits that ran out, after which this instance loaded anyway.
    pub lock_timeouts: u64,
    /// Stale values served by `get_or_load` (fail-safe), to each caller that got one.
    pub stale_served: u64,
    /// Background refreshes of values past the eager-refresh point that this instance ran.
    pub eager_refreshes: u64,
    /// Loads that failed or timed out and fell back to a stale value.
    pub fail_safe_activations: u64,
    /// Other instances' backplane notices applied to L0.
    pub backplane_received: u64,
    /// Times the backplane subscription was re-established (each flushes L0).
    pub backplane_resubscribed: u64,
    /// Shared-tier calls that failed or timed out.
    pub backend_errors: u64,
    /// Stored entries that did not decode and were deleted.
    pub corrupt_entries: u64,
    /// Entries found but invalidated by a tag or a clear.
    pub stale_by_tag: u64,
    /// Loaded values too large to cache.
    pub oversized_values: u64,
    /// The last shared-tier call failed.
    pub backend_failing: bool,
    /// The circuit breaker in front of the shared tiers, if they have one.
    pub breaker: Option<crate::resilience::BreakerStats>,
}

impl CacheStats {
    /// The stats of the tier called `name` (`"l0"`, `"hot"`, ...).
    pub fn tier(&self, name: &str) -> Option<&TierStats> {
        self.tiers.iter().find(|t| t.name == name)
    }
}
