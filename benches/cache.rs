//! The tiered cache against its raw baselines, in one run: raw moka, raw Redis GET and MGET on
//! one multiplexed connection. Prints each ratio after the criterion groups, twice: from
//! criterion's separate measurements, and from a paired run that alternates the two sides in
//! short rounds (`support/paired.rs`), which a machine's drift during the run cannot bias.
//!
//! `cargo bench --bench cache --features redis` (Redis at `PUPKIT_REDIS_URL`, default local).

#[path = "support/paired.rs"]
mod paired;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::redis::{RedisConfig, RedisConnection};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Role {
    User,
    Assistant,
}

/// A chat message of about 1 KiB as JSON: the benchmark's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Message {
    id: u64,
    conversation_id: String,
    user_id: String,
    role: Role,
    content: String,
    created_at: i64,
    tokens: u32,
    model: Option<String>,
    tags: Vec<String>,
}

fn message(id: u64) -> Message {
    Message {
        id,
        conversation_id: "conv-7f3a9c2e-1b4d-4e8f-9a6b-2c5d8e1f0a3b".into(),
        user_id: format!("user-{}", id % 1000),
        role: if id.is_multiple_of(2) {
            Role::User
        } else {
            Role::Assistant
        },
        content: "The quick brown fox jumps over the lazy dog, again and again. ".repeat(13),
        created_at: 1_764_000_000_000 + id as i64,
        tokens: 231,
        model: Some("gpt-4o-mini".into()),
        tags: vec!["support".into(), "billing".into()],
    }
}

fn redis_url() -> String {
    std::env::var("PUPKIT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn prefix() -> String {
    format!("pkbench-{}", std::process::id())
}

fn config(l0: bool) -> TieredConfig {
    let mut config = TieredConfig::named("bench");
    config.key_prefix = prefix();
    config.l0.enabled = l0;
    config
}

fn connection(rt: &Runtime) -> RedisConnection {
    rt.block_on(async {
        let mut config = RedisConfig::new(redis_url());
        config.op_timeout = Duration::from_secs(5);
        RedisConnection::connect(&config)
            .await
            .expect("Redis for the benchmark")
    })
}

fn raw_connection(rt: &Runtime) -> redis::aio::MultiplexedConnection {
    rt.block_on(async {
        redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    })
}

/// The stored envelope of `key` in the hot tier, for the raw baselines to read the same bytes.
fn envelope_key(key: &str) -> String {
    format!("{}:bench:{{{key}}}:hot", prefix())
}

fn l0_hit(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let _runtime = rt.enter();
    let raw: moka::future::Cache<String, Arc<Message>> =
        moka::future::Cache::builder().max_capacity(10_000).build();
    let cache: Tiered<Message> = Tiered::builder(config(true)).build().unwrap();
    rt.block_on(async {
        raw.insert("m:1".to_owned(), Arc::new(message(1))).await;
        cache
            .set("m:1", message(1), &EntryOptions::new())
            .await
            .unwrap();
    });
    let raw_get = || async { raw.get("m:1").await.unwrap() };
    let pupkit_get = || async { cache.get("m:1").await.unwrap().unwrap() };
    let mut group = c.benchmark_group("l0_hit");
    group.bench_function("raw_moka", |b| b.to_async(&rt).iter(raw_get));
    group.bench_function("pupkit", |b| b.to_async(&rt).iter(pupkit_get));
    group.finish();
    pair("l0_hit", &rt, 10_000, raw_get, pupkit_get);
}

/// A 256-dimension embedding (1 KiB of f32): the second benchmark value, cheap to decode.
fn embedding(id: u64) -> Vec<f32> {
    (0..256)
        .map(|i| ((id * 31 + i) % 1000) as f32 / 1000.0)
        .collect()
}

/// A runtime and a cache with L0 off, over Redis: every read is a Redis-tier read.
fn redis_cache<V: Serialize + DeserializeOwned + Send + Sync + 'static>() -> (Runtime, Tiered<V>) {
    let rt = Runtime::new().unwrap();
    let _runtime = rt.enter();
    let cache = Tiered::builder(config(false))
        .redis(connection(&rt))
        .build()
        .unwrap();
    (rt, cache)
}

