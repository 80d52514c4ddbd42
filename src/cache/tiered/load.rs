//! The load path of [`Tiered`]: `get_or_load` and `get_or_load_many` with single-flight, the
//! cross-instance load lock, fail-safe fallbacks and eager refresh.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Tiered;
use crate::cache::Loader;
use crate::cache::config::EntryOptions;
use crate::cache::flight::{
    FlightGuard, Join, LoadFailure, Outcome, Served, SharedLoadFailure, Waiter,
};
use crate::cache::keys::check_key;
use crate::cache::lock::{Backoff, HeldLock};
use crate::cache::store::TierStore;
use crate::error::{BoxError, Error, Result, excerpt};

/// How a leader's turn at the load lock ended.
enum LockTurn<V> {
    /// Another instance filled the key meanwhile.
    Filled(Arc<V>),
    /// This instance holds the lock and loads.
    Held(HeldLock),
    /// No lock (the wait ran out, or the store failed): load anyway.
    Unlocked,
}

/// What a leader caches after its load.
enum ToCache<V: 'static> {
    /// Nothing loaded: the value found is due for an eager refresh, with this loader.
    Refresh(Loader<V>),
    /// A value just loaded, with the entry's options.
    Loaded(Arc<V>, u64),
    /// A stale value served because the loader failed, written back as fresh for
    /// `fail_safe.retry_after`.
    Throttled(Arc<V>, u64),
}

/// A value from [`Tiered::get_or_load_entry`], and whether it is a stale fallback.
#[derive(Debug)]
#[non_exhaustive]
pub struct CacheEntry<V> {
    /// The value.
    pub value: Arc<V>,
    /// True when it is past its TTL, served because the loader failed, timed out or was slower
    /// than the soft timeout (fail-safe).
    pub stale: bool,
}

