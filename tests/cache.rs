//! The tiered cache: behaviour on in-process tiers (no services), then against the real Redis.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pupkit::cache::{
    EntryOptions, MemoryTiers, Probe, TierStore, Tiered, TieredCache, TieredConfig, Write,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Message {
    id: u64,
    text: String,
}

fn message(id: u64) -> Message {
    Message {
        id,
        text: format!("message number {id}"),
    }
}

fn memory_cache(name: &str) -> Tiered<Message> {
    Tiered::builder(TieredConfig::named(name))
        .memory_tiers(16 << 20)
        .build()
        .unwrap()
}

/// Counts calls to the store it wraps; with `short_answers` set, its probes leave out the
/// last key's slot (a broken store).
#[derive(Debug)]
struct CountingStore {
    inner: MemoryTiers,
    probes: AtomicUsize,
    probed_keys: AtomicUsize,
    short_answers: std::sync::atomic::AtomicBool,
}

impl CountingStore {
    fn new(config: &TieredConfig) -> Self {
        CountingStore {
            inner: MemoryTiers::new(config, 1 << 20),
            probes: AtomicUsize::new(0),
            probed_keys: AtomicUsize::new(0),
            short_answers: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl TierStore for CountingStore {
    fn backend(&self) -> &'static str {
        "counting"
    }
    async fn probe(&self, keys: &[&str]) -> pupkit::Result<Probe> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        self.probed_keys.fetch_add(keys.len(), Ordering::SeqCst);
        let mut probe = self.inner.probe(keys).await?;
        if self.short_answers.load(Ordering::SeqCst) {
            probe.found.pop();
        }
        Ok(probe)
    }
    async fn write(&self, writes: Vec<Write<'_>>) -> pupkit::Result<u64> {
        self.inner.write(writes).await
    }
    async fn remove(&self, keys: &[&str]) -> pupkit::Result<()> {
        self.inner.remove(keys).await
    }
    async fn remove_if_unchanged(
        &self,
        key: &str,
        tier: usize,
        envelope: &[u8],
    ) -> pupkit::Result<()> {
        self.inner.remove_if_unchanged(key, tier, envelope).await
    }
    async fn stamp_tags(&self, tags: &[&str]) -> pupkit::Result<u64> {
        self.inner.stamp_tags(tags).await
    }
    async fn clear(&self) -> pupkit::Result<u64> {
        self.inner.clear().await
    }
    async fn try_lock(&self, key: &str, token: u128, lease: Duration) -> pupkit::Result<bool> {
        self.inner.try_lock(key, token, lease).await
    }
    async fn extend_lock(&self, key: &str, token: u128, lease: Duration) -> pupkit::Result<bool> {
        self.inner.extend_lock(key, token, lease).await
    }
    async fn unlock(&self, key: &str, token: u128) -> pupkit::Result<()> {
        self.inner.unlock(key, token).await
    }
}

#[tokio::test]
async fn get_or_load_loads_once_then_serves_from_l0() {
    let cache = memory_cache("once");
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let counter = calls.clone();
        let value = cache
            .get_or_load("m:1", &EntryOptions::new(), move || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(message(1))
            })
            .await
            .unwrap();
        assert_eq!(*value, message(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(stats.loader_calls, 1);
    assert_eq!(stats.tier("l0").unwrap().hits, 2);
    assert!(
        (stats.hit_rate - 2.0 / 3.0).abs() < 1e-9,
        "{}",
        stats.hit_rate
    );
}

/// A loader that counts its calls and waits for `gate` before answering `value`.
fn gated_loader(
    calls: &Arc<AtomicUsize>,
    gate: &Arc<tokio::sync::Notify>,
    value: Result<Message, &'static str>,
) -> impl FnOnce() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Message, std::io::Error>> + Send>,
> + Send
+ 'static {
    let (calls, gate) = (calls.clone(), gate.clone());
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
            value.map_err(std::io::Error::other)
        })
    }
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..2_000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} did not happen within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_callers_of_a_cold_key_cause_one_load() {
    let cache = memory_cache("stampede");
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load("cold", &EntryOptions::new(), move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::io::Error>(message(1))
                    })
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(*task.await.unwrap().unwrap(), message(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().loader_calls, 1);
}

#[tokio::test]
async fn a_dropped_first_caller_does_not_cancel_the_load_for_the_others() {
    let cache = memory_cache("cancel");
    let (calls, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let first = {
        let cache = cache.clone();
        let loader = gated_loader(&calls, &gate, Ok(message(1)));
        tokio::spawn(async move { cache.get_or_load("k", &EntryOptions::new(), loader).await })
    };
    eventually("the load started", || calls.load(Ordering::SeqCst) == 1).await;
    let second = {
        let cache = cache.clone();
        let loader = gated_loader(&calls, &gate, Ok(message(2)));
        tokio::spawn(async move { cache.get_or_load("k", &EntryOptions::new(), loader).await })
    };
    eventually("the second caller joined", || {
        cache.stats().coalesced_loads == 1
    })
    .await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    gate.notify_waiters();
    assert_eq!(
        *second.await.unwrap().unwrap(),
        message(1),
        "the first caller's load answered"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&message(1)));
}

#[tokio::test]
async fn a_loader_error_reaches_every_waiter_and_a_panic_frees_the_key() {
    let cache = memory_cache("shared-error");
    let (calls, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            let loader = gated_loader(&calls, &gate, Err("upstream 503"));
            tokio::spawn(async move { cache.get_or_load("k", &EntryOptions::new(), loader).await })
        })
        .collect();
    eventually("all ten joined one load", || {
        calls.load(Ordering::SeqCst) == 1 && cache.stats().coalesced_loads == 9
    })
    .await;
    gate.notify_waiters();
    for waiter in waiters {
        let err = waiter.await.unwrap().unwrap_err();
        assert!(err.is_loader(), "{err}");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "upstream 503"
        );
    }
    assert_eq!(cache.stats().loader_errors, 1);

    let err = cache
        .get_or_load("p", &EntryOptions::new(), || async {
            if true {
                panic!("loader bug");
            }
            Ok::<_, std::io::Error>(message(0))
        })
        .await
        .unwrap_err();
    assert!(err.is_loader());
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("panicked"),
        "{err}"
    );
    // The key is free again: the next call loads.
    let value = cache
        .get_or_load("p", &EntryOptions::new(), || async {
            Ok::<_, std::io::Error>(message(3))
        })
        .await
        .unwrap();
    assert_eq!(*value, message(3));
}

fn fail_safe_cache(name: &str, configure: impl FnOnce(&mut TieredConfig)) -> Tiered<Message> {
    let mut config = TieredConfig::named(name);
    config.fail_safe.grace = Duration::from_secs(60);
    configure(&mut config);
    Tiered::builder(config)
        .memory_tiers(16 << 20)
        .build()
        .unwrap()
}

async fn failing() -> Result<Message, std::io::Error> {
    Err(std::io::Error::other("upstream down"))
}