fn redis_hit(c: &mut Criterion) {
    let (rt, cache) = redis_cache();
    let mut raw = raw_connection(&rt);
    rt.block_on(cache.set("m:1", message(1), &EntryOptions::new().tier("hot")))
        .unwrap();
    let key = envelope_key("m:1");
    let raw_get = || {
        let mut raw = raw.clone();
        let key = key.clone();
        async move {
            let bytes: Vec<u8> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut raw)
                .await
                .unwrap();
            bytes
        }
    };
    let pupkit_get = || async { cache.get("m:1").await.unwrap().unwrap() };
    let mut group = c.benchmark_group("redis_hit");
    group.bench_function("raw_get", |b| b.to_async(&rt).iter(raw_get));
    group.bench_function("pupkit", |b| b.to_async(&rt).iter(pupkit_get));
    group.finish();
    pair("redis_hit", &rt, 200, raw_get, pupkit_get);
    let _: () = rt
        .block_on(redis::cmd("PING").query_async(&mut raw))
        .unwrap();
}

fn get_many_100(c: &mut Criterion) {
    get_many_of(c, "get_many_100", message);
    get_many_of(c, "get_many_100_embedding", embedding);
}

/// `get_many` of 100 keys holding `value`s, against one raw MGET of the same bytes.
fn get_many_of<V>(c: &mut Criterion, group: &'static str, value: fn(u64) -> V)
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let (rt, cache) = redis_cache::<V>();
    let raw = raw_connection(&rt);
    let keys: Vec<String> = (0..100).map(|i| format!("{group}:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let entries = (0..100)
        .map(|i| (keys[i as usize].clone(), value(i)))
        .collect();
    rt.block_on(cache.set_many(entries, &EntryOptions::new().tier("hot")))
        .unwrap();
    let raw_keys: Vec<String> = keys.iter().map(|k| envelope_key(k)).collect();
    let raw_mget = || {
        let mut raw = raw.clone();
        let raw_keys = &raw_keys;
        async move {
            let values: Vec<Vec<u8>> = redis::cmd("MGET")
                .arg(raw_keys)
                .query_async(&mut raw)
                .await
                .unwrap();
            assert_eq!(values.len(), 100);
            values
        }
    };
    let pupkit_get_many = || async {
        let values = cache.get_many(&refs).await.unwrap();
        assert!(values.iter().all(Option::is_some));
        values
    };
    // Context, no target: MGET and decoding the payloads by hand, which pupkit's get_many
    // also does and the raw MGET does not.
    let raw_mget_decode = || async {
        let values: Vec<Vec<u8>> = raw_mget().await;
        values
            .iter()
            .map(|bytes| decode_by_hand(bytes))
            .collect::<Vec<V>>()
    };
    let name = group;
    let mut group = c.benchmark_group(name);
    group.bench_function("raw_mget", |b| b.to_async(&rt).iter(raw_mget));
    group.bench_function("pupkit", |b| b.to_async(&rt).iter(pupkit_get_many));
    group.finish();
    pair(name, &rt, 20, raw_mget, pupkit_get_many);
    pair_labelled(name, "+decode", &rt, 20, raw_mget_decode, pupkit_get_many);
    pair_labelled(name, FLOOR, &rt, 20, raw_mget, raw_mget_decode);
}

/// The value in a stored envelope, decoded by hand as pupkit does. The bench's entries are
/// untagged and uncompressed, so the postcard payload starts after the 20-byte header.
fn decode_by_hand<V: DeserializeOwned>(envelope: &[u8]) -> V {
    assert_eq!(
        (envelope[2] & 1, envelope[3]),
        (0, 0),
        "uncompressed, untagged"
    );
    postcard::from_bytes(&envelope[20..]).unwrap()
}

/// The label of a pairing that times the hand-decoding baseline against the raw one: what
/// decoding the values adds to the raw bytes, with no cache. For `get_many`, one `MGET` either
/// way, it is the least that any cache returning decoded values pays over the raw `MGET`.
const FLOOR: &str = "floor";

fn concurrent_64(c: &mut Criterion) {
    concurrent_64_of(c, "concurrent_64", message);
    concurrent_64_of(c, "concurrent_64_embedding", embedding);
}

/// 64 tasks, each reading its own key 16 times: the time of one such round is the inverse of
/// throughput.
fn concurrent_64_of<V>(c: &mut Criterion, group: &'static str, value: fn(u64) -> V)
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    const TASKS: usize = 64;
    let (rt, cache) = redis_cache::<V>();
    let raw = raw_connection(&rt);
    let keys: Arc<[String]> = (0..TASKS).map(|i| format!("{group}:{i}")).collect();
    let entries = (0..TASKS)
        .map(|i| (keys[i].clone(), value(i as u64)))
        .collect();
    rt.block_on(cache.set_many(entries, &EntryOptions::new().tier("hot")))
        .unwrap();
    let raw_keys: Arc<[String]> = keys.iter().map(|k| envelope_key(k)).collect();
    let raw_round = || raw_gets_round(&raw, &raw_keys, TASKS);
    let raw_decode_round = || raw_gets_decode_round::<V>(&raw, &raw_keys, TASKS);
    let pupkit_round = || cache_gets_round(&cache, &keys, TASKS);
    let name = group;
    let mut group = c.benchmark_group(name);
    group.throughput(criterion::Throughput::Elements((TASKS * READS) as u64));
    group.bench_function("raw_get", |b| b.to_async(&rt).iter(raw_round));
    group.bench_function("pupkit", |b| b.to_async(&rt).iter(pupkit_round));
    group.finish();
    pair(name, &rt, 2, raw_round, pupkit_round);
    pair_labelled(name, "+decode", &rt, 2, raw_decode_round, pupkit_round);
    pair_labelled(name, FLOOR, &rt, 2, raw_round, raw_decode_round);
}

/// How many reads each task of a concurrent round makes, of its own key.
const READS: usize = 16;

/// One concurrent round, boxed so that both sides have one type.
type Round = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// `tasks` tasks, the `i`th doing [`READS`] raw `GET`s of `raw_keys[i]` on one multiplexed
/// connection.
fn raw_gets_round(
    raw: &redis::aio::MultiplexedConnection,
    raw_keys: &Arc<[String]>,
    tasks: usize,
) -> Round {
    raw_gets_then(raw, raw_keys, tasks, |_| {})
}

/// [`raw_gets_round`], each task also decoding the payloads by hand ([`decode_by_hand`]).
fn raw_gets_decode_round<V>(
    raw: &redis::aio::MultiplexedConnection,
    raw_keys: &Arc<[String]>,
    tasks: usize,
) -> Round
where
    V: DeserializeOwned + Send + 'static,
{
    raw_gets_then(raw, raw_keys, tasks, |bytes| {
        let _: V = decode_by_hand(bytes);
    })
}

/// The raw `GET` rounds, with `then` run on each value read.
fn raw_gets_then(
    raw: &redis::aio::MultiplexedConnection,
    raw_keys: &Arc<[String]>,
    tasks: usize,
    then: fn(&[u8]),
) -> Round {
    let (raw, raw_keys) = (raw.clone(), raw_keys.clone());
    Box::pin(each_task(tasks, move |task| {
        let (mut raw, raw_keys) = (raw.clone(), raw_keys.clone());
        async move {
            for _ in 0..READS {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(&raw_keys[task])
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                then(&bytes);
            }
        }
    }))
}

/// `tasks` tasks, the `i`th doing [`READS`] `get`s of `keys[i]` through `cache`.
fn cache_gets_round<V>(cache: &Tiered<V>, keys: &Arc<[String]>, tasks: usize) -> Round
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let (cache, keys) = (cache.clone(), keys.clone());
    Box::pin(each_task(tasks, move |task| {
        let (cache, keys) = (cache.clone(), keys.clone());
        async move {
            for _ in 0..READS {
                cache.get(&keys[task]).await.unwrap().unwrap();
            }
        }
    }))
}

/// The in-flight limit against concurrency (ARCHITECTURE.md, "Concurrent reads share
/// probes"): for 4,
/// 16 and 64 tasks reading embeddings with L0 off, the paired time ratio to the same raw
/// `GET`s with `max_probes_in_flight` of 1, 4, 32 (the default) and none. Runs when the
/// 64-task group ran.
fn limit_sweep(rt: &Runtime) {
    if !support::ran_since("concurrent_64_embedding", "pupkit", *STARTED) {
        return;
    }
    let _runtime = rt.enter();
    let connection = connection(rt);
    let raw = raw_connection(rt);
    let keys: Arc<[String]> = (0..64).map(|i| format!("sweep:{i}")).collect();
    let raw_keys: Arc<[String]> = keys.iter().map(|k| envelope_key(k)).collect();
    let limits = [1, 4, 32, 0];
    let caches: Vec<Tiered<Vec<f32>>> = limits
        .iter()
        .map(|&limit| {
            let mut config = config(false);
            config.max_probes_in_flight = limit;
            Tiered::builder(config)
                .redis(connection.clone())
                .build()
                .unwrap()
        })
        .collect();
    let entries = (0..keys.len())
        .map(|i| (keys[i].clone(), embedding(i as u64)))
        .collect();
    rt.block_on(caches[0].set_many(entries, &EntryOptions::new().tier("hot")))
        .unwrap();
    println!(
        "\n== in-flight limit vs concurrency (paired time ratio to raw GETs, embeddings, L0 off) =="
    );
    println!("tasks | max 1 | max 4 | max 32 (default) | no limit");
    for tasks in [4, 16, 64] {
        let ratios: Vec<String> = caches
            .iter()
            .map(|cache| {
                let raw_round = || raw_gets_round(&raw, &raw_keys, tasks);
                let cache_round = || cache_gets_round(cache, &keys, tasks);
                let paired = paired::run(rt, 10, Duration::from_secs(2), 1, raw_round, cache_round);
                format!("{:.2}x", paired.ratio)
            })
            .collect();
        println!("{tasks} | {}", ratios.join(" | "));
    }
}

/// Spawns `tasks` tasks, the `i`th running `work(i)`, and waits for them all.
async fn each_task<F, Fut>(tasks: usize, work: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = (0..tasks).map(|i| tokio::spawn(work(i))).collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// 1,000 concurrent `get_or_load` calls of one cold key whose loader sleeps 5 ms, against one
/// loader call plus one raw GET round trip. Each iteration uses a new key.
fn stampede_1000(c: &mut Criterion) {
    const CALLERS: usize = 1000;
    let rt = Runtime::new().unwrap();
    let _runtime = rt.enter();
    let cache: Tiered<Message> = Tiered::builder(config(true))
        .redis(connection(&rt))
        .build()
        .unwrap();
    let raw = raw_connection(&rt);
    let key = envelope_key("stampede:probe");
    let loads = Arc::new(AtomicUsize::new(0));
    let iterations = Arc::new(AtomicUsize::new(0));
    let mut group = c.benchmark_group("stampede_1000");
    group.bench_function("raw_loader_and_get", |b| {
        b.to_async(&rt).iter(|| {
            let mut raw = raw.clone();
            let key = key.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut raw)
                    .await
                    .unwrap();
            }
        })
    });
    group.bench_function("pupkit", |b| {
        b.to_async(&rt).iter(|| {
            let cache = cache.clone();
            let loads = loads.clone();
            let round = iterations.fetch_add(1, Ordering::Relaxed);
            async move {
                let key = format!("stampede:{round}");
                let callers: Vec<_> = (0..CALLERS)
                    .map(|_| {
                        let (cache, loads, key) = (cache.clone(), loads.clone(), key.clone());
                        tokio::spawn(async move {
                            cache
                                .get_or_load(&key, &EntryOptions::new(), move || async move {
                                    loads.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                    Ok::<_, std::io::Error>(message(1))
                                })
                                .await
                                .unwrap()
                        })
                    })
                    .collect();
                for caller in callers {
                    caller.await.unwrap();
                }
            }
        })
    });
    group.finish();
    let rounds = iterations.load(Ordering::Relaxed);
    println!(
        "stampede_1000: {} loader calls over {rounds} rounds of {CALLERS} callers",
        loads.load(Ordering::Relaxed)
    );
}

