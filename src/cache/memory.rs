//! [`MemoryTiers`]: the shared tiers kept in this process. Useful for tests, the quickstart and
//! single-process hosts; it has the same tier, tag and promotion semantics as Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::sync::Cache;

use super::config::TieredConfig;
use super::store::{Found, Probe, TierStore, Write};
use crate::codec;
use crate::error::Result;

#[derive(Clone)]
struct Stored {
    envelope: Arc<Vec<u8>>,
    expires_at: Instant,
}

struct StoredExpiry;

impl Expiry<String, Stored> for StoredExpiry {
    fn expire_after_create(&self, _: &String, value: &Stored, now: Instant) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Stored,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}

#[derive(Clone, Copy)]
struct ReadCount {
    reads: u32,
    window_start_us: u64,
    promoted: bool,
}

/// Shared tiers in this process's memory, each a size-bounded moka cache.
pub struct MemoryTiers {
    tiers: Vec<Cache<String, Stored>>,
    tier_ttls: Vec<Duration>,
    tag_stamps: Cache<String, u64>,
    clear_us: AtomicU64,
    read_counts: Cache<String, ReadCount>,
    promote_reads: u32,
    promote_window_us: u64,
    locks: std::sync::Mutex<std::collections::HashMap<String, (u128, Instant)>>,
}

impl std::fmt::Debug for MemoryTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTiers")
            .field("tiers", &self.tiers.len())
            .field(
                "entries",
                &self
                    .tiers
                    .iter()
                    .map(|t| t.entry_count())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl MemoryTiers {
    /// Tiers as `config` lists them, each bounded to `max_bytes_per_tier` of envelopes.
    pub fn new(config: &TieredConfig, max_bytes_per_tier: u64) -> Self {
        let tiers = config
            .tiers
            .iter()
            .map(|_| {
                Cache::builder()
                    .max_capacity(max_bytes_per_tier)
                    .weigher(|k: &String, v: &Stored| {
                        u32::try_from(k.len() + v.envelope.len()).unwrap_or(u32::MAX)
                    })
                    .expire_after(StoredExpiry)
                    .build()
            })
            .collect();
        MemoryTiers {
            tiers,
            tier_ttls: config.tiers.iter().map(|t| t.ttl).collect(),
            tag_stamps: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(config.max_ttl)
                .build(),
            clear_us: AtomicU64::new(0),
            read_counts: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(config.max_ttl)
                .build(),
            locks: std::sync::Mutex::new(std::collections::HashMap::new()),
            promote_reads: config.promotion.reads,
            promote_window_us: config.promotion.window.as_micros() as u64,
        }
    }

    /// Counts a read of `key` from a lower tier; returns (promote now, hot copy had expired).
    fn count_read(&self, key: &str, now_us: u64) -> (bool, bool) {
        let mut count = self.read_counts.get(key).unwrap_or(ReadCount {
            reads: 0,
            window_start_us: now_us,
            promoted: false,
        });
        let demoted = std::mem::take(&mut count.promoted);
        if now_us.saturating_sub(count.window_start_us) >= self.promote_window_us {
            count.reads = 0;
            count.window_start_us = now_us;
        }
        count.reads += 1;
        let promote = self.promote_reads > 0 && count.reads >= self.promote_reads;
        if promote {
            count = ReadCount {
                reads: 0,
                window_start_us: now_us,
                promoted: true,
            };
        }
        self.read_counts.insert(key.to_owned(), count);
        (promote, demoted)
    }
}

/// This process's wall clock in µs since the epoch.
pub(crate) fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// This process's wall clock in µs since the epoch, strictly increasing between calls, so
/// that a write after an invalidation never shares its timestamp.
pub(crate) fn now_us() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let wall = wall_us();
    let previous = LAST.fetch_max(wall, Ordering::AcqRel);
    if previous < wall {
        wall
    } else {
        LAST.fetch_add(1, Ordering::AcqRel) + 1
    }
}

#[async_trait]
impl TierStore for MemoryTiers {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn probe(&self, keys: &[&str]) -> Result<Probe> {
        let now = now_us();
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let hit = self
                .tiers
                .iter()
                .enumerate()
                .find_map(|(i, tier)| tier.get(*key).map(|stored| (i, stored)));
            let Some((tier, stored)) = hit else {
                found.push(None);
                continue;
            };
            let tag_stamps = match codec::header(&stored.envelope) {
                Ok(header) => header
                    .tags
                    .iter()
                    .map(|t| self.tag_stamps.get(t).unwrap_or(0))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let mut entry = Found::new(tier, stored.envelope.to_vec(), tag_stamps);
            if tier > 0 {
                let (promote, demoted) = self.count_read(key, now);
                entry.demoted = demoted;
                if promote {
                    let hot_ttl = self.tier_ttls[0];
                    let expires_at = stored.expires_at.min(Instant::now() + hot_ttl);
                    self.tiers[0].insert(
                        (*key).to_owned(),
                        Stored {
                            envelope: stored.envelope.clone(),
                            expires_at,
                        },
                    );
                    entry.promoted = true;
                }
            }
            found.push(Some(entry));
        }
        Ok(Probe {
            now_us: now,
            clear_us: self.clear_us.load(Ordering::Acquire),
            found,
        })
    }

    async fn write(&self, writes: Vec<Write<'_>>) -> Result<u64> {
        let now = now_us();
        for mut write in writes {
            let ttl_us = write.ttl.as_micros() as u64;
            let created = write.created_us.map_or(now, |c| c.min(now));
            codec::stamp(&mut write.envelope, created, now + ttl_us)?;
            for (i, tier) in self.tiers.iter().enumerate() {
                if i != write.tier {
                    tier.invalidate(write.key);
                }
            }
            self.read_counts.invalidate(write.key);
            self.tiers[write.tier].insert(
                write.key.to_owned(),
                Stored {
                    envelope: Arc::new(write.envelope),
                    expires_at: Instant::now() + write.ttl + write.grace,
                },
            );
        }
        Ok(now)
    }

    async fn remove(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            for tier in &self.tiers {
                tier.invalidate(*key);
            }
            self.read_counts.invalidate(*key);
        }
        Ok(())
    }

    async fn remove_if_unchanged(&self, key: &str, tier: usize, envelope: &[u8]) -> Result<()> {
        if let Some(tier) = self.tiers.get(tier)
            && tier
                .get(key)
                .is_some_and(|s| s.envelope.as_slice() == envelope)
        {
            tier.invalidate(key);
        }
        Ok(())
    }

    async fn stamp_tags(&self, tags: &[&str]) -> Result<u64> {
        let now = now_us();
        for tag in tags {
            self.tag_stamps.insert((*tag).to_owned(), now);
        }
        Ok(now)
    }

    async fn clear(&self) -> Result<u64> {
        let now = now_us();
        self.clear_us.fetch_max(now, Ordering::AcqRel);
        Ok(now)
    }

    async fn try_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        locks.retain(|_, (_, until)| *until > now);
        if locks.contains_key(key) {
            return Ok(false);
        }
        locks.insert(key.to_owned(), (token, now + lease));
        Ok(true)
    }

    async fn extend_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match locks.get_mut(key) {
            Some((held, until)) if *held == token && *until > now => {
                *until = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn unlock(&self, key: &str, token: u128) -> Result<()> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.get(key).is_some_and(|(held, _)| *held == token) {
            locks.remove(key);
        }
        Ok(())
    }
}
