//! L0: the in-process tier. It holds decoded values as `Arc<V>`, bounded by bytes, each entry
//! living no longer than its remaining TTL in the tier it came from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use super::stats::CacheTally;

/// What a lookup found.
#[derive(Debug)]
pub(crate) struct Hit<V> {
    pub(crate) value: Arc<V>,
    /// Within its TTL (else stale: past it, within its grace).
    pub(crate) fresh: bool,
    /// Past the eager-refresh point of its TTL.
    pub(crate) refresh_due: bool,
}

impl<V> Clone for Hit<V> {
    fn clone(&self) -> Self {
        Hit {
            value: self.value.clone(),
            fresh: self.fresh,
            refresh_due: self.refresh_due,
        }
    }
}

/// How long a value stays fresh, and when it is due for an eager refresh (none when eager
/// refresh is off).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Freshness {
    pub(crate) fresh_for: Duration,
    pub(crate) refresh_in: Option<Duration>,
}

/// One L0 entry. Cloning it (which moka does on every hit) costs one `Arc` increment.
pub(crate) struct L0Entry<V> {
    pub(crate) value: Arc<V>,
    /// Created-at on the store's clock, for tag and clear checks.
    created_us: u64,
    /// The entry's tags; `None` for untagged entries, which skip tag checks.
    tags: Option<Arc<[String]>>,
    /// Past this the value is stale: kept only as a fail-safe fallback. `None` when it stays
    /// fresh for as long as L0 keeps it, which spares the hit path a clock read.
    fresh_until: Option<Instant>,
    /// Past this a `get_or_load` refreshes it in the background (eager refresh).
    refresh_at: Option<Instant>,
    ttl: Duration,
    weight: u32,
}

impl<V> Clone for L0Entry<V> {
    fn clone(&self) -> Self {
        L0Entry {
            value: self.value.clone(),
            created_us: self.created_us,
            tags: self.tags.clone(),
            fresh_until: self.fresh_until,
            refresh_at: self.refresh_at,
            ttl: self.ttl,
            weight: self.weight,
        }
    }
}

struct EntryTtl;

