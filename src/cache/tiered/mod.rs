//! [`TieredCache`], the trait, and [`Tiered`], its implementation over L0 and a [`TierStore`].

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::config::{EntryOptions, TieredConfig};
use super::flight::Flights;
use super::keys::{KeyHasher, check_key, check_tags};
use super::l0::{Freshness, Hit, L0, LocalStamps};
use super::memory::{MemoryTiers, wall_us};
use super::stats::{CacheStats, CacheTally, error_chain};
use super::store::{Found, Notice, Probe, TierStore, Write};
use crate::codec::{self, EncodeOptions};
use crate::error::{BoxError, Error, Result, excerpt};

mod load;

pub use load::CacheEntry;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A loader for one key, as the dyn-compatible [`TieredCache`] takes it. [`Tiered`]'s own
/// methods take any closure instead.
pub type Loader<V> = Box<dyn FnOnce() -> BoxFuture<'static, Result<V, BoxError>> + Send>;

/// A batch loader: gets the missing keys, returns the values it found (absent keys stay
/// uncached misses).
pub type ManyLoader<V> =
    Box<dyn FnOnce(Vec<String>) -> BoxFuture<'static, Result<HashMap<String, V>, BoxError>> + Send>;

/// A multi-tier cache of values of type `V`: an in-process L0 in front of shared tiers.
///
/// Dyn-compatible, so a host can hold `Arc<dyn TieredCache<Profile>>`. [`Tiered`] implements
/// it, and also has inherent methods of the same names that take plain closures and skip the
/// boxing.
#[async_trait]
pub trait TieredCache<V: Send + Sync + 'static>: Send + Sync {
    /// The value under `key`, from the first tier that holds a valid copy.
    async fn get(&self, key: &str) -> Result<Option<Arc<V>>>;

    /// The values under `keys`, in order; one round trip to the shared tiers for all L0 misses.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Arc<V>>>>;

    /// The value under `key`, or the loader's value, which is then cached with `options`.
    async fn get_or_load(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: Loader<V>,
    ) -> Result<Arc<V>>;

    /// The values under `keys`; the loader is called once with only the missing keys.
    async fn get_or_load_many(
        &self,
        keys: &[&str],
        options: &EntryOptions,
        loader: ManyLoader<V>,
    ) -> Result<Vec<Option<Arc<V>>>>;

    /// Stores `value` under `key` in its home tier and in L0.
    async fn set(&self, key: &str, value: V, options: &EntryOptions) -> Result<()>;

    /// Stores several values with the same options, in one round trip.
    async fn set_many(&self, entries: Vec<(String, V)>, options: &EntryOptions) -> Result<()>;

    /// Removes `key` from every tier.
    async fn invalidate(&self, key: &str) -> Result<()>;

    /// Invalidates every entry carrying one of `tags`, by writing one timestamp per tag.
    async fn invalidate_tags(&self, tags: &[&str]) -> Result<()>;

    /// Invalidates every entry of this named cache, by writing one timestamp.
    async fn clear(&self) -> Result<()>;

    /// A snapshot of the counters.
    fn stats(&self) -> CacheStats;
}

/// The tiered cache: L0 (moka, decoded `Arc<V>`) in front of a [`TierStore`] holding the
/// shared tiers (Redis hot/warm/cold, or [`MemoryTiers`]).
///
/// Reads that miss L0 probe every shared tier and the entry's tag timestamps in one round
/// trip. Shared-tier failures never fail a read: they are counted, logged, and the read
/// falls back to L0 and the loader. Writes apply locally and return the store's error.
/// Cloning is cheap and shares everything.
pub struct Tiered<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for Tiered<V> {
    fn clone(&self) -> Self {
        Tiered {
            inner: self.inner.clone(),
        }
    }
}

impl<V> std::fmt::Debug for Tiered<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiered")
            .field("name", &self.inner.config.name)
            .field("l0", &self.inner.l0.is_some())
            .field("store", &self.inner.store)
            .finish()
    }
}