/// A `get_or_load` miss (fresh key, instant loader) with the load lock against without it.
fn miss_lock(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let _runtime = rt.enter();
    let cache: Tiered<Message> = Tiered::builder(config(true))
        .redis(connection(&rt))
        .build()
        .unwrap();
    let round = Arc::new(AtomicUsize::new(0));
    let mut group = c.benchmark_group("miss_lock");
    for (name, options) in [
        ("plain_miss", EntryOptions::new().without_lock()),
        ("pupkit", EntryOptions::new()),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let key = format!("miss:{}", round.fetch_add(1, Ordering::Relaxed));
                let (cache, options) = (cache.clone(), options.clone());
                async move {
                    cache
                        .get_or_load(&key, &options, || async {
                            Ok::<_, std::io::Error>(message(1))
                        })
                        .await
                        .unwrap()
                }
            })
        });
    }
    group.finish();
}

/// Payload formats on the benchmark's value: what the default format was chosen on.
fn formats(c: &mut Criterion) {
    let value = message(1);
    let json = serde_json::to_vec(&value).unwrap();
    let msgpack = rmp_serde::to_vec_named(&value).unwrap();
    let postcard = postcard::to_allocvec(&value).unwrap();
    println!(
        "format sizes for one message: json {} B, msgpack (named) {} B, postcard {} B",
        json.len(),
        msgpack.len(),
        postcard.len()
    );
    let mut group = c.benchmark_group("format_decode");
    group.bench_function("json", |b| {
        b.iter(|| serde_json::from_slice::<Message>(&json).unwrap())
    });
    group.bench_function("msgpack", |b| {
        b.iter(|| rmp_serde::from_slice::<Message>(&msgpack).unwrap())
    });
    group.bench_function("postcard", |b| {
        b.iter(|| postcard::from_bytes::<Message>(&postcard).unwrap())
    });
    group.finish();
    let mut group = c.benchmark_group("format_encode");
    group.bench_function("json", |b| b.iter(|| serde_json::to_vec(&value).unwrap()));
    group.bench_function("msgpack", |b| {
        b.iter(|| rmp_serde::to_vec_named(&value).unwrap())
    });
    group.bench_function("postcard", |b| {
        b.iter(|| postcard::to_allocvec(&value).unwrap())
    });
    group.finish();
}