#[tokio::test]
async fn fail_safe_serves_the_stale_value_when_the_loader_fails_then_throttles() {
    let cache = fail_safe_cache("failsafe", |_| {});
    let short = EntryOptions::new().ttl(Duration::from_millis(100));
    cache.set("k", message(1), &short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        cache.get("k").await.unwrap().is_none(),
        "a plain get never returns a stale value"
    );

    let calls = Arc::new(AtomicUsize::new(0));
    let counted_failure = |calls: &Arc<AtomicUsize>| {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            failing()
        }
    };
    let entry = cache
        .get_or_load_entry("k", &short, counted_failure(&calls))
        .await
        .unwrap();
    assert_eq!((&*entry.value, entry.stale), (&message(1), true));
    let stats = cache.stats();
    assert_eq!((stats.fail_safe_activations, stats.stale_served), (1, 1));
    // For retry_after (30 s) the stale value counts as fresh: the loader is not called again.
    let again = cache
        .get_or_load_entry("k", &short, counted_failure(&calls))
        .await
        .unwrap();
    assert_eq!(*again.value, message(1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Without a stale value, a failing loader is an error as ever.
    let err = cache
        .get_or_load("none", &short, failing)
        .await
        .unwrap_err();
    assert!(err.is_loader(), "{err}");
}

#[tokio::test]
async fn fail_safe_retries_the_loader_once_retry_after_has_passed() {
    let cache = fail_safe_cache("retry", |c| {
        c.fail_safe.retry_after = Duration::from_millis(100)
    });
    let short = EntryOptions::new().ttl(Duration::from_millis(100));
    cache.set("k", message(1), &short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry = cache.get_or_load_entry("k", &short, failing).await.unwrap();
    assert!(entry.stale);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let value = cache
        .get_or_load("k", &short, || async {
            Ok::<_, std::io::Error>(message(2))
        })
        .await
        .unwrap();
    assert_eq!(
        *value,
        message(2),
        "the loader ran again and its value replaced the stale one"
    );
}

#[tokio::test]
async fn a_hard_timeout_gives_up_on_a_slow_loader() {
    let cache = fail_safe_cache("hard", |c| {
        c.fail_safe.hard_timeout = Some(Duration::from_millis(100))
    });
    let short = EntryOptions::new().ttl(Duration::from_millis(100));
    let slow = || async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(message(9))
    };
    cache.set("k", message(1), &short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let entry = cache.get_or_load_entry("k", &short, slow).await.unwrap();
    assert_eq!((&*entry.value, entry.stale), (&message(1), true));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let err = cache
        .get_or_load("nothing-stale", &short, slow)
        .await
        .unwrap_err();
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("hard timeout"),
        "{err}"
    );
}

#[tokio::test]
async fn a_soft_timeout_serves_stale_and_lets_the_load_finish() {
    let cache = fail_safe_cache("soft", |c| {
        c.fail_safe.soft_timeout = Some(Duration::from_millis(50))
    });
    let short = EntryOptions::new().ttl(Duration::from_millis(100));
    cache.set("k", message(1), &short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let released = gate.clone();
    let entry = cache
        .get_or_load_entry("k", &EntryOptions::new(), move || async move {
            released.notified().await;
            Ok::<_, std::io::Error>(message(2))
        })
        .await
        .unwrap();
    assert_eq!(
        (&*entry.value, entry.stale),
        (&message(1), true),
        "served before the load finished"
    );
    gate.notify_waiters();
    for _ in 0..2000 {
        if cache.get("k").await.unwrap().as_deref() == Some(&message(2)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the background load never cached its value");
}

#[tokio::test]
async fn eager_refresh_reloads_in_the_background_past_its_point() {
    let mut config = TieredConfig::named("eager");
    config.eager_refresh = 0.5;
    let cache: Tiered<Message> = Tiered::builder(config)
        .memory_tiers(16 << 20)
        .build()
        .unwrap();
    let options = EntryOptions::new().ttl(Duration::from_secs(2));
    cache.set("k", message(1), &options).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let reload = |calls: &Arc<AtomicUsize>| {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(message(2))
        }
    };
    // Before half the TTL: served, no refresh.
    assert_eq!(
        *cache
            .get_or_load("k", &options, reload(&calls))
            .await
            .unwrap(),
        message(1)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Past it: the current value is served at once, and refreshed in the background.
    assert_eq!(
        *cache
            .get_or_load("k", &options, reload(&calls))
            .await
            .unwrap(),
        message(1)
    );
    eventually("the refresh cached its value", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    for _ in 0..2000 {
        if cache.get("k").await.unwrap().as_deref() == Some(&message(2)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&message(2)));
    assert_eq!(cache.stats().eager_refreshes, 1);
}

#[tokio::test]
async fn a_value_loaded_before_an_invalidation_is_not_served_after_it() {
    let cache = memory_cache("load-race");
    let source = Arc::new(std::sync::Mutex::new(message(1)));
    let (started, gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let options = EntryOptions::new().tags(["row:1"]);
    let slow_read = {
        let (cache, source, started, gate, options) = (
            cache.clone(),
            source.clone(),
            started.clone(),
            gate.clone(),
            options.clone(),
        );
        tokio::spawn(async move {
            cache
                .get_or_load("k", &options, move || async move {
                    let read = source.lock().unwrap().clone();
                    started.notify_one();
                    gate.notified().await;
                    Ok::<_, std::io::Error>(read)
                })
                .await
        })
    };
    started.notified().await;
    // The row changes and its tag is invalidated while the old value is still loading.
    *source.lock().unwrap() = message(2);
    cache.invalidate_tags(&["row:1"]).await.unwrap();
    gate.notify_one();
    assert_eq!(
        *slow_read.await.unwrap().unwrap(),
        message(1),
        "the slow reader gets what it read"
    );
    // But the cache does not keep serving it: it was loaded before the invalidation.
    let current = source.clone();
    let value = cache
        .get_or_load("k", &options, move || async move {
            Ok::<_, std::io::Error>(current.lock().unwrap().clone())
        })
        .await
        .unwrap();
    assert_eq!(*value, message(2));
}

#[tokio::test]
async fn an_l0_miss_is_one_probe_of_the_shared_tiers_even_for_many_keys() {
    let config = TieredConfig::named("probes");
    let store = Arc::new(CountingStore::new(&config));
    let writer: Tiered<Message> = Tiered::builder(config.clone())
        .store(store.clone())
        .build()
        .unwrap();
    for id in 0..10 {
        writer
            .set(
                &format!("m:{id}"),
                message(id),
                &EntryOptions::new().tier("cold"),
            )
            .await
            .unwrap();
    }
    let mut reader_config = config;
    reader_config.l0.enabled = false;
    let reader: Tiered<Message> = Tiered::builder(reader_config)
        .store(store.clone())
        .build()
        .unwrap();
    assert_eq!(*reader.get("m:3").await.unwrap().unwrap(), message(3));
    assert_eq!(store.probes.load(Ordering::SeqCst), 1);
    let keys: Vec<String> = (0..12).map(|i| format!("m:{i}")).collect();
    let mut refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    refs.push("m:3"); // a duplicate is probed once
    let values = reader.get_many(&refs).await.unwrap();
    assert_eq!(store.probes.load(Ordering::SeqCst), 2);
    assert_eq!(store.probed_keys.load(Ordering::SeqCst), 1 + 12);
    assert_eq!(values.len(), 13);
    assert!(values[..10].iter().all(Option::is_some));
    assert!(values[10].is_none() && values[11].is_none());
    assert_eq!(values[12].as_deref(), Some(&message(3)));
}

#[tokio::test]
async fn a_store_answering_too_few_slots_is_a_backend_error_not_a_panic() {
    let mut config = TieredConfig::named("short");
    config.l0.enabled = false;
    let store = Arc::new(CountingStore::new(&config));
    let cache: Tiered<Message> = Tiered::builder(config)
        .store(store.clone())
        .build()
        .unwrap();
    for id in 0..3 {
        let key = format!("m:{id}");
        cache
            .set(&key, message(id), &EntryOptions::new())
            .await
            .unwrap();
    }
    store.short_answers.store(true, Ordering::SeqCst);
    assert!(cache.get("m:0").await.unwrap().is_none());
    let values = cache.get_many(&["m:0", "m:1", "m:2"]).await.unwrap();
    assert_eq!(values.len(), 3);
    assert!(values.iter().all(Option::is_none));
    let loaded = cache
        .get_or_load("m:1", &EntryOptions::new(), || async {
            Ok::<_, std::io::Error>(message(7))
        })
        .await
        .unwrap();
    assert_eq!(*loaded, message(7));
    let stats = cache.stats();
    assert!(stats.backend_errors >= 3, "{stats:?}");
    // A broken answer is not a miss of the data: no tier counted one.
    assert!(stats.tiers.iter().all(|t| t.misses == 0), "{stats:?}");
    store.short_answers.store(false, Ordering::SeqCst);
    assert_eq!(*cache.get("m:2").await.unwrap().unwrap(), message(2));
}

#[tokio::test]
async fn get_or_load_many_asks_the_loader_for_missing_keys_only() {
    let cache = memory_cache("many");
    cache
        .set("a", message(1), &EntryOptions::new())
        .await
        .unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = asked.clone();
    let values = cache
        .get_or_load_many(
            &["a", "b", "c", "b"],
            &EntryOptions::new(),
            move |missing| {
                record.lock().unwrap().extend(missing.clone());
                async move {
                    // "c" does not exist upstream; "zzz" was never asked for and is ignored.
                    let mut found = HashMap::new();
                    found.insert("b".to_owned(), message(2));
                    found.insert("zzz".to_owned(), message(99));
                    Ok::<_, std::io::Error>(found)
                }
            },
        )
        .await
        .unwrap();
    let mut asked = asked.lock().unwrap().clone();
    asked.sort();
    assert_eq!(asked, ["b", "c"]);
    assert_eq!(values[0].as_deref(), Some(&message(1)));
    assert_eq!(values[1].as_deref(), Some(&message(2)));
    assert_eq!(values[2], None);
    assert_eq!(values[3].as_deref(), Some(&message(2)));
    assert!(cache.get("zzz").await.unwrap().is_none());
    assert_eq!(cache.get("b").await.unwrap().as_deref(), Some(&message(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batch_loads_of_the_same_keys_share_one_loader_call() {
    let cache = memory_cache("many-flight");
    let (calls, gate) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load_many(&["x", "y"], &EntryOptions::new(), move |keys| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, message(5))).collect())
                    })
                    .await
            })
        })
        .collect();
    eventually("all callers joined", || {
        cache.stats().coalesced_loads == 2 * 19
    })
    .await;
    gate.notify_waiters();
    for caller in callers {
        let values = caller.await.unwrap().unwrap();
        assert!(values.iter().all(|v| v.as_deref() == Some(&message(5))));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A single-key call joins a batch's flight too, and a key the batch did not return is
    // an error for it.
    let gate = Arc::new(tokio::sync::Notify::new());
    let batch = {
        let (cache, gate) = (cache.clone(), gate.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_many(
                    &["found", "missing"],
                    &EntryOptions::new(),
                    move |_| async move {
                        gate.notified().await;
                        Ok::<_, std::io::Error>(HashMap::from([("found".to_owned(), message(6))]))
                    },
                )
                .await
        })
    };
    eventually("the batch is in flight", || cache.stats().loader_calls == 2).await;
    let single = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load("missing", &EntryOptions::new(), || async {
                    Ok::<_, std::io::Error>(message(7))
                })
                .await
        })
    };
    eventually("the single call joined", || {
        cache.stats().coalesced_loads == 2 * 19 + 1
    })
    .await;
    gate.notify_waiters();
    assert_eq!(
        batch.await.unwrap().unwrap(),
        vec![Some(Arc::new(message(6))), None]
    );
    let err = single.await.unwrap().unwrap_err();
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("returned no value"),
        "{err}"
    );
}