struct Inner<V> {
    config: TieredConfig,
    encode: EncodeOptions,
    default_tier: usize,
    l0: Option<L0<V>>,
    store: Option<Arc<dyn TierStore>>,
    tally: Arc<CacheTally>,
    stamps: LocalStamps,
    flights: Arc<Flights<V>>,
    /// Store clock minus local clock, in µs, as last seen; estimates the store's clock when it
    /// cannot be asked.
    clock_offset_us: AtomicI64,
}

/// Builds a [`Tiered`]: choose the shared tiers, then [`build`](TieredBuilder::build).
#[must_use]
pub struct TieredBuilder<V> {
    config: TieredConfig,
    store: StoreChoice,
    _values: PhantomData<fn() -> V>,
}

enum StoreChoice {
    None,
    Memory {
        max_bytes_per_tier: u64,
    },
    Custom(Arc<dyn TierStore>),
    #[cfg(feature = "redis")]
    Redis(Box<crate::redis::RedisConnection>),
}

impl<V> TieredBuilder<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Shared tiers in this process ([`MemoryTiers`]), each bounded to `max_bytes_per_tier`.
    pub fn memory_tiers(mut self, max_bytes_per_tier: u64) -> Self {
        self.store = StoreChoice::Memory { max_bytes_per_tier };
        self
    }

    /// Shared tiers in Redis, over a (shareable) multiplexed connection.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, connection: crate::redis::RedisConnection) -> Self {
        self.store = StoreChoice::Redis(Box::new(connection));
        self
    }

    /// Shared tiers in a store of your own.
    pub fn store(mut self, store: Arc<dyn TierStore>) -> Self {
        self.store = StoreChoice::Custom(store);
        self
    }

    /// Validates the configuration and builds the cache. Does no I/O: a Redis that is down now
    /// is used once it answers. Call it within a Tokio runtime: the backplane subscriber is
    /// spawned there (outside one, the cache works without a backplane and logs a warning).
    pub fn build(self) -> Result<Tiered<V>> {
        let config = self.config;
        config.validate()?;
        let store: Option<Arc<dyn TierStore>> = match self.store {
            StoreChoice::None => None,
            StoreChoice::Memory { max_bytes_per_tier } => {
                Some(Arc::new(MemoryTiers::new(&config, max_bytes_per_tier)))
            }
            StoreChoice::Custom(store) => Some(store),
            #[cfg(feature = "redis")]
            StoreChoice::Redis(connection) => Some(Arc::new(super::redis::RedisTiers::new(
                *connection,
                &config,
            ))),
        };
        if store.is_none() && !config.l0.enabled {
            return Err(Error::invalid(
                "cache",
                "L0 is disabled and no shared tiers were given: nothing would be cached",
            ));
        }
        let tier_names: Vec<&str> = config.tiers.iter().map(|t| t.name.as_str()).collect();
        let tally = Arc::new(CacheTally::new(&config.name, &tier_names));
        let l0 = config
            .l0
            .enabled
            .then(|| L0::new(config.l0.max_bytes, config.l0.ttl, tally.clone()));
        let cache = Tiered {
            inner: Arc::new(Inner {
                encode: config.encode_options(),
                default_tier: config.tier_index(&config.default_tier)?,
                stamps: LocalStamps::new(config.l0.ttl),
                flights: Flights::new(),
                config,
                l0,
                store,
                tally,
                clock_offset_us: AtomicI64::new(0),
            }),
        };
        if let Some(store) = &cache.inner.store {
            // Weak: the store's subscriber must not keep the cache alive. Without L0 the
            // notices still keep the store's remembered stamps fresh.
            let weak = Arc::downgrade(&cache.inner);
            store.watch(Arc::new(move |notice| {
                let weak = weak.clone();
                Box::pin(async move {
                    if let Some(inner) = weak.upgrade() {
                        Tiered { inner }.apply_notice(notice).await;
                    }
                })
            }));
        }
        Ok(cache)
    }
}

/// A value for L0 after a write: key, value, TTL, encoded size, and created-at when it is not
/// the write's.
type L0Insert<'k, V> = (&'k str, Arc<V>, Duration, usize, Option<u64>);

/// What a write needs after validation and encoding.
struct Prepared<'k, V> {
    key: &'k str,
    value: Arc<V>,
    tier: usize,
    ttl: Duration,
    encoded: codec::Encoded,
    /// Created-at when earlier than the write (a load's start), on the store's clock.
    created_us: Option<u64>,
}

