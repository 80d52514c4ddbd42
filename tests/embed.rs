//! The embedding batcher over an in-process embedder that counts its calls: batching by
//! size, window and tokens, dedup, cache, cost, budgets, failures, backpressure, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pupkit::cache::{Tiered, TieredConfig};
use pupkit::cost::{
    Budget, CostMeter, Meter, MicroUsd, Mode, Period, ReportPeriod, Scope, Spender,
};
use pupkit::embed::{
    Batcher, BatcherConfig, EmbedRequest, EmbedResponse, Embedder, EmbeddingBatcher, LocalEmbedder,
};

/// A local embedder that takes `latency` per call, counts calls and texts, and fails any
/// call containing a text that starts with "FAIL".
#[derive(Debug)]
struct Counting {
    local: LocalEmbedder,
    latency: Duration,
    calls: AtomicUsize,
    texts: AtomicUsize,
    largest: AtomicUsize,
}

impl Counting {
    fn new(latency: Duration) -> Arc<Self> {
        Arc::new(Counting {
            local: LocalEmbedder::new(32),
            latency,
            calls: AtomicUsize::new(0),
            texts: AtomicUsize::new(0),
            largest: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Embedder for Counting {
    async fn embed(&self, request: &EmbedRequest) -> pupkit::Result<EmbedResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.texts.fetch_add(request.texts.len(), Ordering::SeqCst);
        self.largest
            .fetch_max(request.texts.len(), Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        if request.texts.iter().any(|t| t.starts_with("FAIL")) {
            return Err(pupkit::Error::Backend {
                backend: "test",
                operation: "embed",
                source: "HTTP 500 from the provider".into(),
            });
        }
        self.local.embed(request).await
    }

    fn name(&self) -> &str {
        "counting"
    }
}

fn config(batch_size: usize) -> BatcherConfig {
    let mut config = BatcherConfig::default();
    config.batch_size = batch_size;
    config
}

/// An error and its sources, joined.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

fn caller() -> Spender {
    Spender::new("search", "u1")
}

#[tokio::test(start_paused = true)]
async fn a_thousand_callers_with_30_percent_duplicates_make_ceil_unique_over_ten_calls() {
    let embedder = Counting::new(Duration::from_millis(50));
    let batcher = Arc::new(
        Batcher::builder(config(10))
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    // 700 unique texts; 300 callers repeat one of them.
    let texts: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "document number {}",
                if i < 700 { i } else { (i * 7) % 700 }
            )
        })
        .collect();
    let tasks: Vec<_> = texts
        .iter()
        .map(|text| {
            let batcher = batcher.clone();
            let text = text.clone();
            tokio::spawn(async move { (batcher.embed(&text, &caller()).await, text) })
        })
        .collect();
    let local = LocalEmbedder::new(32);
    let mut deduped = 0;
    for task in tasks {
        let (embedding, text) = task.await.unwrap();
        let embedding = embedding.unwrap();
        assert_eq!(*embedding.vector, local.vector(&text, 32), "{text}");
        deduped += usize::from(embedding.deduped);
    }
    assert_eq!(embedder.calls(), 70, "ceil(700 / 10)");
    assert_eq!(embedder.texts.load(Ordering::SeqCst), 700);
    assert_eq!(deduped, 300);
    let stats = batcher.stats();
    assert_eq!(
        (stats.api_calls, stats.deduped, stats.requests),
        (70, 300, 1000)
    );
}

#[tokio::test(start_paused = true)]
async fn the_window_flushes_a_partial_batch() {
    let embedder = Counting::new(Duration::ZERO);
    let batcher = Arc::new(
        Batcher::builder(config(10))
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    let tasks: Vec<_> = ["one", "two", "three"]
        .into_iter()
        .map(|text| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.embed(text, &caller()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(embedder.calls(), 0, "nothing is sent before the 5 s window");
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(embedder.calls(), 1);
    assert_eq!(embedder.largest.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn the_token_budget_flushes_before_the_batch_is_full() {
    let embedder = Counting::new(Duration::ZERO);
    let mut config = config(10);
    config.max_batch_tokens = 100;
    let batcher = Arc::new(
        Batcher::builder(config)
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    // Each text is about 60 tokens: two do not fit one call.
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let batcher = batcher.clone();
            let text = format!("{i} {}", "abcd".repeat(59));
            tokio::spawn(async move { batcher.embed(&text, &caller()).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(embedder.calls(), 4);
    assert_eq!(embedder.largest.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_texts_fail_their_own_callers_and_a_failed_call_only_its_batch() {
    let embedder = Counting::new(Duration::from_millis(10));
    let batcher = Arc::new(
        Batcher::builder(config(2))
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    let empty = batcher.embed("", &caller()).await.unwrap_err();
    assert!(
        empty.is_invalid_input() && empty.to_string().contains("empty"),
        "{empty}"
    );
    let long = "word ".repeat(10_000);
    let too_long = batcher.embed(&long, &caller()).await.unwrap_err();
    assert!(too_long.to_string().contains("8192"), "{too_long}");
    assert_eq!(embedder.calls(), 0, "refused before anything was sent");
    // Batches of two: ["FAIL x", "fine a"] fails, ["fine b", "fine c"] does not.
    let tasks: Vec<_> = ["FAIL x", "fine a", "fine b", "fine c"]
        .into_iter()
        .map(|text| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.embed(text, &caller()).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert!(outcomes[0].as_ref().unwrap_err().is_backend());
    let chain = error_chain(outcomes[1].as_ref().unwrap_err());
    assert!(chain.contains("HTTP 500"), "{chain}");
    assert!(outcomes[2].is_ok() && outcomes[3].is_ok());
    assert_eq!(batcher.stats().failed_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn a_second_run_is_served_by_the_cache_and_recorded_as_saved() {
    let embedder = Counting::new(Duration::ZERO);
    let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("embeddings"))
        .memory_tiers(16 << 20)
        .build()
        .unwrap();
    let meter = Arc::new(Meter::builder().build().await.unwrap());
    let mut config = config(10);
    config.window = Duration::from_millis(10);
    let batcher = Batcher::builder(config)
        .embedder(embedder.clone())
        .cache(Arc::new(cache))
        .meter(meter.clone())
        .build()
        .unwrap();
    let texts: Vec<String> = (0..25)
        .map(|i| format!("passage {i} about caching"))
        .collect();
    for outcome in batcher.embed_many(&texts, &caller()).await {
        assert!(!outcome.unwrap().cached);
    }
    let calls = embedder.calls();
    assert_eq!(calls, 3);
    let second = batcher.embed_many(&texts, &caller()).await;
    assert_eq!(embedder.calls(), calls, "zero API calls the second time");
    let mut saved = MicroUsd::ZERO;
    for outcome in second {
        let embedding = outcome.unwrap();
        assert!(embedding.cached && embedding.cost == MicroUsd::ZERO);
        saved += embedding.saved;
    }
    let report = meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(report.totals.requests, 50);
    assert_eq!(report.savings, saved);
    // What the callers were charged adds up to what the calls used, and the saving to what
    // the same tokens cost, each within a micro-dollar (costs below one are carried).
    let charged: u64 = report.totals.input_tokens;
    assert_eq!(charged, 2 * embedder_tokens(&texts));
    let price = |tokens: u64| tokens as f64 * 0.02; // micro-dollars at $0.02 per million
    let cost = report.totals.cost.micros() as f64;
    assert!(
        (cost - price(embedder_tokens(&texts))).abs() <= 1.0,
        "{cost}"
    );
    assert!((saved.micros() as f64 - price(embedder_tokens(&texts))).abs() <= 1.0);
}

/// The tokens the local embedder reports for the texts: its estimates.
fn embedder_tokens(texts: &[String]) -> u64 {
    texts
        .iter()
        .map(|t| u64::from(pupkit::embed::estimate_tokens(t)))
        .sum()
}

#[tokio::test(start_paused = true)]
async fn each_callers_share_is_recorded_per_service_and_user_and_hard_budgets_refuse_first() {
    let embedder = Counting::new(Duration::ZERO);
    let meter = Arc::new(Meter::builder().build().await.unwrap());
    meter
        .set_budget(
            Budget::new(Scope::User("broke".into()), MicroUsd::ZERO, Period::Day).mode(Mode::Hard),
        )
        .await
        .unwrap();
    let batcher = Arc::new(
        Batcher::builder(config(4))
            .embedder(embedder.clone())
            .meter(meter.clone())
            .build()
            .unwrap(),
    );
    let long = "tokens ".repeat(2_000); // about 3,500 tokens: it costs a few micro-dollars
    let refused = batcher
        .embed(&long, &Spender::new("search", "broke"))
        .await
        .unwrap_err();
    assert!(refused.is_budget_exceeded(), "{refused}");
    assert_eq!(embedder.calls(), 0, "refused before the text was sent");
    // One batch of four texts from two users of two services.
    let callers = [
        ("search", "alice"),
        ("search", "bob"),
        ("chat", "alice"),
        ("chat", "bob"),
    ];
    let tasks: Vec<_> = callers
        .iter()
        .enumerate()
        .map(|(i, (service, user))| {
            let batcher = batcher.clone();
            let caller = Spender::new(*service, *user);
            let text = format!("{i} {}", "words ".repeat(100 * (i + 1)));
            tokio::spawn(async move { batcher.embed(&text, &caller).await.unwrap() })
        })
        .collect();
    let mut charged = 0;
    for task in tasks {
        charged += task.await.unwrap().tokens;
    }
    assert_eq!(embedder.calls(), 1);
    assert_eq!(
        charged,
        batcher.stats().tokens,
        "the shares sum to the call's tokens"
    );
    let report = meter.report(ReportPeriod::Day).await.unwrap();
    let tokens_of = |groups: &[pupkit::cost::GroupTotals], key: &str| {
        groups
            .iter()
            .find(|g| g.key == key)
            .map(|g| g.totals.input_tokens)
            .unwrap()
    };
    assert_eq!(
        tokens_of(&report.by_user, "alice") + tokens_of(&report.by_user, "bob"),
        charged
    );
    assert!(tokens_of(&report.by_service, "chat") > tokens_of(&report.by_service, "search"));
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_cache_outage_is_bypassed_and_still_serves() {
    use pupkit::redis::{RedisConfig, RedisConnection};
    // Nothing listens on this port: every cache call fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    redis.op_timeout = Duration::from_millis(200);
    let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("embeddings"))
        .redis(RedisConnection::lazy(&redis).unwrap())
        .build()
        .unwrap();
    let embedder = Counting::new(Duration::ZERO);
    let mut config = config(10);
    config.window = Duration::from_millis(10);
    let batcher = Batcher::builder(config)
        .embedder(embedder.clone())
        .cache(Arc::new(cache))
        .build()
        .unwrap();
    let texts: Vec<String> = (0..3).map(|i| format!("text {i}")).collect();
    for outcome in batcher.embed_many(&texts, &caller()).await {
        outcome.unwrap();
    }
    assert_eq!(
        embedder.calls(),
        1,
        "served through the API while the cache is down"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_caller_does_not_break_the_batch_and_a_full_queue_says_so() {
    let embedder = Counting::new(Duration::from_millis(100));
    let mut config = config(3);
    config.queue_capacity = 3;
    let batcher = Arc::new(
        Batcher::builder(config)
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    let spawn = |text: &'static str| {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.embed(text, &caller()).await })
    };
    let gone = spawn("a");
    let stays = spawn("b");
    let third = spawn("c");
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Three callers wait (the call is in flight): a fourth is turned away at once.
    let full = batcher.embed("d", &caller()).await.unwrap_err();
    assert!(error_chain(&full).contains("queue is full"), "{full:?}");
    assert_eq!(batcher.stats().rejected, 1);
    gone.abort();
    assert!(stays.await.unwrap().is_ok());
    assert!(third.await.unwrap().is_ok());
    assert_eq!(embedder.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_what_is_pending_and_refuses_new_texts() {
    let embedder = Counting::new(Duration::ZERO);
    let batcher = Arc::new(
        Batcher::builder(config(10))
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    let waiting = {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.embed("pending text", &caller()).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(embedder.calls(), 0);
    batcher.shutdown().await;
    assert!(
        waiting.await.unwrap().is_ok(),
        "the pending text was sent at shutdown"
    );
    assert_eq!(embedder.calls(), 1);
    let after = batcher.embed("late", &caller()).await.unwrap_err();
    assert!(after.to_string().contains("shut down"), "{after}");
}

/// An embedder that panics on every call.
#[derive(Debug)]
struct Panicking;

#[async_trait]
impl Embedder for Panicking {
    async fn embed(&self, _: &EmbedRequest) -> pupkit::Result<EmbedResponse> {
        panic!("embedder bug");
    }

    fn name(&self) -> &str {
        "panicking"
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_embedder_fails_its_callers_instead_of_hanging_them() {
    let batcher = Arc::new(
        Batcher::builder(config(2))
            .embedder(Arc::new(Panicking))
            .build()
            .unwrap(),
    );
    for round in 0..2 {
        let tasks: Vec<_> = ["one", "two"]
            .into_iter()
            .map(|text| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.embed(text, &caller()).await })
            })
            .collect();
        for task in tasks {
            let error = task.await.unwrap().unwrap_err();
            assert!(
                error_chain(&error).contains("panicked"),
                "round {round}: {error}"
            );
        }
    }
    // The callers were counted out: the queue is not left full of ghosts.
    assert_eq!(batcher.stats().rejected, 0);
}