/// Redis memory for one ~1 KiB JSON entry, compressed and not (MEMORY USAGE of the key).
fn redis_memory(rt: &Runtime) {
    let _runtime = rt.enter();
    let connection = connection(rt);
    let mut raw = raw_connection(rt);
    // A JSON document of exactly 1 KiB, cached as a string.
    let text = "The quick brown fox jumps over the lazy dog, again and again. ".repeat(20);
    let mut document = String::new();
    for len in (0..text.len()).rev() {
        document =
            serde_json::json!({"id": 1, "role": "assistant", "content": &text[..len]}).to_string();
        if document.len() <= 1024 {
            break;
        }
    }
    for (label, threshold) in [
        ("lz4 (default, >= 1 KiB)", 1024),
        ("uncompressed", usize::MAX),
    ] {
        let mut config = config(false);
        config.name = format!("mem{}", threshold % 7);
        config.compress_threshold = threshold;
        let cache: Tiered<String> = Tiered::builder(config.clone())
            .redis(connection.clone())
            .build()
            .unwrap();
        rt.block_on(cache.set("doc", document.clone(), &EntryOptions::new().tier("hot")))
            .unwrap();
        let key = format!("{}:{}:{{doc}}:hot", prefix(), config.name);
        let usage: i64 = rt
            .block_on(
                redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&key)
                    .query_async(&mut raw),
            )
            .unwrap();
        let stats = cache.stats();
        let hot = stats.tier("hot").unwrap();
        println!(
            "redis memory per {} B JSON entry, {label}: {usage} B (payload {} B -> {} B)",
            document.len(),
            hot.bytes_raw,
            hot.bytes_stored
        );
    }
}