impl<V> Tiered<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Starts building a cache with `config`.
    pub fn builder(config: TieredConfig) -> TieredBuilder<V> {
        TieredBuilder {
            config,
            store: StoreChoice::None,
            _values: PhantomData,
        }
    }

    /// The configuration this cache was built with.
    pub fn config(&self) -> &TieredConfig {
        &self.inner.config
    }

    /// The value under `key`, from the first tier that holds a valid copy.
    pub async fn get(&self, key: &str) -> Result<Option<Arc<V>>> {
        check_key(key, self.inner.config.max_key_bytes)?;
        if let Some(Hit {
            value, fresh: true, ..
        }) = self.l0_lookup(key).await
        {
            return Ok(Some(value));
        }
        Ok(self.probe_one(key, true).await)
    }

    /// A counted L0 lookup: the value and whether it is fresh (a stale one counts as a miss).
    /// `None` also when there is no L0.
    async fn l0_lookup(&self, key: &str) -> Option<Hit<V>> {
        let inner = &*self.inner;
        let l0 = inner.l0.as_ref()?;
        let found = l0.lookup(key, &inner.stamps).await;
        match &found {
            Some(hit) if hit.fresh => inner.tally.l0().hits.add(1),
            _ => inner.tally.l0().misses.add(1),
        }
        found
    }

    /// How long a value created at `created_us` and fresh until `expires_us` stays fresh from
    /// `now_us`, and when it is due for an eager refresh.
    fn freshness(&self, created_us: u64, expires_us: u64, now_us: u64) -> Freshness {
        let eager = self.inner.config.eager_refresh;
        let refresh_in = (eager > 0.0).then(|| {
            let ttl_us = expires_us.saturating_sub(created_us) as f64;
            let refresh_at_us = created_us + (ttl_us * eager) as u64;
            Duration::from_micros(refresh_at_us.saturating_sub(now_us))
        });
        Freshness {
            fresh_for: Duration::from_micros(expires_us.saturating_sub(now_us)),
            refresh_in,
        }
    }

    /// The values under `keys`, in order. L0 misses are probed in one round trip.
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Arc<V>>>> {
        let inner = &*self.inner;
        for key in keys {
            check_key(key, inner.config.max_key_bytes)?;
        }
        let mut out: Vec<Option<Arc<V>>> = vec![None; keys.len()];
        let mut missing: Vec<usize> = Vec::new();
        match &inner.l0 {
            Some(l0) => {
                for (i, key) in keys.iter().enumerate() {
                    out[i] = l0.get(key, &inner.stamps).await;
                    if out[i].is_none() {
                        missing.push(i);
                    }
                }
                let hits = (keys.len() - missing.len()) as u64;
                inner.tally.l0().hits.add(hits);
                inner.tally.l0().misses.add(missing.len() as u64);
            }
            None => missing.extend(0..keys.len()),
        }
        if missing.is_empty() || inner.store.is_none() {
            return Ok(out);
        }
        if let [i] = missing[..] {
            out[i] = self.probe_one(keys[i], true).await;
            return Ok(out);
        }
        // Probe each distinct key once.
        let mut position: HashMap<&str, usize, KeyHasher> =
            HashMap::with_capacity_and_hasher(missing.len(), KeyHasher::default());
        let mut unique: Vec<&str> = Vec::with_capacity(missing.len());
        let slots: Vec<usize> = missing
            .iter()
            .map(|&i| {
                *position.entry(keys[i]).or_insert_with(|| {
                    unique.push(keys[i]);
                    unique.len() - 1
                })
            })
            .collect();
        let mut found = self.probe_shared(&unique, true).await;
        // Without repeated keys each slot is used once, and its value moves.
        let repeated = unique.len() < missing.len();
        for (&i, &slot) in missing.iter().zip(&slots) {
            out[i] = if repeated {
                found[slot].clone()
            } else {
                found[slot].take()
            };
        }
        Ok(out)
    }

    /// Stores `value` under `key` in its home tier (removing copies elsewhere) and in L0.
    pub async fn set(&self, key: &str, value: V, options: &EntryOptions) -> Result<()> {
        let prepared = self.prepare(key, Arc::new(value), options)?;
        self.write(vec![prepared], options).await
    }

    /// Stores several values with the same options, in one round trip.
    pub async fn set_many(&self, entries: Vec<(String, V)>, options: &EntryOptions) -> Result<()> {
        let (keys, values): (Vec<String>, Vec<V>) = entries.into_iter().unzip();
        let mut writes = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(values) {
            writes.push(self.prepare(key, Arc::new(value), options)?);
        }
        self.write(writes, options).await
    }

    /// Removes `key` from L0 and every shared tier.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let inner = &*self.inner;
        check_key(key, inner.config.max_key_bytes)?;
        if let Some(l0) = &inner.l0 {
            l0.invalidate(key).await;
        }
        match &inner.store {
            Some(store) => self.track(store.backend(), store.remove(&[key]).await),
            None => Ok(()),
        }
    }

    /// Invalidates every entry carrying one of `tags`: one timestamp per tag, no scans or mass
    /// deletes. Entries created at or before it are misses from now on.
    pub async fn invalidate_tags(&self, tags: &[&str]) -> Result<()> {
        let inner = &*self.inner;
        check_tags(tags, inner.config.max_tag_bytes, inner.config.max_tags)?;
        let (stamp, result) = match &inner.store {
            Some(store) => match self.track(store.backend(), store.stamp_tags(tags).await) {
                Ok(stamp) => (stamp, Ok(())),
                Err(error) => (self.store_clock_estimate(), Err(error)),
            },
            None => (self.store_clock_estimate(), Ok(())),
        };
        if inner.stamps.record_tags(tags, stamp)
            && let Some(l0) = &inner.l0
        {
            l0.invalidate_all();
        }
        result
    }

    /// Invalidates every entry of this named cache with one timestamp, and empties L0.
    pub async fn clear(&self) -> Result<()> {
        let inner = &*self.inner;
        let (stamp, result) = match &inner.store {
            Some(store) => match self.track(store.backend(), store.clear().await) {
                Ok(stamp) => (stamp, Ok(())),
                Err(error) => (self.store_clock_estimate(), Err(error)),
            },
            None => (self.store_clock_estimate(), Ok(())),
        };
        inner.stamps.record_clear(stamp);
        if let Some(l0) = &inner.l0 {
            l0.invalidate_all();
        }
        result
    }

    /// Applies another instance's notice to L0: the entries it names are dropped and re-read
    /// on their next access.
    async fn apply_notice(&self, notice: Notice) {
        let inner = &*self.inner;
        let Some(l0) = &inner.l0 else {
            return;
        };
        inner.tally.backplane_received.add(1);
        match notice {
            Notice::Written(keys) | Notice::Removed(keys) => {
                for key in keys {
                    l0.invalidate(&key).await;
                }
            }
            Notice::TagsInvalidated(tags) => {
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                if inner.stamps.record_tags(&tags, self.store_clock_estimate()) {
                    l0.invalidate_all();
                }
            }
            Notice::Cleared => {
                inner.stamps.record_clear(self.store_clock_estimate());
                l0.invalidate_all();
            }
            Notice::Resubscribed => {
                inner.tally.backplane_resubscribed.add(1);
                l0.invalidate_all();
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = self.inner.l0.as_ref().map_or((0, 0), L0::size);
        let mut stats = self
            .inner
            .tally
            .snapshot(self.inner.l0.is_some(), entries, bytes);
        stats.breaker = self.inner.store.as_ref().and_then(|store| store.breaker());
        stats
    }

    fn check_options(&self, options: &EntryOptions) -> Result<(usize, Duration)> {
        let config = &self.inner.config;
        check_tags(&options.tags, config.max_tag_bytes, config.max_tags)?;
        let tier = match &options.tier {
            Some(name) => config.tier_index(name)?,
            None => self.inner.default_tier,
        };
        let ttl = options.ttl.unwrap_or(config.tiers[tier].ttl);
        if ttl.is_zero() || ttl > config.max_ttl {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "{ttl:?} must be above zero and at most max_ttl {:?}",
                    config.max_ttl
                ),
            ));
        }
        Ok((tier, ttl))
    }

    fn prepare<'k>(
        &self,
        key: &'k str,
        value: Arc<V>,
        options: &EntryOptions,
    ) -> Result<Prepared<'k, V>> {
        check_key(key, self.inner.config.max_key_bytes)?;
        let (tier, ttl) = self.check_options(options)?;
        let encoded = codec::encode(key, &*value, &options.tags, &self.inner.encode)?;
        Ok(Prepared {
            key,
            value,
            tier,
            ttl,
            encoded,
            created_us: None,
        })
    }

    /// Writes prepared entries to the store, then to L0. Returns the store's error, if any,
    /// after L0 is updated.
    async fn write(&self, prepared: Vec<Prepared<'_, V>>, options: &EntryOptions) -> Result<()> {
        let (l0_inserts, writes) = self.split_writes(prepared);
        let inner = &*self.inner;
        let (created_us, result) = match &inner.store {
            Some(store) => match self.track(store.backend(), store.write(writes).await) {
                Ok(now) => (now, Ok(())),
                Err(error) => (self.store_clock_estimate(), Err(error)),
            },
            None => (self.store_clock_estimate(), Ok(())),
        };
        self.fill_l0(l0_inserts, created_us, options).await;
        result
    }

    /// Writes loaded values to the shared tiers; a failure is counted and logged (the callers
    /// already have their values).
    async fn write_shared(&self, writes: Vec<Write<'_>>) {
        if let (Some(store), false) = (&self.inner.store, writes.is_empty()) {
            let _ = self.track(store.backend(), store.write(writes).await);
        }
    }

    /// Counts the bytes of prepared writes and splits them into L0 inserts and store writes.
    fn split_writes<'k>(
        &self,
        prepared: Vec<Prepared<'k, V>>,
    ) -> (Vec<L0Insert<'k, V>>, Vec<Write<'k>>) {
        let mut l0_inserts = Vec::with_capacity(prepared.len());
        let mut writes = Vec::with_capacity(prepared.len());
        for p in prepared {
            let tally = self.inner.tally.shared(p.tier);
            tally.bytes_raw.add(p.encoded.raw_len as u64);
            tally.bytes_stored.add(p.encoded.stored_len as u64);
            l0_inserts.push((p.key, p.value, p.ttl, p.encoded.bytes.len(), p.created_us));
            writes.push(Write {
                key: p.key,
                tier: p.tier,
                ttl: p.ttl,
                grace: self.inner.config.fail_safe.grace,
                created_us: p.created_us,
                envelope: p.encoded.bytes,
            });
        }
        (l0_inserts, writes)
    }

    /// Puts written values in L0, created at their own created-at or else `created_us`.
    async fn fill_l0(
        &self,
        inserts: Vec<L0Insert<'_, V>>,
        created_us: u64,
        options: &EntryOptions,
    ) {
        let inner = &*self.inner;
        let grace = inner.config.fail_safe.grace;
        if let Some(l0) = &inner.l0 {
            for (key, value, ttl, len, created) in inserts {
                let eager = inner.config.eager_refresh;
                let freshness = Freshness {
                    fresh_for: ttl,
                    refresh_in: (eager > 0.0).then(|| ttl.mul_f64(eager)),
                };
                l0.insert(
                    key,
                    value,
                    created.unwrap_or(created_us),
                    &options.tags,
                    freshness,
                    ttl + grace,
                    len,
                    &inner.stamps,
                )
                .await;
            }
        }
    }

    /// Prepares freshly loaded values for caching, created at `load_started_us` (so that an
    /// invalidation made while they were loading covers them); a value that cannot be cached
    /// is counted and logged, not returned, because the caller has it.
    fn prepare_loaded<'k>(
        &self,
        loaded: Vec<(&'k str, Arc<V>)>,
        options: &EntryOptions,
        load_started_us: u64,
    ) -> Vec<Prepared<'k, V>> {
        let mut prepared = Vec::with_capacity(loaded.len());
        for (key, value) in loaded {
            match self.prepare(key, value, options) {
                Ok(mut p) => {
                    p.created_us = Some(load_started_us);
                    prepared.push(p);
                }
                Err(error) => {
                    self.inner.tally.oversized_values.add(1);
                    tracing::warn!(cache = %self.inner.config.name, key = %excerpt(key), error = %error_chain(&error), "loaded value not cached");
                }
            }
        }
        prepared
    }

    /// Probes the shared tiers for `keys` and turns what they hold into values, backfilling
    /// L0. A failed probe answers `None` for every key and counts as a backend error.
    /// `counted` is false for re-reads that are not new lookups (a lock waiter's polls); they
    /// leave the hit and miss counters alone. Only fresh values.
    async fn probe_shared(&self, keys: &[&str], counted: bool) -> Vec<Option<Arc<V>>> {
        let found = self.probe_detail(keys, counted).await;
        found
            .into_iter()
            .map(|f| f.and_then(|hit| hit.fresh.then_some(hit.value)))
            .collect()
    }

    /// [`probe_shared`](Self::probe_shared) of one key: its fresh value, if any.
    async fn probe_one(&self, key: &str, counted: bool) -> Option<Arc<V>> {
        let hit = self.probe_detail_one(key, counted).await?;
        hit.fresh.then_some(hit.value)
    }

    /// Like [`probe_shared`](Self::probe_shared), with stale values (past their TTL, within
    /// their grace) too, each with whether it is fresh.
    async fn probe_detail(&self, keys: &[&str], counted: bool) -> Vec<Option<Hit<V>>> {
        let Some((store, probe)) = self.probe_store(keys).await else {
            return vec![None; keys.len()];
        };
        let mut out = Vec::with_capacity(keys.len());
        for (key, found) in keys.iter().zip(probe.found) {
            let hit = self
                .accept(store, key, found, probe.now_us, probe.clear_us, counted)
                .await;
            out.push(hit);
        }
        out
    }

    /// [`probe_detail`](Self::probe_detail) of one key, without a `Vec` for its answer (a
    /// single read's hot path).
    async fn probe_detail_one(&self, key: &str, counted: bool) -> Option<Hit<V>> {
        let (store, probe) = self.probe_store(&[key]).await?;
        let found = probe.found.into_iter().next().flatten();
        self.accept(store, key, found, probe.now_us, probe.clear_us, counted)
            .await
    }

    /// The store's answer for `keys`, one slot per key, and the store. `None` without a
    /// store, or when the probe failed or answered the wrong number of slots: that counts as
    /// a backend error, not as misses.
    async fn probe_store(&self, keys: &[&str]) -> Option<(&dyn TierStore, Probe)> {
        let store = self.inner.store.as_deref()?;
        let probe = store.probe(keys).await.and_then(|probe| {
            if probe.found.len() == keys.len() {
                return Ok(probe);
            }
            Err(Error::Backend {
                backend: store.backend(),
                operation: "probe",
                source: format!(
                    "the store answered {} slots for {} keys",
                    probe.found.len(),
                    keys.len()
                )
                .into(),
            })
        });
        let probe = self.track(store.backend(), probe).ok()?;
        self.note_store_clock(probe.now_us);
        Some((store, probe))
    }

    /// Decodes and checks one found entry; counts hits, misses, promotions and demotions. An
    /// entry not found (`None`) is a plain miss in every shared tier.
    /// Returns the value and whether it is fresh; a stale value (past its TTL, within its
    /// grace) counts as a miss.
    #[allow(clippy::too_many_arguments)]
    async fn accept(
        &self,
        store: &dyn TierStore,
        key: &str,
        found: Option<Found>,
        now_us: u64,
        clear_us: u64,
        counted: bool,
    ) -> Option<Hit<V>> {
        let inner = &*self.inner;
        let count_misses_through = |last: usize| {
            if !counted {
                return;
            }
            for tier in 0..=last.min(inner.config.tiers.len() - 1) {
                inner.tally.shared(tier).misses.add(1);
            }
        };
        let Some(found) = found else {
            count_misses_through(usize::MAX);
            return None;
        };
        let decoded = match codec::decode::<V>(key, &found.envelope, inner.config.max_value_bytes) {
            Ok(decoded) => decoded,
            Err(error) => {
                inner.tally.corrupt_entries.add(1);
                tracing::warn!(cache = %inner.config.name, key = %excerpt(key), tier = %inner.config.tiers[found.tier].name, error = %error_chain(&error), "dropping an entry that does not decode");
                let removed = store
                    .remove_if_unchanged(key, found.tier, &found.envelope)
                    .await;
                let _ = self.track(store.backend(), removed);
                count_misses_through(usize::MAX);
                return None;
            }
        };
        let header = &decoded.header;
        let grace_us = inner.config.fail_safe.grace.as_micros() as u64;
        let kept_until_us = header.expires_us.saturating_add(grace_us);
        if kept_until_us <= now_us {
            count_misses_through(usize::MAX);
            return None;
        }
        let fresh = header.expires_us > now_us;
        let invalidated = header.created_us <= clear_us
            || found
                .tag_stamps
                .iter()
                .any(|&stamp| header.created_us <= stamp);
        if invalidated {
            inner.tally.stale_by_tag.add(1);
            count_misses_through(usize::MAX);
            return None;
        }
        if !fresh {
            count_misses_through(usize::MAX);
        } else {
            if found.tier > 0 {
                count_misses_through(found.tier - 1);
            }
            if counted {
                inner.tally.shared(found.tier).hits.add(1);
            }
        }
        if found.promoted {
            inner.tally.shared(0).promotions.add(1);
        }
        if found.demoted {
            inner.tally.shared(0).demotions.add(1);
        }
        let value = Arc::new(decoded.value);
        let freshness = self.freshness(header.created_us, header.expires_us, now_us);
        if let Some(l0) = &inner.l0 {
            let remaining = Duration::from_micros(kept_until_us - now_us);
            l0.insert(
                key,
                value.clone(),
                header.created_us,
                &header.tags,
                freshness,
                remaining,
                found.envelope.len(),
                &inner.stamps,
            )
            .await;
        }
        Some(Hit {
            value,
            fresh,
            refresh_due: fresh && freshness.refresh_in.is_some_and(|d| d.is_zero()),
        })
    }

    /// Counts and logs a store failure, and notes recovery.
    fn track<T>(&self, backend: &'static str, result: Result<T>) -> Result<T> {
        match &result {
            Ok(_) => self.inner.tally.backend_ok(backend),
            Err(error) => self.inner.tally.backend_failed(backend, error),
        }
        result
    }

    fn note_store_clock(&self, store_now_us: u64) {
        let offset = store_now_us as i64 - wall_us() as i64;
        self.inner.clock_offset_us.store(offset, Ordering::Relaxed);
    }

    fn store_clock_estimate(&self) -> u64 {
        let offset = self.inner.clock_offset_us.load(Ordering::Relaxed);
        wall_us().saturating_add_signed(offset)
    }
}