impl<V> Expiry<String, L0Entry<V>> for EntryTtl {
    fn expire_after_create(&self, _: &String, entry: &L0Entry<V>, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &L0Entry<V>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The in-process tier.
pub(crate) struct L0<V> {
    cache: Cache<String, L0Entry<V>>,
    max_ttl: Duration,
}

impl<V: Send + Sync + 'static> L0<V> {
    pub(crate) fn new(max_bytes: u64, max_ttl: Duration, tally: Arc<CacheTally>) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &String, entry: &L0Entry<V>| entry.weight)
            .expire_after(EntryTtl)
            .eviction_listener(move |_, _, cause| {
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    tally.l0().demotions.add(1);
                }
            })
            .build();
        L0 { cache, max_ttl }
    }

    /// The fresh value under `key`, unless a tag or clear recorded here has invalidated it.
    pub(crate) async fn get(&self, key: &str, stamps: &LocalStamps) -> Option<Arc<V>> {
        self.lookup(key, stamps)
            .await
            .and_then(|hit| hit.fresh.then_some(hit.value))
    }

    /// The value under `key`, whether it is still fresh (a stale one is past its TTL but
    /// within its grace) and whether it is due for an eager refresh, unless a tag or clear
    /// recorded here has invalidated it.
    pub(crate) async fn lookup(&self, key: &str, stamps: &LocalStamps) -> Option<Hit<V>> {
        let entry = self.cache.get(key).await?;
        if stamps.is_stale(entry.created_us, entry.tags.as_deref()) {
            self.cache.invalidate(key).await;
            return None;
        }
        if entry.fresh_until.is_none() && entry.refresh_at.is_none() {
            return Some(Hit {
                value: entry.value,
                fresh: true,
                refresh_due: false,
            });
        }
        let now = Instant::now();
        Some(Hit {
            value: entry.value,
            fresh: entry.fresh_until.is_none_or(|until| now < until),
            refresh_due: entry.refresh_at.is_some_and(|at| now >= at),
        })
    }

    /// Inserts a value that is fresh for `fresh.fresh_for` more, due for an eager refresh
    /// after `fresh.refresh_in`, and kept `remaining` more in its tier (all capped by L0's own
    /// TTL). Skipped if a local invalidation already covers it (a probe racing an
    /// invalidation).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert(
        &self,
        key: &str,
        value: Arc<V>,
        created_us: u64,
        tags: &[String],
        fresh: Freshness,
        remaining: Duration,
        encoded_len: usize,
        stamps: &LocalStamps,
    ) {
        let Freshness {
            fresh_for,
            refresh_in,
        } = fresh;
        let ttl = remaining.min(self.max_ttl);
        if ttl.is_zero() || stamps.is_stale(created_us, Some(tags)) {
            return;
        }
        let entry = L0Entry {
            value,
            created_us,
            tags: (!tags.is_empty()).then(|| Arc::from(tags)),
            fresh_until: (fresh_for < ttl).then(|| Instant::now() + fresh_for),
            refresh_at: refresh_in.map(|after| Instant::now() + after),
            ttl,
            weight: u32::try_from(encoded_len + key.len() + 64).unwrap_or(u32::MAX),
        };
        self.cache.insert(key.to_owned(), entry).await;
    }

    pub(crate) async fn invalidate(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    pub(crate) fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    pub(crate) fn size(&self) -> (u64, u64) {
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

/// Invalidations this instance has made: tag timestamps and the last clear, on the store's
/// clock. L0 entries created at or before them are stale. Tag stamps are kept as long as an
/// L0 entry can live, which is all they are needed for (the shared tiers check their own).
pub(crate) struct LocalStamps {
    clear_us: AtomicU64,
    tags: RwLock<HashMap<String, (u64, Instant)>>,
    keep_for: Duration,
}

/// Beyond this many remembered tags, the oldest are forgotten and L0 is flushed.
const MAX_REMEMBERED_TAGS: usize = 100_000;

impl LocalStamps {
    pub(crate) fn new(keep_for: Duration) -> Self {
        LocalStamps {
            clear_us: AtomicU64::new(0),
            tags: RwLock::new(HashMap::new()),
            keep_for,
        }
    }

    pub(crate) fn is_stale(&self, created_us: u64, tags: Option<&[String]>) -> bool {
        if created_us <= self.clear_us.load(Ordering::Acquire) {
            return true;
        }
        let Some(tags) = tags.filter(|t| !t.is_empty()) else {
            return false;
        };
        let stamps = self.tags.read().unwrap_or_else(|e| e.into_inner());
        tags.iter()
            .any(|t| stamps.get(t).is_some_and(|(stamp, _)| created_us <= *stamp))
    }

    /// Records tag stamps. Returns true when memory ran over its bound and L0 must be flushed.
    pub(crate) fn record_tags(&self, tags: &[&str], stamp_us: u64) -> bool {
        let now = Instant::now();
        let mut stamps = self.tags.write().unwrap_or_else(|e| e.into_inner());
        for tag in tags {
            let slot = stamps.entry((*tag).to_owned()).or_insert((0, now));
            *slot = (slot.0.max(stamp_us), now);
        }
        if stamps.len() > MAX_REMEMBERED_TAGS {
            stamps.retain(|_, (_, at)| now.duration_since(*at) < self.keep_for);
            if stamps.len() > MAX_REMEMBERED_TAGS {
                stamps.clear();
                return true;
            }
        }
        false
    }

    pub(crate) fn record_clear(&self, stamp_us: u64) {
        self.clear_us.fetch_max(stamp_us, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_cover_entries_created_at_or_before_them() {
        let stamps = LocalStamps::new(Duration::from_secs(60));
        let tags = vec!["user:1".to_owned()];
        assert!(!stamps.is_stale(100, Some(&tags)));
        stamps.record_tags(&["user:1"], 100);
        assert!(stamps.is_stale(100, Some(&tags)));
        assert!(!stamps.is_stale(101, Some(&tags)));
        assert!(
            !stamps.is_stale(50, None),
            "untagged entries ignore tag stamps"
        );
        stamps.record_clear(200);
        assert!(stamps.is_stale(150, None));
        assert!(!stamps.is_stale(201, Some(&tags)));
    }
}
