//! The embedding batcher against a local server that speaks the OpenAI embeddings API with
//! 50 ms of simulated latency, in one run:
//! - 1,000 texts from 1,000 concurrent callers through the batcher (batches of 10) vs one API
//!   call per text, both with at most 4 calls in flight; API calls counted by the server;
//! - an L0 cache hit through the batcher (p50) vs a raw `moka` get.
//!
//! `cargo bench --bench embeddings --features openai,axum`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use base64::Engine;
use pupkit::cache::{Tiered, TieredConfig};
use pupkit::cost::Spender;
use pupkit::embed::{
    Batcher, BatcherConfig, EmbedRequest, Embedder, EmbeddingBatcher, LocalEmbedder, OpenAiConfig,
    OpenAiEmbedder,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const TEXTS: usize = 1_000;
const LATENCY: Duration = Duration::from_millis(50);
const CALLS_IN_FLIGHT: usize = 4;

/// POST /embeddings as documented: base64 little-endian f32 vectors, `index`, `usage`.
async fn embeddings(calls: Arc<AtomicU64>, Json(body): Json<Value>) -> Json<Value> {
    calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(LATENCY).await;
    let local = LocalEmbedder::new(256);
    let inputs = body["input"].as_array().cloned().unwrap_or_default();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = local.vector(text.as_str().unwrap_or(""), 256);
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!({"object": "embedding", "index": index,
                   "embedding": base64::engine::general_purpose::STANDARD.encode(bytes)})
        })
        .collect();
    let tokens: usize = inputs
        .iter()
        .map(|t| t.as_str().unwrap_or("").len() / 4 + 1)
        .sum();
    Json(
        json!({"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

/// Starts the server; returns its base URL and its call counter.
fn serve(rt: &Runtime) -> (String, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/v1/embeddings",
        post(move |body| embeddings(counter.clone(), body)),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls)
}

fn client(url: &str) -> Arc<OpenAiEmbedder> {
    let mut config = OpenAiConfig::default();
    config.base_url = url.to_owned();
    config.api_key = Some("sk-bench".to_owned());
    Arc::new(OpenAiEmbedder::new(config).unwrap())
}

fn texts(round: usize) -> Vec<String> {
    (0..TEXTS)
        .map(|i| format!("round {round}: chat message {i} about the order status"))
        .collect()
}

fn batched_vs_one_call_per_text(rt: &Runtime, url: &str, calls: &AtomicU64) {
    let embedder = client(url);
    let mut config = BatcherConfig::default();
    config.max_concurrent_calls = CALLS_IN_FLIGHT;
    let batcher = Arc::new(
        Batcher::builder(config)
            .embedder(embedder.clone())
            .build()
            .unwrap(),
    );
    let before = calls.load(Ordering::Relaxed);
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = texts(1)
            .into_iter()
            .map(|text| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    batcher
                        .embed(&text, &Spender::new("bench", "u"))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let batched = started.elapsed();
    let batched_calls = calls.load(Ordering::Relaxed) - before;

    let before = calls.load(Ordering::Relaxed);
    let limit = Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = texts(2)
            .into_iter()
            .map(|text| {
                let embedder = embedder.clone();
                let limit = limit.clone();
                tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    embedder
                        .embed(&EmbedRequest::new("text-embedding-3-small", vec![text]))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let single = started.elapsed();
    let single_calls = calls.load(Ordering::Relaxed) - before;
    println!(
        "{TEXTS} texts, {CALLS_IN_FLIGHT} calls in flight, 50 ms per call: batched {batched:?} ({:.0} texts/s, {batched_calls} API calls) vs one call per text {single:?} ({:.0} texts/s, {single_calls} API calls): {:.1}x the throughput, {:.0}% fewer API calls",
        TEXTS as f64 / batched.as_secs_f64(),
        TEXTS as f64 / single.as_secs_f64(),
        single.as_secs_f64() / batched.as_secs_f64(),
        100.0 * (1.0 - batched_calls as f64 / single_calls as f64),
    );
}

fn cache_hit_latency(rt: &Runtime, url: &str) {
    let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("bench-embeddings"))
        .memory_tiers(64 << 20)
        .build()
        .unwrap();
    let batcher = Batcher::builder(BatcherConfig::default())
        .embedder(client(url))
        .cache(Arc::new(cache))
        .build()
        .unwrap();
    let caller = Spender::new("bench", "u");
    let text = "a text that is embedded once and then read from the cache";
    rt.block_on(batcher.embed(text, &caller)).unwrap();
    let raw: moka::sync::Cache<String, Arc<Vec<f32>>> = moka::sync::Cache::new(1_000);
    raw.insert(text.to_owned(), Arc::new(vec![0.0; 256]));
    let mut hits = Vec::with_capacity(10_000);
    let mut raws = Vec::with_capacity(10_000);
    rt.block_on(async {
        for _ in 0..10_000 {
            let started = Instant::now();
            let hit = batcher.embed(text, &caller).await.unwrap();
            hits.push(started.elapsed());
            assert!(hit.cached);
            let started = Instant::now();
            std::hint::black_box(raw.get(text));
            raws.push(started.elapsed());
        }
    });
    hits.sort();
    raws.sort();
    println!(
        "cache hit through the batcher (L0): p50 {:?}, p99 {:?}; raw moka get p50 {:?}; ratio p50 {:.2}x",
        hits[hits.len() / 2],
        hits[hits.len() * 99 / 100],
        raws[raws.len() / 2],
        hits[hits.len() / 2].as_secs_f64() / raws[raws.len() / 2].as_secs_f64()
    );
}

fn main() {
    let rt = Runtime::new().unwrap();
    // The batcher starts its task on the runtime it is built in.
    let _runtime = rt.enter();
    let (url, calls) = serve(&rt);
    batched_vs_one_call_per_text(&rt, &url, &calls);
    cache_hit_latency(&rt, &url);
}