#[tokio::test]
async fn a_loader_error_is_returned_with_the_key_and_counted() {
    let cache = memory_cache("failing");
    let err = cache
        .get_or_load("m:404", &EntryOptions::new(), || async {
            Err::<Message, _>(std::io::Error::other("database down"))
        })
        .await
        .unwrap_err();
    assert!(err.is_loader());
    assert_eq!(err.to_string(), "loader for key \"m:404\" failed");
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "database down"
    );
    assert_eq!(cache.stats().loader_errors, 1);
    assert!(
        cache.get("m:404").await.unwrap().is_none(),
        "a failed load is not cached"
    );
}

#[tokio::test]
async fn tags_and_clear_invalidate_without_touching_other_entries() {
    let cache = memory_cache("tags");
    let tagged = EntryOptions::new().tags(["user:1"]);
    cache.set("u1:a", message(1), &tagged).await.unwrap();
    cache.set("u1:b", message(2), &tagged).await.unwrap();
    cache
        .set("u2:a", message(3), &EntryOptions::new().tags(["user:2"]))
        .await
        .unwrap();
    cache.invalidate_tags(&["user:1"]).await.unwrap();
    assert!(cache.get("u1:a").await.unwrap().is_none());
    assert!(cache.get("u1:b").await.unwrap().is_none());
    assert!(cache.get("u2:a").await.unwrap().is_some());
    // Written after the invalidation: valid again.
    cache.set("u1:a", message(4), &tagged).await.unwrap();
    assert_eq!(
        cache.get("u1:a").await.unwrap().as_deref(),
        Some(&message(4))
    );
    cache.clear().await.unwrap();
    assert!(cache.get("u1:a").await.unwrap().is_none());
    assert!(cache.get("u2:a").await.unwrap().is_none());
}

