//! The byte-level backend behind L0: an ordered list of shared tiers (hot, warm, cold) that
//! live in one store and are probed together.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// What a probe found for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Found {
    /// Index of the tier the entry was read from (0 is the hottest).
    pub tier: usize,
    /// The stored envelope (see [`crate::codec`]).
    pub envelope: Vec<u8>,
    /// Invalidation timestamps of the envelope's tags, in the envelope's tag order; 0 where a
    /// tag was never invalidated.
    pub tag_stamps: Vec<u64>,
    /// This read copied the entry to the hottest tier.
    pub promoted: bool,
    /// The entry had been promoted, and its hot copy has expired since.
    pub demoted: bool,
}

impl Found {
    /// An entry found in `tier` with these tag stamps.
    pub fn new(tier: usize, envelope: Vec<u8>, tag_stamps: Vec<u64>) -> Self {
        Found {
            tier,
            envelope,
            tag_stamps,
            promoted: false,
            demoted: false,
        }
    }
}

/// The answer to one probe of several keys.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Probe {
    /// The store's clock when it answered, in µs since the epoch.
    pub now_us: u64,
    /// When the cache was last cleared, in µs on the store's clock (0 if never).
    pub clear_us: u64,
    /// One slot per probed key, in order.
    pub found: Vec<Option<Found>>,
}

/// What another instance did to this cache, as its backplane reports it. Never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// These keys were written.
    Written(Vec<String>),
    /// These keys were removed.
    Removed(Vec<String>),
    /// These tags were invalidated.
    TagsInvalidated(Vec<String>),
    /// The whole cache was cleared.
    Cleared,
    /// The subscription was re-established: notices may have been missed meanwhile.
    Resubscribed,
}

/// Receives the notices of a store's backplane.
pub type NoticeHandler =
    std::sync::Arc<dyn Fn(Notice) -> super::BoxFuture<'static, ()> + Send + Sync>;

/// One entry to write.
#[derive(Debug)]
pub struct Write<'a> {
    /// The caller's key.
    pub key: &'a str,
    /// Index of the home tier.
    pub tier: usize,
    /// Time to live: the entry is fresh until then (its logical expiry).
    pub ttl: Duration,
    /// How long past its TTL the store keeps the entry, for fail-safe reads of a stale value.
    pub grace: Duration,
    /// The entry's created-at, on the store's clock, when it is earlier than the write: a
    /// loaded value is as old as the moment its load began, so an invalidation made while it
    /// was loading covers it. `None`: the store's clock at the write.
    pub created_us: Option<u64>,
    /// The envelope, with zero timestamps: the store stamps it with its own clock
    /// ([`crate::codec::stamp`]).
    pub envelope: Vec<u8>,
}

/// The shared tiers of a cache, as bytes. Implementations: [`MemoryTiers`](super::MemoryTiers)
/// (in-process, for tests and the quickstart) and `RedisTiers` (feature `redis`).
///
/// Every timestamp comes from the store's own clock, so instances with skewed clocks still
/// agree on which entries a tag invalidation covers.
#[async_trait]
pub trait TierStore: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors, such as `"redis"`.
    fn backend(&self) -> &'static str;

    /// Looks up each key in every tier, hottest first, together with the invalidation
    /// timestamps of the found entries' tags and the cache's clear timestamp: one round trip.
    /// Counts reads from lower tiers and promotes frequently read entries.
    async fn probe(&self, keys: &[&str]) -> Result<Probe>;

    /// Writes each entry to its home tier, stamping created-at and expiry, and removes its
    /// copies from the other tiers. Returns the store's clock at the write.
    async fn write(&self, writes: Vec<Write<'_>>) -> Result<u64>;

    /// Removes the keys from every tier.
    async fn remove(&self, keys: &[&str]) -> Result<()>;

    /// Removes one tier's copy of `key`, but only if it still holds `envelope` (used to drop
    /// corrupt bytes without racing a fresh write).
    async fn remove_if_unchanged(&self, key: &str, tier: usize, envelope: &[u8]) -> Result<()>;

    /// Records that every entry carrying one of `tags` and created until now is invalid.
    /// Returns the timestamp written.
    async fn stamp_tags(&self, tags: &[&str]) -> Result<u64>;

    /// Records that every entry created until now is invalid. Returns the timestamp written.
    async fn clear(&self) -> Result<u64>;

    /// Takes the load lock of `key` for `lease` if nobody holds it (`SET NX PX` with `token`).
    /// Returns whether this caller now holds it.
    async fn try_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool>;

    /// Extends a held lock to `lease` from now; false if it was lost (expired or taken).
    async fn extend_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool>;

    /// Releases the lock if `token` still holds it (compare and delete).
    async fn unlock(&self, key: &str, token: u128) -> Result<()>;

    /// Starts delivering other instances' notices to `handler`, if the store has a backplane.
    /// This instance's own writes are not delivered back.
    fn watch(&self, handler: NoticeHandler) {
        let _ = handler;
    }

    /// The state of the circuit breaker in front of the store, if it has one.
    fn breaker(&self) -> Option<crate::resilience::BreakerStats> {
        None
    }
}
