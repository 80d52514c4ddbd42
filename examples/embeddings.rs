//! Batched, deduplicated, cached embeddings with cost per caller.
//!
//! With the `openai` feature and `OPENAI_API_KEY` set (and `OPENAI_BASE_URL` for a compatible
//! server), it calls the API; otherwise it uses the local deterministic embedder (feature
//! hashing, not a language model).
//!
//! ```sh
//! cargo run --example embeddings
//! OPENAI_API_KEY=sk-... cargo run --example embeddings --features openai
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use pupkit::cache::{Tiered, TieredConfig};
use pupkit::cost::{CostMeter, Meter, ReportPeriod, Spender};
use pupkit::embed::{Batcher, BatcherConfig, Embedder, EmbeddingBatcher, LocalEmbedder};

fn embedder() -> pupkit::Result<Arc<dyn Embedder>> {
    #[cfg(feature = "openai")]
    if std::env::var("OPENAI_API_KEY").is_ok() {
        let config = pupkit::embed::OpenAiConfig::from_env();
        return Ok(Arc::new(pupkit::embed::OpenAiEmbedder::new(config)?));
    }
    Ok(Arc::new(LocalEmbedder::new(256)))
}

#[tokio::main]
async fn main() -> pupkit::Result<()> {
    let embedder = embedder()?;
    println!("embedder: {}", embedder.name());
    let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("embeddings"))
        .memory_tiers(64 << 20)
        .build()?;
    let meter = Arc::new(Meter::builder().build().await?);
    let mut config = BatcherConfig::default();
    config.window = Duration::from_millis(200); // the report's 5 s suits background work
    let batcher = Arc::new(
        Batcher::builder(config)
            .embedder(embedder)
            .cache(Arc::new(cache))
            .meter(meter.clone())
            .build()?,
    );

    // 40 concurrent callers from two users; a third of the texts repeat.
    let texts: Vec<String> = (0..40)
        .map(|i| format!("chat message number {} about the weather", i % 27))
        .collect();
    for round in ["first", "second"] {
        let started = Instant::now();
        let tasks: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let batcher = batcher.clone();
                let text = text.clone();
                let user = if i % 2 == 0 { "alice" } else { "bob" };
                tokio::spawn(async move { batcher.embed(&text, &Spender::new("chat", user)).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("embed task")?;
        }
        let stats = batcher.stats();
        println!(
            "{round} round: {} texts in {:?}; so far {} API calls, {} cache hits, {} merged duplicates",
            texts.len(),
            started.elapsed(),
            stats.api_calls,
            stats.cache_hits,
            stats.deduped
        );
    }
    let report = meter.report(ReportPeriod::Day).await?;
    println!(
        "cost {} for {} tokens; saved {} by the cache and dedup",
        report.totals.cost, report.totals.input_tokens, report.savings
    );
    for user in &report.by_user {
        println!(
            "  {:<6} {} tokens, {}",
            user.key, user.totals.input_tokens, user.totals.cost
        );
    }
    batcher.shutdown().await;
    Ok(())
}