/// Backplane lag on loopback: from the start of A's `set` (whose write script publishes) to B
/// reading the new value, i.e. B's L0 copy dropped. Printed as p50/p99 over 300 writes.
fn backplane_lag(rt: &Runtime) {
    let _runtime = rt.enter();
    let connection = connection(rt);
    let mut config = config(true);
    config.name = "lag".to_owned();
    let a: Tiered<Message> = Tiered::builder(config.clone())
        .redis(connection.clone())
        .build()
        .unwrap();
    let b: Tiered<Message> = Tiered::builder(config).redis(connection).build().unwrap();
    let lags = rt.block_on(async {
        // Let B's subscription come up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut lags = Vec::with_capacity(300);
        for i in 0..300u64 {
            a.set("k", message(i), &EntryOptions::new()).await.unwrap();
            while b.get("k").await.unwrap().map(|m| m.id) != Some(i) {}
            // B now holds version i in L0; the next write must drop it.
            let started = Instant::now();
            a.set("k", message(i + 1_000_000), &EntryOptions::new())
                .await
                .unwrap();
            let deadline = started + Duration::from_secs(5);
            while b.get("k").await.unwrap().map(|m| m.id) != Some(i + 1_000_000) {
                if Instant::now() > deadline {
                    break;
                }
                tokio::task::yield_now().await;
            }
            lags.push(started.elapsed());
        }
        lags
    });
    let mut lags = lags;
    lags.sort();
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
    println!(
        "backplane lag, A's set to B's L0 dropped (loopback, {} writes): p50 {:?}, p99 {:?}, max {:?}",
        lags.len(),
        at(0.5),
        at(0.99),
        lags[lags.len() - 1]
    );
}