#[tokio::test]
async fn bad_input_is_refused_with_what_was_wrong() {
    let cache = memory_cache("input");
    let err = cache.get(&"k".repeat(600)).await.unwrap_err();
    assert!(err.is_invalid_input());
    assert!(
        err.to_string().contains("600 bytes, over the limit of 512"),
        "{err}"
    );
    let err = cache
        .set("", message(1), &EntryOptions::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = cache
        .set("k", message(1), &EntryOptions::new().tier("lukewarm"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lukewarm"), "{err}");
    let err = cache
        .set(
            "k",
            message(1),
            &EntryOptions::new().ttl(Duration::from_secs(30 * 86_400)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_ttl"), "{err}");
    let err = cache
        .invalidate_tags(&[&"t".repeat(200)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("over the limit of 128"), "{err}");

    let mut small = TieredConfig::named("small");
    small.max_value_bytes = 100;
    let cache: Tiered<Message> = Tiered::builder(small)
        .memory_tiers(1 << 20)
        .build()
        .unwrap();
    let big = Message {
        id: 1,
        text: "x".repeat(500),
    };
    let err = cache
        .set("big", big.clone(), &EntryOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, pupkit::Error::ValueTooLarge { limit: 100, .. }),
        "{err}"
    );
    // A loaded value that is too large is still returned, just not cached.
    let to_load = big.clone();
    let loaded = cache
        .get_or_load("big", &EntryOptions::new(), move || async move {
            Ok::<_, std::io::Error>(to_load)
        })
        .await
        .unwrap();
    assert_eq!(*loaded, big);
    assert_eq!(cache.stats().oversized_values, 1);
    assert!(cache.get("big").await.unwrap().is_none());
}

#[tokio::test]
async fn promotion_copies_often_read_entries_to_the_hot_tier() {
    let mut config = TieredConfig::named("promo");
    config.l0.enabled = false;
    config.promotion.reads = 3;
    let cache: Tiered<Message> = Tiered::builder(config)
        .memory_tiers(1 << 20)
        .build()
        .unwrap();
    cache
        .set("m", message(1), &EntryOptions::new().tier("cold"))
        .await
        .unwrap();
    for _ in 0..3 {
        cache.get("m").await.unwrap().unwrap();
    }
    let stats = cache.stats();
    assert_eq!(stats.tier("cold").unwrap().hits, 3);
    assert_eq!(stats.tier("hot").unwrap().promotions, 1);
    cache.get("m").await.unwrap().unwrap();
    let stats = cache.stats();
    assert_eq!(
        stats.tier("hot").unwrap().hits,
        1,
        "the fourth read is served by the hot copy"
    );
    assert_eq!(stats.tier("warm").unwrap().hits, 0);
}

#[tokio::test]
async fn works_as_a_trait_object() {
    let cache: Arc<dyn TieredCache<Message>> = Arc::new(memory_cache("dyn"));
    let value = cache
        .get_or_load(
            "k",
            &EntryOptions::new(),
            Box::new(|| Box::pin(async { Ok(message(5)) })),
        )
        .await
        .unwrap();
    assert_eq!(*value, message(5));
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&message(5)));
}

#[tokio::test]
async fn l0_only_caches_work_and_an_empty_cache_is_refused() {
    let mut config = TieredConfig::named("l0only");
    let cache: Tiered<Message> = Tiered::builder(config.clone()).build().unwrap();
    cache
        .set("k", message(1), &EntryOptions::new().tags(["t"]))
        .await
        .unwrap();
    assert!(cache.get("k").await.unwrap().is_some());
    cache.invalidate_tags(&["t"]).await.unwrap();
    assert!(cache.get("k").await.unwrap().is_none());
    config.l0.enabled = false;
    let err = Tiered::<Message>::builder(config).build().unwrap_err();
    assert!(err.to_string().contains("nothing would be cached"), "{err}");
}

#[cfg(feature = "redis")]
mod redis {
    use std::time::Instant;

    use pupkit::redis::{RedisConfig, RedisConnection};
    use pupkit::resilience::BreakerState;

    use super::support::redis::{PrivateRedis, connect, delete_prefix, raw};
    use super::support::unique_prefix;
    use super::*;

    fn config(prefix: &str, name: &str, l0: bool) -> TieredConfig {
        let mut config = TieredConfig::named(name);
        config.key_prefix = prefix.to_owned();
        config.l0.enabled = l0;
        config
    }

    async fn cache(connection: &RedisConnection, config: TieredConfig) -> Tiered<Message> {
        Tiered::builder(config)
            .redis(connection.clone())
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn two_instances_see_each_others_writes_through_redis() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("two-nodes");
        let a = cache(&redis, config(&prefix, "msgs", true)).await;
        let b = cache(&redis, config(&prefix, "msgs", true)).await;
        a.set("m:1", message(1), &EntryOptions::new())
            .await
            .unwrap();
        assert_eq!(b.get("m:1").await.unwrap().as_deref(), Some(&message(1)));
        assert_eq!(b.stats().tier("warm").unwrap().hits, 1);
        // B's get backfilled its L0.
        assert_eq!(b.get("m:1").await.unwrap().as_deref(), Some(&message(1)));
        assert_eq!(b.stats().tier("l0").unwrap().hits, 1);
        // B invalidates; A (reading through Redis once its L0 copy is gone) sees it.
        b.invalidate("m:1").await.unwrap();
        a.invalidate("m:1").await.unwrap();
        assert!(a.get("m:1").await.unwrap().is_none());
        // A batch write from B is read by A in one get_many.
        let entries = (0..5).map(|i| (format!("m:{i}"), message(i))).collect();
        b.set_many(entries, &EntryOptions::new().tier("hot"))
            .await
            .unwrap();
        let keys: Vec<String> = (0..6).map(|i| format!("m:{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let values = a.get_many(&refs).await.unwrap();
        for (i, value) in values.iter().take(5).enumerate() {
            assert_eq!(value.as_deref(), Some(&message(i as u64)));
        }
        assert!(values[5].is_none());
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn entries_live_in_their_home_tier_only_with_its_ttl() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("home");
        let a = cache(&redis, config(&prefix, "msgs", false)).await;
        a.set("k", message(1), &EntryOptions::new().tier("cold"))
            .await
            .unwrap();
        let mut raw = raw().await;
        let base = format!("{prefix}:msgs:{{k}}");
        let exists: (bool, bool, bool) = ::redis::pipe()
            .exists(format!("{base}:hot"))
            .exists(format!("{base}:warm"))
            .exists(format!("{base}:cold"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(exists, (false, false, true));
        let pttl: i64 = ::redis::cmd("PTTL")
            .arg(format!("{base}:cold"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(pttl > 23 * 3_600_000 && pttl <= 24 * 3_600_000, "{pttl}");
        // Moving home removes the old copy.
        a.set("k", message(2), &EntryOptions::new().tier("hot"))
            .await
            .unwrap();
        let cold: bool = ::redis::cmd("EXISTS")
            .arg(format!("{base}:cold"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(!cold);
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&message(2)));
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn tag_invalidation_and_clear_reach_other_instances_through_redis() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("tags");
        // A checks the stamps on every read (stamp_ttl zero): other instances' invalidations
        // are seen at once.
        let mut exact = config(&prefix, "msgs", false);
        exact.stamp_ttl = Duration::ZERO;
        let a = cache(&redis, exact).await;
        let b = cache(&redis, config(&prefix, "msgs", true)).await;
        let tagged = EntryOptions::new().tags(["user:1", "conv:7"]);
        a.set("x", message(1), &tagged).await.unwrap();
        a.set("y", message(2), &EntryOptions::new().tags(["user:2"]))
            .await
            .unwrap();
        b.invalidate_tags(&["conv:7"]).await.unwrap();
        assert!(a.get("x").await.unwrap().is_none());
        assert!(a.get("y").await.unwrap().is_some());
        assert_eq!(a.stats().stale_by_tag, 1);
        // No key was deleted: invalidation wrote one timestamp.
        let mut raw = raw().await;
        let still_there: bool = ::redis::cmd("EXISTS")
            .arg(format!("{prefix}:msgs:{{x}}:warm"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(still_there);
        // A key A has seen untagged is rewritten with a tag elsewhere and that tag invalidated:
        // A's probe notices the changed tags and still honours the stamp.
        a.set("z", message(4), &EntryOptions::new()).await.unwrap();
        assert!(a.get("z").await.unwrap().is_some());
        b.set("z", message(5), &EntryOptions::new().tags(["conv:8"]))
            .await
            .unwrap();
        assert_eq!(a.get("z").await.unwrap().as_deref(), Some(&message(5)));
        b.invalidate_tags(&["conv:8"]).await.unwrap();
        assert!(a.get("z").await.unwrap().is_none());
        b.clear().await.unwrap();
        assert!(a.get("y").await.unwrap().is_none());
        // Another named cache on the same prefix is untouched by this one's clear.
        let other = cache(&redis, config(&prefix, "other", false)).await;
        other
            .set("y", message(3), &EntryOptions::new())
            .await
            .unwrap();
        b.clear().await.unwrap();
        assert!(other.get("y").await.unwrap().is_some());
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn remembered_stamps_see_own_invalidations_at_once_and_others_within_stamp_ttl() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("stampttl");
        let mut trusting = config(&prefix, "msgs", false);
        trusting.stamp_ttl = Duration::from_millis(200);
        let a = cache(&redis, trusting).await;
        let b = cache(&redis, config(&prefix, "msgs", false)).await;
        let tagged = EntryOptions::new().tags(["t1"]);
        a.set("k1", message(1), &tagged).await.unwrap();
        a.set("k2", message(2), &EntryOptions::new().tags(["t2"]))
            .await
            .unwrap();
        assert!(a.get("k1").await.unwrap().is_some());
        assert!(a.get("k2").await.unwrap().is_some());
        // A's own invalidation: at once, whatever it remembers.
        a.invalidate_tags(&["t1"]).await.unwrap();
        assert!(a.get("k1").await.unwrap().is_none());
        // B's invalidation: within stamp_ttl (waiting longer is always fine).
        b.invalidate_tags(&["t2"]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(a.get("k2").await.unwrap().is_none());
        // The same for B's clear.
        a.set("k3", message(3), &EntryOptions::new()).await.unwrap();
        assert!(a.get("k3").await.unwrap().is_some());
        b.clear().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(a.get("k3").await.unwrap().is_none());
        delete_prefix(&prefix).await;
    }

    /// `instances` caches on one Redis (each its own L0), `callers` concurrent get_or_load
    /// calls of one cold key on each; returns the loader calls.
    async fn stampede(
        redis: &RedisConnection,
        instances: usize,
        callers: usize,
        options: EntryOptions,
    ) -> usize {
        let prefix = unique_prefix("stampede");
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..instances {
            let node = cache(redis, config(&prefix, "msgs", true)).await;
            for _ in 0..callers {
                let (node, calls, options) = (node.clone(), calls.clone(), options.clone());
                tasks.push(tokio::spawn(async move {
                    node.get_or_load("cold", &options, move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, std::io::Error>(message(1))
                    })
                    .await
                }));
            }
        }
        for task in tasks {
            assert_eq!(*task.await.unwrap().unwrap(), message(1));
        }
        delete_prefix(&prefix).await;
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_instances_of_250_callers_cause_one_load_with_the_lock() {
        let Some(redis) = connect().await else { return };
        assert_eq!(stampede(&redis, 4, 250, EntryOptions::new()).await, 1);
        let without = stampede(&redis, 4, 250, EntryOptions::new().without_lock()).await;
        assert!(
            (1..=4).contains(&without),
            "{without} loads without the lock"
        );
    }

    #[tokio::test]
    async fn a_lock_holder_that_panics_or_dies_does_not_block_the_others() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("lockdeath");
        let mut patient = config(&prefix, "msgs", false);
        patient.lock.wait = Duration::from_secs(60);
        let a = cache(&redis, config(&prefix, "msgs", false)).await;
        let b = cache(&redis, patient).await;
        let mut raw = raw().await;
        let lock_key = format!("{prefix}:msgs:{{k}}:#lock");

        // A takes the lock, then its loader panics.
        let gate = Arc::new(tokio::sync::Notify::new());
        let holder = {
            let (a, gate) = (a.clone(), gate.clone());
            tokio::spawn(async move {
                a.get_or_load("k", &EntryOptions::new(), move || async move {
                    gate.notified().await;
                    if true {
                        panic!("loader bug");
                    }
                    Ok::<_, std::io::Error>(message(0))
                })
                .await
            })
        };
        for _ in 0..1000 {
            let held: bool = ::redis::cmd("EXISTS")
                .arg(&lock_key)
                .query_async(&mut raw)
                .await
                .unwrap();
            if held {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                b.get_or_load("k", &EntryOptions::new(), || async {
                    Ok::<_, std::io::Error>(message(2))
                })
                .await
            })
        };
        eventually("B waits on A's lock", || b.stats().lock_waits == 1).await;
        gate.notify_waiters();
        assert!(holder.await.unwrap().unwrap_err().is_loader());
        assert_eq!(*waiter.await.unwrap().unwrap(), message(2));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B waited {:?}",
            started.elapsed()
        );
        assert_eq!(
            b.stats().lock_timeouts,
            0,
            "B got the lock, it did not give up waiting"
        );

        // A holder that died without releasing (a crashed process): its lease runs out.
        let _: () = ::redis::cmd("SET")
            .arg(format!("{prefix}:msgs:{{k2}}:#lock"))
            .arg("a-dead-instance")
            .arg("PX")
            .arg(300)
            .query_async(&mut raw)
            .await
            .unwrap();
        let value = b
            .get_or_load("k2", &EntryOptions::new(), || async {
                Ok::<_, std::io::Error>(message(3))
            })
            .await
            .unwrap();
        assert_eq!(*value, message(3));
        assert_eq!(b.stats().lock_timeouts, 0);
        delete_prefix(&prefix).await;
    }

    /// Waits until someone listens on `prefix`'s backplane channel for `cache`.
    async fn subscribed(prefix: &str, cache: &str, listeners: i64) {
        let mut raw = raw().await;
        let channel = format!("{prefix}:{cache}:backplane:v1");
        for _ in 0..2000 {
            let counts: Vec<(String, i64)> = ::redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut raw)
                .await
                .unwrap();
            if counts.first().is_some_and(|(_, n)| *n >= listeners) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("nobody subscribed to {channel} within 10 s");
    }

    /// Reads `key` on `node` until it answers `expected` (bounded).
    async fn reads_eventually(node: &Tiered<Message>, key: &str, expected: Option<Message>) {
        for _ in 0..2000 {
            if node.get(key).await.unwrap().as_deref() == expected.as_ref() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{key} never read {expected:?}");
    }

    #[tokio::test]
    async fn the_backplane_drops_what_other_instances_change_from_l0() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("backplane");
        let a = cache(&redis, config(&prefix, "msgs", true)).await;
        let b = cache(&redis, config(&prefix, "msgs", true)).await;
        let other = cache(&redis, config(&prefix, "other", true)).await;
        subscribed(&prefix, "msgs", 2).await;
        subscribed(&prefix, "other", 1).await;

        a.set("k", message(1), &EntryOptions::new()).await.unwrap();
        other
            .set("k", message(7), &EntryOptions::new())
            .await
            .unwrap();
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&message(1)));
        assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&message(1)));
        assert_eq!(b.stats().tier("l0").unwrap().hits, 1, "B holds k in L0");

        // A writes: B's next reads return the new value once the notice arrives.
        a.set("k", message(2), &EntryOptions::new()).await.unwrap();
        reads_eventually(&b, "k", Some(message(2))).await;
        assert!(b.stats().backplane_received >= 1);
        assert_eq!(
            a.stats().backplane_received,
            0,
            "A ignores its own messages"
        );
        // The other named cache has its own channel: its L0 copy was not touched.
        let before = other.stats().tier("l0").unwrap().hits;
        assert_eq!(other.get("k").await.unwrap().as_deref(), Some(&message(7)));
        assert_eq!(other.stats().tier("l0").unwrap().hits, before + 1);
        assert_eq!(other.stats().backplane_received, 0);

        // The same for tags and for invalidate.
        a.set("t", message(3), &EntryOptions::new().tags(["conv:1"]))
            .await
            .unwrap();
        assert!(b.get("t").await.unwrap().is_some());
        a.invalidate_tags(&["conv:1"]).await.unwrap();
        reads_eventually(&b, "t", None).await;
        a.invalidate("k").await.unwrap();
        reads_eventually(&b, "k", None).await;
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn l0_is_flushed_when_the_backplane_resubscribes() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut redis_config = RedisConfig::new(server.url());
        redis_config.breaker.cool_down = Duration::from_millis(100);
        let connection = RedisConnection::lazy(&redis_config).unwrap();
        let node = cache(&connection, config("pkt-resub", "msgs", true)).await;
        node.set("k", message(1), &EntryOptions::new())
            .await
            .unwrap();
        // Subscribed once the server lists a listener.
        let mut listeners = 0;
        let mut raw = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for _ in 0..2000 {
            let counts: Vec<(String, i64)> = ::redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("pkt-resub:msgs:backplane:v1")
                .query_async(&mut raw)
                .await
                .unwrap();
            listeners = counts.first().map_or(0, |(_, n)| *n);
            if listeners > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(listeners, 1);
        assert!(node.get("k").await.unwrap().is_some(), "in L0");
        server.restart();
        eventually("the backplane resubscribed", || {
            node.stats().backplane_resubscribed >= 1
        })
        .await;
        // L0 was flushed; the restarted Redis is empty.
        assert_eq!(node.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn redis_keeps_entries_for_their_grace_and_serves_them_stale() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("grace");
        let mut with_grace = config(&prefix, "msgs", false);
        with_grace.fail_safe.grace = Duration::from_secs(60);
        let cache = cache(&redis, with_grace).await;
        let short = EntryOptions::new().ttl(Duration::from_millis(200));
        cache.set("k", message(1), &short).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut raw = raw().await;
        let pttl: i64 = ::redis::cmd("PTTL")
            .arg(format!("{prefix}:msgs:{{k}}:warm"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(pttl > 50_000, "kept for its grace: {pttl} ms left");
        assert!(cache.get("k").await.unwrap().is_none());
        let entry = cache
            .get_or_load_entry("k", &short, || async {
                Err::<Message, _>(std::io::Error::other("down"))
            })
            .await
            .unwrap();
        assert_eq!((&*entry.value, entry.stale), (&message(1), true));
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn an_eager_refresh_runs_once_across_instances() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("eager");
        let mut eager = config(&prefix, "msgs", true);
        eager.eager_refresh = 0.5;
        let a = cache(&redis, eager.clone()).await;
        let b = cache(&redis, eager).await;
        let options = EntryOptions::new().ttl(Duration::from_secs(2));
        a.set("k", message(1), &options).await.unwrap();
        assert!(b.get("k").await.unwrap().is_some(), "B holds k in L0 too");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let (calls, gate) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(tokio::sync::Notify::new()),
        );
        for node in [&a, &b] {
            let loader = gated_loader(&calls, &gate, Ok(message(2)));
            let value = node.get_or_load("k", &options, loader).await.unwrap();
            assert_eq!(*value, message(1), "the current value is served meanwhile");
            if node.stats().eager_refreshes == 0 && calls.load(Ordering::SeqCst) == 0 {
                eventually("A's refresh took the lock", || {
                    calls.load(Ordering::SeqCst) == 1
                })
                .await;
            }
        }
        // B's attempt finds A's lock, or (if it comes later) A's refreshed value: no second
        // load either way.
        gate.notify_waiters();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.stats().eager_refreshes + b.stats().eager_refreshes, 1);
        reads_eventually(&b, "k", Some(message(2))).await;
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn promotion_and_demotion_across_redis_tiers() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("promo");
        let a = cache(&redis, config(&prefix, "msgs", false)).await;
        a.set("k", message(1), &EntryOptions::new().tier("cold"))
            .await
            .unwrap();
        for _ in 0..3 {
            a.get("k").await.unwrap().unwrap();
        }
        assert_eq!(a.stats().tier("hot").unwrap().promotions, 1);
        let mut raw = raw().await;
        let hot = format!("{prefix}:msgs:{{k}}:hot");
        let pttl: i64 = ::redis::cmd("PTTL")
            .arg(&hot)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(
            pttl > 0 && pttl <= 300_000,
            "a hot copy lives at most the hot TTL: {pttl}"
        );
        a.get("k").await.unwrap().unwrap();
        assert_eq!(a.stats().tier("hot").unwrap().hits, 1);
        // The hot copy expires (deleted here, as expiry would): the entry stays home.
        let _: () = ::redis::cmd("DEL")
            .arg(&hot)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(a.get("k").await.unwrap().as_deref(), Some(&message(1)));
        let stats = a.stats();
        assert_eq!(stats.tier("hot").unwrap().demotions, 1);
        assert_eq!(stats.tier("cold").unwrap().hits, 4);
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn l0_never_outlives_the_remaining_ttl_of_its_tier() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("l0ttl");
        let writer = cache(&redis, config(&prefix, "msgs", false)).await;
        let reader = cache(&redis, config(&prefix, "msgs", true)).await;
        writer
            .set(
                "short",
                message(1),
                &EntryOptions::new().ttl(Duration::from_millis(300)),
            )
            .await
            .unwrap();
        assert!(reader.get("short").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            reader.get("short").await.unwrap().is_none(),
            "L0 kept the value past its Redis TTL"
        );
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn bytes_that_are_not_an_envelope_are_a_deleted_miss() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("corrupt");
        let cache = cache(&redis, config(&prefix, "msgs", false)).await;
        let big = Message {
            id: 9,
            text: "compressible ".repeat(400),
        };
        cache
            .set("good", big.clone(), &EntryOptions::new())
            .await
            .unwrap();
        let mut raw = raw().await;
        let good: Vec<u8> = ::redis::cmd("GET")
            .arg(format!("{prefix}:msgs:{{good}}:warm"))
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(good[2] & 1, 1, "the large value is stored lz4-compressed");
        let mut future_version = good.clone();
        future_version[1] = 2;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"\x00\x01 definitely not an envelope".to_vec()),
            ("truncated", good[..good.len() - 40].to_vec()),
            ("future", future_version),
            ("empty", Vec::new()),
        ];
        for (key, bytes) in &cases {
            let redis_key = format!("{prefix}:msgs:{{{key}}}:warm");
            let _: () = ::redis::cmd("SET")
                .arg(&redis_key)
                .arg(bytes)
                .arg("PX")
                .arg(60_000)
                .query_async(&mut raw)
                .await
                .unwrap();
            let loaded = cache
                .get_or_load(key, &EntryOptions::new(), || async {
                    Ok::<_, std::io::Error>(message(1))
                })
                .await
                .unwrap();
            assert_eq!(*loaded, message(1), "{key}: the loader answered");
        }
        assert_eq!(cache.stats().corrupt_entries, cases.len() as u64);
        // Each corrupt copy was deleted, and the loader's value written in its place (in the
        // background, after the caller got it).
        for (key, _) in &cases {
            let mut written = None;
            for _ in 0..200 {
                written = cache.get(key).await.unwrap();
                if written.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(written.as_deref(), Some(&message(1)), "{key}");
        }
        assert_eq!(cache.get("good").await.unwrap().as_deref(), Some(&big));
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn keys_with_braces_stay_inside_their_own_entry() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("braces");
        let cache = cache(&redis, config(&prefix, "msgs", false)).await;
        let keys = ["}", "{", "a}:hot", "%7D", "x{y}z"];
        for (i, key) in keys.iter().enumerate() {
            cache
                .set(key, message(i as u64), &EntryOptions::new())
                .await
                .unwrap();
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(
                cache.get(key).await.unwrap().as_deref(),
                Some(&message(i as u64)),
                "{key}"
            );
        }
        let mut raw = raw().await;
        let stored: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut raw)
            .await
            .unwrap();
        // One copy in the home tier, plus the read counter of a lower-tier entry, per key.
        assert_eq!(stored.len(), 2 * keys.len(), "{stored:?}");
        assert!(
            stored
                .iter()
                .all(|k| k.starts_with(&format!("{prefix}:msgs:{{"))
                    && (k.ends_with("}:warm") || k.ends_with("}:#"))),
            "{stored:?}"
        );
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn a_closed_port_degrades_to_l0_and_the_loader_within_the_timeout() {
        let mut redis_config =
            RedisConfig::new(format!("redis://127.0.0.1:{}", super::support::free_port()));
        redis_config.op_timeout = Duration::from_millis(100);
        let connection = RedisConnection::lazy(&redis_config).unwrap();
        let cache = cache(&connection, config("pkt-closed", "msgs", true)).await;
        let started = Instant::now();
        let value = cache
            .get_or_load("k", &EntryOptions::new(), || async {
                Ok::<_, std::io::Error>(message(1))
            })
            .await
            .unwrap();
        assert_eq!(*value, message(1));
        // From L0 now, without touching Redis.
        assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&message(1)));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        // The probe's failure, and the write's, which happens after the caller has its value.
        eventually("both failures counted", || {
            cache.stats().backend_errors >= 2
        })
        .await;
        assert!(cache.stats().backend_failing);
        // Writes report the failure to the caller.
        let err = cache
            .set("k2", message(2), &EntryOptions::new())
            .await
            .unwrap_err();
        assert!(err.is_backend(), "{err}");
    }

    #[tokio::test]
    async fn a_killed_redis_opens_the_breaker_and_a_restart_closes_it() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut redis_config = RedisConfig::new(server.url());
        redis_config.op_timeout = Duration::from_millis(200);
        redis_config.breaker.consecutive_failures = 3;
        redis_config.breaker.cool_down = Duration::from_millis(300);
        redis_config.breaker.jitter = 0.0;
        let connection = RedisConnection::lazy(&redis_config).unwrap();
        let cache = cache(
            &connection,
            config(&unique_prefix("breaker"), "msgs", false),
        )
        .await;
        cache
            .set("k", message(1), &EntryOptions::new())
            .await
            .unwrap();
        server.kill();

        // While Redis is down no call waits longer than the operation timeout plus the
        // loader (here instant); the slack covers a slow machine, not a second timeout.
        let bound = redis_config.op_timeout + Duration::from_millis(800);
        for i in 0..12 {
            let started = Instant::now();
            let value = cache
                .get_or_load(
                    &format!("down:{i}"),
                    &EntryOptions::new(),
                    move || async move { Ok::<_, std::io::Error>(message(i)) },
                )
                .await
                .unwrap();
            assert_eq!(*value, message(i));
            assert!(
                started.elapsed() < bound,
                "call {i} took {:?}",
                started.elapsed()
            );
        }
        let breaker = cache.stats().breaker.expect("Redis tiers have a breaker");
        assert_ne!(breaker.state, BreakerState::Closed, "{breaker:?}");
        assert!(breaker.opened >= 1 && breaker.rejected >= 1, "{breaker:?}");
        let err = cache
            .set("x", message(9), &EntryOptions::new())
            .await
            .unwrap_err();
        assert!(err.is_backend(), "{err}");

        server.restart();
        let deadline = Instant::now() + Duration::from_secs(20);
        while cache
            .set("k2", message(2), &EntryOptions::new())
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the breaker never closed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(cache.stats().breaker.unwrap().state, BreakerState::Closed);
        assert_eq!(cache.get("k2").await.unwrap().as_deref(), Some(&message(2)));
    }

    #[tokio::test]
    async fn a_killed_redis_degrades_then_is_used_again_after_restart() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut redis_config = RedisConfig::new(server.url());
        redis_config.op_timeout = Duration::from_millis(200);
        let connection = RedisConnection::lazy(&redis_config).unwrap();
        let prefix = unique_prefix("killed");
        let with_l0 = cache(&connection, config(&prefix, "msgs", true)).await;
        let without_l0 = cache(&connection, config(&prefix, "msgs", false)).await;
        with_l0
            .set("k", message(1), &EntryOptions::new())
            .await
            .unwrap();
        assert!(without_l0.get("k").await.unwrap().is_some());

        server.kill();
        let started = Instant::now();
        // L0 still answers; the L0-less instance falls back to its loader.
        assert_eq!(
            with_l0.get("k").await.unwrap().as_deref(),
            Some(&message(1))
        );
        let loaded = without_l0
            .get_or_load("k", &EntryOptions::new(), || async {
                Ok::<_, std::io::Error>(message(2))
            })
            .await
            .unwrap();
        assert_eq!(*loaded, message(2));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(without_l0.stats().backend_errors >= 1);

        server.restart();
        // The same instances use Redis again once it answers, without being rebuilt.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if with_l0
                .set("k3", message(3), &EntryOptions::new())
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the cache never reconnected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            without_l0.get("k3").await.unwrap().as_deref(),
            Some(&message(3))
        );
        assert!(!without_l0.stats().backend_failing);
    }

    /// GET and MGET commands a private server has run since its stats were reset.
    async fn reads_served(raw: &mut ::redis::aio::MultiplexedConnection) -> u64 {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(raw)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_get:") || l.starts_with("cmdstat_mget:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// 200 reads that start together, while the server is paused, on a cache allowing
    /// `in_flight` probes; with `cancel`, every third is cancelled as they start. Returns how
    /// many GET/MGET commands Redis ran for them, and how many reads were kept; panics if a
    /// kept read got the wrong value or never finished.
    async fn concurrent_reads(server: &PrivateRedis, in_flight: usize, cancel: bool) -> (u64, u64) {
        const READS: u64 = 200;
        // Reads must outlast the pause below.
        let mut redis_config = RedisConfig::new(server.url());
        redis_config.op_timeout = Duration::from_secs(10);
        let connection = RedisConnection::connect(&redis_config).await.unwrap();
        let mut coalescing = config(&format!("pkt-co{in_flight}"), "msgs", false);
        coalescing.max_probes_in_flight = in_flight;
        let cache = cache(&connection, coalescing).await;
        let entries = (0..READS).map(|i| (format!("m:{i}"), message(i))).collect();
        cache.set_many(entries, &EntryOptions::new()).await.unwrap();
        let mut raw = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = ::redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut raw)
            .await
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(READS as usize + 1));
        let reads: Vec<_> = (0..READS)
            .map(|i| {
                let (cache, start) = (cache.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    cache.get(&format!("m:{i}")).await.unwrap()
                })
            })
            .collect();
        // Paused, Redis holds every command it receives: all reads are issued (or queued)
        // before the first answer comes back, however slowly this machine starts the tasks.
        let _: () = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(300)
            .query_async(&mut raw)
            .await
            .unwrap();
        start.wait().await;
        let mut kept = Vec::new();
        for (i, read) in reads.into_iter().enumerate() {
            if cancel && i % 3 == 1 {
                read.abort();
            } else {
                kept.push((i as u64, read));
            }
        }
        let reads_kept = kept.len() as u64;
        for (i, read) in kept {
            let value = tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .expect("a read finished")
                .unwrap();
            assert_eq!(value.as_deref(), Some(&message(i)), "read {i}");
        }
        (reads_served(&mut raw).await, reads_kept)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reads_beyond_the_in_flight_limit_share_probes() {
        let Some(server) = PrivateRedis::start() else {
            return;
        };
        // Without a limit, each read is its own GET.
        let (unlimited, kept) = concurrent_reads(&server, 0, true).await;
        assert!(unlimited >= kept, "{unlimited} commands for {kept} reads");
        // With one probe out at a time, the first read goes alone and the reads that waited
        // go out together (a batch carries at most 1,000 keys).
        let (coalesced, kept) = concurrent_reads(&server, 1, true).await;
        assert!(
            coalesced <= 3,
            "{coalesced} GET/MGET commands for {kept} reads"
        );
        // The default: its maximum go out at once, each alone; the first back leads the 168
        // reads queued behind them, and the cache drops to two probes at a time, so the rest
        // come back without leading more (a read that started late may take one more batch).
        let most = TieredConfig::named("default").max_probes_in_flight;
        let (burst, kept) = concurrent_reads(&server, most, false).await;
        assert!(
            burst <= most as u64 + 3,
            "{burst} GET/MGET commands for {kept} reads, {most} out at first"
        );
    }

    #[tokio::test]
    async fn a_batch_of_known_and_new_keys_answers_each_in_order() {
        let Some(redis) = connect().await else { return };
        let prefix = unique_prefix("mixed");
        let reader = cache(&redis, config(&prefix, "msgs", false)).await;
        let writer = cache(&redis, config(&prefix, "msgs", false)).await;
        for i in 0..5 {
            // The reader wrote m:i, so it knows where they are; n:i it has never seen.
            reader
                .set(&format!("m:{i}"), message(i), &EntryOptions::new())
                .await
                .unwrap();
            writer
                .set(
                    &format!("n:{i}"),
                    message(100 + i),
                    &EntryOptions::new().tier("cold"),
                )
                .await
                .unwrap();
        }
        let keys: Vec<String> = (0..5)
            .flat_map(|i| [format!("m:{i}"), format!("n:{i}")])
            .chain(["absent".to_owned()])
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        for _ in 0..2 {
            // The second time, every key is known.
            let values = reader.get_many(&refs).await.unwrap();
            for i in 0..5u64 {
                assert_eq!(values[2 * i as usize].as_deref(), Some(&message(i)));
                assert_eq!(
                    values[2 * i as usize + 1].as_deref(),
                    Some(&message(100 + i))
                );
            }
            assert_eq!(values[10], None);
        }
        delete_prefix(&prefix).await;
    }

    #[tokio::test]
    async fn reads_waiting_for_a_probe_are_answered_when_redis_dies() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut redis_config = RedisConfig::new(server.url());
        redis_config.op_timeout = Duration::from_millis(200);
        let connection = RedisConnection::lazy(&redis_config).unwrap();
        let mut coalescing = config("pkt-codown", "msgs", false);
        coalescing.max_probes_in_flight = 1;
        let cache = cache(&connection, coalescing).await;
        cache
            .set("k", message(1), &EntryOptions::new())
            .await
            .unwrap();
        server.kill();
        let reads: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get("k").await })
            })
            .collect();
        for read in reads {
            let value = tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .expect("a queued read is answered")
                .unwrap();
            // A failing Redis is a miss, not an error.
            assert_eq!(value.unwrap(), None);
        }
        // Each read saw its batch's failure, and counted it.
        assert!(cache.stats().backend_errors >= 50, "{:?}", cache.stats());
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(20);
        while cache
            .set("k", message(2), &EntryOptions::new())
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the cache never reconnected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&message(2)));
    }
}