#[async_trait]
impl<V> TieredCache<V> for Tiered<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    async fn get(&self, key: &str) -> Result<Option<Arc<V>>> {
        Tiered::get(self, key).await
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Arc<V>>>> {
        Tiered::get_many(self, keys).await
    }

    async fn get_or_load(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: Loader<V>,
    ) -> Result<Arc<V>> {
        Tiered::get_or_load(self, key, options, loader).await
    }

    async fn get_or_load_many(
        &self,
        keys: &[&str],
        options: &EntryOptions,
        loader: ManyLoader<V>,
    ) -> Result<Vec<Option<Arc<V>>>> {
        Tiered::get_or_load_many(self, keys, options, loader).await
    }

    async fn set(&self, key: &str, value: V, options: &EntryOptions) -> Result<()> {
        Tiered::set(self, key, value, options).await
    }

    async fn set_many(&self, entries: Vec<(String, V)>, options: &EntryOptions) -> Result<()> {
        Tiered::set_many(self, entries, options).await
    }

    async fn invalidate(&self, key: &str) -> Result<()> {
        Tiered::invalidate(self, key).await
    }

    async fn invalidate_tags(&self, tags: &[&str]) -> Result<()> {
        Tiered::invalidate_tags(self, tags).await
    }

    async fn clear(&self) -> Result<()> {
        Tiered::clear(self).await
    }

    fn stats(&self) -> CacheStats {
        Tiered::stats(self)
    }
}