fn cleanup(rt: &Runtime) {
    let mut raw = raw_connection(rt);
    let keys: Vec<String> = rt
        .block_on(
            redis::cmd("KEYS")
                .arg(format!("{}:*", prefix()))
                .query_async(&mut raw),
        )
        .unwrap();
    if !keys.is_empty() {
        let _: () = rt
            .block_on(redis::cmd("DEL").arg(keys).query_async(&mut raw))
            .unwrap();
    }
}

/// When this process started: a group measured since then belongs to this run.
static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The paired measurements of this run, by group.
static PAIRED: Mutex<Vec<(&'static str, &'static str, paired::Paired)>> = Mutex::new(Vec::new());

/// Times `ours` against `baseline` in alternating rounds of `calls` calls (see `paired`), if
/// criterion measured `group` in this run (a filter may have skipped it).
fn pair<FA, FutA, FB, FutB>(group: &'static str, rt: &Runtime, calls: usize, baseline: FA, ours: FB)
where
    FA: FnMut() -> FutA,
    FutA: std::future::Future,
    FB: FnMut() -> FutB,
    FutB: std::future::Future,
{
    pair_labelled(group, "", rt, calls, baseline, ours);
}

/// [`pair`] against another baseline, printed under `label`.
fn pair_labelled<FA, FutA, FB, FutB>(
    group: &'static str,
    label: &'static str,
    rt: &Runtime,
    calls: usize,
    baseline: FA,
    ours: FB,
) where
    FA: FnMut() -> FutA,
    FutA: std::future::Future,
    FB: FnMut() -> FutB,
    FutB: std::future::Future,
{
    if !support::ran_since(group, "pupkit", *STARTED) {
        return;
    }
    let result = paired::run(rt, 20, Duration::from_secs(4), calls, baseline, ours);
    PAIRED.lock().unwrap().push((group, label, result));
}

fn print_ratios(started: Instant) {
    println!("\n== pupkit cache vs raw baselines (this run) ==");
    let rows = [
        ("l0_hit", "raw_moka", "L0 hit vs raw moka get", "<= 2.0x"),
        (
            "redis_hit",
            "raw_get",
            "Redis-tier hit vs raw GET",
            "<= 1.25x",
        ),
        (
            "get_many_100",
            "raw_mget",
            "get_many(100) vs raw MGET",
            "<= 1.25x",
        ),
        (
            "get_many_100_embedding",
            "raw_mget",
            "get_many(100) of embeddings vs raw MGET",
            "<= 1.25x",
        ),
        (
            "concurrent_64",
            "raw_get",
            "64 tasks, Redis-tier hits vs raw GETs (time)",
            "<= 1.11x (throughput >= 0.9x)",
        ),
        (
            "concurrent_64_embedding",
            "raw_get",
            "64 tasks, embedding hits vs raw GETs (time)",
            "<= 1.11x (throughput >= 0.9x)",
        ),
        (
            "stampede_1000",
            "raw_loader_and_get",
            "1,000 callers of a cold key vs one 5 ms load + one GET",
            "<= 1.5x",
        ),
        (
            "miss_lock",
            "plain_miss",
            "get_or_load miss with the load lock vs without (overhead, no target)",
            "report",
        ),
    ];
    for (group, baseline, label, target) in rows {
        match (
            support::ran_since(group, "pupkit", started),
            support::mean_ns(group, "pupkit"),
            support::mean_ns(group, baseline),
        ) {
            (true, Some(ours), Some(raw)) => println!(
                "{label}: pupkit {:.0} ns, raw {:.0} ns, ratio {:.2}x (target {target})",
                ours,
                raw,
                ours / raw
            ),
            _ => println!("{label}: not run"),
        }
        let paired = PAIRED.lock().unwrap();
        for (_, label, p) in paired.iter().filter(|(g, _, _)| *g == group) {
            if *label == FLOOR {
                println!(
                    "  floor, {} alternating rounds: raw+decode {:.0} ns, raw {:.0} ns, median ratio {:.2}x (quartiles {:.2}-{:.2}): the cost of decoding, with no cache",
                    p.rounds, p.ours_ns, p.baseline_ns, p.ratio, p.quartiles[0], p.quartiles[2]
                );
                continue;
            }
            let (raw, target) = match *label {
                "" => ("raw".to_owned(), target),
                label => (format!("raw{label}"), "none, context"),
            };
            println!(
                "  paired, {} alternating rounds: pupkit {:.0} ns, {raw} {:.0} ns, median ratio {:.2}x (quartiles {:.2}-{:.2}; target {target})",
                p.rounds, p.ours_ns, p.baseline_ns, p.ratio, p.quartiles[0], p.quartiles[2]
            );
            if let Some((ours, theirs)) = p.cpu_ns {
                println!(
                    "    CPU time of this process per call: pupkit {ours:.0} ns, {raw} {theirs:.0} ns ({:.2}x)",
                    ours / theirs
                );
            }
        }
    }
    if let (true, Some(ns)) = (
        support::ran_since("l0_hit", "pupkit", started),
        support::mean_ns("l0_hit", "pupkit"),
    ) {
        println!("L0 hit latency: {ns:.0} ns");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = l0_hit, redis_hit, get_many_100, concurrent_64, stampede_1000, miss_lock, formats
}

fn main() {
    let started = *STARTED;
    let rt = Runtime::new().unwrap();
    benches();
    limit_sweep(&rt);
    redis_memory(&rt);
    backplane_lag(&rt);
    cleanup(&rt);
    Criterion::default().configure_from_args().final_summary();
    print_ratios(started);
}