impl<V> Tiered<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The value under `key`, or else `loader`'s, which is cached with `options`.
    ///
    /// Concurrent calls for the same missing key share one load (single-flight): the loader
    /// runs once, in its own task, and every caller gets its value or its error. A caller that
    /// gives up cancels nothing. Options are checked before the loader runs. If the loaded
    /// value cannot be cached (too large, or the shared tiers are down) it is still returned,
    /// and the failure counted. With fail-safe on, a stale value may be returned instead of an
    /// error or a wait; [`get_or_load_entry`](Self::get_or_load_entry) says when. Must be
    /// called within a Tokio runtime.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Arc<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        Ok(self.get_or_load_entry(key, options, loader).await?.value)
    }

    /// [`get_or_load`](Self::get_or_load), saying whether the value is a stale fallback
    /// (fail-safe: the loader failed, timed out, or was slower than the soft timeout).
    pub async fn get_or_load_entry<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<CacheEntry<V>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let inner = &*self.inner;
        check_key(key, inner.config.max_key_bytes)?;
        self.check_options(options)?;
        let own_stale = match self.l0_lookup(key).await {
            Some(hit) if hit.fresh => {
                if hit.refresh_due {
                    self.spawn_refresh(key, options, hit.value.clone(), loader);
                }
                return Ok(CacheEntry {
                    value: hit.value,
                    stale: false,
                });
            }
            Some(hit) => Some(hit.value),
            None => None,
        };
        // Join before reading the shared tiers, so that a stampede costs one probe, not one
        // per caller.
        let waiter = match inner.flights.join(key) {
            Join::Follow(waiter) => {
                inner.tally.coalesced_loads.add(1);
                waiter
            }
            Join::Lead(guard) => {
                let waiter = guard.waiter();
                let cache = self.clone();
                let (key, options, stale) = (key.to_owned(), options.clone(), own_stale.clone());
                tokio::spawn(async move { cache.lead(guard, &key, &options, stale, loader).await });
                waiter
            }
        };
        let fail_safe = &inner.config.fail_safe;
        let soft_timeout = fail_safe
            .soft_timeout
            .filter(|_| !fail_safe.grace.is_zero());
        match waiter.wait(soft_timeout, own_stale).await {
            Ok(served) => {
                if served.stale {
                    inner.tally.stale_served.add(1);
                }
                Ok(CacheEntry {
                    value: served.value,
                    stale: served.stale,
                })
            }
            Err(failure) => Err(Error::Loader {
                key: excerpt(key),
                source: Box::new(failure),
            }),
        }
    }

    /// The leader's task: load (or find), put the value in L0, tell the waiters, then write
    /// the shared tiers and release the lock.
    async fn lead<F, Fut, E>(
        &self,
        guard: FlightGuard<V>,
        key: &str,
        options: &EntryOptions,
        stale: Option<Arc<V>>,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let inner = &*self.inner;
        let use_lock = inner.config.lock.enabled && !options.skip_lock;
        let (outcome, to_cache, lock) = self.load_one(&guard, key, use_lock, stale, loader).await;
        let mut cache_options;
        let cache_options = match &to_cache {
            Some(ToCache::Throttled(..)) => {
                // The stale value counts as fresh for a while, so the loader is not hammered.
                cache_options = options.clone();
                cache_options.ttl = Some(inner.config.fail_safe.retry_after);
                &cache_options
            }
            _ => options,
        };
        let mut refresh = None;
        let mut started_us = 0;
        let loaded = to_cache
            .and_then(|c| match c {
                ToCache::Loaded(value, started) | ToCache::Throttled(value, started) => {
                    started_us = started;
                    Some((key, value))
                }
                ToCache::Refresh(loader) => {
                    refresh = Some(loader);
                    None
                }
            })
            .into_iter()
            .collect();
        let prepared = self.prepare_loaded(loaded, cache_options, started_us);
        let (l0_inserts, writes) = self.split_writes(prepared);
        // L0 has the value before anyone is told; the shared tiers are written after, so
        // waiters do not wait for them.
        self.fill_l0(l0_inserts, self.store_clock_estimate(), cache_options)
            .await;
        guard.publish(outcome);
        self.write_shared(writes).await;
        // Other instances waiting on the lock find the value in the shared tiers.
        if let Some(lock) = lock {
            lock.release().await;
        }
        if let Some(loader) = refresh {
            self.refresh(key, options, loader).await;
        }
        drop(guard);
    }

    /// Starts an eager refresh of `key`, whose `current` value is still fresh, unless a load
    /// or refresh of it is already running here.
    fn spawn_refresh<F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        current: Arc<V>,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let Join::Lead(guard) = self.inner.flights.join(key) else {
            return;
        };
        // Whoever joins meanwhile gets the current value at once.
        guard.publish(Ok(Served {
            value: current,
            stale: false,
        }));
        let cache = self.clone();
        let (key, options) = (key.to_owned(), options.clone());
        tokio::spawn(async move {
            cache.refresh(&key, &options, loader).await;
            drop(guard);
        });
    }

    /// Reloads `key` and caches the new value, once across instances: it runs only if this
    /// instance takes the load lock without waiting. A failure leaves the current value.
    async fn refresh<F, Fut, E>(&self, key: &str, options: &EntryOptions, loader: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        let lock = match &inner.store {
            Some(store) => match HeldLock::try_take(store, key, inner.config.lock.lease).await {
                Ok(Some(lock)) => Some(lock),
                // Another instance is loading or refreshing it, or the store is failing.
                Ok(None) | Err(_) => return,
            },
            None => None,
        };
        // Another instance may have refreshed it just before releasing the lock.
        if let Some(hit) = self.probe_detail_one(key, false).await
            && hit.fresh
            && !hit.refresh_due
        {
            if let Some(lock) = lock {
                lock.release().await;
            }
            return;
        }
        inner.tally.eager_refreshes.add(1);
        inner.tally.loader_calls.add(1);
        let started_us = self.store_clock_estimate();
        let loaded = self.run_loader(loader()).await;
        match loaded {
            Ok(value) => {
                let prepared =
                    self.prepare_loaded(vec![(key, Arc::new(value))], options, started_us);
                let (l0_inserts, writes) = self.split_writes(prepared);
                self.fill_l0(l0_inserts, self.store_clock_estimate(), options)
                    .await;
                self.write_shared(writes).await;
            }
            Err(failure) => {
                inner.tally.loader_errors.add(1);
                tracing::warn!(cache = %inner.config.name, key = %excerpt(key), error = %failure, "eager refresh failed; the current value stays");
            }
        }
        if let Some(lock) = lock {
            lock.release().await;
        }
    }

    /// The leader's load: L0 again, the shared tiers, the load lock (another instance may be
    /// loading), then the loader under the hard timeout, with a stale value as the fallback.
    /// Returns the outcome, what to cache, and the lock to release once it is cached.
    async fn load_one<F, Fut, E>(
        &self,
        guard: &FlightGuard<V>,
        key: &str,
        use_lock: bool,
        mut stale: Option<Arc<V>>,
        loader: F,
    ) -> (Outcome<V>, Option<ToCache<V>>, Option<HeldLock>)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let inner = &*self.inner;
        let fresh = |value: Arc<V>| {
            Ok(Served {
                value,
                stale: false,
            })
        };
        // A load that finished between this caller's miss and its lead has filled L0 (not
        // counted again as a lookup).
        if let Some(l0) = &inner.l0 {
            match l0.lookup(key, &inner.stamps).await {
                Some(hit) if hit.fresh => return (fresh(hit.value), None, None),
                Some(hit) => stale = Some(hit.value),
                None => {}
            }
        }
        match self.probe_detail_one(key, true).await {
            Some(hit) if hit.fresh => {
                if hit.refresh_due {
                    // Served now; the refresh runs after, in this same background task.
                    let loader: Loader<V> = Box::new(move || {
                        Box::pin(async move { loader().await.map_err(Into::into) })
                    });
                    let refresh = ToCache::Refresh(loader);
                    return (fresh(hit.value), Some(refresh), None);
                }
                return (fresh(hit.value), None, None);
            }
            Some(hit) => stale = Some(hit.value),
            None => {}
        }
        if let Some(value) = &stale {
            guard.offer_stale(value.clone());
        }
        let mut lock = None;
        if let (true, Some(store)) = (use_lock, &inner.store) {
            match self.lock_or_wait(store, key).await {
                LockTurn::Filled(value) => return (fresh(value), None, None),
                LockTurn::Held(held) => lock = Some(held),
                LockTurn::Unlocked => {}
            }
        }
        inner.tally.loader_calls.add(1);
        let started_us = self.store_clock_estimate();
        let loaded = self.run_loader(loader()).await;
        match loaded {
            Ok(value) => {
                let value = Arc::new(value);
                (
                    fresh(value.clone()),
                    Some(ToCache::Loaded(value, started_us)),
                    lock,
                )
            }
            Err(failure) => {
                inner.tally.loader_errors.add(1);
                match stale {
                    Some(value) => {
                        inner.tally.fail_safe_activations.add(1);
                        tracing::warn!(cache = %inner.config.name, key = %excerpt(key), error = %failure, "loader failed; serving the stale value");
                        let served = Ok(Served {
                            value: value.clone(),
                            stale: true,
                        });
                        (served, Some(ToCache::Throttled(value, started_us)), lock)
                    }
                    None => (Err(SharedLoadFailure(Arc::new(failure))), None, lock),
                }
            }
        }
    }

    /// Takes the load lock of `key`, or waits (polling the shared tiers with backoff) for the
    /// instance that holds it to fill the key. The wait is bounded by `lock.wait`; when it runs
    /// out, or the store cannot lock, the caller loads without the lock.
    async fn lock_or_wait(&self, store: &Arc<dyn TierStore>, key: &str) -> LockTurn<V> {
        let inner = &*self.inner;
        let config = &inner.config.lock;
        let deadline = tokio::time::Instant::now() + config.wait;
        let mut backoff = Backoff::new(config.poll_min, config.poll_max);
        let mut waited = false;
        loop {
            match HeldLock::try_take(store, key, config.lease).await {
                Ok(Some(held)) => {
                    // Another instance may have filled the key just before releasing.
                    if let Some(value) = self.probe_one(key, false).await {
                        held.release().await;
                        return LockTurn::Filled(value);
                    }
                    return LockTurn::Held(held);
                }
                Ok(None) => {}
                Err(error) => {
                    let _ = self.track(store.backend(), Err::<(), _>(error));
                    return LockTurn::Unlocked;
                }
            }
            if !waited {
                inner.tally.lock_waits.add(1);
                waited = true;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                inner.tally.lock_timeouts.add(1);
                tracing::debug!(cache = %inner.config.name, key = %excerpt(key), "load lock wait ran out; loading without it");
                return LockTurn::Unlocked;
            }
            tokio::time::sleep(backoff.pause().min(left)).await;
            if let Some(value) = self.probe_one(key, false).await {
                return LockTurn::Filled(value);
            }
        }
    }

    /// The values under `keys`, in order; `loader` is called once, with only the keys that no
    /// tier holds and no other call is loading, and what it returns is cached with `options`.
    /// Keys it does not return stay `None` and are not cached. Keys another call is loading
    /// are waited for (single-flight per key, as in [`get_or_load`](Self::get_or_load)); the
    /// cross-instance lock and stale fallbacks apply to `get_or_load` only.
    pub async fn get_or_load_many<F, Fut, E>(
        &self,
        keys: &[&str],
        options: &EntryOptions,
        loader: F,
    ) -> Result<Vec<Option<Arc<V>>>>
    where
        F: FnOnce(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<HashMap<String, V>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.check_options(options)?;
        let mut out = self.get_many(keys).await?;
        let inner = &*self.inner;
        // Each missing key joins the load in flight for it, or is led by this call.
        let mut waiting: Vec<(&str, Waiter<V>)> = Vec::new();
        let mut leads: Vec<(String, FlightGuard<V>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if out[i].is_some() || waiting.iter().any(|(k, _)| k == key) {
                continue;
            }
            match inner.flights.join(key) {
                Join::Follow(waiter) => {
                    inner.tally.coalesced_loads.add(1);
                    waiting.push((key, waiter));
                }
                Join::Lead(guard) => {
                    waiting.push((key, guard.waiter()));
                    leads.push(((*key).to_owned(), guard));
                }
            }
        }
        if !leads.is_empty() {
            let cache = self.clone();
            let options = options.clone();
            tokio::spawn(async move { cache.lead_many(leads, &options, loader).await });
        }
        for (key, waiter) in waiting {
            let value = match waiter.wait(None, None).await {
                Ok(served) => Some(served.value),
                Err(failure) if matches!(*failure.0, LoadFailure::NotReturned) => None,
                Err(failure) => {
                    return Err(Error::Loader {
                        key: excerpt(key),
                        source: Box::new(failure),
                    });
                }
            };
            for (i, k) in keys.iter().enumerate() {
                if *k == key {
                    out[i] = value.clone();
                }
            }
        }
        Ok(out)
    }

    /// The leader's task of a batch load: one loader call for every key this call leads, each
    /// key's flight told its own outcome.
    async fn lead_many<F, Fut, E>(
        &self,
        leads: Vec<(String, FlightGuard<V>)>,
        options: &EntryOptions,
        loader: F,
    ) where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<HashMap<String, V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        let keys: Vec<String> = leads.iter().map(|(key, _)| key.clone()).collect();
        inner.tally.loader_calls.add(1);
        let started_us = self.store_clock_estimate();
        let loaded = self.run_loader(loader(keys)).await;
        let mut loaded = match loaded {
            Ok(loaded) => loaded,
            Err(failure) => {
                inner.tally.loader_errors.add(1);
                let failure = SharedLoadFailure(Arc::new(failure));
                for (_, guard) in &leads {
                    guard.publish(Err(failure.clone()));
                }
                return;
            }
        };
        let found: Vec<(&str, Arc<V>)> = leads
            .iter()
            .filter_map(|(key, _)| {
                loaded
                    .remove(key)
                    .map(|value| (key.as_str(), Arc::new(value)))
            })
            .collect();
        let not_returned = SharedLoadFailure(Arc::new(LoadFailure::NotReturned));
        let prepared = self.prepare_loaded(found.clone(), options, started_us);
        let (l0_inserts, writes) = self.split_writes(prepared);
        self.fill_l0(l0_inserts, self.store_clock_estimate(), options)
            .await;
        for (key, guard) in &leads {
            let outcome = match found.iter().find(|(k, _)| k == key) {
                Some((_, value)) => Ok(Served {
                    value: value.clone(),
                    stale: false,
                }),
                None => Err(not_returned.clone()),
            };
            guard.publish(outcome);
        }
        self.write_shared(writes).await;
    }

    /// Runs a loader's future under the hard timeout, if one is configured.
    async fn run_loader<T, E: Into<BoxError>>(
        &self,
        load: impl Future<Output = std::result::Result<T, E>>,
    ) -> std::result::Result<T, LoadFailure> {
        match self.inner.config.fail_safe.hard_timeout {
            Some(limit) => match tokio::time::timeout(limit, load).await {
                Ok(result) => result.map_err(|e| LoadFailure::Failed(e.into())),
                Err(_) => Err(LoadFailure::TimedOut(limit)),
            },
            None => load.await.map_err(|e| LoadFailure::Failed(e.into())),
        }
    }
}
